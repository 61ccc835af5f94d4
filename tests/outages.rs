//! Calls that never left and vendors that stay down: a job waiting for its
//! rate-limit turn leaves no in-flight marker behind, and the probes of a held
//! vendor change nothing and spend no job's attempts, however long it is down.

mod common;

use std::collections::HashMap;
use std::process::Stdio;

use account_worker::job::{JobStatus, VendorKind};
use account_worker::mock_vendor::{Fault, MockVendor, MockVendorConfig, Vendor};
use common::{Queues, TestApp, EVENT_TIMEOUT};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_account-worker");

/// Calls a vendor fails before the circuit holds its jobs (three rounds in a
/// row), then probes it fails: more than `RETRY_MAX_ATTEMPTS`, so a probe that
/// spent a job's attempts would exhaust it.
const TRIPPING_FAILURES: usize = 3;
const FAILED_PROBES: usize = 3;

/// Short retries for the outage tests, with a first delay long enough that the
/// jobs which meet the outage first each fail once before any fails twice.
fn outage_env(env: &mut HashMap<String, String>) {
    env.insert("RETRY_MAX_ATTEMPTS".into(), "3".into());
    env.insert("RETRY_INITIAL_DELAY".into(), "300ms".into());
    env.insert("RETRY_MAX_DELAY".into(), "1s".into());
}

/// Whether any item of a recorded Mimecast body carries `numberOfUsers`.
fn carries_users(body: &Value) -> bool {
    body["data"]
        .as_array()
        .is_some_and(|items| items.iter().any(|i| i.get("numberOfUsers").is_some()))
}

