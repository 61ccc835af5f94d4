//! The vendor's quota learned from its 429s, for vendors that never publish it.
//!
//! When a vendor says no, the rate drops to what it demonstrably accepted over
//! the last second (or to its `X-RateLimit-Limit`, when the 429 carries one),
//! holds there, then probes upward on a cubic curve (CUBIC's shape: slow near
//! the level that last held, faster the longer nothing is refused), so a quota
//! nobody published is found, and followed when it changes. Calls are released
//! one turn at a time at that rate, never as a burst.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Growth constant of the cubic curve, per s³, relative to the level that held:
/// twice that level 6.3 s into the probe, 2.5% above it after 1.8 s.
const GROWTH: f64 = 0.004;
/// Right after a 429 without `X-RateLimit-Limit`, the rate starts this far below
/// the estimated quota (it climbs back to it within 2.3 s): the estimate counts
/// answers, and one counted in the wrong second would put the rate above.
const BACKOFF: f64 = 0.95;
/// Turns are spread so that a call up to 25 ms late still fits (as the
/// configured ceiling's turns are): the sustainable rate is `count / 1.025 s`.
const JITTER_ALLOWANCE: f64 = 1.025;
/// How long the rate stays at the level that held before it probes above: the
/// probe costs a 429 or two, so at least this long between probes...
const HOLD: Duration = Duration::from_secs(8);
/// ...and at least this many calls, so that a probe's 429 stays a small share
/// of the calls at low rates too (20 s at 2/s)...
const HOLD_CALLS: f64 = 40.0;
/// ...but never longer than this, so a raised quota is found within 30 s.
const MAX_HOLD: Duration = Duration::from_secs(20);
/// 429s within this long of a decrease belong to it (the calls already sent
/// when it happened): they may refine its estimate upwards, never lower it again.
const EVENT: Duration = Duration::from_secs(1);
/// Below the level that held, a 429 lowers the rate only when at least this
/// share of the last second's answers were 429s: an odd one (a proxy, a
/// vendor's hiccup) is no evidence that the quota fell.
const SUSTAINED_SHARE: f64 = 0.05;
/// Without `X-RateLimit-Limit`, a decrease needs this many 429s within a
/// second (a burst that met the quota, or a rate that keeps meeting it): a
/// lone 429, say the first answer of a worker that just started, counts too
/// few accepted answers to estimate anything from.
const CORROBORATING_429S: usize = 2;
/// Answers are counted over this long (the vendor's 1-s window and a margin).
const WINDOW: Duration = Duration::from_secs(2);
/// The curve grows only while the learned rate is what holds calls back: a
/// worker with less to do than the rate allows learns nothing about the quota.
const SATURATION: Duration = Duration::from_secs(1);
/// While the vendor reports its quota on ordinary answers (`X-RateLimit-Remaining`),
/// the slowdown follows those and nothing is learned from 429s.
const QUOTA_HEADERS_TRUSTED: Duration = Duration::from_secs(10);

/// The rate over time after a decrease: concave up to `peak`, a hold there, then
/// a convex probe above it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Curve {
    /// The level the vendor's answers say holds (calls/s).
    pub(super) peak: f64,
    /// The rate right after the decrease (calls/s).
    pub(super) start: f64,
    /// The hold at `peak` before probing above it.
    pub(super) hold: Duration,
    /// When the decrease happened; moved forward while growth is frozen.
    pub(super) epoch: Instant,
}

impl Curve {
    /// A curve starting now at `start`, holding at `peak`.
    pub(super) fn new(peak: f64, start: f64, now: Instant) -> Self {
        let hold = Duration::from_secs_f64(HOLD_CALLS / peak.max(1e-3)).clamp(HOLD, MAX_HOLD);
        Self {
            peak,
            start: start.min(peak),
            hold,
            epoch: now,
        }
    }

