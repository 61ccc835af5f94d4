//! The attempt loop of one owned job: rounds of vendor calls with checkpoints,
//! backoff, circuit and rate limit, until every item has an outcome.

use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::SemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::state::JobState;
use super::{hold, DeliveryHold, Pipeline, Stop};
use crate::batcher::{Batcher, NotSent};
use crate::circuit::Pass;
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
    /// Some calls were not sent: the worker began stopping while they waited
    /// for the rate limiter, their marker could not be stored, or their batch
    /// left without them.
    unsent: bool,
    /// Why the in-flight marker of some call could not be stored (that call was
    /// not sent).
    unmarked: Option<LedgerError>,
    /// Some item is left to retry for a reason other than a 429: a retryable
    /// failure, a server error, a timeout. Only such a round spends an attempt
    /// when the round was also throttled.
    spent: bool,
}

impl Round {
    /// No call of the round reached the vendor or got any answer.
    fn sent_nothing(&self) -> bool {
        !self.touched_vendor && !self.answered && self.last_error.is_none()
    }
}

/// What became of one call of a round.
enum Sent {
    /// It went out; its items and what the vendor answered.
    Answered(Answer),
    /// It was not sent (stopping, or its batch left without it).
    Unsent,
    /// Its in-flight marker could not be stored, so it was not sent.
    Unmarked(LedgerError),
}

/// Stores a round's in-flight marker call by call, each call's items just after
/// the call has its rate-limit turn and just before it leaves. A call still
/// waiting for its turn (a 429's pause can last minutes) has left no marker, so a
/// crash there never reports an unknown outcome for a call the vendor never saw.
struct Marker<'a> {
    pipeline: &'a Pipeline,
    state: &'a JobState,
    owner: &'a str,
    /// The claim stored this round's marker already (every item in flight).
    premarked: bool,
    /// What has been recorded in flight so far in this round.
    in_flight: tokio::sync::Mutex<Vec<usize>>,
}

impl Marker<'_> {
    /// Records `items` in flight before they are sent. Idempotent items are
    /// simply resent after a crash, so a call of only those needs no marker
    /// (and no fsync).
    async fn mark(&self, items: &[Item]) -> Result<(), LedgerError> {
        if self.premarked || !items.iter().any(Item::is_additive) {
            return Ok(());
        }
        let mut in_flight = self.in_flight.lock().await;
        let before = in_flight.len();
        in_flight.extend(items.iter().map(|item| item.index));
        let mut progress = self.state.progress(&[]);
        progress.in_flight.clone_from(&in_flight);
        let stored = self
            .pipeline
            .ledger
            .checkpoint(
                &self.state.job.ledger_key,
                self.owner,
                Some(&self.state.job.fingerprint),
                &progress,
                self.pipeline.policy.lease,
            )
            .await;
        match stored {
            Ok(written) => {
                if written == Written::Recreated {
                    self.pipeline.metrics.ledger_lost();
                }
                Ok(())
            }
            Err(e) => {
                in_flight.truncate(before);
                Err(e)
            }
        }
    }
}

