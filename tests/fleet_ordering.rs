//! Per-account order across a fleet: a consistent-hash exchange routes each
//! account to one shard queue, each worker consumes its shards, and every
//! account's jobs reach the vendor in the order they were published.

mod common;

use std::collections::HashMap;

use account_worker::job::JobStatus;
use account_worker::mock_vendor::{MockVendor, MockVendorConfig};
use common::{Queues, EVENT_TIMEOUT};
use lapin::options::{
    BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_on_account_shards_keep_every_accounts_order() {
    let mock = MockVendor::start("127.0.0.1:0".parse().unwrap(), MockVendorConfig::demo())
        .await
        .unwrap();
    mock.set_latency(std::time::Duration::from_millis(3));
    let base = common::unique_queue("shards");
    let mut queues = Queues::open(&base).await;
    let exchange = format!("{base}.by-account");
    let shards = [format!("{base}.shard0"), format!("{base}.shard1")];
    let channel = queues.channel.clone();
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Custom("x-consistent-hash".into()),
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the consistent-hash exchange plugin is enabled (scripts/ensure-services)");
    for shard in &shards {
        let mut single_active = FieldTable::default();
        single_active.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        channel
            .queue_declare(
                shard.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                single_active,
            )
            .await
            .unwrap();
        // The routing key of a binding is the shard's weight.
        channel
            .queue_bind(
                shard.as_str().into(),
                exchange.as_str().into(),
                "1".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }

    let ledgers = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut workers = Vec::new();
    for (shard, ledger) in shards.iter().zip(&ledgers) {
        let mut env = common::worker_env(&base, &mock, ledger.path());
        env.insert("CONSUME_QUEUES".into(), shard.clone());
        env.insert("WORKER_CONCURRENCY".into(), "16".into());
        workers.push(common::start_worker(&env).await);
    }

    let accounts = 8;
    let rounds = 10;
    for round in 0..rounds {
        for account in 0..accounts {
            let job = json!({"jobId": format!("sh-{account}-{round}"), "vendor": "mimecast", "data": [
                {"accountCode": format!("SH{account}"), "products": [round]}
            ]});
            let confirm = channel
                .basic_publish(
                    exchange.as_str().into(),
                    // Producers route by account, so one account always lands on one shard.
                    format!("SH{account}").as_str().into(),
                    BasicPublishOptions::default(),
                    &serde_json::to_vec(&job).unwrap(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            assert!(confirm.is_ack());
        }
    }
    let results = tokio::time::timeout(EVENT_TIMEOUT, queues.results_by_job(accounts * rounds))
        .await
        .unwrap();
    assert!(results.values().all(|r| r.status == JobStatus::Succeeded));

    let mut seen: HashMap<String, Vec<i64>> = HashMap::new();
    for request in mock.requests() {
        let item = &request.body["data"][0];
        seen.entry(item["accountCode"].as_str().unwrap().to_owned())
            .or_default()
            .push(item["products"][0].as_i64().unwrap());
    }
    for account in 0..accounts {
        assert_eq!(
            seen[&format!("SH{account}")],
            (0..rounds as i64).collect::<Vec<_>>(),
            "SH{account}"
        );
    }
    for (stop, task) in workers {
        stop.cancel();
        let _ = task.await;
    }
    for shard in &shards {
        let _ = channel
            .queue_delete(shard.as_str().into(), Default::default())
            .await;
    }
    let _ = channel
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
    queues.delete().await;
}
