//! `WORKER_CONCURRENCY` bounds the jobs at the vendor at once, while the broker
//! keeps more deliveries ready (the prefetch) so a freed slot never waits for one.

mod common;

use std::time::Duration;

use account_worker::job::JobStatus;
use common::TestApp;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_more_vendor_calls_run_at_once_than_the_configured_concurrency() {
    let concurrency = 4;
    let mut app = TestApp::spawn_with("concurrency", |env| {
        env.insert("WORKER_CONCURRENCY".into(), concurrency.to_string());
    })
    .await;
    // Calls long enough that every free slot is taken while others are out,
    // even when each publish waits tens of milliseconds for its confirm.
    app.mock.set_latency(Duration::from_millis(500));
    app.mock.reset();
    let jobs = 4 * concurrency;
    for i in 0..jobs {
        app.queues
            .publish(
                &json!({"jobId": format!("c-{i}"), "vendor": "mimecast", "data": [
                    {"accountCode": format!("CONC{i}"), "numberOfUsers": 1}
                ]}),
            )
            .await;
    }
    let results = app.queues.results_by_job(jobs).await;
    assert!(results.values().all(|r| r.status == JobStatus::Succeeded));
    assert_eq!(
        app.mock.peak_concurrent_requests(),
        concurrency,
        "the vendor saw exactly WORKER_CONCURRENCY calls at once, never more"
    );
    app.finish().await;
}
