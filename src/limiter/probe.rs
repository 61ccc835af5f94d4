//! After a 429 pause, one call goes first and the rest wait for its answer.
//! The same holds when the worker starts: it knows nothing of the vendor's
//! quota until a first answer reports it.
//!
//! Without this, every call that queued up during the pause is released at the
//! same instant and the vendor answers most of them 429 again. The first answer
//! carries fresh quota headers, which the slowdown then paces the rest by.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// How long the others wait for the first call's answer before going anyway.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
pub(super) struct ProbeGate {
    armed: AtomicBool,
    /// When the call that went first stops holding the others back.
    probe_until: Mutex<Option<Instant>>,
    answered: Notify,
}

impl ProbeGate {
    /// A gate that holds all but the first call from the start (a slow start):
    /// without it a worker with 64 jobs ready sends 64 calls before any answer
    /// can tell it the vendor allows 10 a second, and most come back 429.
    pub(super) fn armed() -> Self {
        let gate = Self::default();
        gate.arm();
        gate
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.probe_until.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether calls are held behind a probe now.
    pub(super) fn is_armed(&self) -> bool {
        self.armed.load(Ordering::Acquire)
    }

    /// A slowed-down quota window ended: the next call goes alone. Arming an
    /// armed gate changes nothing, so many callers may do it.
    pub(super) fn arm(&self) {
        if self
            .armed
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            *self.lock() = None;
        }
    }

    /// The vendor paused calls (a 429, or a quota of zero): after the pause a
    /// new probe goes first, even if a probe was already out (the one at start
    /// may be what got the 429). Waiters go back to the limiter, which holds
    /// them for the pause, so the probe's timeout cannot run out during it.
    pub(super) fn rearm(&self) {
        self.armed.store(true, Ordering::Release);
        *self.lock() = None;
        self.answered.notify_waiters();
    }

    /// A response with quota headers (or the timeout) ends the wait.
    pub(super) fn answered(&self) {
        if self.armed.swap(false, Ordering::AcqRel) {
            *self.lock() = None;
            self.answered.notify_waiters();
        }
    }

    /// Returns at once unless armed; then the first caller goes as the probe,
    /// the others wait for its answer, a re-arm, or the timeout. Returns whether
    /// this caller waited, in which case it must take a fresh turn under the
    /// pacing (or pause) that answer set, and pass the gate again.
    pub(super) async fn pass(&self) -> bool {
        if !self.armed.load(Ordering::Acquire) {
            return false;
        }
        let notified = self.answered.notified();
        let wait_until = {
            let mut probe = self.lock();
            match *probe {
                None => {
                    *probe = Some(Instant::now() + PROBE_TIMEOUT);
                    return false;
                }
                Some(until) => until,
            }
        };
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep_until(wait_until) => {
                // The probe's answer was lost: stop holding calls back.
                if *self.lock() == Some(wait_until) {
                    self.answered();
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn after_a_429_one_call_goes_and_the_rest_wait_for_its_answer() {
        let gate = Arc::new(ProbeGate::default());
        assert!(!gate.pass().await);
        gate.arm();
        assert!(!gate.pass().await, "the first call goes at once");
        let second = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.pass().await })
        };
        tokio::task::yield_now().await;
        assert!(
            !second.is_finished(),
            "the second call waits for the first's answer"
        );
        gate.answered();
        assert!(second.await.unwrap(), "the second call waited");
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_gate_lets_one_call_go_before_any_answer() {
        let gate = Arc::new(ProbeGate::armed());
        assert!(!gate.pass().await, "the first call goes at once");
        let second = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.pass().await })
        };
        tokio::task::yield_now().await;
        assert!(!second.is_finished(), "the rest wait for the first answer");
        gate.answered();
        assert!(second.await.unwrap());
        assert!(!gate.pass().await, "after the answer, calls go at once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_answer_releases_the_others_after_the_timeout() {
        let gate = ProbeGate::default();
        gate.arm();
        gate.pass().await;
        let started = Instant::now();
        gate.pass().await;
        assert!(started.elapsed() >= PROBE_TIMEOUT);
    }
}