    /// The rate at `now` (calls/s).
    pub(super) fn rate(&self, now: Instant) -> f64 {
        let t = now.saturating_duration_since(self.epoch).as_secs_f64();
        let climb = ((1.0 - self.start / self.peak).max(0.0) / GROWTH).cbrt();
        let c = GROWTH * self.peak;
        if t < climb {
            self.peak + c * (t - climb).powi(3)
        } else if t < climb + self.hold.as_secs_f64() {
            self.peak
        } else {
            self.peak + c * (t - climb - self.hold.as_secs_f64()).powi(3)
        }
    }

    /// Whether the rate at `now` is above the level that held (probing).
    fn probing(&self, now: Instant) -> bool {
        self.rate(now) > self.peak * 1.001
    }
}

/// What a 429 did to the learned rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Learning {
    /// Nothing: an odd 429, a refinement that changed nothing, or a vendor that
    /// publishes its quota.
    Unchanged,
    /// A new curve (a decrease, or its refinement): share it with the fleet.
    Changed(Curve),
}

#[derive(Debug)]
struct State {
    curve: Option<Curve>,
    /// The configured ceiling (calls/s): the learned rate never goes above it.
    ceiling: Option<f64>,
    /// Non-429 answers and 429s of the last `WINDOW`.
    answers: VecDeque<Instant>,
    refusals: VecDeque<Instant>,
    /// 429s before this belong to the last decrease; the rate before it.
    event_until: Option<Instant>,
    rate_before_event: Option<f64>,
    /// Last time the learned rate held a call back.
    saturated_at: Option<Instant>,
    /// Up to when the curve's growth is accounted for.
    accounted_at: Instant,
    quota_headers_at: Option<Instant>,
}

/// One vendor's learned rate and the pacer that releases calls at it.
#[derive(Debug)]
pub(super) struct Learned {
    state: Mutex<State>,
    /// Whether a rate was learned, so an unlearned vendor costs one atomic load.
    pacing: AtomicBool,
    /// When the last paced turn went; held by the call waiting for the next one,
    /// so waiters queue in order and only one sleeps on the clock.
    last_turn: tokio::sync::Mutex<Option<Instant>>,
}

