//! The `account-worker` binary: parse the command line, load settings, run.

use anyhow::Context;
use clap::Parser;

use account_worker::cli::{self, Cli, Command, DlqAction};
use account_worker::config::Settings;
use account_worker::{bench, metrics, shutdown, telemetry, worker::Worker};

/// mimalloc: the worker allocates many small short-lived buffers per job (JSON,
/// HTTP, AMQP frames); measured in `account-worker bench`, it beats the system
/// allocator on jobs/s and CPU per job.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(error) = run(cli).await {
        // One line naming what went wrong, never a backtrace, and never a URL's
        // credentials (a crate's error may quote the URL it was given).
        let line = format!("account-worker: {error:#}");
        eprintln!("{}", account_worker::telemetry::redact::url_userinfo(&line));
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::load(cli.config.as_deref())?;
    telemetry::init(&settings.log, telemetry::Redactor::for_settings(&settings));
    match cli.command {
        Command::Run => {
            let stop = shutdown::on_signal();
            let worker = Worker::new(settings.clone()).await?;
            let listener = metrics::bind(settings.metrics_addr)
                .await
                .with_context(|| {
                    format!(
                        "cannot serve METRICS_ADDR {}; choose a free address",
                        settings.metrics_addr
                    )
                })?;
            let endpoints = tokio::spawn(metrics::serve(
                listener,
                worker.health().clone(),
                stop.clone(),
            ));
            // On a runtime thread, not the main one: each job task is spawned from
            // where its delivery arrived, so it starts without a cross-thread wake-up.
            let running = tokio::spawn(async move { worker.run(stop).await });
            running
                .await
                .context("the worker task panicked; this is a bug, please report it")?;
            let _ = endpoints.await;
        }
        Command::Check => cli::check::run(&settings).await?,
        Command::Publish { file } => {
            let published = cli::publish::run(&settings, file.as_deref()).await?;
            eprintln!(
                "published {published} jobs to {}",
                settings.broker.jobs_queue.jobs
            );
        }
        Command::Results { count, idle, json } => {
            cli::inspect::results(&settings, count, idle, json).await?;
        }
        Command::Dlq {
            action: DlqAction::List { limit },
        } => {
            let shown = cli::inspect::dlq_list(&settings, limit).await?;
            eprintln!(
                "{shown} dead letters shown (left in {})",
                settings.broker.jobs_queue.dead
            );
        }
        Command::Dlq {
            action: DlqAction::Replay(filter),
        } => {
            let summary = cli::replay::dlq_replay(&settings, filter).await?;
            eprintln!("{summary}");
        }
        Command::Bench {
            jobs,
            backlog,
            chart,
            only,
        } => {
            let options = bench::BenchOptions {
                jobs,
                backlog,
                chart,
                only,
            };
            bench::run(&settings, options)
                .await
                .map_err(anyhow::Error::msg)?;
        }
        Command::BenchConsumer { baseline } => {
            bench::baselines::run(&settings, baseline, shutdown::on_signal()).await?;
        }
        Command::MockVendor {
            listen,
            latency,
            faults,
        } => {
            let random = faults.random_faults();
            cli::mock::run(&settings, listen, latency, random, shutdown::on_signal()).await?;
        }
    }
    Ok(())
}
