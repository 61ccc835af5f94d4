//! One job from message body to outcome: parse, call the vendor with retries, and
//! decide what to publish. Knows no AMQP types; the broker layer publishes and acks.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use crate::batcher::Batcher;
use crate::circuit::Circuits;
use crate::job::{
    FailEntry, ItemError, Job, JobResult, JobStatus, Malformed, OutcomeId, ReplayClaim, ResultMeta,
};
use crate::ledger::{
    Claim, Finished, Ledger, LedgerError, MalformedAnswer, Progress, StoredDeadLetter, Written,
};
use crate::limiter::Limiters;
use crate::metrics::Metrics;
use crate::retry::Backoff;
use crate::vendor::Vendors;

mod attempts;
mod evidence;
mod hold;
mod lease;
mod replay;
mod state;

use evidence::Seen;
pub use hold::DeliveryHold;
use hold::Holds;
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
    /// `x-outcome-id`: the stored outcome it belongs to, the same in every copy,
    /// which keys its replay. `None` for a malformed message (never stored).
    pub outcome_id: Option<OutcomeId>,
    /// `x-run-replay-id`: set when the run that produced it was a replay.
    pub run_replay_id: Option<OutcomeId>,
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
    /// The job waited too long without calling (its vendor held, another copy
    /// running): publish the message again at the tail of its queue, confirmed,
    /// then ack this delivery. Its lease is released with its exact progress and
    /// the delivery does not count towards `MAX_DELIVERIES`.
    Requeue,
}

/// The worker is stopping and this job has not touched the vendor: hand it back.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stop {
    /// Nothing this delivery sent can have been applied (every call failed
    /// before the vendor acted, or none was made), so its in-flight marker may go.
    pub(crate) untouched: bool,
    /// Not stopping: the job waited past its delivery's hold (at the circuit or
    /// for another copy), with no call in flight, so its state is exact. The
    /// delivery goes back to the tail of its queue.
    pub(crate) requeue: bool,
}

impl Stop {
    pub(crate) const UNTOUCHED: Self = Self {
        untouched: true,
        requeue: false,
    };
    pub(crate) const TOUCHED: Self = Self {
        untouched: false,
        requeue: false,
    };
    pub(crate) const REQUEUE: Self = Self {
        untouched: false,
        requeue: true,
    };
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
    /// `WORKER_CONCURRENCY`: jobs calling their vendor, from the circuit's pass
    /// to their last call. A job waiting at its vendor's circuit or for another
    /// copy's outcome holds none, so one vendor's outage or a slow job's copies
    /// never take capacity from other jobs. Claiming, storing the outcome,
    /// publishing and acking happen outside a slot; the prefetch bounds those.
    slots: Semaphore,
    /// Deliveries waiting without a slot, and when they go back to the queue.
    holds: Holds,
    /// The jobs this process holds or claimed recently: an absent ledger entry
    /// of one of them is ledger loss, not a new job.
    seen: Seen,
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
            seen: Seen::default(),
            // Each vendor keeps up to a concurrency's worth of waiting deliveries
            // (the prefetch has room for them besides the running and ready
            // jobs, see `worker::prefetch`); requeues beyond it are paced at a
            // prefetch's worth a second.
            holds: Holds::new(concurrency, concurrency.saturating_mul(3)),
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

    /// Whether the ledger holds `job_id`'s outcome: a parked job whose copy
    /// another worker settled. A ledger that cannot answer says no (the job
    /// stays parked until it comes back or is given up).
    pub async fn finished_in_ledger(&self, job_id: &str) -> bool {
        let Ok(job) = crate::job::JobId::parse(job_id) else {
            return false;
        };
        matches!(
            self.ledger.get(&job).await,
            Ok(crate::ledger::Stored::Present(crate::ledger::Entry {
                finished: Some(_),
                ..
            }))
        )
    }

    /// Waits for a turn to put a delivery back at the tail of its queue
    /// without running its job (see `pipeline::hold`'s pacing).
    pub async fn pace_requeue(&self) {
        self.holds.paced().await;
    }

