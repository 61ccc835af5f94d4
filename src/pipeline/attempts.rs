//! The attempt loop of one owned job: rounds of vendor calls with checkpoints,
//! backoff, circuit and rate limit, until every item has an outcome.

use std::time::Duration;

use futures_util::future::join_all;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::state::JobState;
use super::{Pipeline, Stop};
use crate::batcher::Batcher;
use crate::job::{Item, ItemError, VendorKind};
use crate::ledger::{LedgerError, Written};
use crate::metrics::Metrics;
use crate::retry::{self, Decision};
use crate::vendor::{ItemOutcome, VendorClient, VendorError};

/// The items of one call and what the call answered for them: per-item outcomes
/// and the HTTP status, or the error of the whole call.
type Answer = (Vec<Item>, Result<(Vec<ItemOutcome>, u16), VendorError>);

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
    /// Some call could not reach the vendor at all.
    unreachable: bool,
    /// Some call got an answer with per-item outcomes.
    answered: bool,
    /// Some call failed on the vendor's side (5xx, timeout, broken connection).
    server_failed: bool,
    /// Some call was refused with a 429 (not executed).
    throttled: bool,
    /// The worker began stopping while calls waited for the rate limiter, and
    /// they were not sent.
    unsent: bool,
    /// Some item is left to retry for a reason other than a 429: a retryable
    /// failure, a server error, a timeout. Only such a round spends an attempt
    /// when the round was also throttled.
    spent: bool,
}

