//! The reference consumers the worker is measured against, run as child
//! processes exactly like the worker:
//!
//! - **naive**: one job at a time, prefetch 1, a fresh HTTP connection per call,
//!   as the vendor's sample code would be if wrapped in a consume loop;
//! - **pass-through**: acks and publishes a result without calling any vendor, with
//!   the worker's prefetch, durable queues and confirms: the broker ceiling;
//! - **pass-through + ledger** and **pass-through + call**: the ceiling plus one of
//!   the two things the worker must do per job (its two durable ledger writes, or
//!   its vendor call), so the table shows what each costs on its own.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use secrecy::ExposeSecret;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::broker::{self, BrokerError, Publisher};
use crate::config::Settings;
use crate::job::{Item, JobResult, JobStatus, ResultMeta};
use crate::ledger::{Finished, Ledger, Progress};
use crate::limiter::Limiters;
use crate::vendor::mimecast::UPDATE_ACCOUNT_PATH;
use crate::vendor::{signing, VendorClient, Vendors};

/// Which reference consumer to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Baseline {
    /// One job at a time, new connection per vendor call.
    Naive,
    /// No vendor call at all: the broker's ceiling.
    Passthrough,
    /// The ceiling plus the worker's ledger writes: the claim with the in-flight
    /// marker, then the outcome, each durable before going on.
    PassthroughLedger,
    /// The ceiling plus the worker's vendor client making the job's call.
    PassthroughCall,
}

/// Why a reference consumer could not run.
#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    /// Its ledger or vendor client could not be set up.
    #[error("cannot set up the reference consumer: {0}; check LEDGER_URL and MIMECAST_* settings")]
    Setup(String),
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// What a pass-through does per job besides acking and publishing.
#[derive(Clone)]
enum Extra {
    None,
    Ledger(Ledger, Duration),
    Call(VendorClient, Arc<Limiters>),
}

impl Extra {
    async fn open(settings: &Settings, baseline: Baseline) -> Result<Self, BaselineError> {
        let setup = |e: &dyn std::fmt::Display| BaselineError::Setup(e.to_string());
        Ok(match baseline {
            Baseline::PassthroughLedger => Self::Ledger(
                Ledger::open(&settings.ledger)
                    .await
                    .map_err(|e| setup(&e))?,
                settings.ledger.lease,
            ),
            Baseline::PassthroughCall => Self::Call(
                Vendors::from_settings(settings)
                    .map_err(|e| setup(&e))?
                    .mimecast
                    .ok_or_else(|| setup(&"MIMECAST_BASE_URL is not set"))?,
                Arc::new(Limiters::from_settings(settings, None).map_err(|e| setup(&e))?),
            ),
            Baseline::Naive | Baseline::Passthrough => Self::None,
        })
    }

    /// Does the extra work for one job; false when it failed.
    async fn apply(&self, body: &[u8]) -> bool {
        let Ok(job) = crate::job::parse(body) else {
            return matches!(self, Self::None);
        };
        match self {
            Self::None => true,
            Self::Ledger(ledger, lease) => {
                let owner = uuid::Uuid::new_v4().to_string();
                let marker = Progress {
                    in_flight: job.items.iter().map(|item| item.index).collect(),
                    ..Progress::default()
                };
                let finished = Finished {
                    result: JobResult {
                        job_id: job.id.to_string(),
                        vendor: job.vendor.as_str().to_owned(),
                        status: JobStatus::Succeeded,
                        meta: ResultMeta { status: 200 },
                        data: Vec::new(),
                        fail: Vec::new(),
                        attempts: 1,
                    },
                    dead_letter: None,
                };
                ledger
                    .claim(&job.ledger_key, &owner, *lease, Some(&marker))
                    .await
                    .is_ok()
                    && ledger
                        .finish(&job.ledger_key, &owner, None, &finished)
                        .await
                        .is_ok()
            }
            Self::Call(client, limiters) => {
                let items: Vec<&Item> = job.items.iter().collect();
                client.send(&items, limiters.get(job.vendor)).await.is_ok()
            }
        }
    }
}

