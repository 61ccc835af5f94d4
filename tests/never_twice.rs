//! "Never twice, never two answers": the sequences that used to apply a
//! licence count twice or give one jobId two answers, each run against the real
//! broker and, where the ledger's own failures matter, a real Redis.

mod common;

use std::time::Duration;

use account_worker::config::{LedgerLocation, LedgerSettings};
use account_worker::job::{JobId, JobStatus};
use account_worker::ledger::{Claim, Ledger, Progress};
use account_worker::mock_vendor::{Fault, Vendor};
use common::{redis_url, TestApp};
use serde_json::{json, Value};

/// The Redis database these tests use; each test names its jobs uniquely, so
/// they share it safely.
const REDIS_DB: u8 = 11;

/// A jobId no other run of a test has used, so a Redis entry left by an
/// earlier run cannot answer for this one.
fn fresh_job_id(test: &str) -> String {
    format!("{test}-{}", uuid::Uuid::new_v4().simple())
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url(REDIS_DB))
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("the tests' Redis is running (scripts/ensure-services --redis)")
}

/// Deletes the job's ledger entry, as an eviction, a failover to a replica that
/// missed the write, or a restart without persistence would.
async fn lose_entry(job_id: &str) {
    let deleted: i64 = redis::cmd("DEL")
        .arg(format!("account-worker:job:{job_id}"))
        .query_async(&mut redis().await)
        .await
        .expect("DEL");
    assert_eq!(deleted, 1, "the claim stored an entry before the call");
}