impl Pipeline {
    /// Calls the vendor until no item is pending. Returns `Err(Stop)` when the
    /// worker is stopping and this job has not touched the vendor yet.
    pub(super) async fn attempt_all(
        &self,
        client: &VendorClient,
        state: &mut JobState,
        owner: &str,
        mut premarked: bool,
        stopping: &CancellationToken,
    ) -> Result<(), Stop> {
        let vendor = client.kind();
        let circuit = self.circuits.get(vendor);
        let mut touched_vendor = false;
        let mut unreachable_rounds = 0;
        while !state.is_done() {
            // Kept until the round's verdict is recorded: a probe that ends
            // without one hands its turn on when this is dropped, before any
            // backoff of this job's own, so the vendor's other jobs need not wait
            // it out.
            let (pass, probing) = tokio::select! {
                pass = circuit.pass() => pass,
                _ = stopping.cancelled(), if !touched_vendor => return Err(Stop::UNTOUCHED),
            };
            // The in-flight marker must be stored before an additive item is sent:
            // it is what keeps a redelivery from sending it again. Idempotent
            // items are simply resent, so they need no marker (and no fsync).
            let pending = state.pending_items();
            // The claim may already hold the first round's marker.
            let needs_marker =
                !std::mem::take(&mut premarked) && pending.iter().any(|item| item.is_additive());
            let marked = match needs_marker {
                true => {
                    let in_flight = state.progress(&pending);
                    self.ledger
                        .checkpoint(&state.job.ledger_key, owner, &in_flight, self.policy.lease)
                        .await
                }
                false => Ok(Written::Kept),
            };
            if let Ok(Written::Recreated) = marked {
                self.metrics.ledger_lost();
            }
            if let Err(LedgerError::LeaseLost { .. }) = marked {
                // This delivery stalled past its lease and another one owns the
                // job now: sending anything could apply a change twice.
                warn!("lost the job's lease to another delivery; handing this one back");
                return Err(Stop::TOUCHED);
            }
            if let Err(e) = marked {
                self.metrics.ledger_failed(e.to_string());
                warn!(error = %e, "cannot record the call in the ledger; not sending until it answers");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stopping.cancelled() => return Err(Stop { untouched: !touched_vendor }),
                }
            }
            state.attempts += 1;
            tracing::Span::current().record("attempt", state.attempts);
            if state.attempts > 1 {
                self.metrics.retry(vendor);
            }
            // Until the job has touched the vendor, stopping also ends the wait
            // for the rate limiter: its in-flight marker is stored by now, and a
            // job aborted at the shutdown timeout would come back as an unknown
            // outcome for a call that never went out.
            let stop_unsent = (!touched_vendor).then_some(stopping);
            let round = self.send_round(client, state, stop_unsent).await;
            if round.unsent && !round.touched_vendor && !touched_vendor {
                // Nothing went out: handed back, its exact progress replaces the
                // marker.
                state.attempts -= 1;
                return Err(Stop::UNTOUCHED);
            }
            touched_vendor |= round.touched_vendor;
            // Record what the round settled and that nothing is in flight any
            // more; a finished job's outcome is stored right after instead.
            if !state.is_done() {
                self.record_progress(state, owner).await;
            }
            if let Some(error) = round.vendor_wide {
                // Not the job's fault and nothing was executed: the round does not
                // count against the job's attempts.
                state.attempts -= 1;
                if circuit.trip(error.to_string(), pass) || pass.is_probe() {
                    warn!(%vendor, error = %error, "vendor-wide failure: holding {vendor} jobs and probing with backoff");
                }
                self.metrics.circuit(vendor, true);
                continue;
            }
            if round.unreachable && !round.touched_vendor {
                // Nothing was sent, so nothing is spent: an outage must not burn
                // the job's attempts. A sustained one holds the vendor's jobs.
                state.attempts -= 1;
                unreachable_rounds += 1;
                let reason = round.last_error.unwrap_or_default();
                if circuit.record_unreachable() {
                    if circuit.trip(reason.clone(), pass) || pass.is_probe() {
                        warn!(%vendor, error = %reason, "{vendor} unreachable: holding its jobs and probing with backoff");
                    }
                    self.metrics.circuit(vendor, true);
                    continue;
                }
                let wait = self.backoff.delay(unreachable_rounds);
                drop(probing);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    _ = stopping.cancelled(), if !touched_vendor => return Err(Stop::UNTOUCHED),
                }
            }
            if round.throttled && !round.spent {
                // A 429 means the call was not executed: waiting out the vendor's
                // reset must not burn the job's attempts, or a 429 storm would
                // dead-letter the queue. That holds when other calls of the round
                // were answered too (a PNCP job sends one call per item).
                state.attempts -= 1;
            }
            if !round.answered && round.server_failed && circuit.record_unreachable() {
                // The vendor keeps failing on its side: hold its jobs rather than
                // exhaust every queued job's attempts against it.
                let reason = round.last_error.clone().unwrap_or_default();
                if circuit.trip(reason.clone(), pass) || pass.is_probe() {
                    warn!(%vendor, error = %reason, "{vendor} keeps failing: holding its jobs and probing with backoff");
                }
                self.metrics.circuit(vendor, true);
                // This job's own attempts still count (the calls may have run);
                // the others wait at the circuit instead of spending theirs.
            }
            if round.answered && circuit.succeed() {
                info!(%vendor, "{vendor} answers again: resuming its jobs");
                self.metrics.circuit(vendor, false);
            }
            drop(probing);
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
                _ = stopping.cancelled(), if !touched_vendor => return Err(Stop::UNTOUCHED),
            }
        }
        Ok(())
    }

    /// Best effort: if it fails, a redelivery resumes from the in-flight marker and
    /// reports the additive items as unknown, which is safe.
    async fn record_progress(&self, state: &JobState, owner: &str) {
        let progress = state.progress(&[]);
        match self
            .ledger
            .checkpoint(&state.job.ledger_key, owner, &progress, self.policy.lease)
            .await
        {
            Ok(Written::Kept) => {}
            Ok(Written::Recreated) => self.metrics.ledger_lost(),
            Err(e) => {
                if !matches!(e, LedgerError::LeaseLost { .. }) {
                    self.metrics.ledger_failed(e.to_string());
                }
                warn!(error = %e, "cannot record progress in the ledger; continuing");
            }
        }
    }

    /// Sends every pending item once, in calls of at most the vendor's size, and
    /// records what happened to each.
    /// While `stopping` is given, calls still waiting for the rate limiter when it
    /// is cancelled are not sent (their items stay pending).
    async fn send_round(
        &self,
        client: &VendorClient,
        state: &mut JobState,
        stopping: Option<&CancellationToken>,
    ) -> Round {
        let pending: Vec<Item> = state.pending_items().into_iter().cloned().collect();
        let answers = match self.batchers.get(client.kind()) {
            Some(batcher) => Self::send_batched(batcher, pending)
                .await
                .into_iter()
                .map(Some)
                .collect(),
            None => self.send_direct(client, pending, stopping).await,
        };
        let mut round = Round::default();
        for answer in answers {
            let Some((chunk, answer)) = answer else {
                round.unsent = true;
                continue;
            };
            match answer {
                Ok((outcomes, http_status)) => {
                    round.touched_vendor = true;
                    round.answered = true;
                    state.last_http_status = Some(http_status);
                    for (item, outcome) in chunk.iter().zip(outcomes) {
                        apply_item_outcome(state, item, outcome, &mut round);
                    }
                }
                Err(error) => self.apply_call_error(state, &chunk, error, &mut round),
            }
        }
        round
    }

    /// One call per chunk of at most the vendor's size, all at once; `None` for a
    /// chunk not sent because `stopping` was cancelled while it waited for its
    /// turn.
    async fn send_direct(
        &self,
        client: &VendorClient,
        pending: Vec<Item>,
        stopping: Option<&CancellationToken>,
    ) -> Vec<Option<Answer>> {
        let vendor = client.kind();
        let limiter = self.limiters.get(vendor);
        let metrics = &self.metrics;
        let calls = pending
            .chunks(client.max_items_per_call())
            .map(|chunk| async move {
                // Every attempt, retries included, is charged to the rate limit.
                let queued = QueuedForTurn::new(metrics, vendor);
                let waited = match stopping {
                    Some(stopping) => tokio::select! {
                        biased;
                        _ = stopping.cancelled() => return None,
                        waited = limiter.acquire() => waited,
                    },
                    None => limiter.acquire().await,
                };
                drop(queued);
                metrics.rate_limit_waited(vendor, waited);
                let refs: Vec<&Item> = chunk.iter().collect();
                let sent = client.call(&refs, limiter, metrics).await;
                let answer = sent.map(|report| (report.outcomes, report.http_status));
                Some((chunk.to_vec(), answer))
            });
        join_all(calls).await
    }

    /// Each item through the vendor's batcher, which coalesces items of many jobs
    /// into one call and charges the rate limit once per call.
    async fn send_batched(batcher: &Batcher, pending: Vec<Item>) -> Vec<Answer> {
        let submissions = pending.into_iter().map(|item| async move {
            let reply = batcher.submit(item.clone()).await;
            (
                vec![item],
                reply.map(|(outcome, status)| (vec![outcome], status)),
            )
        });
        join_all(submissions).await
    }

    fn apply_call_error(
        &self,
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
        round.unreachable |= matches!(error, VendorError::Unreachable(_));
        // The vendor took the change on: a job that stops now must not hand it back.
        round.touched_vendor |= matches!(error, VendorError::TaskStillOpen { .. });
        round.throttled |= matches!(error, VendorError::Throttled { .. });
        round.server_failed |= matches!(
            error,
            VendorError::Timeout | VendorError::Interrupted(_) | VendorError::BadResponse { .. }
        ) || matches!(error, VendorError::Http { status, .. } if status >= 500);
        match retry::classify(&error) {
            Decision::Retry { not_before } => {
                round.spent |= !matches!(error, VendorError::Throttled { .. });
                round.not_before = round.not_before.max(not_before);
            }
            Decision::OutcomeUnknown => {
                round.touched_vendor = true;
                // Idempotent items stay pending and are resent.
                round.spent |= chunk.iter().any(|item| !item.is_additive());
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

/// Counts a call in `account_worker_rate_limit_waiting` while it waits for its
/// turn, however the wait ends.
struct QueuedForTurn<'a> {
    metrics: &'a Metrics,
    vendor: VendorKind,
}

impl<'a> QueuedForTurn<'a> {
    fn new(metrics: &'a Metrics, vendor: VendorKind) -> Self {
        metrics.rate_limit_queue(vendor, 1);
        Self { metrics, vendor }
    }
}

impl Drop for QueuedForTurn<'_> {
    fn drop(&mut self) {
        self.metrics.rate_limit_queue(self.vendor, -1);
    }
}

fn apply_item_outcome(state: &mut JobState, item: &Item, outcome: ItemOutcome, round: &mut Round) {
    match outcome {
        ItemOutcome::Applied(data) => state.succeed(item.index, data),
        // The vendor says it did not apply the item and a retry may work.
        ItemOutcome::Failed(errors) if errors.iter().any(|e| e.retryable) => {
            round.spent = true;
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
            round.spent = true;
            round.last_error = Some("the vendor's response did not mention the item".to_owned());
        }
    }
}