impl Learned {
    /// Nothing learned yet; never above `ceiling` calls/s when one is configured.
    pub(super) fn new(ceiling: Option<f64>) -> Self {
        Self {
            state: Mutex::new(State {
                curve: None,
                ceiling,
                answers: VecDeque::new(),
                refusals: VecDeque::new(),
                event_until: None,
                rate_before_event: None,
                saturated_at: None,
                accounted_at: Instant::now(),
                quota_headers_at: None,
            }),
            pacing: AtomicBool::new(false),
            last_turn: tokio::sync::Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether calls are paced at a learned rate.
    pub(super) fn is_pacing(&self) -> bool {
        self.pacing.load(Ordering::Acquire)
    }

    /// The learned rate now (calls/s), `None` while nothing is learned.
    pub(super) fn rate(&self) -> Option<f64> {
        if !self.is_pacing() {
            return None;
        }
        let now = Instant::now();
        let mut state = self.lock();
        state.account(now);
        state.rate(now)
    }

    /// The time between two turns at the learned rate.
    pub(super) fn interval(&self) -> Option<Duration> {
        self.rate()
            .map(|rate| Duration::from_secs_f64(1.0 / rate.max(1e-3)))
    }

    /// A turn at the learned rate: returns at once while nothing is learned.
    pub(super) async fn wait_turn(&self) {
        if !self.is_pacing() {
            return;
        }
        let mut last = self.last_turn.lock().await;
        while let Some(interval) = self.interval() {
            let now = Instant::now();
            let turn = last.map_or(now, |last| last + interval);
            if turn <= now {
                break;
            }
            self.saturated();
            tokio::time::sleep_until(turn).await;
        }
        *last = Some(Instant::now());
    }

    /// The learned rate held a call back: the curve may grow.
    pub(super) fn saturated(&self) {
        let now = Instant::now();
        let mut state = self.lock();
        state.account(now);
        state.saturated_at = Some(now);
    }

    /// A call was answered (anything but a 429); `quota_headers` when the answer
    /// reported the quota, in which case the slowdown follows the vendor's word.
    pub(super) fn answered(&self, quota_headers: bool) {
        let now = Instant::now();
        let mut state = self.lock();
        if quota_headers {
            state.quota_headers_at = Some(now);
            return;
        }
        if state.publishes_quota(now) {
            return;
        }
        state.answers.push_back(now);
        prune(&mut state.answers, now);
    }

    /// A 429, with the `X-RateLimit-Limit` it carried, if any.
    pub(super) fn throttled(&self, limit: Option<u64>) -> Learning {
        let now = Instant::now();
        let mut state = self.lock();
        let learning = state.throttled(now, limit);
        self.pacing.store(state.curve.is_some(), Ordering::Release);
        learning
    }

    /// Takes a curve another worker of the fleet learned (its epoch already on
    /// this process's clock).
    pub(super) fn adopt(&self, curve: Curve) {
        let now = Instant::now();
        let mut state = self.lock();
        state.account(now);
        let same = state.curve.is_some_and(|ours| {
            (ours.peak - curve.peak).abs() < 1e-3 && (ours.start - curve.start).abs() < 1e-3
        });
        if same {
            // This worker's own curve, read back.
            return;
        }
        let current = state.rate(now);
        state.curve = Some(curve);
        state.event_until = Some(curve.epoch + EVENT);
        state.rate_before_event = current;
        self.pacing.store(true, Ordering::Release);
    }
}

impl State {
    fn publishes_quota(&self, now: Instant) -> bool {
        self.quota_headers_at
            .is_some_and(|at| now.saturating_duration_since(at) < QUOTA_HEADERS_TRUSTED)
    }

    fn rate(&self, now: Instant) -> Option<f64> {
        let rate = self.curve?.rate(now);
        Some(self.ceiling.map_or(rate, |ceiling| rate.min(ceiling)))
    }

    /// Freezes the curve's growth over any time the learned rate held nothing back.
    fn account(&mut self, now: Instant) {
        let idle = self
            .saturated_at
            .is_none_or(|at| now.saturating_duration_since(at) > SATURATION);
        if idle {
            if let Some(curve) = &mut self.curve {
                curve.epoch += now.saturating_duration_since(self.accounted_at);
            }
        }
        self.accounted_at = now;
    }

    fn throttled(&mut self, now: Instant, limit: Option<u64>) -> Learning {
        if self.publishes_quota(now) {
            return Learning::Unchanged;
        }
        self.account(now);
        self.refusals.push_back(now);
        prune(&mut self.refusals, now);
        prune(&mut self.answers, now);
        let current = self.rate(now);
        let Some(estimate) = self.estimate(now, current, limit) else {
            // Nothing was accepted: a storm, not a rate (the pause and the
            // circuit deal with it).
            return Learning::Unchanged;
        };
        let exact = limit.is_some();
        if let (Some(until), Some(curve)) = (self.event_until, self.curve.as_mut()) {
            if now < until {
                // The same decrease: later answers may show the vendor accepted more.
                let peak = estimate.min(self.rate_before_event.unwrap_or(f64::INFINITY));
                if peak <= curve.peak {
                    return Learning::Unchanged;
                }
                let start = if exact { peak } else { peak * BACKOFF };
                *curve = Curve {
                    peak,
                    start: curve.start.max(start).min(peak),
                    ..*curve
                };
                return Learning::Changed(*curve);
            }
        }
        let probing = self.curve.is_some_and(|curve| curve.probing(now));
        let corroborated =
            exact || count_since(&self.refusals, now, Duration::from_secs(1)) >= CORROBORATING_429S;
        if !probing && !corroborated {
            return Learning::Unchanged;
        }
        let peak = match (self.curve, current) {
            (Some(_), Some(current)) if !probing => {
                if self.refused_share(now) < SUSTAINED_SHARE {
                    return Learning::Unchanged;
                }
                // Refused at a level that used to hold: the quota fell.
                if exact {
                    estimate
                } else {
                    estimate.min(current * BACKOFF)
                }
            }
            // Refused while probing above the level that held: that level
            // still holds, unless the 429 says what the limit is.
            (Some(curve), _) if !exact => estimate.max(curve.peak),
            _ => estimate,
        };
        let peak = self.ceiling.map_or(peak, |ceiling| peak.min(ceiling));
        let start = if exact { peak } else { peak * BACKOFF };
        let curve = Curve::new(peak, start, now);
        self.curve = Some(curve);
        self.event_until = Some(now + EVENT);
        self.rate_before_event = current;
        Learning::Changed(curve)
    }

    /// The sustainable rate the vendor's answers show: its `X-RateLimit-Limit`,
    /// or the answers it gave (not 429) in the last second, counted over half a
    /// turn more so the call a second ago is not missed by a hair.
    fn estimate(&self, now: Instant, current: Option<f64>, limit: Option<u64>) -> Option<f64> {
        if let Some(limit) = limit {
            return Some(limit as f64 / JITTER_ALLOWANCE);
        }
        let window = Duration::from_secs(1)
            + current.map_or(Duration::ZERO, |rate| {
                Duration::from_secs_f64(0.5 / rate.max(1e-3)).min(Duration::from_secs(1))
            });
        let accepted = count_since(&self.answers, now, window);
        (accepted > 0).then(|| accepted as f64 / JITTER_ALLOWANCE)
    }

    fn refused_share(&self, now: Instant) -> f64 {
        let second = Duration::from_secs(1);
        let refused = count_since(&self.refusals, now, second) as f64;
        let accepted = count_since(&self.answers, now, second) as f64;
        refused / (refused + accepted).max(1.0)
    }
}

/// Drops what is older than `WINDOW`.
fn prune(times: &mut VecDeque<Instant>, now: Instant) {
    while times
        .front()
        .is_some_and(|at| now.saturating_duration_since(*at) > WINDOW)
    {
        times.pop_front();
    }
}

fn count_since(times: &VecDeque<Instant>, now: Instant, window: Duration) -> usize {
    times
        .iter()
        .rev()
        .take_while(|at| now.saturating_duration_since(**at) <= window)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 0.01 * b.max(1.0)
    }

    /// Answers `n` calls spread over the last second.
    async fn answer_over_a_second(learned: &Learned, n: u32) {
        for _ in 0..n {
            learned.answered(false);
            tokio::time::sleep(Duration::from_millis(1000 / u64::from(n))).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_learned_and_nothing_paced_before_a_429() {
        let learned = Learned::new(None);
        answer_over_a_second(&learned, 50).await;
        assert_eq!(learned.rate(), None);
        let start = Instant::now();
        for _ in 0..100 {
            learned.wait_turn().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_drops_the_rate_to_what_the_vendor_accepted_in_the_last_second() {
        let learned = Learned::new(None);
        answer_over_a_second(&learned, 10).await;
        assert_eq!(learned.throttled(None), Learning::Unchanged, "a lone 429");
        assert!(matches!(learned.throttled(None), Learning::Changed(_)));
        let rate = learned.rate().unwrap();
        assert!(close(rate, 10.0 / 1.025 * BACKOFF), "{rate}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_429s_limit_header_sets_the_rate() {
        let learned = Learned::new(None);
        answer_over_a_second(&learned, 3).await;
        learned.throttled(Some(10));
        assert!(close(learned.rate().unwrap(), 10.0 / 1.025));
    }

    #[tokio::test(start_paused = true)]
    async fn later_429s_of_the_same_burst_refine_the_estimate_upwards_only() {
        let learned = Learned::new(None);
        // A burst: the first 429s come back before most accepted answers.
        learned.answered(false);
        learned.throttled(None);
        learned.throttled(None);
        let first = learned.rate().unwrap();
        for _ in 0..9 {
            learned.answered(false);
        }
        learned.throttled(None);
        let refined = learned.rate().unwrap();
        assert!(refined > first * 5.0, "{first} then {refined}");
        learned.throttled(None);
        assert!(learned.rate().unwrap() >= refined);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_429_of_a_worker_that_just_started_teaches_nothing() {
        let learned = Learned::new(None);
        learned.answered(false);
        assert_eq!(learned.throttled(None), Learning::Unchanged);
        assert_eq!(learned.rate(), None, "not paced at 1/s for one odd 429");
    }

    #[test]
    fn the_curve_climbs_to_the_peak_holds_then_probes_above() {
        let now = Instant::now();
        let curve = Curve::new(10.0, 9.5, now);
        let at = |s: f64| curve.rate(now + Duration::from_secs_f64(s));
        assert!(close(at(0.0), 9.5));
        let climb = (0.05 / GROWTH).cbrt();
        assert!(close(at(climb), 10.0));
        assert!(close(at(climb + 7.9), 10.0), "holds for 8 s");
        assert!(at(climb + 8.0 + 2.0) > 10.2);
        // A quota twice as high is reached within 30 s of the decrease.
        assert!(at(30.0) > 20.0, "{}", at(30.0));
        // Low rates hold longer, so that the probe's 429 is a small share.
        assert_eq!(Curve::new(2.0, 2.0, now).hold, Duration::from_secs(20));
    }

    #[tokio::test(start_paused = true)]
    async fn an_odd_429_at_a_level_that_holds_changes_nothing() {
        let learned = Learned::new(None);
        answer_over_a_second(&learned, 20).await;
        learned.throttled(None);
        learned.throttled(None);
        learned.saturated();
        tokio::time::sleep(Duration::from_secs(4)).await;
        let before = learned.rate().unwrap();
        answer_over_a_second(&learned, 20).await;
        assert_eq!(learned.throttled(None), Learning::Unchanged);
        assert!(learned.rate().unwrap() >= before);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_refused_keeps_the_level_that_held() {
        let learned = Learned::new(None);
        answer_over_a_second(&learned, 10).await;
        learned.throttled(None);
        learned.throttled(None);
        let peak = 10.0 / 1.025;
        // Keep the limiter busy while the curve climbs, holds and probes.
        for _ in 0..14 {
            learned.saturated();
            answer_over_a_second(&learned, 10).await;
        }
        assert!(learned.rate().unwrap() > peak * 1.01, "probing above");
        learned.throttled(None);
        assert!(close(learned.rate().unwrap(), peak * BACKOFF));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_limiter_does_not_grow_its_rate() {
        let learned = Learned::new(None);
        learned.answered(false);
        learned.throttled(Some(10));
        let learned_rate = learned.rate().unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(close(learned.rate().unwrap(), learned_rate));
    }

    #[tokio::test(start_paused = true)]
    async fn the_configured_ceiling_bounds_the_learned_rate() {
        let learned = Learned::new(Some(5.0));
        learned.answered(false);
        learned.throttled(Some(10));
        assert!(close(learned.rate().unwrap(), 5.0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_vendor_that_publishes_its_quota_is_followed_not_learned() {
        let learned = Learned::new(None);
        learned.answered(true);
        assert_eq!(learned.throttled(Some(10)), Learning::Unchanged);
        assert_eq!(learned.rate(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn turns_are_released_one_at_a_time_at_the_learned_rate() {
        let learned = std::sync::Arc::new(Learned::new(None));
        learned.answered(false);
        learned.throttled(Some(10));
        let start = Instant::now();
        let waiters: Vec<_> = (0..5)
            .map(|_| {
                let learned = learned.clone();
                tokio::spawn(async move {
                    learned.wait_turn().await;
                    start.elapsed()
                })
            })
            .collect();
        let mut times = Vec::new();
        for waiter in waiters {
            times.push(waiter.await.unwrap().as_millis());
        }
        times.sort_unstable();
        assert_eq!(times[0], 0, "the first goes at once");
        // 1 / (10 / 1.025) s apart (tokio's timer rounds up to the millisecond).
        for pair in times.windows(2) {
            assert!((102..=104).contains(&(pair[1] - pair[0])), "{times:?}");
        }
    }
}
