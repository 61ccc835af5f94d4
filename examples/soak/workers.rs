//! The worker processes under test: `account-worker run`, started, SIGKILLed, restarted and stopped.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, Command};

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
