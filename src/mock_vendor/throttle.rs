//! Fixed-window request counting behind the `X-RateLimit-*` headers and the mock's own 429s.

/// The `X-RateLimit-Limit` reported when no throttle is set (never enforced):
/// high enough that a client pacing itself on the quota headers never slows
/// down against an unthrottled mock.
const DEFAULT_RATE_LIMIT: u32 = 1_000_000;
const WINDOW_MS: u64 = 1000;

/// What the `X-RateLimit-*` headers report.
#[derive(Clone, Copy, Debug)]
pub(super) struct RateInfo {
    pub(super) limit: u32,
    pub(super) remaining: u32,
    pub(super) reset_ms: u64,
}

/// A fixed-window request counter: at most `per_second` accepted requests per
/// 1-second window, windows counted from the moment the throttle was set.
#[derive(Debug, Default)]
pub(super) struct Throttle {
    per_second: Option<u32>,
    origin_ms: u64,
    window: u64,
    used: u32,
}

impl Throttle {
    /// Sets or lifts the cap and starts a fresh window now.
    pub(super) fn set(&mut self, per_second: Option<u32>, now_ms: u64) {
        *self = Self {
            per_second,
            origin_ms: now_ms,
            window: 0,
            used: 0,
        };
    }

    /// The current quota without taking from it.
    pub(super) fn peek(&mut self, now_ms: u64) -> RateInfo {
        let reset_ms = self.roll(now_ms);
        let limit = self.limit();
        RateInfo {
            limit,
            remaining: limit.saturating_sub(self.used),
            reset_ms,
        }
    }

    /// Takes one request from the quota; `Err` (remaining 0) when the cap is reached.
    pub(super) fn take(&mut self, now_ms: u64) -> Result<RateInfo, RateInfo> {
        let reset_ms = self.roll(now_ms);
        let limit = self.limit();
        if self.per_second.is_some_and(|cap| self.used >= cap) {
            return Err(RateInfo {
                limit,
                remaining: 0,
                reset_ms,
            });
        }
        self.used = self.used.saturating_add(1);
        Ok(RateInfo {
            limit,
            remaining: limit.saturating_sub(self.used),
            reset_ms,
        })
    }

    fn limit(&self) -> u32 {
        self.per_second.unwrap_or(DEFAULT_RATE_LIMIT)
    }

    /// Moves to the window containing `now_ms`; returns milliseconds until it ends.
    fn roll(&mut self, now_ms: u64) -> u64 {
        let since = now_ms.saturating_sub(self.origin_ms);
        let window = since / WINDOW_MS;
        if window != self.window {
            self.window = window;
            self.used = 0;
        }
        (window + 1) * WINDOW_MS - since
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_refuses_beyond_the_cap_and_refills_in_the_next_window() {
        let mut throttle = Throttle::default();
        throttle.set(Some(2), 10_000);
        assert_eq!(throttle.take(10_000).map(|r| r.remaining).ok(), Some(1));
        assert_eq!(throttle.take(10_100).map(|r| r.remaining).ok(), Some(0));
        let refused = throttle.take(10_400).err().map(|r| r.reset_ms);
        assert_eq!(refused, Some(600));
        assert!(throttle.take(11_000).is_ok());
    }

    #[test]
    fn unthrottled_vendor_reports_the_default_limit_and_never_refuses() {
        let mut throttle = Throttle::default();
        for _ in 0..2 * DEFAULT_RATE_LIMIT {
            assert!(throttle.take(5).is_ok());
        }
        let info = throttle.peek(5);
        assert_eq!((info.limit, info.remaining), (DEFAULT_RATE_LIMIT, 0));
    }
}
