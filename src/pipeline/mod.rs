//! One job from message body to outcome: parse, call the vendor with retries, and
//! decide what to publish. Knows no AMQP types; the broker layer publishes and acks.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use crate::batcher::Batcher;
use crate::circuit::Circuits;
use crate::job::{FailEntry, ItemError, Job, JobResult, JobStatus, Malformed, ResultMeta};
use crate::ledger::{Claim, Finished, Ledger, Progress, StoredDeadLetter};
use crate::limiter::Limiters;
use crate::metrics::Metrics;
use crate::retry::Backoff;
use crate::vendor::Vendors;

mod attempts;
mod lease;
mod state;

use lease::LeaseKeeper;
use state::JobState;

/// A message for `<JOBS_QUEUE>.dead`, with the contract's headers.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The body: the original bytes, or the job with only its failed items.
    pub body: Vec<u8>,
    /// `x-error-code`.
    pub error_code: String,
    /// `x-error-message` (never carries a secret).
    pub error_message: String,
    /// `x-attempts`.
    pub attempts: u32,
    /// `x-job-id`, where known.
    pub job_id: Option<String>,
}

/// What the broker layer must do with a delivery.
// `HandBack` is rare; boxing the common variant would cost an allocation per job.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Publish these (each confirmed), then ack.
    Finished {
        /// The job's result; `None` when the message had no readable `jobId`.
        result: Option<JobResult>,
        /// Failed items or the malformed message.
        dead_letter: Option<DeadLetter>,
    },
    /// Give the message back to the queue untouched (shutdown before any vendor effect).
    HandBack,
}

/// The worker is stopping and this job has not touched the vendor: hand it back.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stop {
    /// Nothing this delivery sent can have been applied (every call failed
    /// before the vendor acted, or none was made), so its in-flight marker may go.
    pub(crate) untouched: bool,
}

impl Stop {
    pub(crate) const UNTOUCHED: Self = Self { untouched: true };
    pub(crate) const TOUCHED: Self = Self { untouched: false };
}

/// How the pipeline treats the ledger and repeated deliveries.
#[derive(Debug, Clone, Copy)]
pub struct LedgerPolicy {
    /// How long a delivery's claim on a job holds without renewal.
    pub lease: Duration,
    /// Deliveries of one job before it is dead-lettered as poison.
    pub max_deliveries: u32,
}

/// Everything a job needs, shared by all jobs of the process.
#[derive(Debug)]
pub struct Pipeline {
    vendors: Vendors,
    limiters: Arc<Limiters>,
    circuits: Arc<Circuits>,
    backoff: Backoff,
    ledger: Ledger,
    metrics: Arc<Metrics>,
    policy: LedgerPolicy,
    batchers: Batchers,
    leases: LeaseKeeper,
    /// `WORKER_CONCURRENCY`: jobs between their ledger claim and their last
    /// vendor call. Storing the outcome, publishing and acking happen outside
    /// a slot, overlapping with the next job's call; the prefetch bounds those.
    slots: Semaphore,
}

/// The batching task of each vendor that has one (`MIMECAST_BATCH_MAX` > 1).
#[derive(Debug, Clone, Default)]
pub struct Batchers {
    /// Mimecast's, when batching is on.
    pub mimecast: Option<Batcher>,
}

impl Batchers {
    fn get(&self, vendor: crate::job::VendorKind) -> Option<&Batcher> {
        match vendor {
            crate::job::VendorKind::Mimecast => self.mimecast.as_ref(),
            crate::job::VendorKind::Pncp => None,
        }
    }
}

