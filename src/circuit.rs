//! Per-vendor circuit breaker: holds a vendor's jobs while its credentials are
//! refused or it cannot be reached, and lets one probe through with backoff.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::job::VendorKind;

/// First wait before probing a tripped vendor; doubles up to [`MAX_PROBE_DELAY`].
const FIRST_PROBE_DELAY: Duration = Duration::from_millis(500);
const MAX_PROBE_DELAY: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct State {
    /// Set while the vendor is held; the time the next probe may go.
    open_until: Option<Instant>,
    /// A probe is in flight: other jobs keep waiting for its verdict.
    probing: bool,
    /// The ticket of the latest probe, so a probe that ended without a verdict
    /// releases only its own turn, never a later probe's.
    probe_ticket: u64,
    /// Trips in a row, for the probe backoff.
    trips: u32,
    /// Why it is open, for the readiness endpoint.
    reason: Option<String>,
    /// Rounds in a row in which the vendor could not be reached at all.
    unreachable_rounds: u32,
}

/// The wait before the next probe after `trips` trips in a row.
fn probe_delay(trips: u32) -> Duration {
    FIRST_PROBE_DELAY
        .saturating_mul(2u32.saturating_pow(trips.saturating_sub(1).min(16)))
        .min(MAX_PROBE_DELAY)
}

/// Rounds in a row with the vendor unreachable before it counts as an outage
/// rather than a passing network error.
const UNREACHABLE_ROUNDS_TO_TRIP: u32 = 3;

/// The circuit of one vendor.
#[derive(Debug, Default)]
pub struct Circuit {
    state: Mutex<State>,
    changed: Notify,
}

/// Permission to call the vendor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// The circuit is closed.
    Closed,
    /// The circuit is open and this call is the probe.
    Probe(ProbeTicket),
}

impl Pass {
    /// Whether this call is the probe of an open circuit.
    pub fn is_probe(self) -> bool {
        matches!(self, Pass::Probe(_))
    }
}

/// Which probe a [`Pass::Probe`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeTicket(u64);

/// Held for one round of calls made with a [`Pass`]. A probe round must end in
/// a verdict ([`Circuit::trip`] or [`Circuit::succeed`]), but some end without
/// one: a 429, an item's own error, a network error not yet counted as an
/// outage, a ledger error, or the job stopping. Dropping the guard then hands
/// the probe's turn on after the current delay; otherwise every job of the
/// vendor would wait for a verdict that never comes.
#[derive(Debug)]
pub struct PassGuard<'a> {
    circuit: &'a Circuit,
    pass: Pass,
}

impl Drop for PassGuard<'_> {
    fn drop(&mut self) {
        if let Pass::Probe(ticket) = self.pass {
            self.circuit.end_probe_without_verdict(ticket);
        }
    }
}

impl Circuit {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the vendor may be called: closed, or this caller is the
    /// probe. Keep the guard until the round's verdict has been recorded.
    pub async fn pass(&self) -> (Pass, PassGuard<'_>) {
        let pass = self.wait_for_pass().await;
        (
            pass,
            PassGuard {
                circuit: self,
                pass,
            },
        )
    }