/// Whether a recorded Mimecast body mentions `account`.
fn mentions(body: &Value, account: &str) -> bool {
    body["data"]
        .as_array()
        .is_some_and(|items| items.iter().any(|i| i["accountCode"] == account))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_additive_jobs_outlast_a_mimecast_outage_and_are_applied_once() {
    let mut app = TestApp::spawn_with("outage_mimecast", outage_env).await;
    for _ in 0..TRIPPING_FAILURES + FAILED_PROBES {
        app.mock
            .push_fault(Vendor::Mimecast, Fault::Status { status: 503 });
    }
    // Idempotent jobs meet the outage first and open the circuit.
    for i in 0..TRIPPING_FAILURES {
        app.queues
            .publish(&json!({"jobId": format!("om-p{i}"), "vendor": "mimecast", "data": [{"accountCode": format!("OMP{i}"), "products": [i]}]}))
            .await;
    }
    let circuit = app.worker.circuits().get(VendorKind::Mimecast);
    tokio::time::timeout(EVENT_TIMEOUT, circuit.wait_open())
        .await
        .expect("three failing rounds hold the vendor's jobs");
    // Additive jobs arrive while the vendor is held: they wait for the probes.
    let additive = 5;
    for i in 0..additive {
        app.queues
            .publish(&json!({"jobId": format!("om-a{i}"), "vendor": "mimecast", "data": [{"accountCode": format!("OMA{i}"), "numberOfUsers": i + 1}]}))
            .await;
    }

    let results = app
        .queues
        .results_by_job(TRIPPING_FAILURES + additive)
        .await;
    for (job, result) in &results {
        assert_eq!(
            result.status,
            JobStatus::Succeeded,
            "{job}: {:?}",
            result.fail
        );
    }
    let requests = app.mock.requests();
    for i in 0..additive {
        let account = format!("OMA{i}");
        assert_eq!(
            app.mock.mimecast_account(&account).unwrap().user_count,
            i as i64 + 1
        );
        assert_eq!(app.mock.applied_count(Vendor::Mimecast, &account), 1);
        let sent_users = requests
            .iter()
            .filter(|r| mentions(&r.body, &account) && carries_users(&r.body))
            .count();
        assert_eq!(sent_users, 1, "{account}'s numberOfUsers went out once");
    }
    let failed: Vec<_> = requests.iter().filter(|r| r.status == 503).collect();
    assert_eq!(failed.len(), TRIPPING_FAILURES + FAILED_PROBES);
    assert!(
        failed.iter().all(|r| !carries_users(&r.body)),
        "no probe carried numberOfUsers"
    );
    assert_eq!(app.queues.depth(&app.queues.names.dead).await, 0);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_pncp_job_outlasts_an_outage_longer_than_its_attempts() {
    let mut app = TestApp::spawn_with("outage_pncp", |env| {
        outage_env(env);
        // The job spends three attempts opening the circuit and has one left.
        env.insert("RETRY_MAX_ATTEMPTS".into(), "4".into());
    })
    .await;
    for _ in 0..TRIPPING_FAILURES + FAILED_PROBES {
        app.mock
            .push_fault(Vendor::Pncp, Fault::Status { status: 503 });
    }
    // The only job, so it is the one every probe goes out for.
    app.queues
        .publish(&json!({"jobId": "op-1", "vendor": "pncp", "data": [
            {"accountId": "701", "name": "Held", "email": "ops@example.com"}
        ]}))
        .await;

    let result = app.queues.next_result().await;
    assert_eq!(result.status, JobStatus::Succeeded, "{:?}", result.fail);
    assert_eq!(result.attempts, 4, "the probes spent none of its attempts");
    let failed = app
        .mock
        .requests()
        .iter()
        .filter(|r| r.status == 503)
        .count();
    assert_eq!(failed, TRIPPING_FAILURES + FAILED_PROBES);
    assert_eq!(app.queues.depth(&app.queues.names.dead).await, 0);
    app.finish().await;
}

/// `account-worker run` as a separate process, killed if the test ends first.
fn spawn_worker_process(env: &HashMap<String, String>) -> tokio::process::Child {
    tokio::process::Command::new(BIN)
        .arg("run")
        .envs(env)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the worker binary starts")
}

/// A loopback port free right now, for a worker process's metrics.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// Waits until the worker at `metrics` reports a Mimecast call waiting for its
/// rate-limit turn.
async fn wait_for_a_call_waiting_for_its_turn(metrics: &str) {
    let client = reqwest::Client::new();
    let waiting = "account_worker_rate_limit_waiting{vendor=\"mimecast\"} 1";
    tokio::time::timeout(EVENT_TIMEOUT, async {
        loop {
            let page = match client.get(format!("http://{metrics}/metrics")).send().await {
                Ok(response) => response.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            if page.lines().any(|line| line == waiting) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a call waits for its turn");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_while_a_call_waits_out_a_429_pause_leaves_it_unsent_not_unknown() {
    let mock = MockVendor::start("127.0.0.1:0".parse().unwrap(), MockVendorConfig::demo())
        .await
        .unwrap();
    let ledger = tempfile::tempdir().unwrap();
    let queue = common::unique_queue("killed_in_pause");
    let mut env = common::worker_env(&queue, &mock, ledger.path());
    env.insert("LEDGER_LEASE".into(), "1s".into());
    let metrics = format!("127.0.0.1:{}", free_port());
    env.insert("METRICS_ADDR".into(), metrics.clone());
    let mut queues = Queues::open(&queue).await;
    // The first call is refused with a two-minute pause: every later call to
    // the vendor waits it out.
    mock.push_fault(Vendor::Mimecast, Fault::RateLimited { reset_ms: 120_000 });
    let mut child = spawn_worker_process(&env);
    queues
        .publish(&json!({"jobId": "kp-1", "vendor": "mimecast", "data": [{"accountCode": "KP1", "numberOfUsers": 2}]}))
        .await;
    tokio::time::timeout(EVENT_TIMEOUT, mock.wait_for_requests(1))
        .await
        .expect("the first job meets the 429");
    queues
        .publish(&json!({"jobId": "kp-2", "vendor": "mimecast", "data": [{"accountCode": "KP2", "numberOfUsers": 5}]}))
        .await;
    wait_for_a_call_waiting_for_its_turn(&metrics).await;
    child.kill().await.unwrap();

    // A worker the pause does not hold takes both jobs over: neither call was
    // ever executed, so both are sent now and applied once.
    env.insert("METRICS_ADDR".into(), "127.0.0.1:0".into());
    let (stop, worker) = common::start_worker(&env).await;
    let results = queues.results_by_job(2).await;
    for (job, result) in &results {
        assert_eq!(
            result.status,
            JobStatus::Succeeded,
            "{job}: {:?}",
            result.fail
        );
    }
    assert_eq!(mock.mimecast_account("KP2").unwrap().user_count, 5);
    assert_eq!(mock.applied_count(Vendor::Mimecast, "KP2"), 1);
    assert_eq!(mock.mimecast_account("KP1").unwrap().user_count, 2);
    stop.cancel();
    let _ = worker.await;
    queues.delete().await;
    mock.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_items_wait_in_the_batcher_hands_them_back_unsent() {
    let mut app = TestApp::spawn_with("stop_in_batcher", |env| {
        env.insert("MIMECAST_BATCH_MAX".into(), "10".into());
        env.insert("MIMECAST_BATCH_LINGER".into(), "20ms".into());
        env.insert("MIMECAST_RATE_LIMIT".into(), "1/min".into());
        env.insert("SHUTDOWN_TIMEOUT".into(), "1s".into());
        // A ledger the next worker can open while this one's is still held:
        // Redis (database 12, used by no other test), entries kept an hour.
        env.insert("LEDGER_URL".into(), common::redis_url(12));
        env.insert("LEDGER_RETENTION".into(), "1h".into());
    })
    .await;
    // Job ids unique to this run, since the Redis ledger outlives it.
    let run = app.env["JOBS_QUEUE"].clone();
    let (first, second) = (format!("{run}-1"), format!("{run}-2"));
    app.queues
        .publish(&json!({"jobId": first, "vendor": "mimecast", "data": [{"accountCode": "SB1", "numberOfUsers": 3}]}))
        .await;
    assert_eq!(app.queues.next_result().await.status, JobStatus::Succeeded);
    // The next batch's turn is a minute away: the item waits in the batcher.
    app.queues
        .publish(&json!({"jobId": second, "vendor": "mimecast", "data": [{"accountCode": "SB2", "numberOfUsers": 4}]}))
        .await;
    let metrics = app.worker.health().metrics().clone();
    tokio::time::timeout(EVENT_TIMEOUT, async {
        while metrics.rate_limit_waiting(VendorKind::Mimecast) < 1 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the second job's batch waits for its turn");
    app.stop_worker().await;

    let mut env = app.env.clone();
    env.insert("MIMECAST_RATE_LIMIT".into(), String::new());
    let (stop, task) = common::start_worker(&env).await;
    let result = app.queues.next_result().await;
    assert_eq!(result.job_id, second);
    assert_eq!(result.status, JobStatus::Succeeded, "{:?}", result.fail);
    assert_eq!(app.mock.mimecast_account("SB2").unwrap().user_count, 4);
    assert_eq!(app.mock.applied_count(Vendor::Mimecast, "SB2"), 1);
    stop.cancel();
    let _ = task.await;
    app.finish().await;
}
