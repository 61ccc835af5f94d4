//! The soak's command line, and the chaos a run carries out by default.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use account_worker::cli::mock::parse_share;
use account_worker::mock_vendor::Vendor;

/// Soak the worker under random vendor faults, connection closes and a SIGKILL.
#[derive(Debug, Parser)]
pub struct Args {
    /// Jobs to publish (each with 1–3 items).
    #[arg(long, default_value_t = 20_000)]
    pub jobs: usize,
    /// Two workers sharing a Redis ledger (`RATE_LIMIT_SCOPE=fleet`) instead of one
    /// worker with a file ledger.
    #[arg(long)]
    pub fleet: bool,
    /// Share of vendor calls the mock faults at random (`5%` or `0.05`; default 5%,
    /// 0 with `--outage`).
    #[arg(long, value_parser = parse_share)]
    pub fault_rate: Option<f64>,
    /// Seed of the jobs and of the mock's faults (default: from the clock, printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// How often every worker connection is closed (default 20s; never with `--outage`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub close_every: Option<Duration>,
    /// SIGKILL (and restart) a worker once this share of the jobs is answered
    /// (default 30%; never with `--outage`).
    #[arg(long, value_parser = parse_share)]
    pub kill_at: Option<f64>,
    /// Publish at this many jobs per second instead of all at once, so jobs of
    /// both vendors keep arriving through an outage.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Hold one vendor fully down for this long: every call to it answers
    /// `--outage-status` and applies nothing.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub outage: Option<Duration>,
    /// The vendor the outage takes down: mimecast or pncp.
    #[arg(long, default_value = "mimecast", value_parser = parse_vendor)]
    pub outage_vendor: Vendor,
    /// The status every call answers during the outage (503: the vendor is down;
    /// 401: its credentials are refused).
    #[arg(long, default_value_t = 503, value_parser = clap::value_parser!(u16).range(400..=599))]
    pub outage_status: u16,
    /// When the outage starts, counted from the start of publishing.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub outage_after: Duration,
    /// Sets the broker's consumer_timeout for the run (before the workers
    /// connect) and puts the previous value back at the end.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub consumer_timeout: Option<Duration>,
    /// The workers' HELD_DELIVERY_MAX (keep it well under the consumer timeout).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub held_delivery_max: Option<Duration>,
    /// The workers' VENDOR_TIMEOUT; the mock's slow calls wait one second longer.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub vendor_timeout: Duration,
    /// Each worker's WORKER_CONCURRENCY.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Share of jobs a "producer" publishes a second time (same body, up to 300 jobs later).
    #[arg(long, default_value = "1%", value_parser = parse_share)]
    pub producer_retries: f64,
    /// The `account-worker` binary (default: next to this example's directory).
    #[arg(long)]
    pub worker_bin: Option<PathBuf>,
    /// Broker without the vhost; the soak makes a vhost of its own with rabbitmqctl.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672")]
    pub amqp: String,
    /// The fleet's Redis ledger: a database of the soak's own.
    #[arg(long, default_value = "redis://127.0.0.1:6379/11")]
    pub redis: String,
    /// Where worker logs, the file ledger and the report go (one folder per run).
    #[arg(long, default_value = "target/soak")]
    pub out: PathBuf,
    /// Give up waiting for the jobs after this long (default: 2 min + 40 ms per job).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    /// Keep the run's vhost (and whatever is left in its queues) for inspection.
    #[arg(long)]
    pub keep: bool,
}

pub fn parse_vendor(text: &str) -> Result<Vendor, String> {
    match text {
        "mimecast" => Ok(Vendor::Mimecast),
        "pncp" => Ok(Vendor::Pncp),
        other => Err(format!("{other:?} is not a vendor; use mimecast or pncp")),
    }
}

/// The chaos a run carries out: the defaults, or none with `--outage` (so that
/// what the outage run measures is the outage), each overridden when asked for.
#[derive(Debug, Clone, Copy)]
pub struct ChaosPlan {
    pub fault_rate: f64,
    pub close_every: Option<Duration>,
    pub kill_at: Option<f64>,
}

impl ChaosPlan {
    pub fn of(args: &Args) -> Self {
        let calm = args.outage.is_some();
        Self {
            fault_rate: args.fault_rate.unwrap_or(if calm { 0.0 } else { 0.05 }),
            close_every: args
                .close_every
                .or((!calm).then_some(Duration::from_secs(20))),
            kill_at: args.kill_at.or((!calm).then_some(0.3)),
        }
    }
}
