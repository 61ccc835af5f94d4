//! Shared test harness: a worker on randomised queue names against the real broker,
//! a mock vendor on port 0, and helpers that await results instead of sleeping.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::time::Duration;

use account_worker::config::{QueueNames, Settings};
use account_worker::job::JobResult;
use account_worker::job::VendorKind;
use account_worker::mock_vendor::{self, MockVendor, MockVendorConfig};
use account_worker::worker::Worker;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a test waits for an event before it fails (generous: CI has 2 cores).
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(60);

/// The broker the tests use: `TEST_AMQP_URL`, or the local default.
pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The Redis the tests use: `TEST_REDIS_URL`, or the local default, with
/// database `db`. Each test takes its own database, so parallel tests share no
/// state.
#[allow(dead_code)] // not every test binary uses Redis
pub fn redis_url(db: u8) -> String {
    let base = std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    format!("{}/{db}", base.trim_end_matches('/'))
}

/// A unique jobs-queue name for one test.
pub fn unique_queue(test: &str) -> String {
    format!("test.{test}.{}", uuid::Uuid::new_v4().simple())
}

/// The environment a test worker runs with, pointing at `mock`.
pub fn worker_env(
    queue: &str,
    mock: &MockVendor,
    ledger_dir: &std::path::Path,
) -> HashMap<String, String> {
    let mut env = HashMap::new();
    let mut set = |k: &str, v: String| {
        env.insert(k.to_owned(), v);
    };
    set("AMQP_URL", amqp_url());
    set("JOBS_QUEUE", queue.to_owned());
    set("WORKER_CONCURRENCY", "8".to_owned());
    set("MIMECAST_BASE_URL", mock.base_url());
    set(
        "MIMECAST_ACCESS_KEY",
        mock_vendor::DEMO_MIMECAST_ACCESS_KEY.to_owned(),
    );
    set(
        "MIMECAST_SECRET_KEY",
        mock_vendor::DEMO_MIMECAST_SECRET_KEY_B64.to_owned(),
    );
    set(
        "MIMECAST_APP_ID",
        mock_vendor::DEMO_MIMECAST_APP_ID.to_owned(),
    );
    set(
        "MIMECAST_APP_KEY",
        mock_vendor::DEMO_MIMECAST_APP_KEY.to_owned(),
    );
    set("PNCP_BASE_URL", mock.pncp_base_url());
    set(
        "PNCP_APPLICATION_KEY",
        mock_vendor::DEMO_PNCP_APPLICATION_KEY.to_owned(),
    );
    set(
        "PNCP_SHARED_SECRET",
        mock_vendor::DEMO_PNCP_SHARED_SECRET.to_owned(),
    );
    set("RETRY_INITIAL_DELAY", "10ms".to_owned());
    set("RETRY_MAX_DELAY", "100ms".to_owned());
    set("RETRY_MAX_ATTEMPTS", "4".to_owned());
    set("VENDOR_TIMEOUT", "10s".to_owned());
    set("SHUTDOWN_TIMEOUT", "10s".to_owned());
    set("LEDGER_LEASE", "3s".to_owned());
    set("METRICS_ADDR", "127.0.0.1:0".to_owned());
    set(
        "LEDGER_URL",
        format!("file:{}", ledger_dir.join("ledger").display()),
    );
    env
}

/// Settings from an environment map, with nothing read from the real environment.
pub fn settings_from(env: &HashMap<String, String>) -> Settings {
    Settings::load_from(None, |k| env.get(k).cloned()).expect("test settings are valid")
}

/// A test's view of the broker: a confirm channel to publish jobs and consumers on
/// the results and dead-letter queues.
pub struct Queues {
    pub names: QueueNames,
    pub connection: Connection,
    pub channel: Channel,
    // Started on first use, so that `depth` counts every message until a test
    // reads that queue.
    results: Option<Consumer>,
    dead: Option<Consumer>,
}

/// Connects with publisher confirms on and declares the three durable queues of
/// `names`, the jobs queue with `jobs_arguments` (which must match the worker's).
pub async fn declare_queues(
    names: &QueueNames,
    jobs_arguments: FieldTable,
) -> (Connection, Channel) {
    declare_queues_with(names, jobs_arguments, FieldTable::default()).await
}

