//! No secret reaches the output in any encoding, even at `RUST_LOG=trace` with
//! every third-party crate's output: the worker binary runs against the real
//! broker as a non-default user, with vendor base URLs that carry userinfo.

mod common;

use std::process::Stdio;

use account_worker::job::JobStatus;
use account_worker::mock_vendor::{self, MockVendor, MockVendorConfig};
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine;
use common::{Queues, EVENT_TIMEOUT};
use serde_json::json;
use tokio::io::AsyncReadExt;

/// A broker user made for one test with `rabbitmqctl`, deleted when dropped.
struct BrokerUser {
    name: String,
    password: String,
}

fn rabbitmqctl(args: &[&str]) {
    let status = ["rabbitmqctl", "/usr/sbin/rabbitmqctl"]
        .iter()
        .find_map(|program| {
            std::process::Command::new(program)
                .args(args)
                .stdout(Stdio::null())
                .status()
                .ok()
        })
        .expect("rabbitmqctl runs (the tests run where RabbitMQ does, as root)");
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}

impl BrokerUser {
    fn create() -> Self {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let user = Self {
            name: format!("aw-{}", &tag[..8]),
            password: format!("Pw-{}", &tag[8..]),
        };
        rabbitmqctl(&["add_user", &user.name, &user.password]);
        rabbitmqctl(&["set_permissions", "-p", "/", &user.name, ".*", ".*", ".*"]);
        user
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_user", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `secret` as a crate might print it: plain, percent-encoded, as the decimal
/// byte list `Debug` gives a `Vec<u8>` (what lapin prints for the SASL
/// response), and as base64.
fn encodings(secret: &[u8]) -> Vec<String> {
    let decimal: Vec<String> = secret.iter().map(u8::to_string).collect();
    let mut forms = vec![
        decimal.join(", "),
        decimal.join(","),
        STANDARD.encode(secret),
        STANDARD_NO_PAD.encode(secret),
        URL_SAFE_NO_PAD.encode(secret),
    ];
    if let Ok(text) = std::str::from_utf8(secret) {
        forms.push(text.to_owned());
        forms.push(format!("{text:?}").trim_matches('"').to_owned());
    }
    forms
}

fn read_all(
    mut pipe: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes).await;
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_output_in_any_encoding_at_trace_level() {
    let user = BrokerUser::create();
    let mock = MockVendor::start("127.0.0.1:0".parse().unwrap(), MockVendorConfig::demo())
        .await
        .unwrap();
    let ledger = tempfile::tempdir().unwrap();
    let queue = common::unique_queue("secrets-trace");
    let mut env = common::worker_env(&queue, &mock, ledger.path());
    let amqp = common::amqp_url().replacen(
        "guest:guest",
        &format!("{}:{}", user.name, user.password),
        1,
    );
    assert!(
        amqp.contains(&user.password),
        "TEST_AMQP_URL uses guest:guest"
    );
    env.insert("AMQP_URL".into(), amqp);
    let vendor_user = "vendor-user";
    let vendor_password = format!("Vp-{}", uuid::Uuid::new_v4().simple());
    let with_userinfo = |url: String| {
        url.replacen(
            "http://",
            &format!("http://{vendor_user}:{vendor_password}@"),
            1,
        )
    };
    env.insert("MIMECAST_BASE_URL".into(), with_userinfo(mock.base_url()));
    env.insert("PNCP_BASE_URL".into(), with_userinfo(mock.pncp_base_url()));
    // Asked for by name too: the AMQP crates stay capped whatever RUST_LOG says.
    env.insert(
        "RUST_LOG".into(),
        "trace,lapin=trace,amq_protocol=trace".into(),
    );
    env.insert("LOG_FORMAT".into(), "text".into());

    let mut queues = Queues::open(&queue).await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_account-worker"))
        .arg("run")
        .envs(&env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = read_all(child.stdout.take().unwrap());
    let stderr = read_all(child.stderr.take().unwrap());

    queues
        .publish(&json!({"jobId": "trace-m", "vendor": "mimecast",
                         "data": [{"accountCode": "T1", "numberOfUsers": 1}]}))
        .await;
    queues
        .publish(&json!({"jobId": "trace-p", "vendor": "pncp",
                         "data": [{"accountId": "7", "name": "N", "email": "n@example.com"}]}))
        .await;
    // A vendor error, so that a result message and x-error-message are written.
    queues
        .publish(&json!({"jobId": "trace-404", "vendor": "pncp",
                         "data": [{"accountId": "404", "name": "N", "email": "n@example.com"}]}))
        .await;
    let results = queues.results_by_job(3).await;
    for job_id in ["trace-m", "trace-p"] {
        assert_eq!(results[job_id].status, JobStatus::Succeeded, "{job_id}");
    }
    let letter = queues.next_dead_letter().await;
    assert_eq!(letter.job_id.as_deref(), Some("trace-404"));

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
    let log = format!("{}\n{}", stdout.await.unwrap(), stderr.await.unwrap());
    // For a look at what was checked: `SECRETS_TEST_LOG=/tmp/log cargo test --test secrets`.
    if let Ok(path) = std::env::var("SECRETS_TEST_LOG") {
        let _ = std::fs::write(path, &log);
    }
    assert!(
        log.lines().filter(|line| line.contains("TRACE")).count() > 5,
        "trace logging produced output"
    );
    assert!(
        log.contains("lapin") || log.contains("amq_protocol"),
        "the AMQP client's output is in the log"
    );

    let published = format!(
        "{}\n{}\n{}\n{}",
        serde_json::to_string(&results).unwrap(),
        letter.code,
        letter.message,
        String::from_utf8_lossy(&letter.body)
    );
    let mut secrets: Vec<Vec<u8>> = vec![
        user.password.clone().into_bytes(),
        format!("\0{}\0{}", user.name, user.password).into_bytes(),
        format!("{}:{}", user.name, user.password).into_bytes(),
        vendor_password.clone().into_bytes(),
        format!("{vendor_user}:{vendor_password}").into_bytes(),
    ];
    for key in [
        mock_vendor::DEMO_MIMECAST_SECRET_KEY_B64,
        mock_vendor::DEMO_MIMECAST_APP_KEY,
        mock_vendor::DEMO_PNCP_SHARED_SECRET,
        mock_vendor::DEMO_PNCP_APPLICATION_KEY,
    ] {
        secrets.push(key.as_bytes().to_vec());
    }
    secrets.push(
        STANDARD
            .decode(mock_vendor::DEMO_MIMECAST_SECRET_KEY_B64)
            .unwrap(),
    );
    for secret in &secrets {
        for form in encodings(secret) {
            assert!(!log.contains(&form), "{form:?} appears in the log");
            assert!(
                !published.contains(&form),
                "{form:?} appears in a result or dead letter"
            );
        }
    }
    for header in ["Authorization: MC ", "Authorization: PNCP ", "Basic "] {
        assert!(!log.contains(header), "{header:?} appears in the log");
    }
    queues.delete().await;
    mock.shutdown();
}
