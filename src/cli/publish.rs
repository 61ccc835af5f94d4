//! `account-worker publish`: jobs from a file or standard input, one per line, confirmed.

use std::io::{BufRead, IsTerminal};
use std::path::Path;

use lapin::BasicProperties;

use crate::broker::{self, BrokerError, Publisher};
use crate::config::Settings;

/// Publishes awaiting their confirms at once: fast for a back-fill, bounded in memory.
const CONFIRM_WINDOW: usize = 256;

/// Why publishing stopped.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The input could not be read; nothing was published.
    #[error("cannot read jobs from {source_name} ({cause}); nothing was published: give a readable UTF-8 file of JSON jobs, one per line, or - for standard input")]
    Read {
        /// File name or standard input.
        source_name: String,
        /// The cause: printed in the message, so not chained as a `source` (which
        /// `account-worker: {error:#}` would print a second time).
        cause: std::io::Error,
    },
    /// The broker could not be reached before anything was published.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// A publish failed part-way through the input.
    #[error("{cause}; the first {confirmed} of {total} jobs are confirmed on the queue (some after them may be too): once the cause is fixed, publish the rest again (a job sent twice is applied once)")]
    Interrupted {
        /// Jobs the broker had confirmed when the failure happened.
        confirmed: usize,
        /// Jobs in the input.
        total: usize,
        /// The cause, printed in the message.
        cause: BrokerError,
    },
}

/// Publishes each non-empty line as one job; returns how many were confirmed.
pub async fn run(settings: &Settings, file: Option<&Path>) -> Result<usize, PublishError> {
    let (source_name, reader): (String, Box<dyn BufRead>) = match file {
        Some(path) if path != Path::new("-") => {
            let file = std::fs::File::open(path).map_err(|cause| PublishError::Read {
                source_name: path.display().to_string(),
                cause,
            })?;
            (
                path.display().to_string(),
                Box::new(std::io::BufReader::new(file)),
            )
        }
        _ => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                eprintln!("reading jobs from standard input, one JSON per line; end with Ctrl-D");
            }
            ("standard input".to_owned(), Box::new(stdin.lock()))
        }
    };
    let lines: Vec<String> =
        reader
            .lines()
            .collect::<Result<_, _>>()
            .map_err(|cause| PublishError::Read {
                source_name: source_name.clone(),
                cause,
            })?;
    let jobs: Vec<&str> = lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .collect();
    let broker_settings = &settings.broker;
    let connection = broker::connect(&broker_settings.amqp_url, "account-worker publish").await?;
    broker::declare(&connection, &broker_settings.jobs_queue).await?;
    let publisher = Publisher::open(&connection, broker_settings.jobs_queue.clone()).await?;
    let progress = super::progress::bar(jobs.len() as u64, "publishing");
    // Confirms are awaited in windows so a large back-fill is fast but bounded.
    let mut published = 0;
    for window in jobs.chunks(CONFIRM_WINDOW) {
        let sends = window.iter().map(|job| {
            let properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2);
            publisher.publish(&broker_settings.jobs_queue.jobs, job.as_bytes(), properties)
        });
        for outcome in futures_util::future::join_all(sends).await {
            outcome.map_err(|cause| PublishError::Interrupted {
                confirmed: published,
                total: jobs.len(),
                cause,
            })?;
            published += 1;
            progress.inc(1);
        }
    }
    progress.finish_and_clear();
    let _ = connection.close(200, "published".into()).await;
    Ok(published)
}