/// As [`declare_queues`], the results queue with `results_arguments` (an
/// operator's limits the worker must live with).
pub async fn declare_queues_with(
    names: &QueueNames,
    jobs_arguments: FieldTable,
    results_arguments: FieldTable,
) -> (Connection, Channel) {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ must be running (scripts/ensure-services starts it)");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    for name in [&names.jobs, &names.results, &names.dead] {
        let arguments = if name == &names.jobs {
            jobs_arguments.clone()
        } else if name == &names.results {
            results_arguments.clone()
        } else {
            FieldTable::default()
        };
        channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await
            .expect("declare");
    }
    (connection, channel)
}

impl Queues {
    /// Declares the three queues for `jobs_queue` and starts consuming the outputs.
    pub async fn open(jobs_queue: &str) -> Self {
        Self::open_with_results(jobs_queue, FieldTable::default()).await
    }

    /// As [`Queues::open`], the results queue declared with `results_arguments`.
    pub async fn open_with_results(jobs_queue: &str, results_arguments: FieldTable) -> Self {
        let names = QueueNames::new(jobs_queue).expect("queue name");
        let (connection, channel) =
            declare_queues_with(&names, FieldTable::default(), results_arguments).await;
        Self {
            names,
            connection,
            channel,
            results: None,
            dead: None,
        }
    }

    /// Publishes raw bytes to the jobs queue and waits for the broker's confirm.
    pub async fn publish_raw(&self, body: &[u8]) {
        self.publish_raw_to(&self.names.jobs, body).await;
    }

    /// Publishes a JSON job to `queue` (another queue the worker consumes).
    #[allow(dead_code)] // not every test binary consumes several queues
    pub async fn publish_to(&self, queue: &str, job: &Value) {
        self.publish_raw_to(queue, &serde_json::to_vec(job).expect("json"))
            .await;
    }

    async fn publish_raw_to(&self, queue: &str, body: &[u8]) {
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack(), "broker refused a test job");
    }

    /// Publishes a JSON job.
    pub async fn publish(&self, job: &Value) {
        self.publish_raw(&serde_json::to_vec(job).expect("json"))
            .await;
    }

    async fn consumer(channel: &Channel, queue: &str) -> Consumer {
        channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume")
    }

    async fn next(consumer: &mut Consumer, what: &str) -> Delivery {
        let delivery = tokio::time::timeout(EVENT_TIMEOUT, consumer.next())
            .await
            .unwrap_or_else(|_| panic!("no {what} within {EVENT_TIMEOUT:?}"))
            .expect("consumer ended")
            .expect("delivery");
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
        delivery
    }

    /// The next result, with its AMQP properties.
    pub async fn next_result_delivery(&mut self) -> Delivery {
        if self.results.is_none() {
            self.results = Some(Self::consumer(&self.channel, &self.names.results).await);
        }
        let consumer = self.results.as_mut().expect("started above");
        Self::next(consumer, "result").await
    }

    /// The next result, parsed.
    pub async fn next_result(&mut self) -> JobResult {
        let delivery = self.next_result_delivery().await;
        serde_json::from_slice(&delivery.data).expect("results are JobResult JSON")
    }

    /// The next `n` results keyed by job id.
    pub async fn results_by_job(&mut self, n: usize) -> HashMap<String, JobResult> {
        let mut results = HashMap::new();
        for _ in 0..n {
            let result = self.next_result().await;
            results.insert(result.job_id.clone(), result);
        }
        results
    }

    /// The next dead letter.
    pub async fn next_dead_letter(&mut self) -> DeadLetter {
        if self.dead.is_none() {
            self.dead = Some(Self::consumer(&self.channel, &self.names.dead).await);
        }
        let consumer = self.dead.as_mut().expect("started above");
        let delivery = Self::next(consumer, "dead letter").await;
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let header = |name: &str| account_worker::broker::header_text(&headers, name);
        DeadLetter {
            code: header("x-error-code").unwrap_or_default(),
            message: header("x-error-message").unwrap_or_default(),
            attempts: header("x-attempts"),
            job_id: header("x-job-id"),
            body: delivery.data,
        }
    }

    /// Messages waiting in a queue right now (a passive declare).
    pub async fn depth(&self, queue: &str) -> u32 {
        let channel = self.connection.create_channel().await.expect("channel");
        account_worker::broker::queue_depth(&channel, queue)
            .await
            .expect("queue exists")
    }

    /// Deletes the test's queues.
    pub async fn delete(self) {
        for name in [&self.names.jobs, &self.names.results, &self.names.dead] {
            let _ = self
                .channel
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = self.connection.close(200, "test done".into()).await;
    }
}

