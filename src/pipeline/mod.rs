//! One job from message body to outcome: parse, call the vendor with retries, and
//! decide what to publish. Knows no AMQP types; the broker layer publishes and acks.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::circuit::{Circuits, Pass};
use crate::job::{self, FailEntry, Item, ItemError, JobResult, JobStatus, Malformed, ResultMeta};
use crate::limiter::Limiters;
use crate::retry::{self, Backoff, Decision};
use crate::vendor::{ItemOutcome, VendorClient, VendorError, Vendors};

mod state;

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

/// Everything a job needs, shared by all jobs of the process.
#[derive(Debug)]
pub struct Pipeline {
    vendors: Vendors,
    limiters: Arc<Limiters>,
    circuits: Arc<Circuits>,
    backoff: Backoff,
}

impl Pipeline {
    /// A pipeline over the configured vendors and limits.
    pub fn new(
        vendors: Vendors,
        limiters: Arc<Limiters>,
        circuits: Arc<Circuits>,
        backoff: Backoff,
    ) -> Self {
        Self {
            vendors,
            limiters,
            circuits,
            backoff,
        }
    }

    /// The circuits, for readiness reports.
    pub fn circuits(&self) -> &Arc<Circuits> {
        &self.circuits
    }

    /// Processes one message body. `stopping` is cancelled when the worker shuts
    /// down: a job that has not yet touched the vendor is then handed back.
    pub async fn process(&self, body: &[u8], stopping: &CancellationToken) -> Outcome {
        match job::parse(body) {
            Err(malformed) => malformed_outcome(body, malformed),
            Ok(job) => {
                let span = tracing::info_span!("job", job_id = %job.id, vendor = %job.vendor, attempt = tracing::field::Empty);
                self.run(JobState::new(job), stopping)
                    .instrument(span)
                    .await
            }
        }
    }

