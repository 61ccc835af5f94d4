//! Command-line interface: the subcommands and their arguments.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

pub mod check;
pub mod inspect;
pub mod mock;
pub mod publish;

/// Keeps customer accounts at Mimecast and PNCP in step with CRM jobs on RabbitMQ.
#[derive(Debug, Parser)]
#[command(name = "account-worker", version, about)]
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
    Run,
    /// Validate the configuration, connect to the broker, and list the configured vendors.
    Check,
    /// Publish jobs (one JSON document per line) to the jobs queue, with confirms.
    Publish {
        /// File of jobs, one per line; `-` or nothing reads standard input.
        file: Option<PathBuf>,
    },
    /// Take results off `<JOBS_QUEUE>.results` and print them.
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
    /// Inspect the dead-letter queue.
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
    },
}

/// Dead-letter actions.
#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// Print dead letters without removing them.
    List {
        /// Print at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}
