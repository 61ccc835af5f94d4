//! What operators watch: the metrics endpoint after a run, and logs that never
//! carry a secret even at trace level.

mod common;

use std::process::Stdio;

use account_worker::metrics;
use account_worker::mock_vendor::{self, MockVendor, MockVendorConfig};
use common::{Queues, TestApp, EVENT_TIMEOUT};
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_a_run_count_what_happened() {
    let mut app = TestApp::spawn("metrics").await;
    let listener = metrics::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let server = tokio::spawn(metrics::serve(
        listener,
        app.worker.health().clone(),
        stop.clone(),
    ));

    let good = json!({"jobId": "m-good", "vendor": "mimecast", "data": [
        {"accountCode": "M1", "numberOfUsers": 1}, {"accountCode": "M2", "products": [5]}
    ]});
    app.queues.publish(&good).await;
    app.queues
        .publish(
            &json!({"jobId": "m-partial", "vendor": "mimecast", "data": [
                {"accountCode": "M3"}, {"accountCode": "MISSING-M4"}
            ]}),
        )
        .await;
    app.queues
        .publish(&json!({"jobId": "m-bad", "vendor": "acme", "data": [{"accountCode": "M5"}]}))
        .await;
    app.queues.results_by_job(3).await;
    app.queues.publish(&good).await;
    assert_eq!(app.queues.next_result().await.job_id, "m-good");

    let http = reqwest::Client::new();
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let expect = [
        (
            "account_worker_jobs_total{vendor=\"mimecast\",outcome=\"succeeded\"}",
            1.0,
        ),
        (
            "account_worker_jobs_total{vendor=\"mimecast\",outcome=\"partial\"}",
            1.0,
        ),
        (
            "account_worker_jobs_total{vendor=\"other\",outcome=\"malformed\"}",
            1.0,
        ),
        ("account_worker_items_total{outcome=\"succeeded\"}", 3.0),
        ("account_worker_items_total{outcome=\"failed\"}", 1.0),
        (
            "account_worker_vendor_calls_total{vendor=\"mimecast\",status=\"200\"}",
            2.0,
        ),
        (
            "account_worker_vendor_call_duration_seconds_count{vendor=\"mimecast\"}",
            2.0,
        ),
        (
            "account_worker_dead_letters_total{code=\"err_account_not_found\"}",
            1.0,
        ),
        (
            "account_worker_dead_letters_total{code=\"err_job_malformed\"}",
            1.0,
        ),
        ("account_worker_ledger_duplicates_total", 1.0),
        ("account_worker_retries_total{vendor=\"mimecast\"}", 0.0),
        ("account_worker_broker_reconnects_total", 0.0),
    ];
    for (series, value) in expect {
        assert_eq!(metric(&text, series), value, "{series} in\n{text}");
    }
    assert_eq!(
        app.mock.requests().len(),
        2,
        "the duplicate did not call the vendor"
    );

    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert!(health.status().is_success());
    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert!(ready.status().is_success());
    app.stop_worker().await;
    let not_ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(
        not_ready.status().as_u16(),
        503,
        "a stopped worker is not ready"
    );
    stop.cancel();
    let _ = server.await;
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_are_json_per_line_and_never_carry_a_secret() {
    let mock = MockVendor::start("127.0.0.1:0".parse().unwrap(), MockVendorConfig::demo())
        .await
        .unwrap();
    let ledger = tempfile::tempdir().unwrap();
    let queue = common::unique_queue("secrets");
    let mut env = common::worker_env(&queue, &mock, ledger.path());
    env.insert("RUST_LOG".into(), "trace".into());
    env.insert("LOG_FORMAT".into(), "json".into());
    let mut queues = Queues::open(&queue).await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_account-worker"))
        .arg("run")
        .envs(&env)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let log = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    queues
        .publish(&json!({"jobId": "secret-1", "vendor": "mimecast", "data": [{"accountCode": "S1", "numberOfUsers": 1}]}))
        .await;
    queues
        .publish(&json!({"jobId": "secret-2", "vendor": "pncp", "data": [{"accountId": "7", "name": "N", "email": "n@example.com"}]}))
        .await;
    queues.results_by_job(2).await;
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(EVENT_TIMEOUT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let text = log.await.unwrap();

    assert!(text.lines().count() > 20, "trace logging produced output");
    for line in text.lines() {
        let parsed: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line}"));
        assert!(parsed.is_object());
    }
    assert!(
        text.contains("\"job_id\":\"secret-1\""),
        "job spans carry the job id"
    );
    for secret in [
        mock_vendor::DEMO_MIMECAST_SECRET_KEY_B64,
        "demo-secret-key",
        mock_vendor::DEMO_MIMECAST_APP_KEY,
        mock_vendor::DEMO_MIMECAST_ACCESS_KEY,
        mock_vendor::DEMO_PNCP_SHARED_SECRET,
        mock_vendor::DEMO_PNCP_APPLICATION_KEY,
        "MC ",
        "PNCP ",
        "guest:guest",
    ] {
        assert!(!text.contains(secret), "{secret:?} appears in the logs");
    }
    queues.delete().await;
}