    async fn wait_for_pass(&self) -> Pass {
        loop {
            let notified = self.changed.notified();
            let wait_until = {
                let mut state = self.lock();
                match state.open_until {
                    None => return Pass::Closed,
                    Some(until) if !state.probing && until <= Instant::now() => {
                        state.probing = true;
                        state.probe_ticket = state.probe_ticket.wrapping_add(1);
                        return Pass::Probe(ProbeTicket(state.probe_ticket));
                    }
                    Some(_) if state.probing => None,
                    Some(until) => Some(until),
                }
            };
            match wait_until {
                Some(until) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => {}
                        _ = notified => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Records a vendor-wide failure of a call that went out with `pass`;
    /// returns true when this opened the circuit.
    ///
    /// Only the failure that opens the circuit and failed probes push the next
    /// probe further out. Calls that were already in flight when the circuit
    /// opened fail for the same reason; counting each of them as a trip would
    /// double the wait once per concurrent call, and a vendor's bad minute
    /// would hold its jobs for far longer than the outage.
    pub fn trip(&self, reason: String, pass: Pass) -> bool {
        let mut state = self.lock();
        let opened = state.open_until.is_none();
        // A probe whose turn has passed (the circuit closed and opened again
        // while it was out) speaks for no one now: like a call that went out
        // while the circuit was closed, it neither frees the current probe's
        // turn nor pushes the next one out.
        let current_probe =
            matches!(pass, Pass::Probe(ProbeTicket(t)) if state.probing && t == state.probe_ticket);
        if !opened && !current_probe {
            return false;
        }
        state.trips = state.trips.saturating_add(1);
        state.open_until = Some(Instant::now() + probe_delay(state.trips));
        state.probing = false;
        state.reason = Some(reason);
        drop(state);
        self.changed.notify_waiters();
        opened
    }

    /// A probe ended without telling whether the vendor-wide fault is over: the
    /// next probe goes after the current delay (not a longer one: nothing new
    /// was learned). A later probe's turn is left alone.
    fn end_probe_without_verdict(&self, ticket: ProbeTicket) {
        let mut state = self.lock();
        if !state.probing || ProbeTicket(state.probe_ticket) != ticket {
            return;
        }
        state.probing = false;
        if state.open_until.is_some() {
            state.open_until = Some(Instant::now() + probe_delay(state.trips));
        }
        drop(state);
        self.changed.notify_waiters();
    }

    /// Records a round in which no call reached the vendor; returns true when the
    /// vendor has now been unreachable long enough to hold its jobs.
    pub fn record_unreachable(&self) -> bool {
        let mut state = self.lock();
        state.unreachable_rounds = state.unreachable_rounds.saturating_add(1);
        state.unreachable_rounds >= UNREACHABLE_ROUNDS_TO_TRIP
    }

    /// Waits until the circuit is open (for tests and probes of readiness).
    pub async fn wait_open(&self) {
        loop {
            let notified = self.changed.notified();
            if self.lock().open_until.is_some() {
                return;
            }
            notified.await;
        }
    }

    /// Waits until the circuit is closed again.
    pub async fn wait_closed(&self) {
        loop {
            let notified = self.changed.notified();
            if self.lock().open_until.is_none() {
                return;
            }
            notified.await;
        }
    }

    /// Records a call the vendor answered; returns true when this closed the circuit.
    pub fn succeed(&self) -> bool {
        let mut state = self.lock();
        let was_open = state.open_until.is_some();
        // The ticket counter carries on, so a guard of an earlier probe can
        // never match a later one.
        *state = State {
            probe_ticket: state.probe_ticket,
            ..State::default()
        };
        drop(state);
        if was_open {
            self.changed.notify_waiters();
        }
        was_open
    }

    /// Whether the vendor may be called without waiting.
    pub fn is_closed(&self) -> bool {
        self.lock().open_until.is_none()
    }

    /// Why the circuit is open, or `None` when it is closed.
    pub fn open_reason(&self) -> Option<String> {
        let state = self.lock();
        state.open_until.and(state.reason.clone())
    }
}

/// The circuits of both vendors.
#[derive(Debug, Default)]
pub struct Circuits {
    mimecast: Circuit,
    pncp: Circuit,
}

impl Circuits {
    /// The circuit of one vendor.
    pub fn get(&self, vendor: VendorKind) -> &Circuit {
        match vendor {
            VendorKind::Mimecast => &self.mimecast,
            VendorKind::Pncp => &self.pncp,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Another job asking for a pass, in a task of its own.
    fn spawn_pass(circuit: &Arc<Circuit>) -> tokio::task::JoinHandle<Pass> {
        let circuit = circuit.clone();
        tokio::spawn(async move { circuit.pass().await.0 })
    }

    #[tokio::test(start_paused = true)]
    async fn a_tripped_circuit_lets_one_probe_through_after_the_delay() {
        let circuit = Arc::new(Circuit::default());
        assert_eq!(circuit.pass().await.0, Pass::Closed);
        assert!(circuit.trip("401".into(), Pass::Closed));
        let started = Instant::now();
        let (probe, _probing) = circuit.pass().await;
        assert!(probe.is_probe());
        assert!(started.elapsed() >= FIRST_PROBE_DELAY);
        let waiter = spawn_pass(&circuit);
        tokio::task::yield_now().await;
        assert!(
            !waiter.is_finished(),
            "a second caller must wait for the probe"
        );
        assert!(circuit.succeed());
        assert_eq!(waiter.await.unwrap(), Pass::Closed);
        assert!(circuit.open_reason().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn probe_delays_grow_while_the_vendor_keeps_failing() {
        let circuit = Circuit::default();
        circuit.trip("a".into(), Pass::Closed);
        let (probe, probing) = circuit.pass().await;
        assert!(probe.is_probe());
        assert!(!circuit.trip("b".into(), probe));
        drop(probing);
        let started = Instant::now();
        assert!(circuit.pass().await.0.is_probe());
        assert!(started.elapsed() >= FIRST_PROBE_DELAY * 2);
        assert_eq!(circuit.open_reason().as_deref(), Some("b"));
    }

    #[tokio::test(start_paused = true)]
    async fn calls_already_in_flight_do_not_push_the_probe_further_out() {
        let circuit = Circuit::default();
        assert!(circuit.trip("first".into(), Pass::Closed));
        for _ in 0..4 {
            assert!(!circuit.trip("in flight".into(), Pass::Closed));
        }
        let started = Instant::now();
        assert!(circuit.pass().await.0.is_probe());
        assert!(
            started.elapsed() < FIRST_PROBE_DELAY * 2,
            "the probe goes after the first delay, not one doubled per concurrent failure"
        );
        assert_eq!(circuit.open_reason().as_deref(), Some("first"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_ends_without_a_verdict_hands_its_turn_on() {
        let circuit = Arc::new(Circuit::default());
        circuit.trip("401".into(), Pass::Closed);
        let (probe, probing) = circuit.pass().await;
        assert!(probe.is_probe());
        let waiter = spawn_pass(&circuit);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "the others wait for the probe");

        // The probe was answered 429, say: no verdict on the credentials.
        drop(probing);
        let next = tokio::time::timeout(Duration::from_secs(600), waiter)
            .await
            .expect("another job probes instead of waiting forever")
            .unwrap();
        assert!(next.is_probe());
        assert!(
            circuit.open_reason().is_some(),
            "still open until a verdict"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_probe_failing_late_leaves_the_current_probe_out_alone() {
        let circuit = Arc::new(Circuit::default());
        circuit.trip("401".into(), Pass::Closed);
        let (stale, _stale_round) = circuit.pass().await;
        // Another job's call is answered: closed. Then a new failure opens it.
        circuit.succeed();
        circuit.trip("401 again".into(), Pass::Closed);
        let (current, _current_round) = circuit.pass().await;
        assert!(current.is_probe());
        // The stale probe's slow call fails now.
        assert!(!circuit.trip("late".into(), stale));
        let waiter = spawn_pass(&circuit);
        tokio::time::sleep(MAX_PROBE_DELAY * 2).await;
        assert!(
            !waiter.is_finished(),
            "one probe at a time: the current one is still out"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_old_probe_ending_leaves_a_later_probe_alone() {
        let circuit = Arc::new(Circuit::default());
        circuit.trip("401".into(), Pass::Closed);
        let (first, first_round) = circuit.pass().await;
        circuit.trip("401 again".into(), first);
        let (second, _second_round) = circuit.pass().await;
        assert!(second.is_probe());
        let waiter = spawn_pass(&circuit);
        drop(first_round);
        tokio::time::sleep(MAX_PROBE_DELAY * 2).await;
        assert!(
            !waiter.is_finished(),
            "one probe at a time: the second is still out"
        );
    }
}
