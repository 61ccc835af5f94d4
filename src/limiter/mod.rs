//! Per-vendor rate ceiling, 429 pause and quota slowdown, shared by every job of
//! the process or, with `RATE_LIMIT_SCOPE=fleet`, by every worker through Redis.
//!
//! Every attempt, retries included, takes a turn here before it is sent, so that
//! retries cannot escape the ceiling. A 429's reset pauses the whole vendor rather
//! than letting each job discover the throttle on its own, and a quota running
//! low (`X-RateLimit-Remaining`) spaces calls out before the vendor says no. A
//! vendor that publishes nothing but its 429s gets a rate learned from them
//! (`learned.rs`), and calls are released at it one turn at a time.

use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::futures::Notified;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::{RateLimit, RateLimitScope, Settings};
use crate::job::VendorKind;
use crate::vendor::{QuotaHint, ThrottleHint};

mod fleet;
mod learned;
mod local;
mod probe;
mod slowdown;

use fleet::FleetLimiter;
use learned::Learning;
use local::LocalLimiter;
use probe::ProbeGate;
use slowdown::Reaction;

/// A pause at least this long lets the jobs waiting for it give up their
/// concurrency slots (see [`VendorLimiter::long_pause_until`]).
pub const LONG_PAUSE: Duration = Duration::from_secs(1);

/// Calls assumed to be under way at once when the caller does not say
/// (`WORKER_CONCURRENCY`'s default).
const DEFAULT_IN_FLIGHT: u64 = 16;

/// How much later than its turn a call may reach the vendor without breaking
/// the ceiling there: turns are spaced `(period + this) / count` apart, so a call
/// delayed by up to this much (scheduling, network) still leaves every window
/// of `period` with at most `count` calls. It costs 2.5% of a per-second
/// ceiling; 10 ms proved too little when a new pooled connection delays a call.
const JITTER_ALLOWANCE: Duration = Duration::from_millis(25);

/// Why the limiters could not be built.
#[derive(Debug, thiserror::Error)]
pub enum LimiterError {
    /// A fleet-wide ceiling needs somewhere all workers can see.
    #[error(
        "RATE_LIMIT_SCOPE=fleet shares the rate limits through Redis, but LEDGER_URL is not a redis:// URL; \
         set LEDGER_URL=redis://host:port/db (the fleet's shared ledger) or RATE_LIMIT_SCOPE=process"
    )]
    FleetNeedsRedis,
}

/// The limiter of one vendor.
#[derive(Debug)]
pub struct VendorLimiter {
    local: LocalLimiter,
    /// Set in the fleet scope: turns come from Redis, `local` is the fallback.
    fleet: Option<FleetLimiter>,
    /// After a 429 pause, lets one call go before the rest.
    gate: ProbeGate,
    /// Wakes calls waiting for a turn when a pause begins, so their jobs can
    /// wait it out without a concurrency slot.
    pause_began: Notify,
}

impl VendorLimiter {
    /// A process-scope limiter for `rate`, or only the pause and slowdown when `None`.
    pub fn new(rate: Option<RateLimit>) -> Self {
        Self {
            local: LocalLimiter::new(rate.map(interval), DEFAULT_IN_FLIGHT),
            fleet: None,
            gate: ProbeGate::armed(),
            pause_began: Notify::new(),
        }
    }

    /// Waits until a call may be sent; returns how long it waited.
    pub async fn acquire(&self) -> Duration {
        let started = Instant::now();
        loop {
            match &self.fleet {
                Some(fleet) => fleet.acquire(&self.local).await,
                None => {
                    if self.local.acquire().await {
                        // A new quota window: learn its size from one call first.
                        self.gate.arm();
                    }
                }
            }
            // A call held behind the post-429 probe takes a fresh turn, paced by
            // the quota the probe's answer reported.
            if !self.gate.pass().await {
                break;
            }
        }
        started.elapsed()
    }

    /// Whether a call would go out at once: no ceiling, pause, spacing or probe
    /// holds it (the pipeline then stores its claim and in-flight marker in one
    /// ledger write, since nothing can delay the call between the two).
    pub fn is_open(&self) -> bool {
        self.fleet.is_none() && self.local.is_open() && !self.gate.is_armed()
    }

