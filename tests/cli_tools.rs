//! The operator's command-line tools run as the real binary against the real broker:
//! `publish`, `dlq list`, `dlq replay` and `check`.

mod common;

use std::process::Stdio;

use account_worker::broker::header_text;
use account_worker::config::QueueNames;
use account_worker::job::{JobResult, JobStatus, OutcomeId};
use account_worker::mock_vendor::{Fault, Vendor};
use futures_util::StreamExt;
use lapin::message::{BasicGetMessage, Delivery};
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection};
use serde_json::{json, Value};

use common::{amqp_url, unique_queue, TestApp, EVENT_TIMEOUT};

/// What one run of the binary did.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The one `account-worker: ...` error line; other stderr lines are logs (the
    /// broker client's own thread may still log after it).
    fn error_line(&self) -> &str {
        let errors: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| l.starts_with("account-worker: "))
            .collect();
        assert_eq!(errors.len(), 1, "one error line in:\n{}", self.stderr);
        errors[0]
    }

    fn assert_ok(&self) {
        assert_eq!(
            self.code,
            Some(0),
            "stdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
    }
}

/// Runs `account-worker ARGS` with only `env` set (nothing from this process leaks in).
async fn account_worker(env: &[(&str, &str)], args: &[&str]) -> Run {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_account-worker"));
    command
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(EVENT_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| {
            panic!("account-worker {args:?} did not finish within {EVENT_TIMEOUT:?}")
        })
        .expect("the binary runs");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The test's broker view for dead-letter tools: the three queues declared, nothing
/// consuming them (a consumer would take the dead letters away from the tool).
struct DeadLetterQueues {
    names: QueueNames,
    url: String,
    connection: Connection,
    channel: Channel,
}

/// A dead letter as the worker publishes it, to seed the queue with.
struct Seed {
    body: &'static [u8],
    code: &'static str,
    job_id: Option<&'static str>,
}

impl DeadLetterQueues {
    async fn open(test: &str) -> Self {
        Self::open_with(test, FieldTable::default()).await
    }

    /// As [`DeadLetterQueues::open`], declaring the jobs queue with `jobs_arguments`.
    async fn open_with(test: &str, jobs_arguments: FieldTable) -> Self {
        let names = QueueNames::new(&unique_queue(test)).expect("queue name");
        let url = amqp_url();
        let (connection, channel) = common::declare_queues(&names, jobs_arguments).await;
        Self {
            names,
            url,
            connection,
            channel,
        }
    }

    /// The environment the binary runs with for these queues.
    fn env(&self) -> Vec<(&str, &str)> {
        vec![
            ("AMQP_URL", self.url.as_str()),
            ("JOBS_QUEUE", self.names.jobs.as_str()),
            ("RUST_LOG", "warn"),
        ]
    }

    /// Publishes dead letters with the worker's headers, each confirmed.
    async fn seed(&self, letters: &[Seed]) {
        for letter in letters {
            let mut headers = FieldTable::default();
            let text = |value: &str| AMQPValue::LongString(LongString::from(value));
            headers.insert("x-error-code".into(), text(letter.code));
            headers.insert("x-error-message".into(), text("seeded by the test"));
            headers.insert("x-attempts".into(), AMQPValue::LongLongInt(3));
            if let Some(job_id) = letter.job_id {
                headers.insert("x-job-id".into(), text(job_id));
            }
            let confirm = self
                .channel
                .basic_publish(
                    "".into(),
                    self.names.dead.as_str().into(),
                    BasicPublishOptions::default(),
                    letter.body,
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_headers(headers),
                )
                .await
                .expect("publish")
                .await
                .expect("confirm");
            assert!(confirm.is_ack(), "broker refused a seeded dead letter");
        }
    }

    /// Messages waiting in a queue right now.
    async fn depth(&self, queue: &str) -> u32 {
        account_worker::broker::queue_depth(&self.channel, queue)
            .await
            .expect("queue exists")
    }

    /// Takes every message off a queue, in order.
    async fn take_all(&self, queue: &str) -> Vec<BasicGetMessage> {
        let mut taken = Vec::new();
        while let Some(message) = self
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic_get")
        {
            taken.push(message);
        }
        taken
    }

    async fn delete(self) {
        for name in [&self.names.jobs, &self.names.results, &self.names.dead] {
            let _ = self
                .channel
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = self.connection.close(200, "test done".into()).await;
    }
}

fn header(message: &BasicGetMessage, name: &str) -> Option<String> {
    let headers = message.delivery.properties.headers().as_ref()?;
    header_text(headers, name)
}

fn bodies(messages: &[BasicGetMessage]) -> Vec<&[u8]> {
    messages
        .iter()
        .map(|m| m.delivery.data.as_slice())
        .collect()
}

const TIMEOUT_A: &[u8] =
    br#"{"jobId":"job-a", "vendor":"mimecast","data":[{"accountCode":"CUS-\u00dc1","numberOfUsers":5}]}"#;
const NOT_FOUND_B: &[u8] =
    br#"{"jobId":"job-b","vendor":"pncp","data":[{"accountId":"99","name":"x","email":"b@example.com"}]}"#;
const TIMEOUT_C: &[u8] =
    "{\"jobId\":\"job-c\",\"vendor\":\"mimecast\",\"data\":[{\"accountCode\":\"CUS3 \u{e9}\"}]}\n"
        .as_bytes();
const MALFORMED: &[u8] = b"not json {";

fn seeds() -> Vec<Seed> {
    vec![
        Seed {
            body: TIMEOUT_A,
            code: "err_outcome_unknown",
            job_id: Some("job-a"),
        },
        Seed {
            body: NOT_FOUND_B,
            code: "err_http_404",
            job_id: Some("job-b"),
        },
        Seed {
            body: TIMEOUT_C,
            code: "err_outcome_unknown",
            job_id: Some("job-c"),
        },
        Seed {
            body: MALFORMED,
            code: "err_job_malformed",
            job_id: None,
        },
    ]
}

#[tokio::test]
async fn publish_puts_one_job_per_non_blank_line_on_the_jobs_queue() {
    let queue = unique_queue("cli_publish");
    let queues = common::Queues::open(&queue).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("jobs.jsonl");
    let first = r#"{"jobId":"p-1","vendor":"mimecast","data":[{"accountCode":"A1"}]}"#;
    let second = r#"{"jobId":"p-2","vendor":"pncp","data":[{"accountId":"7","name":"n","email":"e@example.com"}]}"#;
    std::fs::write(&file, format!("{first}\n\n{second}\n")).expect("write jobs");
    let url = amqp_url();
    let env = [
        ("AMQP_URL", url.as_str()),
        ("JOBS_QUEUE", queue.as_str()),
        ("RUST_LOG", "warn"),
    ];

    let run = account_worker(&env, &["publish", file.to_str().expect("utf-8 path")]).await;

    run.assert_ok();
    assert!(
        run.stderr.contains(&format!("published 2 jobs to {queue}")),
        "{}",
        run.stderr
    );
    let mut jobs = Vec::new();
    while let Some(message) = queues
        .channel
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic_get")
    {
        jobs.push(message);
    }
    assert_eq!(bodies(&jobs), [first.as_bytes(), second.as_bytes()]);
    for job in &jobs {
        let properties = &job.delivery.properties;
        assert_eq!(
            properties.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
        assert_eq!(*properties.delivery_mode(), Some(2), "persistent");
    }
    queues.delete().await;
}

#[tokio::test]
async fn publish_of_a_missing_file_fails_with_one_line_naming_it() {
    let url = amqp_url();
    let run = account_worker(
        &[("AMQP_URL", url.as_str()), ("JOBS_QUEUE", "unused")],
        &["publish", "/nonexistent/jobs.jsonl"],
    )
    .await;

    assert_eq!(run.code, Some(1));
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    let error = run.error_line();
    assert!(
        error.starts_with("account-worker: cannot read jobs from /nonexistent/jobs.jsonl"),
        "{error}"
    );
    assert_eq!(
        error.matches("os error 2").count(),
        1,
        "cause said once: {error}"
    );
}

#[tokio::test]
async fn replay_with_a_code_moves_only_those_dead_letters_and_leaves_the_rest_in_place() {
    let queues = DeadLetterQueues::open("cli_replay_code").await;
    queues.seed(&seeds()).await;

    let run = account_worker(
        &queues.env(),
        &["dlq", "replay", "--code", "err_outcome_unknown"],
    )
    .await;

    run.assert_ok();
    assert_eq!(run.stdout.lines().count(), 2, "{}", run.stdout);
    assert!(run.stdout.contains("job-a") && run.stdout.contains("job-c"));
    assert!(
        run.stderr.contains("replayed 2 of 4 dead letters"),
        "{}",
        run.stderr
    );
    let replayed = queues.take_all(&queues.names.jobs).await;
    assert_eq!(
        bodies(&replayed),
        [TIMEOUT_A, TIMEOUT_C],
        "bodies byte for byte"
    );
    let mut replay_ids = Vec::new();
    for ((message, job_id), body) in replayed
        .iter()
        .zip(["job-a", "job-c"])
        .zip([TIMEOUT_A, TIMEOUT_C])
    {
        assert_eq!(header(message, "x-job-id").as_deref(), Some(job_id));
        let replay_id = header(message, "x-replay-id").expect("x-replay-id set");
        // These seeds carry no x-outcome-id: the id is derived from the dead letter.
        assert_eq!(
            replay_id,
            OutcomeId::of_content(Some(job_id), None, body).as_str()
        );
        assert_eq!(header(message, "x-replay-origin"), None);
        replay_ids.push(replay_id);
        let properties = &message.delivery.properties;
        assert_eq!(*properties.delivery_mode(), Some(2), "persistent");
        assert_eq!(
            properties.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
    }
    assert_ne!(replay_ids[0], replay_ids[1], "each replay has its own id");
    let left = queues.take_all(&queues.names.dead).await;
    assert_eq!(
        bodies(&left),
        [NOT_FOUND_B, MALFORMED],
        "others stay, in order"
    );
    assert_eq!(
        header(&left[0], "x-error-code").as_deref(),
        Some("err_http_404")
    );
    assert_eq!(header(&left[0], "x-job-id").as_deref(), Some("job-b"));
    assert_eq!(header(&left[0], "x-attempts").as_deref(), Some("3"));
    queues.delete().await;
}

#[tokio::test]
async fn malformed_dead_letters_are_replayed_only_when_their_code_is_named() {
    let queues = DeadLetterQueues::open("cli_replay_malformed").await;
    queues.seed(&seeds()).await;

    let all = account_worker(&queues.env(), &["dlq", "replay"]).await;

    all.assert_ok();
    assert!(
        all.stderr.contains("--code err_job_malformed"),
        "the summary says how to replay malformed ones: {}",
        all.stderr
    );
    let replayed = queues.take_all(&queues.names.jobs).await;
    assert_eq!(bodies(&replayed), [TIMEOUT_A, NOT_FOUND_B, TIMEOUT_C]);
    assert_eq!(queues.depth(&queues.names.dead).await, 1);

    let malformed = account_worker(
        &queues.env(),
        &["dlq", "replay", "--code", "err_job_malformed"],
    )
    .await;

    malformed.assert_ok();
    let replayed = queues.take_all(&queues.names.jobs).await;
    assert_eq!(bodies(&replayed), [MALFORMED]);
    assert!(header(&replayed[0], "x-replay-id").is_some());
    assert_eq!(header(&replayed[0], "x-job-id"), None, "it had no jobId");
    assert_eq!(queues.depth(&queues.names.dead).await, 0);
    queues.delete().await;
}

/// Jobs-queue arguments under which the broker refuses (nacks) every publish.
fn refusing_every_publish() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    arguments
}

#[tokio::test]
async fn replay_refused_by_the_broker_loses_no_dead_letter_and_says_what_to_do() {
    let queues = DeadLetterQueues::open_with("cli_replay_refused", refusing_every_publish()).await;
    queues.seed(&seeds()).await;

    let run = account_worker(&queues.env(), &["dlq", "replay"]).await;

    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert_eq!(run.stdout, "", "nothing was replayed");
    let error = run.error_line();
    assert!(
        error.starts_with("account-worker: replay stopped after 0 dead letters")
            && error.contains("job-a")
            && error.contains("nothing was lost")
            && error.contains("run `dlq replay` again"),
        "{error}"
    );
    assert_eq!(
        error.matches("not confirmed").count(),
        1,
        "cause said once: {error}"
    );
    let left = queues.take_all(&queues.names.dead).await;
    assert_eq!(
        bodies(&left),
        [TIMEOUT_A, NOT_FOUND_B, TIMEOUT_C, MALFORMED],
        "every dead letter stays, in order"
    );
    queues.delete().await;
}

#[tokio::test]
async fn publish_refused_by_the_broker_fails_with_one_line_saying_how_far_it_got() {
    let queues = DeadLetterQueues::open_with("cli_publish_refused", refusing_every_publish()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("jobs.jsonl");
    std::fs::write(&file, "{\"jobId\":\"r-1\"}\n{\"jobId\":\"r-2\"}\n").expect("write jobs");

    let run = account_worker(
        &queues.env(),
        &["publish", file.to_str().expect("utf-8 path")],
    )
    .await;

    assert_eq!(run.code, Some(1), "{}", run.stderr);
    let error = run.error_line();
    assert!(
        error.contains("the broker refused it") && error.contains("the first 0 of 2 jobs"),
        "{error}"
    );
    assert_eq!(
        error.matches("not confirmed").count(),
        1,
        "cause said once: {error}"
    );
    queues.delete().await;
}

#[tokio::test]
async fn replay_dry_run_prints_the_choice_and_moves_nothing() {
    let queues = DeadLetterQueues::open("cli_replay_dry").await;
    queues.seed(&seeds()).await;

    let run = account_worker(
        &queues.env(),
        &[
            "dlq",
            "replay",
            "--code",
            "err_outcome_unknown",
            "--dry-run",
        ],
    )
    .await;

    run.assert_ok();
    let would: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(would.len(), 2, "{}", run.stdout);
    assert!(would[0].starts_with("would replay job-a"), "{}", would[0]);
    assert!(would[1].starts_with("would replay job-c"), "{}", would[1]);
    assert!(run.stderr.contains("nothing was changed"), "{}", run.stderr);
    assert_eq!(queues.depth(&queues.names.jobs).await, 0);
    let left = queues.take_all(&queues.names.dead).await;
    assert_eq!(
        bodies(&left),
        [TIMEOUT_A, NOT_FOUND_B, TIMEOUT_C, MALFORMED],
        "every dead letter stays, in order"
    );
    queues.delete().await;
}

#[tokio::test]
async fn replay_limit_one_moves_one_dead_letter() {
    let queues = DeadLetterQueues::open("cli_replay_limit").await;
    queues.seed(&seeds()).await;

    let run = account_worker(&queues.env(), &["dlq", "replay", "--limit", "1"]).await;

    run.assert_ok();
    assert_eq!(run.stdout.lines().count(), 1, "{}", run.stdout);
    assert!(run.stderr.contains("--limit"), "{}", run.stderr);
    let replayed = queues.take_all(&queues.names.jobs).await;
    assert_eq!(bodies(&replayed), [TIMEOUT_A]);
    let left = queues.take_all(&queues.names.dead).await;
    assert_eq!(bodies(&left), [NOT_FOUND_B, TIMEOUT_C, MALFORMED]);
    queues.delete().await;
}

#[tokio::test]
async fn dlq_list_shows_dead_letters_and_leaves_them_in_place() {
    let queues = DeadLetterQueues::open("cli_list").await;
    queues.seed(&seeds()).await;

    let run = account_worker(&queues.env(), &["dlq", "list"]).await;

    run.assert_ok();
    for shown in [
        "job-a",
        "err_http_404",
        "job-c",
        "err_job_malformed",
        "not json {",
    ] {
        assert!(run.stdout.contains(shown), "{shown} in:\n{}", run.stdout);
    }
    assert_eq!(queues.depth(&queues.names.jobs).await, 0);
    let left = queues.take_all(&queues.names.dead).await;
    assert_eq!(
        bodies(&left),
        [TIMEOUT_A, NOT_FOUND_B, TIMEOUT_C, MALFORMED]
    );
    queues.delete().await;
}

#[tokio::test]
async fn replay_against_an_unreachable_broker_fails_with_one_line_saying_what_to_check() {
    let run = account_worker(
        &[
            ("AMQP_URL", "amqp://guest:pw-never-shown@127.0.0.1:1/%2f"),
            ("JOBS_QUEUE", "unused"),
        ],
        &["dlq", "replay"],
    )
    .await;

    assert_eq!(run.code, Some(1));
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(
        run.stderr
            .starts_with("account-worker: cannot connect to RabbitMQ"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("AMQP_URL"), "{}", run.stderr);
    assert!(!run.stderr.contains("pw-never-shown"), "{}", run.stderr);
}

/// Secrets set in the environment of `check`.
const SECRET_ENV: [(&str, &str); 7] = [
    ("MIMECAST_ACCESS_KEY", "mc-access-key-4f1e9"),
    // base64 of "mc-secret-key-bytes-77"
    ("MIMECAST_SECRET_KEY", "bWMtc2VjcmV0LWtleS1ieXRlcy03Nw=="),
    ("MIMECAST_APP_KEY", "mc-app-key-0c2d8"),
    ("PNCP_APPLICATION_KEY", "pncp-application-key-91ab"),
    ("PNCP_SHARED_SECRET", "pncp-shared-secret-e5f0"),
    (
        "PNCP_BASE_URL",
        "http://pncp-user:url-pass-6d2b@127.0.0.1:9/pncp",
    ),
    ("LEDGER_URL", "redis://:ledger-pass-3a7c@127.0.0.1:6379/0"),
];

/// What must appear in no output: the secrets above, the decoded Mimecast key, and
/// the passwords inside URLs.
const SECRETS: [&str; 8] = [
    "mc-access-key-4f1e9",
    "bWMtc2VjcmV0LWtleS1ieXRlcy03Nw==",
    "mc-secret-key-bytes-77",
    "mc-app-key-0c2d8",
    "pncp-application-key-91ab",
    "pncp-shared-secret-e5f0",
    "url-pass-6d2b",
    "ledger-pass-3a7c",
];

fn assert_no_secret(run: &Run, broker_password: Option<&str>) {
    let output = format!("{}\n{}", run.stdout, run.stderr);
    for secret in SECRETS.into_iter().chain(broker_password) {
        assert!(!output.contains(secret), "{secret} leaked:\n{output}");
    }
}

/// `check`'s environment: every vendor configured, logging at its most verbose.
fn check_env<'a>(amqp_url: &'a str, jobs_queue: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("AMQP_URL", amqp_url),
        ("JOBS_QUEUE", jobs_queue),
        ("RUST_LOG", "trace"),
        ("MIMECAST_BASE_URL", "http://127.0.0.1:9/mimecast"),
        ("MIMECAST_APP_ID", "app-id-is-public"),
    ];
    env.extend(SECRET_ENV);
    env
}

#[tokio::test]
async fn check_reports_vendors_and_prints_no_secret() {
    let queues = DeadLetterQueues::open("cli_check").await;
    let url = url::Url::parse(&queues.url).expect("TEST_AMQP_URL is a URL");
    // With guest:guest the password is also the user name, which is shown.
    let broker_password = url.password().filter(|p| *p != url.username());

    let run = account_worker(&check_env(&queues.url, &queues.names.jobs), &["check"]).await;

    run.assert_ok();
    for shown in [
        "app-id-is-public",
        "http://127.0.0.1:9/mimecast",
        // A base URL's credentials are dropped when the configuration is read.
        "http://127.0.0.1:9/pncp (",
        "redis://:***@127.0.0.1:6379/0",
        "reachable",
    ] {
        assert!(run.stdout.contains(shown), "{shown} in:\n{}", run.stdout);
    }
    assert_no_secret(&run, broker_password);
    queues.delete().await;
}

#[tokio::test]
async fn check_with_a_wrong_broker_password_names_the_broker_without_the_password() {
    let mut wrong = url::Url::parse(&amqp_url()).expect("TEST_AMQP_URL is a URL");
    wrong
        .set_password(Some("wrong-broker-pass-8e4d"))
        .expect("set password");

    let run = account_worker(
        &check_env(wrong.as_str(), "test.cli_check_refused"),
        &["check"],
    )
    .await;

    assert_eq!(run.code, Some(1), "{}", run.stderr);
    let last = run.error_line();
    assert!(
        last.starts_with("account-worker: cannot connect to RabbitMQ at") && last.contains(":***@"),
        "{last}"
    );
    assert_no_secret(&run, Some("wrong-broker-pass-8e4d"));
}

#[tokio::test]
async fn help_says_what_replay_does_and_its_defaults() {
    let run = account_worker(&[], &["dlq", "replay", "--help"]).await;

    run.assert_ok();
    for said in [
        "--code <CODE>",
        "--limit <N>",
        "--dry-run",
        "err_job_malformed",
        "default: no limit",
        "confirmed",
    ] {
        assert!(run.stdout.contains(said), "{said} in:\n{}", run.stdout);
    }
    let top = account_worker(&[], &["--help"]).await;
    top.assert_ok();
    for command in ["publish", "dlq", "check", "run"] {
        assert!(top.stdout.contains(command), "{}", top.stdout);
    }
}

#[tokio::test]
async fn replay_names_every_copy_of_a_dead_letter_after_its_stored_outcome() {
    let queues = DeadLetterQueues::open("cli_replay_names").await;
    let (outcome, run) = (OutcomeId::new(), OutcomeId::new());
    let mut headers = FieldTable::default();
    let text = |value: &str| AMQPValue::LongString(LongString::from(value));
    headers.insert("x-error-code".into(), text("err_http_400"));
    headers.insert("x-job-id".into(), text("job-b"));
    headers.insert("x-outcome-id".into(), text(outcome.as_str()));
    headers.insert("x-run-replay-id".into(), text(run.as_str()));
    for _ in 0..2 {
        publish_with(
            &queues.channel,
            &queues.names.dead,
            NOT_FOUND_B,
            headers.clone(),
        )
        .await;
    }

    let run_output = account_worker(&queues.env(), &["dlq", "replay"]).await;

    run_output.assert_ok();
    let replayed = queues.take_all(&queues.names.jobs).await;
    assert_eq!(bodies(&replayed), [NOT_FOUND_B, NOT_FOUND_B]);
    for copy in &replayed {
        assert_eq!(
            header(copy, "x-replay-id").as_deref(),
            Some(outcome.as_str()),
            "both copies replay under the stored outcome's id"
        );
        assert_eq!(
            header(copy, "x-replay-origin").as_deref(),
            Some(run.as_str()),
            "the replayed run the dead letter came from"
        );
    }
    queues.delete().await;
}

/// Publishes `body` with `headers` to `queue`, confirmed.
async fn publish_with(channel: &Channel, queue: &str, body: &[u8], headers: FieldTable) {
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(headers),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack(), "broker refused a test message");
}

/// Waits until `n` dead letters are in the dead-letter queue and returns them,
/// leaving them in place (taken unacked on a channel of their own, which is then
/// closed, so the broker puts them back in order).
async fn await_dead_letters(app: &TestApp, n: usize) -> Vec<Delivery> {
    let channel = app
        .queues
        .connection
        .create_channel()
        .await
        .expect("channel");
    let mut consumer = channel
        .basic_consume(
            app.queues.names.dead.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut letters = Vec::new();
    while letters.len() < n {
        let delivery = tokio::time::timeout(EVENT_TIMEOUT, consumer.next())
            .await
            .unwrap_or_else(|_| panic!("{n} dead letters not there within {EVENT_TIMEOUT:?}"))
            .expect("consumer ended")
            .expect("delivery");
        letters.push(delivery);
    }
    channel
        .close(200, "looked at".into())
        .await
        .expect("close hands them back");
    letters
}

fn delivery_header(delivery: &Delivery, name: &str) -> Option<String> {
    header_text(delivery.properties.headers().as_ref()?, name)
}

/// The environment `dlq replay` runs with against a test worker's queues.
fn replay_env(app: &TestApp) -> Vec<(&str, &str)> {
    vec![
        ("AMQP_URL", app.env["AMQP_URL"].as_str()),
        ("JOBS_QUEUE", app.env["JOBS_QUEUE"].as_str()),
        ("RUST_LOG", "warn"),
    ]
}

/// Runs `dlq replay` against the test worker's queues and checks it succeeded.
async fn replay(app: &TestApp) -> Run {
    let run = account_worker(&replay_env(app), &["dlq", "replay"]).await;
    run.assert_ok();
    run
}

/// A job adding users: applying it twice would add them twice.
fn adding_job(job_id: &str, account: &str) -> Value {
    json!({"jobId": job_id, "vendor": "mimecast",
           "data": [{"accountCode": account, "numberOfUsers": 5}]})
}

async fn next_status(app: &mut TestApp) -> JobStatus {
    app.queues.next_result().await.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_copies_of_a_dead_letter_replayed_apply_the_change_once() {
    let mut app = TestApp::spawn("replay_copies").await;
    app.mock
        .push_fault(Vendor::Mimecast, Fault::Status { status: 400 });
    let job = adding_job("rc-1", "RC");
    app.queues.publish(&job).await;
    assert_eq!(next_status(&mut app).await, JobStatus::Failed);
    // The producer sends the job again: its stored outcome, dead letter included,
    // is published again, so two copies of the dead letter wait.
    app.queues.publish(&job).await;
    assert_eq!(next_status(&mut app).await, JobStatus::Failed);
    let copies = await_dead_letters(&app, 2).await;
    assert_eq!(copies[0].data, copies[1].data);
    let outcome = delivery_header(&copies[0], "x-outcome-id").expect("x-outcome-id set");
    assert_eq!(
        delivery_header(&copies[1], "x-outcome-id").as_deref(),
        Some(outcome.as_str()),
        "every copy names the same stored outcome"
    );

    // The cause is fixed (no fault any more); the operator replays both copies.
    replay(&app).await;

    assert_eq!(next_status(&mut app).await, JobStatus::Succeeded);
    assert_eq!(next_status(&mut app).await, JobStatus::Succeeded);
    assert_eq!(
        app.mock.applied_count(Vendor::Mimecast, "RC"),
        1,
        "numberOfUsers added once"
    );
    assert_eq!(
        app.mock.mimecast_account("RC").expect("account").user_count,
        5
    );
    assert_eq!(app.queues.depth(&app.queues.names.dead).await, 0);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_replayed_again_after_a_run_killed_before_its_ack_is_applied_once() {
    let mut app = TestApp::spawn("replay_again").await;
    app.mock
        .push_fault(Vendor::Mimecast, Fault::Status { status: 400 });
    app.queues.publish(&adding_job("ra-1", "RA")).await;
    assert_eq!(next_status(&mut app).await, JobStatus::Failed);
    let letter = await_dead_letters(&app, 1).await.remove(0);

    replay(&app).await;
    let first: JobResult = app.queues.next_result().await;
    assert_eq!(first.status, JobStatus::Succeeded);
    // As if that run had been killed after its copy was confirmed and before the
    // dead letter's ack: the same dead letter is still there, and replay runs again.
    publish_with(
        &app.queues.channel,
        &app.queues.names.dead,
        &letter.data,
        letter.properties.headers().clone().unwrap_or_default(),
    )
    .await;
    replay(&app).await;

    let again = app.queues.next_result().await;
    assert_eq!(again, first, "the first replay's outcome, published again");
    assert_eq!(app.mock.applied_count(Vendor::Mimecast, "RA"), 1);
    assert_eq!(
        app.mock.requests().len(),
        2,
        "the failed call and one replay"
    );
    assert_eq!(app.queues.depth(&app.queues.names.dead).await, 0);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_setting_its_own_replay_id_gets_the_stored_outcome_and_nothing_is_sent() {
    let mut app = TestApp::spawn("replay_forged").await;
    let job = adding_job("rf-1", "RF");
    app.queues.publish(&job).await;
    let first = app.queues.next_result().await;
    assert_eq!(first.status, JobStatus::Succeeded);

    let body = serde_json::to_vec(&job).expect("json");
    let own_ids = [
        OutcomeId::new().to_string(),
        "not an id dlq replay makes".to_owned(),
    ];
    for own_id in &own_ids {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-replay-id".into(),
            AMQPValue::LongString(LongString::from(own_id.as_str())),
        );
        publish_with(&app.queues.channel, &app.queues.names.jobs, &body, headers).await;
        let copy = app.queues.next_result().await;
        assert_eq!(copy, first, "the stored outcome, published again");
    }

    assert_eq!(app.mock.applied_count(Vendor::Mimecast, "RF"), 1);
    assert_eq!(app.mock.requests().len(), 1, "nothing sent for the copies");
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_that_fails_again_is_a_new_dead_letter_replayed_once_after_the_next_fix() {
    let mut app = TestApp::spawn("replay_chain").await;
    for _ in 0..2 {
        app.mock
            .push_fault(Vendor::Mimecast, Fault::Status { status: 400 });
    }
    app.queues.publish(&adding_job("rh-1", "RH")).await;
    assert_eq!(next_status(&mut app).await, JobStatus::Failed);
    let first = await_dead_letters(&app, 1).await.remove(0);
    let first_outcome = delivery_header(&first, "x-outcome-id").expect("x-outcome-id");

    // Replayed before the cause is fixed: it fails again.
    replay(&app).await;
    assert_eq!(next_status(&mut app).await, JobStatus::Failed);
    let second = await_dead_letters(&app, 1).await.remove(0);
    let second_outcome = delivery_header(&second, "x-outcome-id").expect("x-outcome-id");
    assert_ne!(second_outcome, first_outcome, "a new stored outcome");
    assert_eq!(
        delivery_header(&second, "x-run-replay-id").as_deref(),
        Some(first_outcome.as_str()),
        "it says which replay produced it"
    );

    replay(&app).await;
    assert_eq!(next_status(&mut app).await, JobStatus::Succeeded);
    replay(&app).await; // nothing left to replay
    assert_eq!(app.mock.applied_count(Vendor::Mimecast, "RH"), 1);
    assert_eq!(app.mock.requests().len(), 3);
    app.finish().await;
}
