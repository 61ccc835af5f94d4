//! `account-worker publish`: jobs from a file or standard input, one per line, confirmed.

use std::io::BufRead;
use std::path::Path;

use lapin::BasicProperties;

use crate::broker::{self, BrokerError, Publisher};
use crate::config::Settings;

/// Why publishing stopped.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The input could not be read.
    #[error("cannot read jobs from {source_name}: {source}")]
    Read {
        /// File name or standard input.
        source_name: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The broker refused or failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// Publishes each non-empty line as one job; returns how many were confirmed.
pub async fn run(settings: &Settings, file: Option<&Path>) -> Result<usize, PublishError> {
    let (source_name, reader): (String, Box<dyn BufRead>) = match file {
        Some(path) if path != Path::new("-") => {
            let file = std::fs::File::open(path).map_err(|source| PublishError::Read {
                source_name: path.display().to_string(),
                source,
            })?;
            (
                path.display().to_string(),
                Box::new(std::io::BufReader::new(file)),
            )
        }
        _ => (
            "standard input".to_owned(),
            Box::new(std::io::stdin().lock()),
        ),
    };
    let lines: Vec<String> =
        reader
            .lines()
            .collect::<Result<_, _>>()
            .map_err(|source| PublishError::Read {
                source_name: source_name.clone(),
                source,
            })?;
    let broker_settings = &settings.broker;
    let connection = broker::connect(&broker_settings.amqp_url, "account-worker publish").await?;
    broker::declare(&connection, &broker_settings.jobs_queue).await?;
    let publisher = Publisher::open(&connection, broker_settings.jobs_queue.clone()).await?;
    let jobs: Vec<&str> = lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .collect();
    // Confirms are awaited in windows so a large back-fill is fast but bounded.
    let mut published = 0;
    for window in jobs.chunks(256) {
        let sends = window.iter().map(|job| {
            let properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2);
            publisher.publish(&broker_settings.jobs_queue.jobs, job.as_bytes(), properties)
        });
        for outcome in futures_util::future::join_all(sends).await {
            outcome?;
            published += 1;
        }
    }
    let _ = connection.close(200, "published".into()).await;
    Ok(published)
}