fn with_redis_ledger(env: &mut std::collections::HashMap<String, String>) {
    env.insert("LEDGER_URL".into(), redis_url(REDIS_DB));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_lost_during_the_call_is_not_applied_again() {
    let mut app = TestApp::spawn_with("lost_mid_call", with_redis_ledger).await;
    let job_id = fresh_job_id("lost");
    let job = json!({"jobId": job_id, "vendor": "mimecast", "data": [
        {"accountCode": "LOST-A", "numberOfUsers": 5}
    ]});
    // The call outlives a lease renewal, which used to find the entry gone,
    // take it for another owner's, and hand the job back to be sent again.
    app.mock
        .push_fault(Vendor::Mimecast, Fault::Delay { ms: 2_500 });
    app.queues.publish(&job).await;
    app.mock.wait_for_admitted(1).await;
    lose_entry(&job_id).await;

    let result = app.queues.next_result().await;
    assert_eq!(result.status, JobStatus::Succeeded);
    assert_eq!(app.mock.applied_count(Vendor::Mimecast, "LOST-A"), 1);

    // The owner stored its outcome again, so a later copy gets that answer.
    app.queues.publish(&job).await;
    let again = app.queues.next_result().await;
    assert_eq!(again, result, "one jobId, one answer");
    assert_eq!(app.mock.requests().len(), 1, "nothing is sent twice");
    assert_eq!(app.mock.mimecast_account("LOST-A").unwrap().user_count, 5);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_arriving_after_the_entry_was_flushed_mid_call_does_not_resend() {
    let mut app = TestApp::spawn_with("flushed_mid_call", with_redis_ledger).await;
    let job_id = fresh_job_id("flushed");
    let job = json!({"jobId": job_id, "vendor": "mimecast", "data": [
        {"accountCode": "FLUSH-A", "numberOfUsers": 3}
    ]});
    app.mock
        .push_fault(Vendor::Mimecast, Fault::Delay { ms: 2_500 });
    app.queues.publish(&job).await;
    app.mock.wait_for_admitted(1).await;
    lose_entry(&job_id).await;
    // A copy claims while the entry is gone and the first call is still out:
    // this worker's own in-flight state is evidence the job is not new.
    app.queues.publish(&job).await;

    let first = app.queues.next_result().await;
    let second = app.queues.next_result().await;
    assert_eq!(first, second, "both copies give the same answer");
    assert_eq!(first.status, JobStatus::Succeeded);
    assert_eq!(app.mock.applied_count(Vendor::Mimecast, "FLUSH-A"), 1);
    assert_eq!(app.mock.requests().len(), 1);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_retried_after_a_lost_reply_is_not_counted_as_a_second_delivery() {
    let ledger = Ledger::open(&LedgerSettings {
        location: LedgerLocation::Redis(redis_url(REDIS_DB)),
        retention: Duration::from_secs(3600),
        lease: Duration::from_secs(30),
    })
    .await
    .expect("ledger opens");
    let job = JobId::parse(&fresh_job_id("retried-claim")).expect("job id");
    let marker = Progress {
        in_flight: vec![0],
        ..Progress::default()
    };
    let lease = Duration::from_secs(30);
    let first = ledger
        .claim(&job, "worker-a/1", lease, Some(&marker))
        .await
        .expect("claim");
    // The first reply was lost on the way back: the client tries again as the
    // same owner. The marker it finds is its own, not an earlier delivery's.
    let retried = ledger
        .claim(&job, "worker-a/1", lease, Some(&marker))
        .await
        .expect("claim");
    assert_eq!(retried, first);
    match retried {
        Claim::Owned {
            deliveries, marked, ..
        } => {
            assert_eq!(deliveries, 1);
            assert!(marked, "the retry still owns the first call's marker");
        }
        other => panic!("expected the lease, got {other:?}"),
    }
    // Another delivery is a different owner and is told the lease is held.
    let other = ledger
        .claim(&job, "worker-b/1", lease, Some(&marker))
        .await
        .expect("claim");
    assert_eq!(other, Claim::Busy);
}

/// An item nested as deep as the parser accepts (a level more and the job is
/// malformed), invalid because its
/// count is not a number.
fn deeply_nested_item(account: &str) -> Value {
    let mut nested = json!(1);
    for _ in 0..124 {
        nested = json!([nested]);
    }
    json!({"accountCode": account, "numberOfUsers": nested})
}

async fn deeply_nested_job_gets_one_answer(
    ledger: Option<fn(&mut std::collections::HashMap<String, String>)>,
) {
    let mut app = TestApp::spawn_with("nested", |env| {
        if let Some(adjust) = ledger {
            adjust(env);
        }
    })
    .await;
    let job = json!({"jobId": fresh_job_id("nested"), "vendor": "mimecast", "data": [
        deeply_nested_item("NEST-A"),
        {"accountCode": "NEST-B", "numberOfUsers": 2}
    ]});
    app.queues.publish(&job).await;
    let result = app.queues.next_result().await;
    assert_eq!(result.status, JobStatus::Partial);
    assert_eq!(result.fail.len(), 1);
    assert!(result.fail[0].errors[0].code.starts_with("err_validation"));

    // The stored outcome reads back: the copy gets it, not a loop of failures.
    app.queues.publish(&job).await;
    let again = app.queues.next_result().await;
    assert_eq!(again, result);
    assert_eq!(app.mock.applied_count(Vendor::Mimecast, "NEST-B"), 1);
    assert_eq!(
        app.worker.health().readiness(),
        Ok(()),
        "the ledger is not reported failing"
    );
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deeply_nested_invalid_item_is_stored_readably_in_the_file_ledger() {
    deeply_nested_job_gets_one_answer(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deeply_nested_invalid_item_is_stored_readably_in_redis() {
    deeply_nested_job_gets_one_answer(Some(with_redis_ledger)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_copy_of_a_finished_job_gets_the_stored_answer() {
    let mut app = TestApp::spawn("malformed_copy").await;
    let job_id = fresh_job_id("malformed");
    app.queues
        .publish(&json!({"jobId": job_id, "vendor": "mimecast", "data": [
            {"accountCode": "MAL-A", "numberOfUsers": 4}
        ]}))
        .await;
    let result = app.queues.next_result().await;
    assert_eq!(result.status, JobStatus::Succeeded);

    // Same jobId, a body the parser rejects: the job already has its answer.
    app.queues
        .publish(&json!({"jobId": job_id, "vendor": "mimecast", "data": "not a list"}))
        .await;
    let again = app.queues.next_result().await;
    assert_eq!(again, result, "one jobId, one answer");
    // The bytes themselves are still kept for the producer to see.
    let dead = app.queues.next_dead_letter().await;
    assert_eq!(dead.code, "err_job_malformed");
    assert_eq!(dead.json()["data"], "not a list");
    assert_eq!(app.queues.depth(&app.queues.names.results).await, 0);
    assert_eq!(app.mock.applied_count(Vendor::Mimecast, "MAL-A"), 1);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_job_id_with_a_different_body_is_a_conflict_and_sends_nothing() {
    let mut app = TestApp::spawn("conflict").await;
    let job_id = fresh_job_id("conflict");
    let original = json!({"jobId": job_id, "vendor": "mimecast", "data": [
        {"accountCode": "CON-A", "numberOfUsers": 6}
    ]});
    app.queues.publish(&original).await;
    let result = app.queues.next_result().await;
    assert_eq!(result.status, JobStatus::Succeeded);

    // Same jobId, another account: mapping the stored progress onto it by item
    // index used to report CON-B succeeded with CON-A's data, never sent.
    app.queues
        .publish(&json!({"jobId": job_id, "vendor": "mimecast", "data": [
            {"accountCode": "CON-B", "numberOfUsers": 6}
        ]}))
        .await;
    let dead = app.queues.next_dead_letter().await;
    assert_eq!(dead.code, "err_job_conflict");
    assert!(
        dead.message.contains(&job_id),
        "the message names the jobId: {}",
        dead.message
    );
    assert!(app.mock.mimecast_account("CON-B").is_none());
    assert_eq!(app.mock.requests().len(), 1);

    // An identical copy still gets the stored answer, and only it.
    app.queues.publish(&original).await;
    let again = app.queues.next_result().await;
    assert_eq!(again, result);
    assert_eq!(app.queues.depth(&app.queues.names.results).await, 0);
    app.finish().await;
}
