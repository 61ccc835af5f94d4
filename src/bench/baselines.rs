//! The two reference consumers the worker is measured against, run as child
//! processes exactly like the worker:
//!
//! - **naive**: one job at a time, prefetch 1, a fresh HTTP connection per call,
//!   as the vendor's sample code would be if wrapped in a consume loop;
//! - **pass-through**: acks and publishes a result without calling any vendor, with
//!   the worker's prefetch, durable queues and confirms: the broker ceiling.

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use secrecy::ExposeSecret;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::broker::{self, BrokerError, Publisher};
use crate::config::Settings;
use crate::vendor::mimecast::UPDATE_ACCOUNT_PATH;
use crate::vendor::signing;

/// Which reference consumer to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Baseline {
    /// One job at a time, new connection per vendor call.
    Naive,
    /// No vendor call at all: the broker's ceiling.
    Passthrough,
}

/// Consumes `JOBS_QUEUE` until `stop` is cancelled.
pub async fn run(
    settings: &Settings,
    baseline: Baseline,
    stop: CancellationToken,
) -> Result<(), BrokerError> {
    let queues = &settings.broker.jobs_queue;
    let connection = broker::connect(&settings.broker.amqp_url, "account-worker baseline").await?;
    broker::declare(&connection, queues).await?;
    let publisher = Publisher::open(&connection, queues.clone()).await?;
    let channel = connection.create_channel().await?;
    let prefetch = match baseline {
        Baseline::Naive => 1,
        Baseline::Passthrough => {
            u16::try_from(settings.broker.concurrency.get()).unwrap_or(u16::MAX)
        }
    };
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queues.jobs.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    loop {
        let delivery = tokio::select! {
            next = consumer.next() => match next {
                Some(delivery) => delivery?,
                None => break,
            },
            _ = stop.cancelled() => break,
        };
        match baseline {
            Baseline::Naive => {
                let result = naive_call(settings, &delivery.data).await;
                respond(&publisher, &queues.results, &delivery.data, result).await?;
                delivery.acker.ack(BasicAckOptions::default()).await?;
            }
            Baseline::Passthrough => {
                let publisher = publisher.clone();
                let results = queues.results.clone();
                tokio::spawn(async move {
                    if respond(
                        &publisher,
                        &results,
                        &delivery.data,
                        json!({"status": "succeeded"}),
                    )
                    .await
                    .is_ok()
                    {
                        let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                    }
                });
            }
        }
    }
    let _ = connection.close(200, "baseline done".into()).await;
    Ok(())
}

async fn respond(
    publisher: &Publisher,
    results: &str,
    job: &[u8],
    mut result: Value,
) -> Result<(), BrokerError> {
    let job: Value = serde_json::from_slice(job).unwrap_or(Value::Null);
    let job_id = job
        .get("jobId")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    result["jobId"] = Value::String(job_id.clone());
    let body = serde_json::to_vec(&result).unwrap_or_default();
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_correlation_id(job_id.as_str().into())
        .with_delivery_mode(2);
    publisher.publish(results, &body, properties).await
}

/// The sample code's call: a new client (and connection) per request.
async fn naive_call(settings: &Settings, job: &[u8]) -> Value {
    let Some(mimecast) = &settings.mimecast else {
        return json!({"status": "failed"});
    };
    let job: Value = serde_json::from_slice(job).unwrap_or(Value::Null);
    let date = signing::mimecast_date(chrono::Utc::now());
    let request_id = uuid::Uuid::new_v4().to_string();
    let signature = signing::mimecast_signature(
        mimecast.secret_key.expose_secret(),
        &date,
        &request_id,
        UPDATE_ACCOUNT_PATH,
        mimecast.app_key.expose_secret(),
    );
    let url = format!(
        "{}{UPDATE_ACCOUNT_PATH}",
        mimecast.base_url.as_str().trim_end_matches('/')
    );
    let response = reqwest::Client::new()
        .post(url)
        .header(
            "Authorization",
            signing::mimecast_authorization(mimecast.access_key.expose_secret(), &signature),
        )
        .header("x-mc-date", date)
        .header("x-mc-req-id", request_id)
        .header("x-mc-app-id", &mimecast.app_id)
        .json(&json!({"data": job.get("data").cloned().unwrap_or(Value::Null)}))
        .send()
        .await;
    match response {
        Ok(response) => {
            json!({"status": "succeeded", "meta": {"status": response.status().as_u16()}})
        }
        Err(_) => json!({"status": "failed"}),
    }
}
