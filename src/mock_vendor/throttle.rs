//! Request counting behind the `X-RateLimit-*` headers and the mock's own 429s:
//! fixed 1-s windows that report the quota on every answer (the default), or a
//! sliding 1-s window that says nothing until it refuses (see [`ThrottleMode`]).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// The `X-RateLimit-Limit` reported when no throttle is set (never enforced):
/// high enough that a client pacing itself on the quota headers never slows
/// down against an unthrottled mock.
const DEFAULT_RATE_LIMIT: u32 = 1_000_000;
const WINDOW_MS: u64 = 1000;

/// How the throttle counts and what its answers tell the client: a real vendor
/// need not publish its quota, so the mock can play one that only says no.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThrottleMode {
    /// Fixed 1-s windows; every Mimecast answer carries `X-RateLimit-Limit`,
    /// `-Remaining` and `-Reset` (ms until the window ends).
    #[default]
    Headers,
    /// A sliding 1-s window; a 200 carries no quota header, a Mimecast 429
    /// carries `X-RateLimit-Limit` and `X-RateLimit-Reset` (ms until a slot frees).
    QuotaOn429,
    /// A sliding 1-s window; a 429 carries only `Retry-After` in whole seconds
    /// (rounded up), on both vendors, and a 200 nothing.
    RetryAfterOnly,
}

impl ThrottleMode {
    fn sliding(self) -> bool {
        self != Self::Headers
    }
}

/// What the `X-RateLimit-*` headers report, and which of them the mode sends.
#[derive(Clone, Copy, Debug)]
pub(super) struct RateInfo {
    pub(super) limit: u32,
    pub(super) remaining: u32,
    pub(super) reset_ms: u64,
    pub(super) mode: ThrottleMode,
}

/// A request counter: at most `per_second` accepted requests per 1-second
/// window, fixed windows counted from the moment the throttle was set, or a
/// window sliding over the last second of accepted requests.
#[derive(Debug, Default)]
pub(super) struct Throttle {
    per_second: Option<u32>,
    mode: ThrottleMode,
    origin_ms: u64,
    window: u64,
    used: u32,
    /// Sliding modes: arrival times (ms) of the requests accepted in the last second.
    accepted: VecDeque<u64>,
}

impl Throttle {
    /// Sets or lifts the cap, keeping the mode. Fixed windows start afresh now;
    /// a sliding window keeps the last second's requests, as a vendor whose
    /// quota changes would.
    pub(super) fn set(&mut self, per_second: Option<u32>, now_ms: u64) {
        let accepted = std::mem::take(&mut self.accepted);
        *self = Self {
            per_second,
            mode: self.mode,
            origin_ms: now_ms,
            window: 0,
            used: 0,
            accepted: if self.mode.sliding() {
                accepted
            } else {
                VecDeque::new()
            },
        };
    }

    /// Changes how requests are counted and reported, keeping the cap.
    pub(super) fn set_mode(&mut self, mode: ThrottleMode, now_ms: u64) {
        self.mode = mode;
        self.set(self.per_second, now_ms);
    }

    /// The current quota without taking from it.
    pub(super) fn peek(&mut self, now_ms: u64) -> RateInfo {
        let reset_ms = self.roll(now_ms);
        let limit = self.limit();
        RateInfo {
            limit,
            remaining: limit.saturating_sub(self.used()),
            reset_ms,
            mode: self.mode,
        }
    }

    /// Takes one request from the quota; `Err` (remaining 0) when the cap is reached.
    pub(super) fn take(&mut self, now_ms: u64) -> Result<RateInfo, RateInfo> {
        let reset_ms = self.roll(now_ms);
        let limit = self.limit();
        if self.per_second.is_some_and(|cap| self.used() >= cap) {
            return Err(RateInfo {
                limit,
                remaining: 0,
                reset_ms,
                mode: self.mode,
            });
        }
        if self.mode.sliding() {
            if self.per_second.is_some() {
                self.accepted.push_back(now_ms);
            }
        } else {
            self.used = self.used.saturating_add(1);
        }
        Ok(RateInfo {
            limit,
            remaining: limit.saturating_sub(self.used()),
            reset_ms,
            mode: self.mode,
        })
    }

    fn limit(&self) -> u32 {
        self.per_second.unwrap_or(DEFAULT_RATE_LIMIT)
    }

    fn used(&self) -> u32 {
        if self.mode.sliding() {
            u32::try_from(self.accepted.len()).unwrap_or(u32::MAX)
        } else {
            self.used
        }
    }

    /// Moves to the window containing `now_ms`; returns milliseconds until it
    /// ends (sliding: until the oldest request leaves it and a slot frees).
    fn roll(&mut self, now_ms: u64) -> u64 {
        if self.mode.sliding() {
            while self
                .accepted
                .front()
                .is_some_and(|at| at + WINDOW_MS <= now_ms)
            {
                self.accepted.pop_front();
            }
            return self.accepted.front().map_or(WINDOW_MS, |at| {
                (at + WINDOW_MS).saturating_sub(now_ms).max(1)
            });
        }
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

    #[test]
    fn a_sliding_window_frees_a_slot_a_second_after_each_accepted_request() {
        let mut throttle = Throttle::default();
        throttle.set_mode(ThrottleMode::QuotaOn429, 0);
        throttle.set(Some(2), 0);
        assert!(throttle.take(900).is_ok());
        assert!(throttle.take(1500).is_ok());
        // A fixed window would have started afresh at 1000; this one still holds 900.
        assert_eq!(throttle.take(1800).err().map(|r| r.reset_ms), Some(100));
        assert!(throttle.take(1900).is_ok(), "900 left the window");
        assert!(throttle.take(2400).is_err());
        assert!(throttle.take(2500).is_ok());
    }

    #[test]
    fn raising_a_sliding_cap_keeps_the_last_second() {
        let mut throttle = Throttle::default();
        throttle.set_mode(ThrottleMode::RetryAfterOnly, 0);
        throttle.set(Some(1), 0);
        assert!(throttle.take(100).is_ok());
        throttle.set(Some(2), 200);
        assert!(throttle.take(300).is_ok());
        assert!(throttle.take(400).is_err(), "100 and 300 fill the new cap");
        assert_eq!(throttle.peek(400).mode, ThrottleMode::RetryAfterOnly);
    }
}
