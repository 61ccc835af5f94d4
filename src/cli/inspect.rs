//! `account-worker results` and `account-worker dlq list`: read the output queues.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;

use crate::broker::{self, header_text as header, BrokerError};
use crate::config::Settings;
use crate::job::JobResult;

/// Takes up to `count` results off the results queue (acking each) and prints them;
/// stops early when none arrives for `idle`. Returns how many were read.
pub async fn results(
    settings: &Settings,
    count: usize,
    idle: Duration,
    json: bool,
) -> Result<usize, BrokerError> {
    let broker_settings = &settings.broker;
    let connection = broker::connect(&broker_settings.amqp_url, "account-worker results").await?;
    broker::declare(&connection, &broker_settings.jobs_queue).await?;
    let channel = connection.create_channel().await?;
    channel.basic_qos(100, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            broker_settings.jobs_queue.results.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut read = 0;
    while read < count {
        let Ok(Some(delivery)) = tokio::time::timeout(idle, consumer.next()).await else {
            break;
        };
        let delivery = delivery?;
        if json {
            println!("{}", String::from_utf8_lossy(&delivery.data));
        } else {
            match serde_json::from_slice::<JobResult>(&delivery.data) {
                Ok(result) => print_result(&result),
                Err(_) => println!(
                    "(unreadable result) {}",
                    String::from_utf8_lossy(&delivery.data)
                ),
            }
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
        read += 1;
    }
    let _ = connection.close(200, "results read".into()).await;
    Ok(read)
}

fn print_result(result: &JobResult) {
    println!(
        "{:<24} {:<8} {:<9} succeeded={} failed={} attempts={} (HTTP {})",
        result.job_id,
        result.vendor,
        result.status.as_str(),
        result.data.len(),
        result.fail.len(),
        result.attempts,
        result.meta.status
    );
    for data in &result.data {
        println!("    ok   {}", summary_of(data));
    }
    for failure in &result.fail {
        for error in &failure.errors {
            println!(
                "    fail {}: {} ({})",
                failure.key, error.code, error.message
            );
        }
    }
}

/// The fields an operator checks first in a vendor's data element.
fn summary_of(data: &serde_json::Value) -> String {
    let fields = [
        "accountCode",
        "userCount",
        "packages",
        "name",
        "email",
        "accountResource",
        "state",
        "result",
    ];
    let shown: Vec<String> = fields
        .iter()
        .filter_map(|field| data.get(*field).map(|value| format!("{field}={value}")))
        .collect();
    match shown.is_empty() {
        true => data.to_string(),
        false => shown.join(" "),
    }
}

/// Prints up to `limit` dead letters with their headers, leaving them in the queue.
/// Returns how many were shown.
pub async fn dlq_list(settings: &Settings, limit: usize) -> Result<usize, BrokerError> {
    let broker_settings = &settings.broker;
    let connection = broker::connect(&broker_settings.amqp_url, "account-worker dlq").await?;
    broker::declare(&connection, &broker_settings.jobs_queue).await?;
    let channel = connection.create_channel().await?;
    let mut shown = 0;
    // Messages got without ack stay unacked until handed back at the end, so each
    // is seen once here and all return to their place untouched afterwards.
    let mut held = Vec::new();
    while shown < limit {
        let Some(message) = channel
            .basic_get(
                broker_settings.jobs_queue.dead.as_str().into(),
                BasicGetOptions::default(),
            )
            .await?
        else {
            break;
        };
        let headers = message
            .delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default();
        println!(
            "{:<24} {:<28} attempts={} {}",
            header(&headers, "x-job-id").unwrap_or_else(|| "(no jobId)".to_owned()),
            header(&headers, "x-error-code").unwrap_or_default(),
            header(&headers, "x-attempts").unwrap_or_default(),
            header(&headers, "x-error-message").unwrap_or_default(),
        );
        println!(
            "    body: {}",
            String::from_utf8_lossy(&message.delivery.data)
        );
        held.push(message.delivery.acker);
        shown += 1;
    }
    // An explicit nack, not only the channel close: RabbitMQ 4.3+ quorum queues then
    // leave the delivery count alone, so listing does not spend a delivery limit.
    let requeue = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    for acker in held {
        let _ = acker.nack(requeue).await;
    }
    let _ = channel.close(200, "listed".into()).await;
    let _ = connection.close(200, "listed".into()).await;
    Ok(shown)
}
