//! The binary as an operator runs it: bad configuration, and a crash between the
//! vendor call and the ack.

mod common;

use std::process::Stdio;

use account_worker::job::JobStatus;
use account_worker::mock_vendor::{Fault, MockVendor, MockVendorConfig, Vendor};
use common::{Queues, EVENT_TIMEOUT};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_account-worker");

/// `account-worker run` as a separate process, killed if the test ends first.
fn spawn_worker_process(env: &std::collections::HashMap<String, String>) -> tokio::process::Child {
    tokio::process::Command::new(BIN)
        .arg("run")
        .envs(env)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the worker binary starts")
}

fn run_with(vars: &[(&str, &str)]) -> std::process::Output {
    let mut command = std::process::Command::new(BIN);
    command
        .arg("check")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in vars {
        command.env(k, v);
    }
    command.output().expect("binary runs")
}

#[test]
fn bad_configuration_exits_non_zero_with_one_line_naming_the_setting() {
    let mimecast = [
        ("MIMECAST_BASE_URL", "http://127.0.0.1:1"),
        ("MIMECAST_ACCESS_KEY", "a"),
        ("MIMECAST_APP_ID", "b"),
        ("MIMECAST_APP_KEY", "c"),
    ];
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![("AMQP_URL", "amqp://[broken")], "AMQP_URL"),
        (
            vec![("MIMECAST_RATE_LIMIT", "20/parsec")],
            "MIMECAST_RATE_LIMIT",
        ),
        (vec![("WORKER_CONCURRENCY", "0")], "WORKER_CONCURRENCY"),
        (
            mimecast
                .iter()
                .copied()
                .chain([("MIMECAST_SECRET_KEY", "not*base64!")])
                .collect(),
            "MIMECAST_SECRET_KEY",
        ),
        (vec![("RETRY_MAX_DELAY", "forever")], "RETRY_MAX_DELAY"),
        // Shorter than a job can live: its entry could expire mid-job.
        (vec![("LEDGER_RETENTION", "300ms")], "LEDGER_RETENTION"),
        // No request could carry it: every call would fail before leaving.
        (
            mimecast
                .iter()
                .copied()
                .filter(|(k, _)| *k != "MIMECAST_APP_ID")
                .chain([
                    ("MIMECAST_SECRET_KEY", "c2VjcmV0"),
                    ("MIMECAST_APP_ID", "app\nid"),
                ])
                .collect(),
            "MIMECAST_APP_ID",
        ),
        (
            vec![("PNCP_MEDIA_TYPE", "application/\u{1}json")],
            "PNCP_MEDIA_TYPE",
        ),
    ];
    for (vars, setting) in cases {
        let output = run_with(&vars);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{setting}: should fail");
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "{setting}: one line, got {stderr}"
        );
        assert!(stderr.contains(setting), "{setting} not named in: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!stderr.contains("not*base64!"), "a secret leaked: {stderr}");
    }
}

#[test]
fn a_missing_config_file_is_named() {
    let output = std::process::Command::new(BIN)
        .args(["--config", "/nonexistent/worker.toml", "check"])
        .output()
        .expect("binary runs");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/worker.toml"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_not_acked_before_its_result_is_published() {
    let mock = MockVendor::start("127.0.0.1:0".parse().unwrap(), MockVendorConfig::demo())
        .await
        .unwrap();
    let ledger = tempfile::tempdir().unwrap();
    let queue = common::unique_queue("crash");
    let env = common::worker_env(&queue, &mock, ledger.path());
    let mut queues = Queues::open(&queue).await;

    // The vendor holds the call long enough for the worker to be killed mid-job.
    mock.push_fault(Vendor::Mimecast, Fault::Delay { ms: 120_000 });
    let mut child = spawn_worker_process(&env);
    queues
        .publish(&json!({"jobId": "crash-1", "vendor": "mimecast", "data": [{"accountCode": "CRASH", "products": [1, 2]}]}))
        .await;
    tokio::time::timeout(EVENT_TIMEOUT, mock.wait_for_admitted(1))
        .await
        .expect("the worker called the vendor");
    child.kill().await.unwrap();

    assert_eq!(
        queues.depth(&queues.names.results).await,
        0,
        "no result was published"
    );

    // A new worker gets the job back from the broker and finishes it.
    let (stop, worker) = common::start_worker(&env).await;
    let result = queues.next_result().await;
    assert_eq!(result.job_id, "crash-1");
    assert_eq!(result.status, JobStatus::Succeeded);
    assert_eq!(mock.mimecast_account("CRASH").unwrap().products, vec![1, 2]);
    assert!(mock.requests().len() >= 2, "the job was delivered again");
    stop.cancel();
    let _ = worker.await;
    queues.delete().await;
}

