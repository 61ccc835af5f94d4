//! Slowing down before the vendor says no: when `X-RateLimit-Remaining` runs low,
//! the next calls are spaced so the quota that is left lasts until
//! `X-RateLimit-Reset`, instead of spending it at once and collecting 429s.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::vendor::QuotaHint;

/// Below this share of the vendor's quota (as estimated from the most
/// `remaining` seen), calls are spaced out.
const LOW_WATER_SHARE: u64 = 10;

/// What a quota hint asks of the limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reaction {
    /// Plenty left: nothing changes.
    Carry,
    /// Space calls at least `interval` apart for `for_`, until the quota returns.
    Space {
        /// Time between two calls.
        interval: Duration,
        /// How long the spacing holds (the hint's reset).
        for_: Duration,
    },
    /// Nothing left: the next call would be refused, so hold every call until reset.
    Pause(Duration),
}

/// Spacing in force: calls go one per `interval`, the next at `next`, until `until`.
#[derive(Debug, Clone, Copy)]
struct Spacing {
    interval: Duration,
    until: Instant,
    next: Instant,
}

/// The slowdown of one vendor within this process.
#[derive(Debug)]
pub(super) struct Slowdown {
    /// Calls that may be under way at once: a quota below this can be spent by
    /// calls already sent, so the limiter slows down before it gets there.
    in_flight: u64,
    /// The largest `remaining` seen: the best guess at the vendor's quota.
    peak_remaining: AtomicU64,
    /// Whether `spacing` may hold, so `wait_turn` costs one atomic load otherwise.
    active: AtomicBool,
    spacing: Mutex<Option<Spacing>>,
}

impl Slowdown {
    /// A slowdown for a process with up to `in_flight` calls under way.
    pub(super) fn new(in_flight: u64) -> Self {
        Self {
            in_flight: in_flight.max(1),
            peak_remaining: AtomicU64::new(0),
            active: AtomicBool::new(false),
            spacing: Mutex::new(None),
        }
    }

    /// The `remaining` below which calls are spaced out.
    fn low_water(&self) -> u64 {
        let peak = self.peak_remaining.load(Ordering::Relaxed);
        (peak / LOW_WATER_SHARE).max(self.in_flight)
    }

    /// Decides what `hint` asks for and, when it asks for spacing, applies it
    /// here; the caller applies a pause (and shares either with the fleet).
    pub(super) fn observe(&self, hint: QuotaHint) -> Reaction {
        self.peak_remaining
            .fetch_max(hint.remaining, Ordering::Relaxed);
        let reaction = react(hint, self.low_water());
        if let Reaction::Space { interval, for_ } = reaction {
            self.space(interval, for_);
        }
        reaction
    }

    /// Spaces calls `interval` apart for `for_`; a newer hint replaces the
    /// interval but keeps the turn already given out.
    pub(super) fn space(&self, interval: Duration, for_: Duration) {
        let now = Instant::now();
        let mut spacing = self.spacing.lock().unwrap_or_else(|p| p.into_inner());
        let next = spacing.map_or(now, |s| s.next);
        *spacing = Some(Spacing {
            interval,
            until: now + for_,
            next,
        });
        self.active.store(true, Ordering::Release);
    }

    /// Waits for this call's turn while a spacing holds; returns at once otherwise.
    /// Returns whether the turn fell at the end of the spaced window.
    /// Whether calls are being spaced out now.
    pub(super) fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    pub(super) async fn wait_turn(&self) -> bool {
        if !self.active.load(Ordering::Acquire) {
            return false;
        }
        let mut rolled_over = false;
        let turn = {
            let now = Instant::now();
            let mut spacing = self.spacing.lock().unwrap_or_else(|p| p.into_inner());
            match *spacing {
                Some(s) if now < s.until => {
                    let turn = s.next.max(now);
                    if turn >= s.until {
                        // The quota is back by then: no turn is needed past reset,
                        // but the new window's size is unknown until a call answers.
                        rolled_over = true;
                        Some(s.until)
                    } else {
                        *spacing = Some(Spacing {
                            next: turn + s.interval,
                            ..s
                        });
                        Some(turn)
                    }
                }
                _ => {
                    *spacing = None;
                    self.active.store(false, Ordering::Release);
                    None
                }
            }
        };
        if let Some(turn) = turn {
            tokio::time::sleep_until(turn).await;
        }
        rolled_over
    }
}

/// The pure decision: space calls `reset / remaining` apart once `remaining` is
/// below `low_water`, and pause until reset when nothing is left.
pub(super) fn react(hint: QuotaHint, low_water: u64) -> Reaction {
    if hint.remaining >= low_water || hint.reset.is_zero() {
        return Reaction::Carry;
    }
    if hint.remaining == 0 {
        return Reaction::Pause(hint.reset);
    }
    let calls = u32::try_from(hint.remaining).unwrap_or(u32::MAX);
    Reaction::Space {
        interval: hint.reset / calls,
        for_: hint.reset,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hint(remaining: u64, reset_ms: u64) -> QuotaHint {
        QuotaHint {
            remaining,
            reset: Duration::from_millis(reset_ms),
        }
    }

    #[test]
    fn plenty_of_quota_changes_nothing() {
        assert_eq!(react(hint(500, 800), 16), Reaction::Carry);
        assert_eq!(react(hint(16, 800), 16), Reaction::Carry);
    }

    #[test]
    fn low_quota_spreads_what_is_left_over_the_reset() {
        assert_eq!(
            react(hint(4, 800), 16),
            Reaction::Space {
                interval: Duration::from_millis(200),
                for_: Duration::from_millis(800),
            }
        );
    }

    #[test]
    fn an_empty_quota_pauses_until_reset() {
        assert_eq!(
            react(hint(0, 300), 16),
            Reaction::Pause(Duration::from_millis(300))
        );
    }

    #[test]
    fn the_low_water_mark_follows_the_quota_seen() {
        let slowdown = Slowdown::new(8);
        assert_eq!(slowdown.observe(hint(999, 1000)), Reaction::Carry);
        assert_eq!(slowdown.low_water(), 99);
        assert!(matches!(
            slowdown.observe(hint(50, 500)),
            Reaction::Space { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn calls_are_spaced_until_the_quota_returns() {
        let slowdown = Slowdown::new(16);
        let start = Instant::now();
        assert!(matches!(
            slowdown.observe(hint(5, 1000)),
            Reaction::Space { .. }
        ));
        let mut turns = Vec::new();
        for _ in 0..7 {
            slowdown.wait_turn().await;
            turns.push(start.elapsed().as_millis());
        }
        // Five calls over the second that is left, then free again after reset.
        assert_eq!(turns, vec![0, 200, 400, 600, 800, 1000, 1000]);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_the_spacing() {
        let slowdown = std::sync::Arc::new(Slowdown::new(16));
        slowdown.observe(hint(4, 400));
        let start = Instant::now();
        let waits = (0..4).map(|_| {
            let slowdown = slowdown.clone();
            tokio::spawn(async move {
                slowdown.wait_turn().await;
                start.elapsed().as_millis()
            })
        });
        let mut turns = Vec::new();
        for wait in waits {
            turns.push(wait.await.unwrap());
        }
        turns.sort_unstable();
        assert_eq!(turns, vec![0, 100, 200, 300]);
    }

    #[tokio::test(start_paused = true)]
    async fn no_hint_means_no_wait() {
        let slowdown = Slowdown::new(16);
        let start = Instant::now();
        for _ in 0..100 {
            slowdown.wait_turn().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