    /// Resolves when a long pause begins (from when the future is first
    /// polled or enabled).
    pub fn pause_begins(&self) -> Notified<'_> {
        self.pause_began.notified()
    }

    /// When a 429's pause of this process's calls ends, while one holds them
    /// for at least [`LONG_PAUSE`] more. A job waiting it out needs no
    /// concurrency slot meanwhile; shorter pauses (a learned rate's turn, a
    /// reset due in milliseconds) are waited out in place.
    pub fn long_pause_until(&self) -> Option<Instant> {
        self.local
            .pause_deadline()
            .filter(|until| until.saturating_duration_since(Instant::now()) >= LONG_PAUSE)
    }

    /// A call came back (any answer but a 429): its quota headers, if any, pace
    /// the next calls, and calls held behind a post-429 probe may go.
    pub fn call_answered(&self, quota: Option<QuotaHint>) {
        self.local.learned.answered(quota.is_some());
        if let Some(quota) = quota {
            self.observe(quota);
        }
        self.gate.answered();
    }

    /// Takes note of the quota the vendor reported, to slow down before it says no.
    pub fn observe(&self, quota: QuotaHint) {
        match self.local.slowdown.observe(quota) {
            Reaction::Carry => {}
            Reaction::Space { interval, for_ } => {
                if let Some(fleet) = &self.fleet {
                    fleet.share_spacing(interval, for_);
                }
            }
            Reaction::Pause(duration) => self.pause_for(duration),
        }
    }

    /// A call was refused with a 429: the learned rate takes note, and every
    /// call waits out the vendor's reset, when it gave one, and then one goes
    /// first. Called as the 429 arrives, since calls waiting behind the refused
    /// one are held until it is.
    ///
    /// A `Retry-After` in whole seconds is an upper bound rounded up (a vendor
    /// with a sliding 1-s window frees a slot long before): once calls are paced
    /// at a learned rate, holding them all for it would cost a second of calls
    /// per 429, so they are held one turn of the (now lower) rate instead. The
    /// refused call itself still waits out the whole `Retry-After` (`retry.rs`).
    pub fn call_throttled(&self, hint: ThrottleHint) {
        let was_pacing = self.local.learned.is_pacing();
        if let Learning::Changed(curve) = self.local.learned.throttled(hint.limit) {
            if let Some(fleet) = &self.fleet {
                fleet.share_learned(curve);
            }
        }
        let wait = match hint.retry_after {
            Some(wait) if hint.whole_seconds && was_pacing => Some(
                self.local
                    .learned
                    .interval()
                    .map_or(wait, |turn| turn.min(wait)),
            ),
            other => other,
        };
        if let Some(wait) = wait {
            self.pause_for(wait);
        }
    }

    /// The rate learned from the vendor's 429s (calls/s), `None` while nothing is.
    pub fn learned_rate(&self) -> Option<f64> {
        self.local.learned.rate()
    }

    /// Holds every call to the vendor for `duration` (a 429's reset), fleet-wide
    /// in the fleet scope.
    pub fn pause_for(&self, duration: Duration) {
        self.local.pause_for(duration);
        if duration >= LONG_PAUSE {
            self.pause_began.notify_waiters();
        }
        self.gate.rearm();
        if let Some(fleet) = &self.fleet {
            fleet.share_pause(duration);
        }
    }
}

/// Time between two turns under `rate`, with no burst: calls are spread evenly
/// so no window of `rate.per` can hold more than `rate.count` of them.
fn interval(rate: RateLimit) -> Duration {
    ((rate.per + JITTER_ALLOWANCE) / rate.count.get()).max(Duration::from_nanos(1))
}

/// The limiters of both vendors.
#[derive(Debug)]
pub struct Limiters {
    mimecast: VendorLimiter,
    pncp: VendorLimiter,
}

impl Limiters {
    /// The limiters `settings` ask for. In the fleet scope they share their
    /// state through `redis` (the Redis ledger's connection), which must be there.
    pub fn from_settings(
        settings: &Settings,
        redis: Option<ConnectionManager>,
    ) -> Result<Self, LimiterError> {
        let in_flight = u64::try_from(settings.broker.concurrency.get()).unwrap_or(u64::MAX);
        let mimecast = settings.mimecast.as_ref();
        let pncp = settings.pncp.as_ref();
        let vendors = [
            (
                VendorKind::Mimecast,
                mimecast.and_then(|m| m.rate_limit),
                mimecast.map(|m| endpoint(&m.base_url)),
            ),
            (
                VendorKind::Pncp,
                pncp.and_then(|p| p.rate_limit),
                pncp.map(|p| endpoint(&p.base_url)),
            ),
        ];
        let redis = match settings.rate_limit_scope {
            RateLimitScope::Process => None,
            RateLimitScope::Fleet => Some(redis.ok_or(LimiterError::FleetNeedsRedis)?),
        };
        let [mimecast, pncp] = vendors.map(|(vendor, rate, endpoint)| {
            let interval = rate.map(interval);
            VendorLimiter {
                local: LocalLimiter::new(interval, in_flight),
                fleet: redis.clone().map(|connection| {
                    let endpoint = endpoint.unwrap_or_else(|| "unconfigured".to_owned());
                    FleetLimiter::new(vendor, &endpoint, interval, connection)
                }),
                gate: ProbeGate::armed(),
                pause_began: Notify::new(),
            }
        });
        Ok(Self { mimecast, pncp })
    }

    /// The limiter of one vendor.
    pub fn get(&self, vendor: VendorKind) -> &VendorLimiter {
        match vendor {
            VendorKind::Mimecast => &self.mimecast,
            VendorKind::Pncp => &self.pncp,
        }
    }
}

