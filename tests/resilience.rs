//! Retries, unknown outcomes, duplicates, throttling and vendor-wide faults,
//! injected at the mock vendor, with the real broker in between.

mod common;

use account_worker::job::{JobResult, JobStatus};
use account_worker::mock_vendor::{Fault, Vendor};
use common::{TestApp, EVENT_TIMEOUT};
use serde_json::json;

fn error_code(result: &JobResult, account: &str) -> Option<String> {
    result
        .fail
        .iter()
        .find(|f| f.key["accountCode"] == account)
        .map(|f| f.errors[0].code.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_item_failures_are_resent_and_succeed() {
    let mut app = TestApp::spawn("retryable").await;
    app.mock.push_fault(Vendor::Mimecast, Fault::RetryableFail);
    app.queues
        .publish(&json!({"jobId": "r-1", "vendor": "mimecast", "data": [
            {"accountCode": "RA", "numberOfUsers": 7},
            {"accountCode": "RB", "products": [1]}
        ]}))
        .await;
    let result = app.queues.next_result().await;
    assert_eq!(result.status, JobStatus::Succeeded);
    assert_eq!(result.attempts, 2);
    assert_eq!(app.mock.requests().len(), 2);
    // The vendor said the first call applied nothing, so the count lands once.
    assert_eq!(app.mock.mimecast_account("RA").unwrap().user_count, 7);
    assert_eq!(app.mock.applied_count(Vendor::Mimecast, "RA"), 1);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_error_resends_only_idempotent_items_and_reports_the_additive_one_unknown() {
    let mut app = TestApp::spawn("unknown_5xx").await;
    app.mock
        .push_fault(Vendor::Mimecast, Fault::FailAfterApply { status: 500 });
    app.queues
        .publish(&json!({"jobId": "u-1", "vendor": "mimecast", "data": [
            {"accountCode": "UA", "numberOfUsers": 5},
            {"accountCode": "UB", "products": [9702]}
        ]}))
        .await;
    let result = app.queues.next_result().await;
    assert_eq!(result.status, JobStatus::Partial);
    assert_eq!(
        error_code(&result, "UA").as_deref(),
        Some("err_outcome_unknown")
    );
    assert_eq!(result.data.len(), 1);
    assert_eq!(result.data[0]["accountCode"], "UB");

    let requests = app.mock.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(
        requests[1].body["data"],
        json!([{"accountCode": "UB", "products": [9702]}]),
        "only the idempotent item is sent again"
    );
    // Applied once by the failing call, never twice.
    assert_eq!(app.mock.mimecast_account("UA").unwrap().user_count, 5);
    assert_eq!(app.mock.applied_count(Vendor::Mimecast, "UA"), 1);

    let dead = app.queues.next_dead_letter().await;
    assert_eq!(dead.code, "err_outcome_unknown");
    assert_eq!(
        dead.json()["data"],
        json!([{"accountCode": "UA", "numberOfUsers": 5}])
    );
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_after_applying_never_applies_the_count_twice() {
    let mut app = TestApp::spawn("drop_after").await;
    app.mock.push_fault(Vendor::Mimecast, Fault::DropAfterApply);
    app.queues
        .publish(&json!({"jobId": "d-1", "vendor": "mimecast", "data": [{"accountCode": "DA", "numberOfUsers": 10}]}))
        .await;
    let result = app.queues.next_result().await;
    assert_eq!(result.status, JobStatus::Failed);
    assert_eq!(
        error_code(&result, "DA").as_deref(),
        Some("err_outcome_unknown")
    );
    assert_eq!(
        app.mock.requests().len(),
        1,
        "an additive item is not resent"
    );
    assert_eq!(app.mock.mimecast_account("DA").unwrap().user_count, 10);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_before_applying_is_resent_for_idempotent_items() {
    let mut app = TestApp::spawn("drop_before").await;
    app.mock.push_fault(Vendor::Mimecast, Fault::Drop);
    app.queues
        .publish(&json!({"jobId": "d-2", "vendor": "mimecast", "data": [{"accountCode": "DB", "accountName": "New name"}]}))
        .await;
    let result = app.queues.next_result().await;
    assert_eq!(result.status, JobStatus::Succeeded);
    assert_eq!(result.attempts, 2);
    assert_eq!(
        app.mock
            .mimecast_account("DB")
            .unwrap()
            .account_name
            .as_deref(),
        Some("New name")
    );
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_vendor_errors_are_not_retried() {
    let mut app = TestApp::spawn("permanent").await;
    app.mock
        .push_fault(Vendor::Mimecast, Fault::Status { status: 400 });
    app.queues
        .publish(&json!({"jobId": "p-1", "vendor": "mimecast", "data": [{"accountCode": "PA", "numberOfUsers": 1}]}))
        .await;
    let result = app.queues.next_result().await;
    assert_eq!(result.status, JobStatus::Failed);
    assert_eq!(result.fail[0].errors[0].code, "err_http_400");
    assert!(!result.fail[0].errors[0].retryable);
    assert_eq!(app.mock.requests().len(), 1);
    let dead = app.queues.next_dead_letter().await;
    assert_eq!(dead.code, "err_http_400");
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_at_the_attempt_limit_and_the_item_is_dead_lettered() {
    // Two attempts, spent before three failing rounds could hold the vendor:
    // once it is held, probes spend no job's attempts, and the job waits out the
    // outage instead (tests/outages.rs).
    let mut app = TestApp::spawn_with("exhausted", |env| {
        env.insert("RETRY_MAX_ATTEMPTS".into(), "2".into());
    })
    .await;
    for _ in 0..2 {
        app.mock
            .push_fault(Vendor::Mimecast, Fault::Status { status: 503 });
    }
    app.queues
        .publish(&json!({"jobId": "e-1", "vendor": "mimecast", "data": [{"accountCode": "EA", "products": [1, 2]}]}))
        .await;
    let result = app.queues.next_result().await;
    assert_eq!(result.status, JobStatus::Failed);
    assert_eq!(result.attempts, 2);
    assert_eq!(result.fail[0].errors[0].code, "err_retries_exhausted");
    assert_eq!(app.mock.requests().len(), 2);
    let dead = app.queues.next_dead_letter().await;
    assert_eq!(dead.code, "err_retries_exhausted");
    assert_eq!(dead.attempts.as_deref(), Some("2"));
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_call_waits_for_the_reset_and_succeeds() {
    let mut app = TestApp::spawn("throttled").await;
    app.mock
        .push_fault(Vendor::Mimecast, Fault::RateLimited { reset_ms: 200 });
    app.queues
        .publish(&json!({"jobId": "t-1", "vendor": "mimecast", "data": [{"accountCode": "TA", "numberOfUsers": 3}]}))
        .await;
    let result = app.queues.next_result().await;
    assert_eq!(result.status, JobStatus::Succeeded);
    let requests = app.mock.requests();
    assert_eq!(requests.len(), 2);
    assert!(
        requests[1].at_ms >= requests[0].at_ms + 200,
        "the retry went before the vendor's reset"
    );
    assert_eq!(app.mock.mimecast_account("TA").unwrap().user_count, 3);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vendor_throttling_at_ten_per_second_sees_fewer_429s_than_jobs() {
    let mut app = TestApp::spawn_with("throttle_storm", |env| {
        env.insert("WORKER_CONCURRENCY".into(), "16".into());
        env.insert("RETRY_MAX_ATTEMPTS".into(), "20".into());
    })
    .await;
    app.mock.set_throttle(Vendor::Mimecast, Some(10));
    let jobs = 40;
    for i in 0..jobs {
        app.queues
            .publish(&json!({"jobId": format!("ts-{i}"), "vendor": "mimecast", "data": [{"accountCode": format!("TS{i}"), "numberOfUsers": 1}]}))
            .await;
    }
    let results = app.queues.results_by_job(jobs).await;
    assert!(results.values().all(|r| r.status == JobStatus::Succeeded));
    let throttled = app
        .mock
        .requests()
        .iter()
        .filter(|r| r.status == 429)
        .count();
    assert!(throttled < jobs, "{throttled} 429s for {jobs} jobs");
    for i in 0..jobs {
        assert_eq!(
            app.mock
                .mimecast_account(&format!("TS{i}"))
                .unwrap()
                .user_count,
            1
        );
    }
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_job_published_four_times_applies_its_change_once() {
    let mut app = TestApp::spawn("duplicates").await;
    let job = json!({"jobId": "dup-1", "vendor": "mimecast", "data": [
        {"accountCode": "DUP", "numberOfUsers": 25},
        {"accountCode": "MISSING-DUP", "numberOfUsers": 1}
    ]});
    for _ in 0..4 {
        app.queues.publish(&job).await;
    }
    let mut results = Vec::new();
    for _ in 0..4 {
        results.push(app.queues.next_result().await);
    }
    assert!(
        results.iter().all(|r| r == &results[0]),
        "every copy republishes the same result"
    );
    assert_eq!(results[0].status, JobStatus::Partial);
    assert_eq!(app.mock.mimecast_account("DUP").unwrap().user_count, 25);
    assert_eq!(app.mock.applied_count(Vendor::Mimecast, "DUP"), 1);
    assert_eq!(app.mock.requests().len(), 1);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_hold_the_jobs_and_resume_when_the_vendor_answers() {
    let mut app = TestApp::spawn("vendor_wide").await;
    // The vendor refuses every call until the test lets it answer: with only a
    // few refusals queued, the circuit could open and close again before the
    // test looks at it.
    for _ in 0..1000 {
        app.mock
            .push_fault(Vendor::Mimecast, Fault::Status { status: 401 });
    }
    for i in 0..5 {
        app.queues
            .publish(&json!({"jobId": format!("vw-{i}"), "vendor": "mimecast", "data": [{"accountCode": format!("VW{i}"), "numberOfUsers": 2}]}))
            .await;
    }
    let circuit = app
        .worker
        .circuits()
        .get(account_worker::job::VendorKind::Mimecast);
    tokio::time::timeout(EVENT_TIMEOUT, circuit.wait_open())
        .await
        .expect("the circuit opens on 401");
    assert!(
        app.worker.health().readiness().is_err(),
        "not ready while holding jobs"
    );
    assert_eq!(app.queues.depth(&app.queues.names.dead).await, 0);
    assert_eq!(app.queues.depth(&app.queues.names.results).await, 0);

    // The vendor accepts the credentials again: the held jobs go through.
    app.mock.reset();
    let results = app.queues.results_by_job(5).await;
    assert!(results.values().all(|r| r.status == JobStatus::Succeeded));
    assert!(circuit.open_reason().is_none());
    assert!(app.worker.health().readiness().is_ok());
    assert_eq!(
        app.queues.depth(&app.queues.names.dead).await,
        0,
        "nothing dead-lettered for a vendor-wide fault"
    );
    for i in 0..5 {
        assert_eq!(
            app.mock
                .mimecast_account(&format!("VW{i}"))
                .unwrap()
                .user_count,
            2
        );
    }
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_answered_429_does_not_hold_the_vendor_for_good() {
    let mut app = TestApp::spawn("probe_429").await;
    // A 401 opens the circuit; its probe is answered 429, which says nothing
    // about the credentials. The next probe must still go.
    app.mock
        .push_fault(Vendor::Mimecast, Fault::Status { status: 401 });
    app.mock
        .push_fault(Vendor::Mimecast, Fault::RateLimited { reset_ms: 200 });
    app.queues
        .publish(&json!({"jobId": "p429-1", "vendor": "mimecast", "data": [{"accountCode": "P429", "numberOfUsers": 3}]}))
        .await;
    let result = app.queues.next_result().await;
    assert_eq!(result.status, JobStatus::Succeeded);
    let requests = app.mock.requests();
    let statuses: Vec<u16> = requests.iter().map(|r| r.status).collect();
    // The job's call (401), a probe answered 429, a probe answered 200, then the
    // job's own call again; the probes carry only the account code.
    assert_eq!(statuses, [401, 429, 200, 200]);
    for probe in &requests[1..3] {
        assert_eq!(probe.body["data"], json!([{"accountCode": "P429"}]));
    }
    assert_eq!(app.mock.mimecast_account("P429").unwrap().user_count, 3);
    assert!(app.worker.health().readiness().is_ok());
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_waiting_for_its_rate_limit_turn_at_shutdown_comes_back_unsent_not_unknown() {
    let mut app = TestApp::spawn_with("stop_in_limiter", |env| {
        env.insert("MIMECAST_RATE_LIMIT".into(), "1/min".into());
        env.insert("SHUTDOWN_TIMEOUT".into(), "1s".into());
        // A ledger the next worker can open while this one's is still held:
        // Redis (database 13, used by no other test), entries kept an hour.
        env.insert("LEDGER_URL".into(), common::redis_url(13));
        env.insert("LEDGER_RETENTION".into(), "1h".into());
    })
    .await;
    // Job ids unique to this run, since the Redis ledger outlives it.
    let run = app.env["JOBS_QUEUE"].clone();
    let (first, second) = (format!("{run}-1"), format!("{run}-2"));
    app.queues
        .publish(&json!({"jobId": first, "vendor": "mimecast", "data": [{"accountCode": "SL1", "numberOfUsers": 3}]}))
        .await;
    assert_eq!(app.queues.next_result().await.status, JobStatus::Succeeded);
    // The next call's turn is a minute away: the job stores its in-flight
    // marker, then waits for the rate limiter.
    app.queues
        .publish(&json!({"jobId": second, "vendor": "mimecast", "data": [{"accountCode": "SL2", "numberOfUsers": 4}]}))
        .await;
    let metrics = app.worker.health().metrics().clone();
    tokio::time::timeout(EVENT_TIMEOUT, async {
        while metrics.rate_limit_waiting(account_worker::job::VendorKind::Mimecast) < 1 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the second job waits for its turn");
    app.stop_worker().await;

    // A worker without the limit takes the job over: it was never sent, so it
    // is sent now, not reported as an outcome nobody can know.
    let mut env = app.env.clone();
    env.insert("MIMECAST_RATE_LIMIT".into(), String::new());
    let (stop, task) = common::start_worker(&env).await;
    let result = app.queues.next_result().await;
    assert_eq!(result.job_id, second);
    assert_eq!(result.status, JobStatus::Succeeded, "{:?}", result.fail);
    assert_eq!(app.mock.mimecast_account("SL2").unwrap().user_count, 4);
    assert_eq!(app.mock.applied_count(Vendor::Mimecast, "SL2"), 1);
    stop.cancel();
    let _ = task.await;
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_keys_keep_the_jobs_in_the_queue_instead_of_dead_lettering_them() {
    let mut app = TestApp::spawn_with("wrong_keys", |env| {
        // Valid base64, wrong secret.
        env.insert("MIMECAST_SECRET_KEY".into(), "d3Jvbmctc2VjcmV0".into());
        env.insert("WORKER_CONCURRENCY".into(), "2".into());
    })
    .await;
    let jobs = 6;
    for i in 0..jobs {
        app.queues
            .publish(&json!({"jobId": format!("wk-{i}"), "vendor": "mimecast", "data": [{"accountCode": format!("WK{i}")}]}))
            .await;
    }
    let circuit = app
        .worker
        .circuits()
        .get(account_worker::job::VendorKind::Mimecast);
    tokio::time::timeout(EVENT_TIMEOUT, circuit.wait_open())
        .await
        .expect("the circuit opens on a bad signature");
    assert!(circuit
        .open_reason()
        .is_some_and(|r| r.contains("err_xdk_invalid_signature")));
    app.stop_worker().await;

    assert_eq!(
        app.queues.depth(&app.queues.names.jobs).await,
        jobs as u32,
        "every job is back in the queue"
    );
    assert_eq!(app.queues.depth(&app.queues.names.dead).await, 0);
    assert_eq!(app.queues.depth(&app.queues.names.results).await, 0);
    assert!(app.mock.requests().iter().all(|r| r.status == 401));
    assert!(
        app.mock.requests().len() <= 4,
        "held jobs do not hammer the vendor"
    );
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_vendor_holds_jobs_instead_of_exhausting_their_retries() {
    let mut app = TestApp::spawn_with("unreachable", |env| {
        // Nothing listens on port 9 of loopback.
        env.insert("MIMECAST_BASE_URL".into(), "http://127.0.0.1:9".into());
        env.insert("RETRY_MAX_ATTEMPTS".into(), "2".into());
    })
    .await;
    app.queues
        .publish(&json!({"jobId": "ur-1", "vendor": "mimecast", "data": [{"accountCode": "UR", "numberOfUsers": 1}]}))
        .await;
    let circuit = app
        .worker
        .circuits()
        .get(account_worker::job::VendorKind::Mimecast);
    tokio::time::timeout(EVENT_TIMEOUT, circuit.wait_open())
        .await
        .expect("a sustained outage opens the circuit");
    app.stop_worker().await;
    assert_eq!(app.queues.depth(&app.queues.names.jobs).await, 1);
    assert_eq!(app.queues.depth(&app.queues.names.dead).await, 0);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_extra_queue_is_declared_again_and_consumed() {
    let mut extra = String::new();
    let mut app = TestApp::spawn_with("extra_deleted", |env| {
        extra = format!("{}.extra", env["JOBS_QUEUE"]);
        env.insert(
            "CONSUME_QUEUES".into(),
            format!("{},{extra}", env["JOBS_QUEUE"]),
        );
    })
    .await;
    tokio::time::timeout(EVENT_TIMEOUT, app.worker.health().wait_for_sessions(1))
        .await
        .expect("the worker starts consuming");
    app.queues
        .channel
        .queue_delete(extra.as_str().into(), Default::default())
        .await
        .unwrap();
    // The broker cancels that queue's consumer; the worker reopens its session,
    // which declares the queue again, instead of consuming only the others.
    tokio::time::timeout(EVENT_TIMEOUT, app.worker.health().wait_for_sessions(2))
        .await
        .expect("the worker reopens its broker session");
    let job = json!({"jobId": "xq-1", "vendor": "mimecast", "data": [{"accountCode": "XQ", "numberOfUsers": 2}]});
    app.queues.publish_to(&extra, &job).await;
    let result = app.queues.next_result().await;
    assert_eq!(result.job_id, "xq-1");
    assert_eq!(result.status, JobStatus::Succeeded);
    app.queues
        .channel
        .queue_delete(extra.as_str().into(), Default::default())
        .await
        .unwrap();
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_results_queue_is_declared_again_and_the_result_still_arrives() {
    let app = TestApp::spawn("results_deleted").await;
    tokio::time::timeout(EVENT_TIMEOUT, app.worker.health().wait_for_sessions(1))
        .await
        .expect("the worker starts consuming");
    app.queues
        .channel
        .queue_delete(app.queues.names.results.as_str().into(), Default::default())
        .await
        .unwrap();
    app.queues
        .publish(&json!({"jobId": "rd-1", "vendor": "mimecast", "data": [{"accountCode": "RD", "numberOfUsers": 4}]}))
        .await;
    // The unroutable result makes the worker reopen its session, which declares
    // the results queue again; the redelivered job republishes the stored outcome.
    tokio::time::timeout(EVENT_TIMEOUT, app.worker.health().wait_for_sessions(2))
        .await
        .expect("the worker reopens its broker session");
    let mut reader = common::Queues::open(&app.queues.names.jobs).await;
    let result = reader.next_result().await;
    assert_eq!(result.job_id, "rd-1");
    assert_eq!(result.status, JobStatus::Succeeded);
    assert_eq!(
        app.mock.mimecast_account("RD").unwrap().user_count,
        4,
        "applied once"
    );
    assert_eq!(
        app.mock.requests().len(),
        1,
        "the redelivery republished the stored outcome"
    );
    app.finish().await;
}