    /// Processes one message body, already parsed by the caller (the worker
    /// parses on delivery to keep each account's jobs in order). `stopping` is
    /// cancelled when the worker shuts down: a job that has not yet touched the
    /// vendor is then handed back.
    ///
    /// `replay` is set when the message carries replay headers (`dlq replay`
    /// sets them): if they name a dead letter the ledger stored, the replay is a
    /// new attempt at the change under that dead letter's own ledger entry;
    /// otherwise they are ignored and the message is a plain copy of its job.
    ///
    /// `delivery_hold` says when the delivery must be back in the queue if its
    /// job is still waiting then without calling (`Outcome::Requeue`): its
    /// arrival plus `HELD_DELIVERY_MAX`, or at once once a later job of its
    /// account waits behind it.
    pub async fn process(
        &self,
        body: &[u8],
        parsed: Result<Job, Malformed>,
        replay: Option<&ReplayClaim>,
        delivery_hold: &DeliveryHold,
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
                self.settle_malformed(malformed_outcome(body, &malformed), &malformed, stopping)
                    .await
            }
            Ok(mut job) => {
                let span = tracing::info_span!("job", job_id = %job.id, vendor = %job.vendor, attempt = tracing::field::Empty);
                let outcome = async {
                    if let Some(claim) = replay {
                        match self.verified_replay(&job, body, claim, stopping).await {
                            Ok(Some(outcome)) => job.replay_as(outcome),
                            Ok(None) => {}
                            Err(_) => return Outcome::HandBack,
                        }
                    }
                    self.process_job(job, body, delivery_hold, stopping).await
                }
                .instrument(span)
                .await;
                if matches!(outcome, Outcome::Finished { .. }) {
                    self.holds.credit();
                }
                outcome
            }
        }
    }

    /// A malformed message with a readable `jobId` is that job's answer only if
    /// the job has none yet: a finished job's stored outcome is published again
    /// and the body only dead-lettered, a copy being processed elsewhere keeps
    /// its own outcome, and a first-seen failure is stored so that every later
    /// copy gets the same answer. One `jobId`, one answer.
    async fn settle_malformed(
        &self,
        outcome: Outcome,
        malformed: &Malformed,
        stopping: &CancellationToken,
    ) -> Outcome {
        let Some(job_id) = malformed.job_id.as_ref() else {
            return outcome;
        };
        let Outcome::Finished {
            result: Some(result),
            dead_letter,
        } = outcome
        else {
            return outcome;
        };
        // A malformed replay is a copy of its job like any other: it has no
        // change to attempt again, so it is keyed by the jobId alone.
        let key = job_id.clone();
        let failure = Finished {
            result: result.clone(),
            dead_letter: dead_letter.as_ref().map(StoredDeadLetter::from_letter),
        };
        let mut wait = Duration::from_millis(50);
        loop {
            // A job this process holds or held lost its entry: it has an owner's
            // answer, which a malformed copy must not replace.
            let evidence = self.seen.evidence(&key, None);
            match self.ledger.settle_malformed(&key, evidence, &failure).await {
                Ok(answer) => {
                    self.metrics.ledger_ok();
                    let result = match answer {
                        MalformedAnswer::Stored => Some(result),
                        MalformedAnswer::Finished(stored) => {
                            info!(job_id = %job_id, "malformed copy of a finished job: publishing its stored outcome again and dead-lettering the copy");
                            Some(stored.result)
                        }
                        MalformedAnswer::Pending => {
                            info!(job_id = %job_id, "malformed copy of a job in progress: dead-lettering the copy; the job's own outcome is its answer");
                            None
                        }
                    };
                    return Outcome::Finished {
                        result,
                        dead_letter,
                    };
                }
                Err(e) => {
                    self.metrics.ledger_failed(e.to_string());
                    error!(error = %e, job_id = %job_id, "ledger unavailable; the malformed job waits");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stopping.cancelled() => return Outcome::HandBack,
            }
            wait = (wait * 2).min(Duration::from_secs(2));
        }
    }

    async fn process_job(
        &self,
        job: Job,
        body: &[u8],
        delivery_hold: &DeliveryHold,
        stopping: &CancellationToken,
    ) -> Outcome {
        if stopping.is_cancelled() {
            return Outcome::HandBack;
        }
        // The slot is taken at the circuit's pass, so a job that waits there or
        // for another copy's outcome holds none. A free slot taken now keeps the
        // one-write claim: its first call's marker may be stored with the claim
        // only when nothing can delay that call, a wait for a slot included.
        let mut slot = self.slots.try_acquire().ok();
        let owner = uuid::Uuid::new_v4().to_string();
        let first_marker = slot.as_ref().and_then(|_| self.first_marker(&job));
        let Owned {
            progress,
            deliveries,
            marked: premarked,
            lost,
        } = match self
            .claim(
                &job,
                &owner,
                first_marker,
                &mut slot,
                delivery_hold,
                stopping,
            )
            .await
        {
            Err(stop) if stop.requeue => return Outcome::Requeue,
            Err(_) => return Outcome::HandBack,
            Ok(Claimed::Conflict) => return self.conflict(&job, body),
            Ok(Claimed::Forgotten) => return self.forgotten(&job, body),
            Ok(Claimed::Done(finished)) => {
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
            Ok(Claimed::Owned(owned)) => owned,
        };
        // Until this job's outcome is stored or it is handed back, and a while
        // after: an absent entry of it is then ledger loss, not a new job.
        let seen = self.seen.hold(&job.ledger_key, &job.fingerprint);
        if lost {
            self.metrics.ledger_lost();
        }
        let resumed = !progress.in_flight.is_empty() || progress.attempts > 0;
        let mut state = JobState::resume(job, progress, lost);
        if resumed {
            warn!(
                deliveries,
                "resuming a job whose earlier delivery was interrupted"
            );
        }
        // Released when dropped, so a panic cannot leave the lease renewed forever.
        let renewal = self
            .leases
            .hold(&state.job.ledger_key, &owner, &state.job.fingerprint);
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
                    let slot = slot.take();
                    self.attempt_all(
                        client,
                        &mut state,
                        &owner,
                        premarked,
                        slot,
                        delivery_hold,
                        stopping,
                    )
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
            // A requeued job waited with no call in flight: its state is exact too.
            let exact = (stop.untouched || stop.requeue).then(|| state.progress(&[]));
            let _ = self
                .ledger
                .release(
                    &state.job.ledger_key,
                    &owner,
                    Some(&state.job.fingerprint),
                    exact.as_ref(),
                )
                .await;
            return match stop.requeue {
                true => Outcome::Requeue,
                false => Outcome::HandBack,
            };
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
            return match self.store_outcome(&state.job, &owner, &stored).await {
                Some(kept) => {
                    seen.answered();
                    Outcome::Finished {
                        dead_letter: kept
                            .dead_letter
                            .as_ref()
                            .map(|d| d.to_letter(&kept.result.job_id)),
                        result: Some(kept.result),
                    }
                }
                None => Outcome::HandBack,
            };
        }
        outcome
    }

    /// A known `jobId` arrived with a different body: nothing is sent, and no
    /// second result is published (the stored or coming outcome of the body the
    /// ledger accepted is the job's one answer); the copy is dead-lettered.
    fn conflict(&self, job: &Job, body: &[u8]) -> Outcome {
        warn!("a copy of this jobId with a different body: dead-lettered as err_job_conflict, nothing sent");
        self.metrics.dead_lettered("err_job_conflict");
        Outcome::Finished {
            result: None,
            dead_letter: Some(DeadLetter {
                body: body.to_vec(),
                error_code: "err_job_conflict".to_owned(),
                error_message: format!(
                    "jobId {} is already known with a different body (vendor or data differ); nothing was sent and the first body's outcome stands: send a different change under a new jobId",
                    job.id
                ),
                attempts: 0,
                job_id: Some(job.id.to_string()),
                outcome_id: None,
                run_replay_id: None,
            }),
        }
    }

    /// A copy of a job this process answered, whose stored outcome the ledger
    /// lost (evicted, expired, flushed): nothing is sent, since all of it may
    /// be applied, and no second result is published, since it could differ
    /// from the first. The copy is dead-lettered for the operator to reconcile.
    fn forgotten(&self, job: &Job, body: &[u8]) -> Outcome {
        error!("a copy of a job this worker already answered, whose stored outcome the ledger lost: dead-lettered as err_outcome_unknown, nothing sent");
        self.metrics.ledger_lost();
        self.metrics.dead_lettered("err_outcome_unknown");
        Outcome::Finished {
            result: None,
            dead_letter: Some(DeadLetter {
                body: body.to_vec(),
                error_code: "err_outcome_unknown".to_owned(),
                error_message: format!(
                    "jobId {} was already answered, but the ledger lost its stored outcome (Redis restarted without persistence, evicted or expired the entry); nothing was sent again and the first result stands: check the accounts at the vendor before replaying this message, and check the ledger's persistence settings",
                    job.id
                ),
                attempts: 0,
                job_id: Some(job.id.to_string()),
                outcome_id: None,
                run_replay_id: None,
            }),
        }
    }

    /// Stores the outcome, retrying a failing ledger briefly; returns the outcome
    /// to publish (an earlier stored one wins), or `None` to hand the job back.
    async fn store_outcome(&self, job: &Job, owner: &str, outcome: &Finished) -> Option<Finished> {
        for wait_ms in [100, 500, 2000, 0] {
            let stored = self
                .ledger
                .finish(&job.ledger_key, owner, Some(&job.fingerprint), outcome)
                .await;
            match stored {
                Ok((kept, written)) => {
                    self.metrics.ledger_ok();
                    if written == Written::Recreated {
                        self.metrics.ledger_lost();
                    }
                    return Some(kept);
                }
                Err(e @ LedgerError::LeaseLost { .. }) => {
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
    ///
    /// A copy waiting for another delivery's outcome gives up `slot` (and with
    /// it the first marker, which needs the slot), and goes back to the queue
    /// when its hold is over (`Stop::REQUEUE`).
    async fn claim<'s>(
        &'s self,
        job: &Job,
        owner: &str,
        mut first_marker: Option<Progress>,
        slot: &mut Option<SemaphorePermit<'s>>,
        delivery_hold: &DeliveryHold,
        stopping: &CancellationToken,
    ) -> Result<Claimed, Stop> {
        let mut wait = Duration::from_millis(50);
        let mut waiting = None;
        loop {
            // Read again every try: a delivery of this process holding the job
            // may have finished meanwhile.
            let evidence = self.seen.evidence(&job.ledger_key, Some(&job.fingerprint));
            let claimed = self
                .ledger
                .claim_job(
                    &job.ledger_key,
                    owner,
                    self.policy.lease,
                    first_marker.as_ref(),
                    Some(&job.fingerprint),
                    evidence,
                )
                .await;
            if claimed.is_ok() {
                self.metrics.ledger_ok();
            }
            match claimed {
                Ok(Claim::Busy) => {
                    debug!("another delivery of this job is in progress; waiting for its outcome");
                    *slot = None;
                    first_marker = None;
                    if waiting.is_none() {
                        waiting = Some(self.holds.enter(job.vendor, delivery_hold));
                    }
                }
                Ok(Claim::Owned {
                    progress,
                    deliveries,
                    marked,
                    lost,
                }) => {
                    return Ok(Claimed::Owned(Owned {
                        progress,
                        deliveries,
                        marked,
                        lost,
                    }))
                }
                Ok(Claim::Done(finished)) => return Ok(Claimed::Done(finished)),
                Ok(Claim::Conflict) => return Ok(Claimed::Conflict),
                Ok(Claim::Forgotten) => return Ok(Claimed::Forgotten),
                Err(e) => {
                    self.metrics.ledger_failed(e.to_string());
                    error!(error = %e, "ledger unavailable; the job waits");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stopping.cancelled() => return Err(Stop::UNTOUCHED),
                _ = hold::requeue_due(waiting.as_ref()) => {
                    info!("still waiting for another delivery of this job: putting this one back at the tail of the queue");
                    return Err(Stop::REQUEUE);
                }
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
    /// The ledger had lost the job's entry.
    lost: bool,
}

/// How a claim ended.
enum Claimed {
    /// This delivery owns the job.
    Owned(Owned),
    /// The job is finished: its stored outcome.
    Done(Box<Finished>),
    /// The `jobId` is known with a different body.
    Conflict,
    /// This process answered the job and the ledger lost that answer.
    Forgotten,
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
            outcome_id: Some(OutcomeId::new()),
            run_replay_id: state.job.replay.clone(),
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

fn malformed_outcome(body: &[u8], malformed: &Malformed) -> Outcome {
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
            job_id: malformed.job_id.as_ref().map(|id| id.to_string()),
            outcome_id: None,
            run_replay_id: None,
        }),
    }
}