/// `host:port` of a vendor's API: the quota is the API user's at that endpoint,
/// so it names the fleet's shared state (and keeps two endpoints apart).
fn endpoint(url: &url::Url) -> String {
    format!(
        "{}:{}",
        url.host_str().unwrap_or("-"),
        url.port_or_known_default().unwrap_or(0)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_every_call_until_it_ends() {
        let limiter = VendorLimiter::new(None);
        limiter.pause_for(Duration::from_secs(2));
        let waited = limiter.acquire().await;
        assert!(waited >= Duration::from_secs(2), "{waited:?}");
        // The call after a 429 pause goes alone; once it is answered, the rest go.
        limiter.call_answered(None);
        assert!(limiter.acquire().await < Duration::from_millis(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_for_the_first_call_holds_the_rest_past_the_pause_then_sends_one_probe() {
        let limiter = std::sync::Arc::new(VendorLimiter::new(None));
        // A starting worker: the first call goes alone.
        limiter.acquire().await;
        let started = Instant::now();
        let waiting: Vec<_> = (0..3)
            .map(|_| {
                let limiter = limiter.clone();
                tokio::spawn(async move { limiter.acquire().await })
            })
            .collect();
        tokio::task::yield_now().await;
        // The vendor answers it 429 with a reset longer than the probe timeout.
        limiter.pause_for(Duration::from_secs(5));
        tokio::time::sleep(Duration::from_secs(6)).await;
        let gone = waiting.iter().filter(|task| task.is_finished()).count();
        assert_eq!(
            gone, 1,
            "after the pause one call goes first, not all of them"
        );
        limiter.call_answered(None);
        for task in waiting {
            task.await.unwrap();
        }
        assert!(started.elapsed() >= Duration::from_secs(5));
    }

    #[test]
    fn turns_are_spread_evenly_with_room_for_jitter() {
        let rate = |text| interval(RateLimit::parse(text).unwrap());
        assert_eq!(rate("20/s"), Duration::from_micros(51_250));
        assert_eq!(rate("1000/s"), Duration::from_micros(1025));
        assert!(rate("60/min") > Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_quota_pauses_the_vendor_until_reset() {
        let limiter = VendorLimiter::new(None);
        limiter.observe(QuotaHint {
            remaining: 0,
            reset: Duration::from_millis(700),
        });
        assert_eq!(limiter.acquire().await, Duration::from_millis(700));
    }

    #[tokio::test(start_paused = true)]
    async fn a_low_quota_slows_the_ceiling_down() {
        let limiter = VendorLimiter::new(RateLimit::parse("100/s"));
        limiter.call_answered(Some(QuotaHint {
            remaining: 3,
            reset: Duration::from_millis(900),
        }));
        let start = Instant::now();
        for _ in 0..3 {
            limiter.acquire().await;
        }
        // Three calls over the 900 ms left, not three at 10 ms apart.
        assert_eq!(start.elapsed(), Duration::from_millis(600));
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_429_without_quota_headers_waiting_calls_go_paced_not_as_a_burst() {
        let limiter = std::sync::Arc::new(VendorLimiter::new(None));
        limiter.acquire().await;
        for _ in 0..10 {
            limiter.call_answered(None);
        }
        // Retry-After-only 429s: pause a whole second, then the learned pace.
        for _ in 0..2 {
            limiter.call_throttled(ThrottleHint {
                retry_after: Some(Duration::from_secs(1)),
                whole_seconds: true,
                limit: None,
            });
        }
        let rate = limiter.learned_rate().expect("a rate is learned");
        assert!(rate > 8.0 && rate < 10.0, "{rate}");
        let started = Instant::now();
        let waiting: Vec<_> = (0..6)
            .map(|_| {
                let limiter = limiter.clone();
                tokio::spawn(async move {
                    limiter.acquire().await;
                    limiter.call_answered(None);
                    started.elapsed()
                })
            })
            .collect();
        let mut times = Vec::new();
        for task in waiting {
            times.push(task.await.unwrap());
        }
        times.sort();
        assert!(
            times[0] >= Duration::from_secs(1),
            "the pause holds: {times:?}"
        );
        for pair in times.windows(2) {
            assert!(
                pair[1] - pair[0] >= Duration::from_millis(100),
                "one turn at a time: {times:?}"
            );
        }
        // Once learned, a rounded Retry-After holds calls for a turn, not a second.
        limiter.call_throttled(ThrottleHint {
            retry_after: Some(Duration::from_secs(1)),
            whole_seconds: true,
            limit: None,
        });
        let again = Instant::now();
        limiter.acquire().await;
        assert!(
            again.elapsed() < Duration::from_millis(500),
            "{:?}",
            again.elapsed()
        );
    }

    #[test]
    fn the_fleet_scope_without_redis_names_both_settings() {
        let message = LimiterError::FleetNeedsRedis.to_string();
        assert!(message.contains("RATE_LIMIT_SCOPE") && message.contains("LEDGER_URL"));
    }
}