impl Pipeline {
    /// Calls the vendor until no item is pending. Returns `Err(Stop)` when the
    /// worker is stopping and this job has not touched the vendor yet, or when
    /// the job waited at its vendor's circuit past `hold_until`.
    ///
    /// `slot`, when given, is a concurrency slot already taken. The job holds a
    /// slot from the circuit's pass on, and gives it up whenever it waits for
    /// its held vendor, so held jobs never take capacity from the other vendor.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn attempt_all<'s>(
        &'s self,
        client: &VendorClient,
        state: &mut JobState,
        owner: &str,
        mut premarked: bool,
        mut slot: Option<SemaphorePermit<'s>>,
        delivery_hold: &DeliveryHold,
        stopping: &CancellationToken,
    ) -> Result<(), Stop> {
        let vendor = client.kind();
        let circuit = self.circuits.get(vendor);
        let mut touched_vendor = false;
        let mut unreachable_rounds = 0;
        while !state.is_done() {
            // The claim's marker is good only while nothing can hold the call
            // back; otherwise it goes before the wait, and this round's marker is
            // stored once the call has its turn.
            if premarked && !(circuit.is_closed() && self.limiters.get(vendor).is_open()) {
                premarked = false;
                self.record_progress(state, owner).await;
            }
            // A 429's pause holds every call to the vendor, maybe for minutes:
            // the job waits it out without a slot, and goes back to the tail of
            // its queue if it outlasts the delivery's hold. Nothing is in flight.
            if let Some(until) = self.limiters.get(vendor).long_pause_until() {
                slot = None;
                let waiting = self.holds.enter(vendor, delivery_hold);
                // Counted with the calls waiting for their turn: it is one.
                let _queued = QueuedForTurn::new(&self.metrics, vendor);
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => {}
                    _ = stopping.cancelled(), if !touched_vendor => return Err(Stop::UNTOUCHED),
                    _ = hold::requeue_due(Some(&waiting)) => {
                        info!(%vendor, "{vendor} calls still paused by its 429: putting the job back at the tail of its queue");
                        return Err(Stop::REQUEUE);
                    }
                }
                continue;
            }
            // Kept until the round's verdict is recorded: a probe that ends
            // without one hands its turn on when this is dropped, before any
            // backoff of this job's own, so the vendor's other jobs need not wait
            // it out.
            let waiting = match circuit.is_closed() {
                true => None,
                false => {
                    slot = None;
                    Some(self.holds.enter(vendor, delivery_hold))
                }
            };
            let (pass, probing) = tokio::select! {
                biased;
                pass = circuit.pass() => pass,
                _ = stopping.cancelled(), if !touched_vendor => return Err(Stop::UNTOUCHED),
                // Nothing is in flight here: the job's state is exact, and the
                // delivery goes back to the tail of its queue before the broker's
                // consumer timeout could close the channel over it.
                _ = hold::requeue_due(waiting.as_ref()) => {
                    info!(%vendor, "{vendor} still held: putting the job back at the tail of its queue");
                    return Err(Stop::REQUEUE);
                }
                // The circuit opened between the check and the wait: the job
                // waits with its slot, but not past its hold.
                _ = tokio::time::sleep_until(delivery_hold.until), if waiting.is_none() => {
                    info!(%vendor, "{vendor} held: putting the job back at the tail of its queue");
                    return Err(Stop::REQUEUE);
                }
            };
            drop(waiting);
            if slot.is_none() {
                // Still nothing in flight: a job that cannot get a slot before its
                // hold ends goes back to the queue (a probe's pass is handed on
                // when `probing` drops).
                slot = tokio::select! {
                    slot = self.slots.acquire() => slot.ok(),
                    _ = stopping.cancelled(), if !touched_vendor => return Err(Stop::UNTOUCHED),
                    _ = tokio::time::sleep_until(delivery_hold.until) => {
                        info!(%vendor, "no slot free before the delivery's hold ended: putting the job back at the tail of its queue");
                        return Err(Stop::REQUEUE);
                    }
                };
            }
            // The circuit may have opened while this job waited for its slot: a
            // pass taken before then must not send another call into the outage.
            if !pass.is_probe() && !circuit.is_closed() {
                drop(probing);
                continue;
            }
            // Until the job has touched the vendor, stopping also ends the wait
            // for the rate limiter: nothing is recorded in flight before a call
            // has its turn, and a job aborted at the shutdown timeout would come
            // back with its call unsent.
            let stop_unsent = (!touched_vendor).then_some(stopping);
            if pass.is_probe() {
                // The probe asks whether the vendor answers again with a call that
                // changes nothing; the job's own items wait for the verdict and
                // keep every attempt for when the vendor is back.
                if self.probe(client, state, pass, stop_unsent).await.is_err() {
                    return Err(Stop::UNTOUCHED);
                }
                drop(probing);
                continue;
            }
            state.attempts += 1;
            tracing::Span::current().record("attempt", state.attempts);
            if state.attempts > 1 {
                self.metrics.retry(vendor);
            }
            let claim_marked = premarked;
            let round = self
                .send_round(
                    client,
                    state,
                    owner,
                    std::mem::take(&mut premarked),
                    stop_unsent,
                )
                .await;
            if let Some(marked) = round.unmarked.as_ref().filter(|_| round.sent_nothing()) {
                // The in-flight marker must be stored before an additive item is
                // sent: it is what keeps a redelivery from sending it again.
                state.attempts -= 1;
                if let LedgerError::LeaseLost { .. } = marked {
                    // This delivery stalled past its lease and another one owns the
                    // job now: sending anything could apply a change twice.
                    warn!("lost the job's lease to another delivery; handing this one back");
                    return Err(Stop::TOUCHED);
                }
                self.metrics.ledger_failed(marked.to_string());
                warn!(error = %marked, "cannot record the call in the ledger; not sending until it answers");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stopping.cancelled() => return Err(Stop { untouched: !touched_vendor, requeue: false }),
                }
            }
            if round.unsent && round.sent_nothing() {
                // Nothing went out and nothing is in flight: no attempt spent.
                state.attempts -= 1;
                if claim_marked {
                    // The claim marked this round's call in flight; it never left
                    // (a pause began before its turn).
                    self.record_progress(state, owner).await;
                }
                if !touched_vendor && stopping.is_cancelled() {
                    // Handed back, its exact progress replaces any marker.
                    return Err(Stop::UNTOUCHED);
                }
                // A batch left without the items: they go in a later one.
                tokio::select! {
                    _ = tokio::time::sleep(self.backoff.delay(1)) => continue,
                    _ = stopping.cancelled(), if !touched_vendor => return Err(Stop::UNTOUCHED),
                }
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
            // Nothing is in flight while the job waits to retry (its progress was
            // recorded above): it holds no slot, and a wait that outlasts the
            // delivery's hold (a 429's reset) puts it back at the tail of its queue.
            slot = None;
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stopping.cancelled(), if !touched_vendor => return Err(Stop::UNTOUCHED),
                _ = tokio::time::sleep_until(delivery_hold.until) => {
                    info!(%vendor, "still waiting to retry: putting the job back at the tail of its queue");
                    return Err(Stop::REQUEUE);
                }
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
            .checkpoint(
                &state.job.ledger_key,
                owner,
                Some(&state.job.fingerprint),
                &progress,
                self.policy.lease,
            )
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
    /// records what happened to each. Each call stores its in-flight marker once
    /// it has its rate-limit turn, just before it leaves (`premarked`: the claim
    /// stored it already).
    /// While `stopping` is given, calls still waiting for the rate limiter when it
    /// is cancelled are not sent (their items stay pending).
    async fn send_round(
        &self,
        client: &VendorClient,
        state: &mut JobState,
        owner: &str,
        premarked: bool,
        stopping: Option<&CancellationToken>,
    ) -> Round {
        let pending: Vec<Item> = state.pending_items().into_iter().cloned().collect();
        let marker = Marker {
            pipeline: self,
            state,
            owner,
            premarked,
            in_flight: tokio::sync::Mutex::new(Vec::new()),
        };
        let answers = match self.batchers.get(client.kind()) {
            Some(batcher) => Self::send_batched(batcher, pending, &marker, stopping).await,
            None => self.send_direct(client, pending, &marker, stopping).await,
        };
        let mut round = Round::default();
        for answer in answers {
            let (chunk, answer) = match answer {
                Sent::Answered(answer) => answer,
                Sent::Unsent => {
                    round.unsent = true;
                    continue;
                }
                Sent::Unmarked(error) => {
                    round.unsent = true;
                    round.unmarked.get_or_insert(error);
                    continue;
                }
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

    /// Takes one rate-limit turn for a call; `None` when `stopping` was
    /// cancelled first.
    async fn take_turn(
        &self,
        vendor: VendorKind,
        stopping: Option<&CancellationToken>,
    ) -> Option<()> {
        let limiter = self.limiters.get(vendor);
        // A 429's long pause may last minutes: a call that would wait it out is not
        // sent this round, so its job waits without a slot (`attempt_all`).
        // Only until the job has touched the vendor, as with stopping.
        let pause = limiter.pause_begins();
        tokio::pin!(pause);
        pause.as_mut().enable();
        if stopping.is_some() && limiter.long_pause_until().is_some() {
            return None;
        }
        // Every attempt, retries included, is charged to the rate limit.
        let queued = QueuedForTurn::new(&self.metrics, vendor);
        let waited = match stopping {
            Some(stopping) => tokio::select! {
                biased;
                _ = stopping.cancelled() => return None,
                _ = pause => return None,
                waited = limiter.acquire() => waited,
            },
            None => limiter.acquire().await,
        };
        drop(queued);
        self.metrics.rate_limit_waited(vendor, waited);
        Some(())
    }

    /// One call per chunk of at most the vendor's size, all at once, each
    /// marked in flight once it has its turn.
    async fn send_direct(
        &self,
        client: &VendorClient,
        pending: Vec<Item>,
        marker: &Marker<'_>,
        stopping: Option<&CancellationToken>,
    ) -> Vec<Sent> {
        let vendor = client.kind();
        let limiter = self.limiters.get(vendor);
        let metrics = &self.metrics;
        let calls = pending
            .chunks(client.max_items_per_call())
            .map(|chunk| async move {
                if self.take_turn(vendor, stopping).await.is_none() {
                    return Sent::Unsent;
                }
                if let Err(error) = marker.mark(chunk).await {
                    return Sent::Unmarked(error);
                }
                let refs: Vec<&Item> = chunk.iter().collect();
                let sent = client.call(&refs, limiter, metrics).await;
                let answer = sent.map(|report| (report.outcomes, report.http_status));
                Sent::Answered((chunk.to_vec(), answer))
            });
        join_all(calls).await
    }

    /// The items through the vendor's batcher, which coalesces items of many jobs
    /// into one call, charges the rate limit once per call, and lets each job
    /// store its marker (or withdraw) once the call has its turn.
    async fn send_batched(
        batcher: &Batcher,
        pending: Vec<Item>,
        marker: &Marker<'_>,
        stopping: Option<&CancellationToken>,
    ) -> Vec<Sent> {
        let submissions = pending.chunks(batcher.max_items()).map(|chunk| async move {
            let submitted = batcher
                .submit(chunk.to_vec(), stopping, || marker.mark(chunk))
                .await;
            match submitted {
                Ok(answer) => Sent::Answered((chunk.to_vec(), answer)),
                Err(NotSent::NotReady(error)) => Sent::Unmarked(error),
                Err(NotSent::Stopping | NotSent::Left) => Sent::Unsent,
            }
        });
        join_all(submissions).await
    }

    /// The probe of a held vendor: one call that changes nothing (Mimecast: an
    /// update-account item with only the account code; PNCP: the job's own
    /// idempotent item), whose answer opens or closes the circuit. It spends none
    /// of the job's attempts and settles none of its items. `Err` when the
    /// worker began stopping before it went.
    async fn probe(
        &self,
        client: &VendorClient,
        state: &JobState,
        pass: Pass,
        stopping: Option<&CancellationToken>,
    ) -> Result<(), ()> {
        let vendor = client.kind();
        let circuit = self.circuits.get(vendor);
        let Some(item) = state
            .pending_items()
            .first()
            .map(|item| client.probe_item(item))
        else {
            return Ok(());
        };
        self.take_turn(vendor, stopping).await.ok_or(())?;
        debug!(%vendor, "probing a held vendor with a call that changes nothing");
        let sent = client
            .call(&[&item], self.limiters.get(vendor), &self.metrics)
            .await;
        match probe_verdict(&sent) {
            Some(true) if circuit.succeed() => {
                info!(%vendor, "{vendor} answers again: resuming its jobs");
                self.metrics.circuit(vendor, false);
            }
            // Another job's answer closed the circuit already.
            Some(true) => {}
            Some(false) => {
                let reason = sent.err().map(|e| e.to_string()).unwrap_or_default();
                circuit.trip(reason.clone(), pass);
                warn!(%vendor, error = %reason, "{vendor} still failing: holding its jobs and probing with backoff");
                self.metrics.circuit(vendor, true);
            }
            // A 429 says nothing about the fault; the guard hands the turn on.
            None => {}
        }
        Ok(())
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

/// What a probe's answer says: `Some(true)` the vendor answers again,
/// `Some(false)` it still fails, `None` nothing either way (a 429).
fn probe_verdict(sent: &Result<crate::vendor::CallReport, VendorError>) -> Option<bool> {
    match sent {
        Ok(_) => Some(true),
        Err(VendorError::Throttled { .. }) => None,
        // The vendor took the change on and is working on it.
        Err(VendorError::TaskStillOpen { .. }) => Some(true),
        // An answer about the item (a 4xx) is an answer from the vendor.
        Err(error) => Some(matches!(retry::classify(error), Decision::Permanent(_))),
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