/// Consumes `JOBS_QUEUE` until `stop` is cancelled.
pub async fn run(
    settings: &Settings,
    baseline: Baseline,
    stop: CancellationToken,
) -> Result<(), BaselineError> {
    let extra = Extra::open(settings, baseline).await?;
    Ok(consume(settings, baseline, extra, stop).await?)
}

async fn consume(
    settings: &Settings,
    baseline: Baseline,
    extra: Extra,
    stop: CancellationToken,
) -> Result<(), BrokerError> {
    let queues = &settings.broker.jobs_queue;
    let connection = broker::connect(&settings.broker.amqp_url, "account-worker baseline").await?;
    broker::declare(&connection, queues).await?;
    let publisher = Publisher::open(&connection, queues.clone()).await?;
    let channel = connection.create_channel().await?;
    let prefetch = match baseline {
        Baseline::Naive => 1,
        Baseline::Passthrough | Baseline::PassthroughLedger | Baseline::PassthroughCall => {
            crate::worker::prefetch(settings.broker.concurrency.get())
        }
    };
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queues.jobs.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    loop {
        let delivery = tokio::select! {
            next = consumer.next() => match next {
                Some(delivery) => delivery?,
                None => break,
            },
            _ = stop.cancelled() => break,
        };
        match baseline {
            Baseline::Naive => {
                let result = naive_call(settings, &delivery.data).await;
                respond(&publisher, &queues.results, &delivery.data, result).await?;
                delivery.acker.ack(BasicAckOptions::default()).await?;
            }
            Baseline::Passthrough | Baseline::PassthroughLedger | Baseline::PassthroughCall => {
                let publisher = publisher.clone();
                let results = queues.results.clone();
                let extra = extra.clone();
                tokio::spawn(async move {
                    // A failed extra still answers, so the run counts the job
                    // instead of stalling on it.
                    let status = match extra.apply(&delivery.data).await {
                        true => "succeeded",
                        false => "failed",
                    };
                    if respond(
                        &publisher,
                        &results,
                        &delivery.data,
                        json!({"status": status}),
                    )
                    .await
                    .is_ok()
                    {
                        let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                    }
                });
            }
        }
    }
    let _ = connection.close(200, "baseline done".into()).await;
    Ok(())
}

async fn respond(
    publisher: &Publisher,
    results: &str,
    job: &[u8],
    mut result: Value,
) -> Result<(), BrokerError> {
    let job: Value = serde_json::from_slice(job).unwrap_or(Value::Null);
    let job_id = job
        .get("jobId")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    result["jobId"] = Value::String(job_id.clone());
    let body = serde_json::to_vec(&result).unwrap_or_default();
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_correlation_id(job_id.as_str().into())
        .with_delivery_mode(2);
    publisher.publish(results, &body, properties).await
}

/// The sample code's call: a new client (and connection) per request.
async fn naive_call(settings: &Settings, job: &[u8]) -> Value {
    let Some(mimecast) = &settings.mimecast else {
        return json!({"status": "failed"});
    };
    let job: Value = serde_json::from_slice(job).unwrap_or(Value::Null);
    let date = signing::mimecast_date(chrono::Utc::now());
    let request_id = uuid::Uuid::new_v4().to_string();
    let signature = signing::mimecast_signature(
        mimecast.secret_key.expose_secret(),
        &date,
        &request_id,
        UPDATE_ACCOUNT_PATH,
        mimecast.app_key.expose_secret(),
    );
    let url = format!(
        "{}{UPDATE_ACCOUNT_PATH}",
        mimecast.base_url.as_str().trim_end_matches('/')
    );
    let response = reqwest::Client::new()
        .post(url)
        .header(
            "Authorization",
            signing::mimecast_authorization(mimecast.access_key.expose_secret(), &signature),
        )
        .header("x-mc-date", date)
        .header("x-mc-req-id", request_id)
        .header("x-mc-app-id", &mimecast.app_id)
        .json(&json!({"data": job.get("data").cloned().unwrap_or(Value::Null)}))
        .send()
        .await;
    match response {
        Ok(response) => {
            json!({"status": "succeeded", "meta": {"status": response.status().as_u16()}})
        }
        Err(_) => json!({"status": "failed"}),
    }
}