impl Pipeline {
    /// A pipeline over the configured vendors, limits, ledger and batchers.
    /// Starts the lease renewing task, so it must be called inside a Tokio runtime.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vendors: Vendors,
        limiters: Arc<Limiters>,
        circuits: Arc<Circuits>,
        backoff: Backoff,
        ledger: Ledger,
        metrics: Arc<Metrics>,
        policy: LedgerPolicy,
        batchers: Batchers,
        concurrency: usize,
    ) -> Self {
        Self {
            slots: Semaphore::new(concurrency),
            leases: LeaseKeeper::start(ledger.clone(), policy.lease),
            vendors,
            limiters,
            circuits,
            backoff,
            ledger,
            metrics,
            policy,
            batchers,
        }
    }

    /// Processes one message body, already parsed by the caller (the worker
    /// parses on delivery to keep each account's jobs in order). `stopping` is
    /// cancelled when the worker shuts down: a job that has not yet touched the
    /// vendor is then handed back.
    ///
    /// `replay_id` is set when an operator replayed the message from the
    /// dead-letter queue (`x-replay-id` header): the replay is then a new attempt
    /// at the change, with its own ledger entry.
    pub async fn process(
        &self,
        body: &[u8],
        parsed: Result<Job, Malformed>,
        replay_id: Option<&str>,
        stopping: &CancellationToken,
    ) -> Outcome {
        match parsed {
            Err(malformed) => {
                let vendor = malformed
                    .vendor
                    .clone()
                    .unwrap_or_else(|| "unknown".to_owned());
                self.metrics.job_finished(&vendor, "malformed", 0, 0);
                self.metrics.dead_lettered("err_job_malformed");
                malformed_outcome(body, malformed)
            }
            Ok(mut job) => {
                if let Some(replay_id) = replay_id {
                    job.ledger_key = job.id.replayed(replay_id);
                }
                let span = tracing::info_span!("job", job_id = %job.id, vendor = %job.vendor, attempt = tracing::field::Empty);
                self.process_job(job, stopping).instrument(span).await
            }
        }
    }

    async fn process_job(&self, job: Job, stopping: &CancellationToken) -> Outcome {
        let slot = tokio::select! {
            biased;
            _ = stopping.cancelled() => None,
            slot = self.slots.acquire() => slot.ok(),
        };
        let Some(slot) = slot else {
            return Outcome::HandBack;
        };
        let owner = uuid::Uuid::new_v4().to_string();
        let first_marker = self.first_marker(&job);
        let Owned {
            progress,
            deliveries,
            marked: premarked,
        } = match self
            .claim(&job, &owner, first_marker.as_ref(), stopping)
            .await
        {
            Err(_) => return Outcome::HandBack,
            Ok(Err(finished)) => {
                info!("already finished: publishing its stored outcome again without calling the vendor");
                self.metrics.ledger_duplicate();
                let dead_letter = finished
                    .dead_letter
                    .as_ref()
                    .map(|d| d.to_letter(&finished.result.job_id));
                return Outcome::Finished {
                    result: Some(finished.result),
                    dead_letter,
                };
            }
            Ok(Ok(owned)) => owned,
        };
        let resumed = !progress.in_flight.is_empty() || progress.attempts > 0;
        let mut state = JobState::resume(job, progress);
        if resumed {
            warn!(
                deliveries,
                "resuming a job whose earlier delivery was interrupted"
            );
        }
        // Released when dropped, so a panic cannot leave the lease renewed forever.
        let renewal = self.leases.hold(&state.job.ledger_key, &owner);
        let outcome = if deliveries > self.policy.max_deliveries {
            warn!(
                deliveries,
                "poison message: delivered too often without finishing"
            );
            state.fail_all_pending(&ItemError::permanent(
                "err_poison_message",
                format!(
                    "delivered {deliveries} times without finishing (MAX_DELIVERIES is {}); inspect the worker logs for this jobId",
                    self.policy.max_deliveries
                ),
            ));
            Ok(())
        } else {
            match self.vendors.get(state.job.vendor) {
                Some(client) => {
                    self.attempt_all(client, &mut state, &owner, premarked, stopping)
                        .await
                }
                None => {
                    let vendor = state.job.vendor;
                    state.fail_all_pending(&ItemError::permanent(
                        "err_vendor_not_configured",
                        format!(
                            "{vendor} is not configured on this worker; set {}_BASE_URL and its credentials",
                            vendor.as_str().to_ascii_uppercase()
                        ),
                    ));
                    Ok(())
                }
            }
        };
        drop(renewal);
        drop(slot);
        if let Err(stop) = outcome {
            // Release the lease so the next delivery need not wait for it to lapse
            // (a no-op when another delivery took it). When nothing this delivery
            // sent was applied, its exact state replaces the stored progress: a
            // job stopped before its call (its claim may carry the first call's
            // marker) must not come back as an unknown outcome, while unknowns
            // it inherited stay recorded as such.
            let exact = stop.untouched.then(|| state.progress(&[]));
            let _ = self
                .ledger
                .release(&state.job.ledger_key, &owner, exact.as_ref())
                .await;
            return Outcome::HandBack;
        }
        let outcome = finished(&state);
        if let Outcome::Finished {
            result: Some(result),
            dead_letter,
        } = &outcome
        {
            self.metrics.job_finished(
                &result.vendor,
                result.status.as_str(),
                result.data.len(),
                result.fail.len(),
            );
            if let Some(letter) = dead_letter {
                self.metrics.dead_lettered(&letter.error_code);
            }
            let stored = Finished {
                result: result.clone(),
                dead_letter: dead_letter.as_ref().map(StoredDeadLetter::from_letter),
            };
            // The outcome is published only once it is stored: a later copy of
            // the job must find it, or it would publish a different result.
            return match self
                .store_outcome(&state.job.ledger_key, &owner, &stored)
                .await
            {
                Some(kept) => Outcome::Finished {
                    dead_letter: kept
                        .dead_letter
                        .as_ref()
                        .map(|d| d.to_letter(&kept.result.job_id)),
                    result: Some(kept.result),
                },
                None => Outcome::HandBack,
            };
        }
        outcome
    }

    /// Stores the outcome, retrying a failing ledger briefly; returns the outcome
    /// to publish (an earlier stored one wins), or `None` to hand the job back.
    async fn store_outcome(
        &self,
        key: &crate::job::JobId,
        owner: &str,
        outcome: &Finished,
    ) -> Option<Finished> {
        for wait_ms in [100, 500, 2000, 0] {
            match self.ledger.finish(key, owner, outcome).await {
                Ok(kept) => {
                    self.metrics.ledger_ok();
                    return Some(kept);
                }
                Err(e @ crate::ledger::LedgerError::LeaseLost { .. }) => {
                    warn!(error = %e, "not publishing: another delivery owns the job");
                    return None;
                }
                Err(e) if wait_ms > 0 => {
                    self.metrics.ledger_failed(e.to_string());
                    warn!(error = %e, retry_in_ms = wait_ms, "cannot store the job's outcome; retrying");
                    tokio::time::sleep(Duration::from_millis(wait_ms)).await;
                }
                Err(e) => {
                    self.metrics.ledger_failed(e.to_string());
                    error!(error = %e, "cannot store the job's outcome; handing the job back");
                    return None;
                }
            }
        }
        None
    }

    /// The in-flight marker of a new job's first call, to store with its claim in
    /// one ledger write, when nothing can hold that call back (no rate ceiling,
    /// pause or open circuit, no batching): one fsync per job saved. Otherwise the
    /// marker is written just before the call, as for every later round.
    fn first_marker(&self, job: &Job) -> Option<Progress> {
        let additive: Vec<usize> = job
            .items
            .iter()
            .filter(|item| item.is_additive())
            .map(|item| item.index)
            .collect();
        let immediate = self.vendors.get(job.vendor).is_some()
            && self.batchers.get(job.vendor).is_none()
            && self.circuits.get(job.vendor).is_closed()
            && self.limiters.get(job.vendor).is_open();
        (immediate && !additive.is_empty()).then(|| Progress {
            in_flight: job.items.iter().map(|item| item.index).collect(),
            ..Progress::default()
        })
    }

    /// Takes the job's lease, waiting while another delivery holds it: the progress
    /// to resume from and the delivery count, or the finished job's stored outcome.
    async fn claim(
        &self,
        job: &Job,
        owner: &str,
        first_marker: Option<&Progress>,
        stopping: &CancellationToken,
    ) -> Result<Result<Owned, Box<Finished>>, Stop> {
        let mut wait = Duration::from_millis(50);
        loop {
            let claimed = self
                .ledger
                .claim(&job.ledger_key, owner, self.policy.lease, first_marker)
                .await;
            if claimed.is_ok() {
                self.metrics.ledger_ok();
            }
            match claimed {
                Ok(Claim::Busy) => {
                    debug!("another delivery of this job is in progress; waiting for its outcome");
                }
                Ok(Claim::Owned {
                    progress,
                    deliveries,
                    marked,
                }) => {
                    return Ok(Ok(Owned {
                        progress,
                        deliveries,
                        marked,
                    }))
                }
                Ok(Claim::Done(finished)) => return Ok(Err(finished)),
                Err(e) => {
                    self.metrics.ledger_failed(e.to_string());
                    error!(error = %e, "ledger unavailable; the job waits");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stopping.cancelled() => return Err(Stop::UNTOUCHED),
            }
            wait = (wait * 2).min(Duration::from_secs(2));
        }
    }
}

