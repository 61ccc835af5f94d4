//! A vendor outage longer than the broker's consumer timeout: RabbitMQ closes
//! a channel whose delivery stays unacked past `consumer_timeout`, taking every
//! job in flight on it. Held deliveries go back to the queue before that.
//!
//! The test lowers the broker's timeout for the whole node, so it is the only
//! test of its binary (cargo runs test binaries one after another) and puts
//! the node's settings back when it ends, however it ends.

mod common;

use std::time::Duration;

use account_worker::job::{JobStatus, VendorKind};
use account_worker::mock_vendor::Vendor;
use common::TestApp;
use serde_json::json;

/// The node settings this test lowers, with the values it sets: a 5-s
/// consumer timeout, checked every second (the default check runs once a minute).
const LOWERED: [(&str, u64); 2] = [
    ("consumer_timeout", 5_000),
    ("channel_tick_interval", 1_000),
];

/// How long Mimecast refuses every call: three of the lowered timeouts, each
/// of which would close a channel holding a delivery through it.
const OUTAGE: Duration = Duration::from_secs(16);

/// Runs an Erlang expression on the local RabbitMQ node; its printed answer.
fn rabbit_eval(expression: &str) -> String {
    let output = std::process::Command::new("rabbitmqctl")
        .args(["eval", expression])
        .output()
        .expect("rabbitmqctl runs (scripts/ensure-services installs RabbitMQ)");
    assert!(
        output.status.success(),
        "rabbitmqctl eval {expression}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// The node's settings as they were, put back on drop (a failing test included).
struct LoweredTimeout {
    previous: Vec<(&'static str, String)>,
}

impl LoweredTimeout {
    fn apply() -> Self {
        let previous = LOWERED
            .iter()
            .map(|(key, _)| {
                (
                    *key,
                    rabbit_eval(&format!("application:get_env(rabbit, {key}).")),
                )
            })
            .collect();
        for (key, value) in LOWERED {
            rabbit_eval(&format!("application:set_env(rabbit, {key}, {value})."));
        }
        Self { previous }
    }
}

impl Drop for LoweredTimeout {
    fn drop(&mut self) {
        for (key, was) in &self.previous {
            // `{ok,1800000}` when it was set, `undefined` when it was not.
            let restore = match was.strip_prefix("{ok,").and_then(|v| v.strip_suffix('}')) {
                Some(value) => format!("application:set_env(rabbit, {key}, {value})."),
                None => format!("application:unset_env(rabbit, {key})."),
            };
            rabbit_eval(&restore);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_three_consumer_timeouts_long_closes_no_channel_and_loses_no_job() {
    let _lowered = LoweredTimeout::apply();
    // Opened after the change: the channels take the lowered timeout.
    let mut app = TestApp::spawn_with("consumer_timeout", |env| {
        env.insert("WORKER_CONCURRENCY".into(), "2".into());
        env.insert("HELD_DELIVERY_MAX".into(), "2s".into());
    })
    .await;
    // Mimecast refuses every call until the test ends the outage.
    app.refuse_calls(Vendor::Mimecast, 401, 40);
    let outage_started = tokio::time::Instant::now();
    let mimecast = 8;
    for i in 0..mimecast {
        app.queues
            .publish(&json!({"jobId": format!("ct-m{i}"), "vendor": "mimecast", "data": [{"accountCode": format!("CTM{i}"), "numberOfUsers": i + 1}]}))
            .await;
    }
    app.wait_held(VendorKind::Mimecast).await;
    let circuit = app.worker.circuits().get(VendorKind::Mimecast);
    let pncp = 6;
    for i in 0..pncp {
        app.queues
            .publish(&json!({"jobId": format!("ct-p{i}"), "vendor": "pncp", "data": [{"accountId": format!("{}", 900 + i), "name": "Timely", "email": "ops@example.com"}]}))
            .await;
    }

    // The other vendor's jobs finish during the outage.
    let flowing = app.queues.results_by_job(pncp).await;
    assert!(
        flowing.keys().all(|job| job.starts_with("ct-p")),
        "{flowing:?}"
    );
    assert!(!circuit.is_closed(), "Mimecast is still held");
    // The outage lasts three of the lowered timeouts, then ends.
    tokio::time::sleep_until(outage_started + OUTAGE).await;
    app.mock.reset();
    let mut results = app.queues.results_by_job(mimecast).await;
    results.extend(flowing);
    for (job, result) in &results {
        assert_eq!(
            result.status,
            JobStatus::Succeeded,
            "{job}: {:?}",
            result.fail
        );
    }
    for i in 0..mimecast {
        let account = format!("CTM{i}");
        assert_eq!(
            app.mock.mimecast_account(&account).map(|a| a.user_count),
            Some(i as i64 + 1),
            "{account} got its users once"
        );
    }
    assert_eq!(
        app.worker.health().reconnects(),
        0,
        "the broker closed no channel for a delivery held too long"
    );
    assert_eq!(app.queues.depth(&app.queues.names.dead).await, 0);
    app.finish().await;
}
