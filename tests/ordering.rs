//! Jobs for one account take effect in the order they were queued, while jobs
//! for other accounts run alongside.

mod common;

use account_worker::job::JobStatus;
use common::TestApp;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_for_one_account_reach_the_vendor_in_queue_order() {
    let mut app = TestApp::spawn_with("ordering", |env| {
        env.insert("WORKER_CONCURRENCY".into(), "16".into());
    })
    .await;
    // A little latency so that, unordered, later jobs would overtake earlier ones.
    app.mock.set_latency(std::time::Duration::from_millis(5));
    let rounds = 12;
    for i in 0..rounds {
        app.queues
            .publish(
                &json!({"jobId": format!("o-{i}"), "vendor": "mimecast", "data": [
                    {"accountCode": "ORDERED", "products": [i], "accountName": format!("v{i}")}
                ]}),
            )
            .await;
        app.queues
            .publish(
                &json!({"jobId": format!("x-{i}"), "vendor": "mimecast", "data": [
                    {"accountCode": format!("FREE{i}"), "products": [i]}
                ]}),
            )
            .await;
    }
    let results = app.queues.results_by_job(2 * rounds).await;
    assert!(results.values().all(|r| r.status == JobStatus::Succeeded));

    let seen: Vec<i64> = app
        .mock
        .requests()
        .iter()
        .filter(|r| r.body["data"][0]["accountCode"] == "ORDERED")
        .map(|r| r.body["data"][0]["products"][0].as_i64().unwrap())
        .collect();
    assert_eq!(
        seen,
        (0..rounds as i64).collect::<Vec<_>>(),
        "calls for one account keep queue order"
    );
    let account = app.mock.mimecast_account("ORDERED").unwrap();
    assert_eq!(
        account.products,
        vec![rounds as i64 - 1],
        "the last job's products win"
    );
    assert_eq!(
        account.account_name.as_deref(),
        Some(format!("v{}", rounds - 1).as_str())
    );
    app.finish().await;
}