    async fn run(&self, mut state: JobState, stopping: &CancellationToken) -> Outcome {
        let vendor = state.job.vendor;
        let Some(client) = self.vendors.get(vendor) else {
            state.fail_all_pending(&ItemError::permanent(
                "err_vendor_not_configured",
                format!(
                    "{vendor} is not configured on this worker; set {}_BASE_URL and its credentials",
                    vendor.as_str().to_ascii_uppercase()
                ),
            ));
            return finished(&state);
        };
        let mut touched_vendor = false;
        while !state.is_done() {
            let pass = tokio::select! {
                pass = self.circuits.get(vendor).pass() => pass,
                _ = stopping.cancelled(), if !touched_vendor => return Outcome::HandBack,
            };
            state.attempts += 1;
            tracing::Span::current().record("attempt", state.attempts);
            let round = self.send_round(client, &mut state).await;
            touched_vendor |= round.touched_vendor;
            match round.vendor_wide {
                Some(error) => {
                    // Not the job's fault and nothing was executed: this round does
                    // not count against the job's attempts.
                    state.attempts -= 1;
                    if self.circuits.get(vendor).trip(error.to_string()) || pass == Pass::Probe {
                        warn!(%vendor, error = %error, "vendor-wide failure: holding {vendor} jobs and probing with backoff");
                    }
                    continue;
                }
                None => {
                    if self.circuits.get(vendor).succeed() {
                        info!(%vendor, "vendor answers again: resuming {vendor} jobs");
                    }
                }
            }
            if state.is_done() {
                break;
            }
            if state.attempts >= self.backoff.max_attempts() {
                let last = round.last_error.unwrap_or_else(|| "no detail".to_owned());
                state.fail_all_pending(&ItemError::permanent(
                    "err_retries_exhausted",
                    format!(
                        "gave up after {} attempts; last error: {last}",
                        state.attempts
                    ),
                ));
                break;
            }
            let wait = self
                .backoff
                .delay(state.attempts)
                .max(round.not_before.unwrap_or_default());
            debug!(wait_ms = wait.as_millis() as u64, "retrying pending items");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stopping.cancelled(), if !touched_vendor => return Outcome::HandBack,
            }
        }
        finished(&state)
    }

    /// Sends every pending item once, in calls of at most the vendor's size, and
    /// records what happened to each.
    async fn send_round(&self, client: &VendorClient, state: &mut JobState) -> Round {
        let limiter = self.limiters.get(client.kind());
        let pending: Vec<Item> = state.pending_items().into_iter().cloned().collect();
        let calls = pending
            .chunks(client.max_items_per_call())
            .map(|chunk| async move {
                limiter.acquire().await;
                let refs: Vec<&Item> = chunk.iter().collect();
                (chunk, client.send(&refs).await)
            });
        let mut round = Round::default();
        for (chunk, result) in join_all(calls).await {
            match result {
                Ok(report) => {
                    round.touched_vendor = true;
                    state.last_http_status = Some(report.http_status);
                    for (item, outcome) in chunk.iter().zip(report.outcomes) {
                        apply_item_outcome(state, item, outcome, &mut round);
                    }
                }
                Err(error) => self.apply_call_error(client, state, chunk, error, &mut round),
            }
        }
        round
    }

    fn apply_call_error(
        &self,
        client: &VendorClient,
        state: &mut JobState,
        chunk: &[Item],
        error: VendorError,
        round: &mut Round,
    ) {
        debug!(error = %error, items = chunk.len(), "vendor call failed");
        round.last_error = Some(error.to_string());
        if let VendorError::Http { status, .. } | VendorError::Credentials { status, .. } = &error {
            state.last_http_status = Some(*status);
        }
        match retry::classify(&error) {
            Decision::Retry { not_before } => {
                if let (VendorError::Throttled { .. }, Some(wait)) = (&error, not_before) {
                    self.limiters.get(client.kind()).pause_for(wait);
                }
                round.not_before = round.not_before.max(not_before);
            }
            Decision::OutcomeUnknown => {
                round.touched_vendor = true;
                for item in chunk.iter().filter(|item| item.is_additive()) {
                    state.fail(
                        item.index,
                        vec![ItemError::permanent(
                            "err_outcome_unknown",
                            format!(
                                "the call may have been applied ({error}); numberOfUsers is additive, so it is not resent: reconcile the account before replaying"
                            ),
                        )],
                    );
                }
            }
            Decision::Permanent(item_error) => {
                round.touched_vendor = true;
                for item in chunk {
                    state.fail(item.index, vec![item_error.clone()]);
                }
            }
            Decision::VendorWide => round.vendor_wide = Some(error),
        }
    }
}

/// What one round of calls left behind.
#[derive(Debug, Default)]
struct Round {
    /// A call reached the vendor (its effect may exist).
    touched_vendor: bool,
    /// The vendor's own wait before the next attempt.
    not_before: Option<Duration>,
    /// The round hit a vendor-wide failure.
    vendor_wide: Option<VendorError>,
    /// The last error seen, for `err_retries_exhausted`.
    last_error: Option<String>,
}

fn apply_item_outcome(state: &mut JobState, item: &Item, outcome: ItemOutcome, round: &mut Round) {
    match outcome {
        ItemOutcome::Applied(data) => state.succeed(item.index, data),
        ItemOutcome::Failed(errors) if errors.iter().any(|e| e.retryable) => {
            round.last_error = errors.first().map(|e| format!("{}: {}", e.code, e.message));
        }
        ItemOutcome::Failed(errors) => state.fail(item.index, errors),
        ItemOutcome::Unaccounted if item.is_additive() => state.fail(
            item.index,
            vec![ItemError::permanent(
                "err_outcome_unknown",
                "the vendor's response did not mention this item; numberOfUsers is additive, so it is not resent",
            )],
        ),
        ItemOutcome::Unaccounted => {
            round.last_error = Some("the vendor's response did not mention the item".to_owned());
        }
    }
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
    warn!(job_id = malformed.job_id.as_ref().map(|id| id.as_str()), reason = %malformed.reason, "malformed job dead-lettered");
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