/// A dead letter as a test reads it.
#[derive(Debug)]
pub struct DeadLetter {
    pub code: String,
    pub message: String,
    pub attempts: Option<String>,
    pub job_id: Option<String>,
    pub body: Vec<u8>,
}

impl DeadLetter {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("dead letter body is JSON")
    }
}

/// A worker running in this process against the mock vendor, plus the test's queues.
pub struct TestApp {
    pub mock: MockVendor,
    pub queues: Queues,
    pub env: HashMap<String, String>,
    pub ledger_dir: tempfile::TempDir,
    pub worker: Worker,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl TestApp {
    /// Starts a mock vendor and a worker on fresh queues.
    pub async fn spawn(test: &str) -> Self {
        Self::spawn_with(test, |_| {}).await
    }

    /// As [`TestApp::spawn`], letting the test adjust the worker's environment.
    pub async fn spawn_with(test: &str, adjust: impl FnOnce(&mut HashMap<String, String>)) -> Self {
        let mock = MockVendor::start(
            "127.0.0.1:0".parse().expect("addr"),
            MockVendorConfig::demo(),
        )
        .await
        .expect("mock vendor starts");
        let ledger_dir = tempfile::tempdir().expect("tempdir");
        let queue = unique_queue(test);
        let mut env = worker_env(&queue, &mock, ledger_dir.path());
        adjust(&mut env);
        let queues = Queues::open(&queue).await;
        let (stop, task, worker) = start_worker_with_handle(&env).await;
        Self {
            mock,
            queues,
            env,
            ledger_dir,
            worker,
            stop,
            task: Some(task),
        }
    }

    /// Queues `n` answers of `status` for every call to `vendor`: an outage
    /// that lasts until the answers run out or the test calls `MockVendor::reset`.
    pub fn refuse_calls(&self, vendor: mock_vendor::Vendor, status: u16, n: usize) {
        for _ in 0..n {
            self.mock
                .push_fault(vendor, mock_vendor::Fault::Status { status });
        }
    }

    /// Waits until `vendor`'s circuit is open: its jobs are held.
    pub async fn wait_held(&self, vendor: VendorKind) {
        let circuit = self.worker.circuits().get(vendor);
        tokio::time::timeout(EVENT_TIMEOUT, circuit.wait_open())
            .await
            .unwrap_or_else(|_| panic!("{vendor}'s circuit opens: its jobs are held"));
    }

    /// Stops the worker gracefully (in-flight jobs finish or go back to the queue).
    pub async fn stop_worker(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(EVENT_TIMEOUT, task).await;
        }
    }

    /// Stops the worker gracefully and deletes the queues.
    pub async fn finish(mut self) {
        self.stop_worker().await;
        self.queues.delete().await;
        self.mock.shutdown();
    }
}

/// Runs a worker in this process with `env`; returns its stop token and task.
pub async fn start_worker(env: &HashMap<String, String>) -> (CancellationToken, JoinHandle<()>) {
    let (stop, handle, _) = start_worker_with_handle(env).await;
    (stop, handle)
}

/// As [`start_worker`], also returning the worker to observe its health and circuits.
pub async fn start_worker_with_handle(
    env: &HashMap<String, String>,
) -> (CancellationToken, JoinHandle<()>, Worker) {
    let worker = Worker::new(settings_from(env))
        .await
        .expect("worker builds");
    let stop = CancellationToken::new();
    let token = stop.clone();
    let running = worker.clone();
    let handle = tokio::spawn(async move { running.run(token).await });
    (stop, handle, worker)
}

/// The vendor's own count of what a run cost: calls that reached `vendor`
/// from `skip_ms` after its first call on, and how many of them it refused with
/// a 429 (the "429s after the first 2 s" is `refused_after(…, 2000)`).
pub fn refused_after(
    requests: &[mock_vendor::RecordedRequest],
    vendor: mock_vendor::Vendor,
    skip_ms: u64,
) -> (usize, usize) {
    let calls: Vec<_> = requests.iter().filter(|r| r.vendor == vendor).collect();
    let Some(first) = calls.iter().map(|r| r.at_ms).min() else {
        return (0, 0);
    };
    let counted: Vec<_> = calls
        .iter()
        .filter(|r| r.at_ms >= first + skip_ms)
        .collect();
    let refused = counted.iter().filter(|r| r.status == 429).count();
    (counted.len(), refused)
}
