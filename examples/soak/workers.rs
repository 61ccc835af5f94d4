//! The worker processes under test: `account-worker run`, started, SIGKILLed, restarted and stopped.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, Command};

use account_worker::mock_vendor::{self, MockVendor};

use crate::args::Args;

/// One worker process and how to start it again.
#[derive(Debug)]
pub struct WorkerProcess {
    bin: PathBuf,
    env: HashMap<String, String>,
    log: PathBuf,
    child: Child,
}

impl WorkerProcess {
    /// Starts `bin run` with exactly `env` (nothing inherited but `PATH`), its output
    /// appended to `log`.
    pub fn start(bin: &Path, env: HashMap<String, String>, log: PathBuf) -> anyhow::Result<Self> {
        let child = spawn(bin, &env, &log)?;
        Ok(Self {
            bin: bin.to_owned(),
            env,
            log,
            child,
        })
    }

    /// SIGKILLs the process, waits for it to die, and starts it again with the same
    /// environment (the same ledger).
    pub async fn kill_and_restart(&mut self) -> anyhow::Result<()> {
        self.child.start_kill().context("SIGKILL of a worker")?;
        let _ = self.child.wait().await;
        self.child = spawn(&self.bin, &self.env, &self.log)?;
        Ok(())
    }

    /// Whether the process has exited, and how.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then up to `grace` for a clean exit, then SIGKILL; the exit status.
    pub async fn stop(mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                let _ = self.child.start_kill();
                let _ = self.child.wait().await;
                None
            }
        }
    }
}

fn spawn(bin: &Path, env: &HashMap<String, String>, log: &Path) -> anyhow::Result<Child> {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let err = out.try_clone()?;
    Command::new(bin)
        .arg("run")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!(
                "cannot start {} run; build it first (scripts/soak does)",
                bin.display()
            )
        })
}

/// The environment of worker `i`: the mock's demo keys, short retries, and the
/// file ledger of its own or the fleet's Redis ledger.
pub fn worker_env(
    args: &Args,
    mock: &MockVendor,
    amqp_url: &str,
    queue: &str,
    dir: &std::path::Path,
    i: usize,
    metrics_port: u16,
) -> HashMap<String, String> {
    let ledger = if args.fleet {
        args.redis.clone()
    } else {
        format!("file:{}", dir.join(format!("ledger-{i}")).display())
    };
    let vars = [
        ("AMQP_URL", amqp_url.to_owned()),
        ("JOBS_QUEUE", queue.to_owned()),
        ("WORKER_CONCURRENCY", args.concurrency.to_string()),
        ("MIMECAST_BASE_URL", mock.base_url()),
        (
            "MIMECAST_ACCESS_KEY",
            mock_vendor::DEMO_MIMECAST_ACCESS_KEY.to_owned(),
        ),
        (
            "MIMECAST_SECRET_KEY",
            mock_vendor::DEMO_MIMECAST_SECRET_KEY_B64.to_owned(),
        ),
        (
            "MIMECAST_APP_ID",
            mock_vendor::DEMO_MIMECAST_APP_ID.to_owned(),
        ),
        (
            "MIMECAST_APP_KEY",
            mock_vendor::DEMO_MIMECAST_APP_KEY.to_owned(),
        ),
        ("PNCP_BASE_URL", mock.pncp_base_url()),
        (
            "PNCP_APPLICATION_KEY",
            mock_vendor::DEMO_PNCP_APPLICATION_KEY.to_owned(),
        ),
        (
            "PNCP_SHARED_SECRET",
            mock_vendor::DEMO_PNCP_SHARED_SECRET.to_owned(),
        ),
        ("RETRY_INITIAL_DELAY", "50ms".to_owned()),
        ("RETRY_MAX_DELAY", "1s".to_owned()),
        (
            "VENDOR_TIMEOUT",
            humantime::format_duration(args.vendor_timeout).to_string(),
        ),
        ("SHUTDOWN_TIMEOUT", "10s".to_owned()),
        ("LEDGER_URL", ledger),
        // A fleet run leaves nothing in its Redis database for long.
        ("LEDGER_RETENTION", "1h".to_owned()),
        (
            "RATE_LIMIT_SCOPE",
            if args.fleet { "fleet" } else { "process" }.to_owned(),
        ),
        ("METRICS_ADDR", format!("127.0.0.1:{metrics_port}")),
        ("RUST_LOG", "info".to_owned()),
    ];
    let mut env: HashMap<String, String> =
        vars.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    if let Some(held) = args.held_delivery_max {
        let held = humantime::format_duration(held).to_string();
        env.insert("HELD_DELIVERY_MAX".to_owned(), held);
    }
    env
}
