//! Broker connections closed twice and a broker restart during a run of 300 jobs.
//! This binary closes every connection of the broker, so it holds a single test.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use account_worker::job::{JobResult, JobStatus};
use account_worker::mock_vendor::Vendor;
use common::{Queues, TestApp, EVENT_TIMEOUT};
use serde_json::json;

fn rabbitmqctl(args: &[&str]) {
    let status = std::process::Command::new("rabbitmqctl")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("rabbitmqctl runs (scripts/ensure-services installs RabbitMQ)");
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_finishes_once_through_dropped_connections_and_a_broker_restart() {
    let jobs = 300;
    let app = TestApp::spawn_with("broker_outage", |env| {
        env.insert("WORKER_CONCURRENCY".into(), "16".into());
    })
    .await;
    app.mock.set_latency(Duration::from_millis(20));
    for i in 0..jobs {
        app.queues
            .publish(&json!({"jobId": format!("bo-{i}"), "vendor": "mimecast", "data": [{"accountCode": format!("BO{i}"), "numberOfUsers": 1}]}))
            .await;
    }
    for (seen, action) in [(40, "close"), (120, "close"), (200, "restart")] {
        tokio::time::timeout(EVENT_TIMEOUT, app.mock.wait_for_requests(seen))
            .await
            .expect("the worker keeps calling the vendor");
        match action {
            "close" => rabbitmqctl(&["close_all_connections", "test: connection lost"]),
            _ => {
                rabbitmqctl(&["stop_app"]);
                rabbitmqctl(&["start_app"]);
                rabbitmqctl(&["await_startup"]);
            }
        }
    }

    // The test's own connection died with the others: read results on a new one.
    let mut queues = Queues::open(&app.queues.names.jobs).await;
    let mut results: HashMap<String, JobResult> = HashMap::new();
    while results.len() < jobs {
        let result = queues.next_result().await;
        if let Some(earlier) = results.get(&result.job_id) {
            assert_eq!(
                earlier, &result,
                "a result published twice has the same content"
            );
        }
        results.insert(result.job_id.clone(), result);
    }
    for i in 0..jobs {
        let result = &results[&format!("bo-{i}")];
        let applied = app.mock.applied_count(Vendor::Mimecast, &format!("BO{i}"));
        assert!(applied <= 1, "bo-{i} applied {applied} times");
        match result.status {
            JobStatus::Succeeded => assert_eq!(applied, 1, "bo-{i}"),
            _ => assert_eq!(
                result.fail[0].errors[0].code, "err_outcome_unknown",
                "bo-{i}: {result:?}"
            ),
        }
    }
    let reconnects = app.worker.health().reconnects();
    assert!(reconnects >= 2, "{reconnects} reconnects");
    queues.delete().await;
    app.finish().await;
}
