//! Command-line interface: the subcommands and their arguments.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

pub mod check;
pub mod inspect;
pub mod mock;
mod progress;
pub mod publish;
pub mod replay;

pub use replay::ReplayFilter;

/// Keeps customer accounts at Mimecast and PNCP in step with CRM jobs on RabbitMQ.
#[derive(Debug, Parser)]
#[command(
    name = "account-worker",
    version,
    about,
    after_help = "Settings come from the embedded defaults, then --config FILE, then the \
environment (AMQP_URL, JOBS_QUEUE, MIMECAST_*, PNCP_*, ...; see config/default.toml). \
Every command works on JOBS_QUEUE (default account-updates), <JOBS_QUEUE>.results and \
<JOBS_QUEUE>.dead in the vhost of AMQP_URL."
)]
pub struct Cli {
    /// A TOML file overriding the embedded defaults (environment variables override both).
    #[arg(long, global = true, env = "WORKER_CONFIG")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a worker: consume jobs, call the vendors, publish results.
    ///
    /// Runs until SIGTERM or SIGINT, then finishes or hands back in-flight jobs
    /// within SHUTDOWN_TIMEOUT. Serves /metrics, /healthz and /readyz on METRICS_ADDR.
    Run,
    /// Validate the configuration, connect to the broker, and list the configured vendors.
    ///
    /// Prints the settings in force (the broker URL with its password hidden; no key
    /// or secret is ever printed), declares the three queues, and exits non-zero with
    /// one line naming the problem when the configuration or the broker is not usable.
    Check,
    /// Publish jobs (one JSON document per line) to the jobs queue, with confirms.
    ///
    /// Each non-empty line is sent as it is, persistent, as application/json; blank
    /// lines are skipped. Lines are not validated here: the worker dead-letters a
    /// malformed job. Returns once the broker has confirmed every job, and prints how
    /// many were published. A progress bar is drawn on a terminal for long runs.
    Publish {
        /// File of jobs, one per line; `-` or nothing reads standard input.
        file: Option<PathBuf>,
    },
    /// Take results off `<JOBS_QUEUE>.results` and print them.
    ///
    /// Results read are acknowledged, so they leave the queue.
    Results {
        /// Stop after this many results.
        #[arg(long, default_value_t = 1000)]
        count: usize,
        /// Stop when no result arrives for this long.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        idle: Duration,
        /// Print each result as its raw JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Inspect the dead-letter queue, or replay dead letters to the jobs queue.
    Dlq {
        /// What to do with the dead letters.
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Serve the signature-checking, fault-injecting mock vendor (tests, demo, benchmarks).
    MockVendor {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:18080")]
        listen: std::net::SocketAddr,
        /// Added latency per vendor call.
        #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
        latency: Duration,
        /// Random faults, for soaks.
        #[command(flatten)]
        faults: mock::RandomFaultArgs,
    },
    /// Measure throughput, vendor calls, CPU and memory against the real broker and
    /// the mock vendor, next to a naive consumer and the broker ceiling.
    Bench {
        /// Jobs per unthrottled case (rate-limited and naive cases use fewer).
        #[arg(long, default_value_t = 20_000)]
        jobs: usize,
        /// Jobs queued before the worker starts, for the memory case (0 skips it).
        #[arg(long, default_value_t = 100_000)]
        backlog: usize,
        /// Where to write the throughput-versus-concurrency chart.
        #[arg(long, default_value = "docs/throughput.svg")]
        chart: PathBuf,
        /// Run only the cases whose name contains this text (e.g. `20ps`, `50ms`).
        #[arg(long)]
        only: Option<String>,
    },
    /// A reference consumer for `bench` (naive or pass-through); not for production.
    #[command(hide = true)]
    BenchConsumer {
        /// Which reference consumer.
        #[arg(value_enum)]
        baseline: crate::bench::baselines::Baseline,
    },
}

/// Dead-letter actions.
#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// Print dead letters with their headers and bodies, without removing them.
    ///
    /// Every dead letter looked at goes back to `<JOBS_QUEUE>.dead` in its place.
    List {
        /// Print at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Move dead letters back to the jobs queue once their cause is fixed.
    ///
    /// Each chosen dead letter is re-published to JOBS_QUEUE (body unchanged,
    /// persistent, with an `x-replay-id` header derived from the dead letter, so the
    /// worker attempts the change again, and at most once however many copies of
    /// that dead letter are replayed and however often) and leaves
    /// `<JOBS_QUEUE>.dead` only after the broker confirmed that publish; on any
    /// failure it stays where it was, and replaying it again is safe. Dead letters
    /// not chosen stay in place. Every dead letter present when the command starts
    /// is looked at once; those arriving meanwhile wait for the next run.
    Replay(ReplayFilter),
}
