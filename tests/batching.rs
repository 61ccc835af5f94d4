//! MIMECAST_BATCH_MAX: items of different jobs share calls, and each job still
//! gets exactly the result it would have had alone.

mod common;

use std::collections::HashSet;

use account_worker::job::JobStatus;
use account_worker::mock_vendor::{Fault, Vendor};
use common::TestApp;
use serde_json::json;

async fn batching_app(name: &str) -> TestApp {
    TestApp::spawn_with(name, |env| {
        env.insert("MIMECAST_BATCH_MAX".into(), "10".into());
        env.insert("MIMECAST_BATCH_LINGER".into(), "100ms".into());
        env.insert("WORKER_CONCURRENCY".into(), "32".into());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_of_different_jobs_share_calls_and_each_job_gets_its_own_result() {
    let mut app = batching_app("batch_routing").await;
    let jobs = 30;
    let code = |i: usize| {
        if i.is_multiple_of(5) {
            format!("MISSING-B{i}")
        } else {
            format!("B{i}")
        }
    };
    for i in 0..jobs {
        app.queues
            .publish(&json!({"jobId": format!("b-{i}"), "vendor": "mimecast", "data": [{"accountCode": code(i), "numberOfUsers": i}]}))
            .await;
    }
    let results = app.queues.results_by_job(jobs).await;
    for i in 0..jobs {
        let result = &results[&format!("b-{i}")];
        if i.is_multiple_of(5) {
            assert_eq!(result.status, JobStatus::Failed, "b-{i}");
            assert_eq!(result.fail[0].key["accountCode"], code(i));
            assert_eq!(result.fail[0].errors[0].code, "err_account_not_found");
        } else {
            assert_eq!(result.status, JobStatus::Succeeded, "b-{i}");
            assert_eq!(result.data.len(), 1);
            assert_eq!(result.data[0]["accountCode"], code(i));
            assert_eq!(result.data[0]["userCount"], i);
        }
    }
    let requests = app.mock.requests();
    assert!(
        requests.len() < jobs,
        "{} calls for {jobs} jobs: nothing was coalesced",
        requests.len()
    );
    assert!(requests
        .iter()
        .all(|r| r.body["data"].as_array().unwrap().len() <= 10));
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_coalesced_call_affects_only_its_own_items() {
    let mut app = batching_app("batch_failure").await;
    app.mock
        .push_fault(Vendor::Mimecast, Fault::FailAfterApply { status: 500 });
    let jobs = 20;
    for i in 0..jobs {
        app.queues
            .publish(&json!({"jobId": format!("bf-{i}"), "vendor": "mimecast", "data": [{"accountCode": format!("BF{i}"), "numberOfUsers": 1}]}))
            .await;
    }
    let results = app.queues.results_by_job(jobs).await;
    let requests = app.mock.requests();
    let in_failed_call: HashSet<String> = requests[0].body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["accountCode"].as_str().unwrap().to_owned())
        .collect();
    for i in 0..jobs {
        let account = format!("BF{i}");
        let result = &results[&format!("bf-{i}")];
        if in_failed_call.contains(&account) {
            assert_eq!(
                result.fail[0].errors[0].code, "err_outcome_unknown",
                "{account}"
            );
        } else {
            assert_eq!(result.status, JobStatus::Succeeded, "{account}");
        }
        assert_eq!(
            app.mock.mimecast_account(&account).unwrap().user_count,
            1,
            "{account} applied once"
        );
    }
    app.finish().await;
}
