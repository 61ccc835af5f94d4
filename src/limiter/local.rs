//! The process-local limiter: a `governor` ceiling, the 429 pause, the quota
//! slowdown and the learned rate, all on tokio's clock so paused-time tests can
//! drive them.

use std::sync::Mutex;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::time::Instant;

use super::learned::Learned;
use super::slowdown::Slowdown;

/// `governor`'s clock read from tokio's, so `tokio::time::pause()` governs the
/// ceiling as it does the pause and the slowdown.
#[derive(Debug, Clone, Copy, Default)]
struct TokioClock;

impl Clock for TokioClock {
    type Instant = std::time::Instant;

    fn now(&self) -> Self::Instant {
        Instant::now().into_std()
    }
}

type Ceiling = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<std::time::Instant>>;

/// One vendor's limiter within this process.
#[derive(Debug)]
pub(super) struct LocalLimiter {
    ceiling: Option<Ceiling>,
    paused_until: Mutex<Option<Instant>>,
    pub(super) slowdown: Slowdown,
    pub(super) learned: Learned,
}

impl LocalLimiter {
    /// Whether a call would go at once: no ceiling, no pause, no spacing.
    pub(super) fn is_open(&self) -> bool {
        self.ceiling.is_none()
            && self.pause_deadline().is_none()
            && !self.slowdown.is_active()
            && !self.learned.is_pacing()
    }

    /// A limiter spacing calls `interval` apart (`None`: no ceiling); `in_flight`
    /// is how many calls may be under way at once, for the slowdown.
    pub(super) fn new(interval: Option<Duration>, in_flight: u64) -> Self {
        Self {
            ceiling: interval.and_then(Quota::with_period).map(|quota| {
                // No burst: calls are spread evenly, so no window holds more than its share.
                RateLimiter::direct_with_clock(quota, TokioClock)
            }),
            paused_until: Mutex::new(None),
            slowdown: Slowdown::new(in_flight),
            // The learned rate never needs to exceed the ceiling's.
            learned: Learned::new(interval.map(|i| 1.0 / i.as_secs_f64().max(1e-9))),
        }
    }

    /// Waits out the pause, the slowdown, the learned rate and the ceiling;
    /// returns whether the turn came at the end of a slowed-down
    /// quota window, when the new window's quota is not known yet.
    pub(super) async fn acquire(&self) -> bool {
        let mut rolled_over = false;
        loop {
            self.wait_out_pause().await;
            rolled_over |= self.slowdown.wait_turn().await;
            self.learned.wait_turn().await;
            if let Some(ceiling) = &self.ceiling {
                while let Err(not_until) = ceiling.check() {
                    let wait = not_until.wait_time_from(TokioClock.now());
                    tokio::time::sleep(wait).await;
                }
            }
            // A 429 may have arrived while this call waited for its turn.
            if self.pause_deadline().is_none() {
                return rolled_over;
            }
        }
    }

    /// Holds every call for `duration`; never shortens a longer pause.
    pub(super) fn pause_for(&self, duration: Duration) {
        let until = Instant::now() + duration;
        let mut paused = self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        if paused.is_none_or(|current| current < until) {
            *paused = Some(until);
        }
    }

    /// When the current pause ends, if one holds.
    pub(super) fn pause_deadline(&self) -> Option<Instant> {
        let paused = *self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        paused.filter(|until| *until > Instant::now())
    }

    /// Sleeps until no pause holds.
    pub(super) async fn wait_out_pause(&self) {
        while let Some(until) = self.pause_deadline() {
            tokio::time::sleep_until(until).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Start times of `n` calls made by `tasks` concurrent callers.
    async fn call_times(
        limiter: std::sync::Arc<LocalLimiter>,
        tasks: usize,
        n: usize,
    ) -> Vec<Duration> {
        let start = Instant::now();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let left = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(n));
        let mut handles = Vec::new();
        for _ in 0..tasks {
            let (limiter, tx, left) = (limiter.clone(), tx.clone(), left.clone());
            handles.push(tokio::spawn(async move {
                loop {
                    limiter.acquire().await;
                    let before = left.fetch_update(
                        std::sync::atomic::Ordering::SeqCst,
                        std::sync::atomic::Ordering::SeqCst,
                        |l| l.checked_sub(1),
                    );
                    if before.is_err() {
                        return;
                    }
                    let _ = tx.send(start.elapsed());
                }
            }));
        }
        drop(tx);
        for handle in handles {
            handle.await.unwrap();
        }
        let mut times = Vec::new();
        while let Some(t) = rx.recv().await {
            times.push(t);
        }
        times
    }

    /// The most calls in any window of `width` starting at a call.
    fn peak(times: &[Duration], width: Duration) -> usize {
        (0..times.len())
            .map(|i| {
                times[i..]
                    .iter()
                    .take_while(|t| **t < times[i] + width)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_every_call_until_it_ends() {
        let limiter = LocalLimiter::new(None, 16);
        limiter.pause_for(Duration::from_secs(2));
        let started = Instant::now();
        limiter.acquire().await;
        assert!(started.elapsed() >= Duration::from_secs(2));
        let again = Instant::now();
        limiter.acquire().await;
        assert!(again.elapsed() < Duration::from_millis(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_pause_is_not_shortened_by_an_earlier_one() {
        let limiter = LocalLimiter::new(None, 16);
        limiter.pause_for(Duration::from_secs(5));
        limiter.pause_for(Duration::from_secs(1));
        let deadline = limiter.pause_deadline().unwrap();
        assert!(deadline >= Instant::now() + Duration::from_secs(4));
    }

    #[tokio::test(start_paused = true)]
    async fn sixteen_callers_never_put_more_than_the_ceiling_in_one_second() {
        let limiter = std::sync::Arc::new(LocalLimiter::new(Some(Duration::from_millis(51)), 16));
        let times = call_times(limiter, 16, 100).await;
        assert_eq!(times.len(), 100);
        assert!(peak(&times, Duration::from_secs(1)) <= 20, "{times:?}");
        // Sustained: 100 calls spaced 51 ms apart take 99 intervals.
        let span = times[times.len() - 1] - times[0];
        assert!(span <= Duration::from_millis(99 * 51 + 5), "{span:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_ceiling_calls_do_not_wait() {
        let limiter = std::sync::Arc::new(LocalLimiter::new(None, 16));
        let times = call_times(limiter, 4, 1000).await;
        assert_eq!(times.last(), Some(&Duration::ZERO));
    }
}
