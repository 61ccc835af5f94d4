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
    /// Trips in a row, for the probe backoff.
    trips: u32,
    /// Why it is open, for the readiness endpoint.
    reason: Option<String>,
    /// Rounds in a row in which the vendor could not be reached at all.
    unreachable_rounds: u32,
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
    Probe,
}

impl Circuit {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the vendor may be called: closed, or this caller is the probe.
    pub async fn pass(&self) -> Pass {
        loop {
            let notified = self.changed.notified();
            let wait_until = {
                let mut state = self.lock();
                match state.open_until {
                    None => return Pass::Closed,
                    Some(until) if !state.probing && until <= Instant::now() => {
                        state.probing = true;
                        return Pass::Probe;
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
        if !opened && pass == Pass::Closed {
            return false;
        }
        state.trips = state.trips.saturating_add(1);
        let delay = FIRST_PROBE_DELAY
            .saturating_mul(2u32.saturating_pow(state.trips.saturating_sub(1).min(16)))
            .min(MAX_PROBE_DELAY);
        state.open_until = Some(Instant::now() + delay);
        state.probing = false;
        state.reason = Some(reason);
        drop(state);
        self.changed.notify_waiters();
        opened
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
        *state = State::default();
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

    #[tokio::test(start_paused = true)]
    async fn a_tripped_circuit_lets_one_probe_through_after_the_delay() {
        let circuit = std::sync::Arc::new(Circuit::default());
        assert_eq!(circuit.pass().await, Pass::Closed);
        assert!(circuit.trip("401".into(), Pass::Closed));
        let started = Instant::now();
        assert_eq!(circuit.pass().await, Pass::Probe);
        assert!(started.elapsed() >= FIRST_PROBE_DELAY);
        let waiter = {
            let circuit = circuit.clone();
            tokio::spawn(async move { circuit.pass().await })
        };
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
        assert_eq!(circuit.pass().await, Pass::Probe);
        assert!(!circuit.trip("b".into(), Pass::Probe));
        let started = Instant::now();
        assert_eq!(circuit.pass().await, Pass::Probe);
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
        assert_eq!(circuit.pass().await, Pass::Probe);
        assert!(
            started.elapsed() < FIRST_PROBE_DELAY * 2,
            "the probe goes after the first delay, not one doubled per concurrent failure"
        );
    }
}