/// What a delivery that took a job's lease starts from.
struct Owned {
    progress: Progress,
    deliveries: u32,
    /// The claim stored the first call's in-flight marker.
    marked: bool,
}

fn finished(state: &JobState) -> Outcome {
    let result = state.result();
    let dead_letter = state.failed_job_body().and_then(|body| {
        let first = result.first_error()?;
        Some(DeadLetter {
            body,
            error_code: first.code.clone(),
            error_message: first.message.clone(),
            attempts: result.attempts,
            job_id: Some(result.job_id.clone()),
        })
    });
    let level_failed = result.status != JobStatus::Succeeded;
    if level_failed {
        info!(
            status = result.status.as_str(),
            failed = result.fail.len(),
            succeeded = result.data.len(),
            "job finished with failures"
        );
    } else {
        debug!(items = result.data.len(), "job succeeded");
    }
    Outcome::Finished {
        result: Some(result),
        dead_letter,
    }
}

fn malformed_outcome(body: &[u8], malformed: Malformed) -> Outcome {
    warn!(job_id = malformed.job_id.as_ref().map(|id| id.as_str()), reason = %malformed.logged_reason(), "malformed job dead-lettered");
    let error = ItemError::permanent("err_job_malformed", malformed.reason.clone());
    let result = malformed.job_id.as_ref().map(|id| JobResult {
        job_id: id.to_string(),
        vendor: malformed.vendor.clone().unwrap_or_default(),
        status: JobStatus::Failed,
        meta: ResultMeta { status: 400 },
        data: Vec::new(),
        fail: vec![FailEntry {
            key: serde_json::Value::Null,
            errors: vec![error.clone()],
        }],
        attempts: 0,
    });
    Outcome::Finished {
        result,
        dead_letter: Some(DeadLetter {
            body: body.to_vec(),
            error_code: error.code,
            error_message: error.message,
            attempts: 0,
            job_id: malformed.job_id.map(|id| id.to_string()),
        }),
    }
}