fn signal(child: &tokio::process::Child, name: &str) {
    let pid = child.id().expect("child is running").to_string();
    let status = std::process::Command::new("kill")
        .args([format!("-{name}"), pid])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_jobs_exits_zero_and_loses_nothing() {
    let mock = MockVendor::start("127.0.0.1:0".parse().unwrap(), MockVendorConfig::demo())
        .await
        .unwrap();
    mock.set_latency(std::time::Duration::from_millis(30));
    let ledger = tempfile::tempdir().unwrap();
    let queue = common::unique_queue("sigterm");
    let env = common::worker_env(&queue, &mock, ledger.path());
    let mut queues = Queues::open(&queue).await;
    let jobs = 200;
    for i in 0..jobs {
        queues
            .publish(&json!({"jobId": format!("st-{i}"), "vendor": "mimecast", "data": [{"accountCode": format!("ST{i}"), "numberOfUsers": 1}]}))
            .await;
    }
    let mut child = spawn_worker_process(&env);
    tokio::time::timeout(EVENT_TIMEOUT, mock.wait_for_requests(40))
        .await
        .expect("the worker is busy");
    signal(&child, "TERM");
    // SHUTDOWN_TIMEOUT is 10 s in the test environment.
    let status = tokio::time::timeout(EVENT_TIMEOUT, child.wait())
        .await
        .expect("the worker exits within its shutdown timeout")
        .unwrap();
    assert!(status.success(), "exit status {status}");

    // A worker started afterwards finishes the rest.
    let (stop, worker) = common::start_worker(&env).await;
    let mut seen = std::collections::HashMap::new();
    while seen.len() < jobs {
        let result = queues.next_result().await;
        if let Some(earlier) = seen.insert(result.job_id.clone(), result.clone()) {
            assert_eq!(earlier, result);
        }
    }
    assert!(seen.values().all(|r| r.status == JobStatus::Succeeded));
    for i in 0..jobs {
        assert_eq!(
            mock.applied_count(Vendor::Mimecast, &format!("ST{i}")),
            1,
            "ST{i}"
        );
    }
    stop.cancel();
    let _ = worker.await;
    queues.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_keeps_killing_its_worker_is_dead_lettered_as_poison() {
    let mock = MockVendor::start("127.0.0.1:0".parse().unwrap(), MockVendorConfig::demo())
        .await
        .unwrap();
    let ledger = tempfile::tempdir().unwrap();
    let queue = common::unique_queue("poison");
    let mut env = common::worker_env(&queue, &mock, ledger.path());
    env.insert("MAX_DELIVERIES".into(), "2".into());
    env.insert("LEDGER_LEASE".into(), "1s".into());
    let mut queues = Queues::open(&queue).await;
    queues
        .publish(&json!({"jobId": "poison-1", "vendor": "mimecast", "data": [{"accountCode": "PZ", "products": [7]}]}))
        .await;
    // Two deliveries each die while their call hangs at the vendor.
    for delivery in 1..=2 {
        mock.push_fault(Vendor::Mimecast, Fault::Delay { ms: 120_000 });
        let mut child = spawn_worker_process(&env);
        tokio::time::timeout(EVENT_TIMEOUT, mock.wait_for_admitted(delivery))
            .await
            .expect("the delivery reaches the vendor");
        child.kill().await.unwrap();
    }
    let (stop, worker) = common::start_worker(&env).await;
    let result = queues.next_result().await;
    assert_eq!(result.status, JobStatus::Failed);
    assert_eq!(result.fail[0].errors[0].code, "err_poison_message");
    let dead = queues.next_dead_letter().await;
    assert_eq!(dead.code, "err_poison_message");
    assert_eq!(
        mock.requests().len(),
        2,
        "the third delivery does not call the vendor"
    );
    stop.cancel();
    let _ = worker.await;
    queues.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_additive_item_in_flight_when_the_worker_died_is_reported_unknown_not_resent() {
    let mock = MockVendor::start("127.0.0.1:0".parse().unwrap(), MockVendorConfig::demo())
        .await
        .unwrap();
    let ledger = tempfile::tempdir().unwrap();
    let queue = common::unique_queue("crash_additive");
    let mut env = common::worker_env(&queue, &mock, ledger.path());
    env.insert("LEDGER_LEASE".into(), "1s".into());
    let mut queues = Queues::open(&queue).await;
    mock.push_fault(Vendor::Mimecast, Fault::Delay { ms: 120_000 });
    let mut child = spawn_worker_process(&env);
    queues
        .publish(&json!({"jobId": "crash-2", "vendor": "mimecast", "data": [
            {"accountCode": "CRASH2", "numberOfUsers": 7},
            {"accountCode": "CRASH3", "products": [4]}
        ]}))
        .await;
    tokio::time::timeout(EVENT_TIMEOUT, mock.wait_for_admitted(1))
        .await
        .expect("the worker called the vendor");
    child.kill().await.unwrap();

    let (stop, worker) = common::start_worker(&env).await;
    let result = queues.next_result().await;
    assert_eq!(result.status, JobStatus::Partial);
    assert_eq!(result.fail[0].key["accountCode"], "CRASH2");
    assert_eq!(result.fail[0].errors[0].code, "err_outcome_unknown");
    assert_eq!(
        result.data[0]["accountCode"], "CRASH3",
        "the idempotent item is resent"
    );
    let resent: Vec<_> = mock
        .requests()
        .iter()
        .filter(|r| r.body["data"].to_string().contains("CRASH2"))
        .map(|r| r.seq)
        .collect();
    assert_eq!(resent.len(), 1, "the additive item was never sent twice");
    stop.cancel();
    let _ = worker.await;
    queues.delete().await;
}
