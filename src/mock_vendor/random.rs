//! Faults drawn at random for a share of requests, so a soak meets every way a vendor misbehaves without scripting each one.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::model::Fault;

/// Statuses a drawn `Status` fault answers: the 5xx a vendor's proxies produce.
const SERVER_ERRORS: [u16; 4] = [500, 502, 503, 504];

/// The random fault mode: each request that passes the vendor's checks and finds no
/// queued fault gets, with probability `rate`, one fault drawn evenly from seven
/// kinds: a 5xx, a 429, a drop before applying, a slow call of `delay_ms`, a
/// retryable item failure, a 5xx after applying, and a drop after applying.
/// Queued faults ([`super::MockVendor::push_fault`]) still come first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandomFaults {
    /// Share of requests that get a fault, from 0 (none) to 1 (every one).
    pub rate: f64,
    /// Seeds the draws, so a run's sequence of faults can be repeated; which request
    /// meets which fault still depends on the order requests arrive in.
    #[serde(default)]
    pub seed: u64,
    /// How long a drawn `Delay` waits before answering, in milliseconds: set it past
    /// the worker's `VENDOR_TIMEOUT` to provoke timeouts.
    #[serde(default = "default_delay_ms")]
    pub delay_ms: u64,
    /// The `X-RateLimit-Reset` (Mimecast) or `Retry-After` (PNCP, rounded up to
    /// seconds) of a drawn 429, in milliseconds.
    #[serde(default = "default_reset_ms")]
    pub reset_ms: u64,
}

/// Past the worker's default `VENDOR_TIMEOUT` of 30 s.
fn default_delay_ms() -> u64 {
    35_000
}

/// Short, so that a drawn 429 pauses a worker only briefly.
fn default_reset_ms() -> u64 {
    50
}

impl RandomFaults {
    /// `rate` of the requests faulted, with the default delay and reset.
    pub fn new(rate: f64, seed: u64) -> Self {
        Self {
            rate,
            seed,
            delay_ms: default_delay_ms(),
            reset_ms: default_reset_ms(),
        }
    }

    /// Refuses a rate the mock could not honour, with the reason.
    pub fn check(&self) -> Result<(), String> {
        if (0.0..=1.0).contains(&self.rate) {
            Ok(())
        } else {
            Err(format!(
                "rate {} is not between 0 and 1 (e.g. 0.05 for 5%)",
                self.rate
            ))
        }
    }
}

/// The mode in force and the generator its draws come from.
#[derive(Debug)]
pub(super) struct RandomDraw {
    faults: RandomFaults,
    rng: StdRng,
}

impl RandomDraw {
    pub(super) fn new(faults: RandomFaults) -> Self {
        let rng = StdRng::seed_from_u64(faults.seed);
        Self { faults, rng }
    }

    /// The fault for the next request, if it draws one.
    pub(super) fn next(&mut self) -> Option<Fault> {
        if !self.rng.random_bool(self.faults.rate.clamp(0.0, 1.0)) {
            return None;
        }
        let server_error = SERVER_ERRORS[self.rng.random_range(0..SERVER_ERRORS.len())];
        Some(match self.rng.random_range(0..7) {
            0 => Fault::Status {
                status: server_error,
            },
            1 => Fault::RateLimited {
                reset_ms: self.faults.reset_ms,
            },
            2 => Fault::Drop,
            3 => Fault::Delay {
                ms: self.faults.delay_ms,
            },
            4 => Fault::RetryableFail,
            5 => Fault::FailAfterApply {
                status: server_error,
            },
            _ => Fault::DropAfterApply,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn kinds_of(draw: &mut RandomDraw, n: usize) -> BTreeMap<&'static str, usize> {
        let mut kinds = BTreeMap::new();
        for _ in 0..n {
            let kind = draw.next().map_or("none", |fault| fault.kind());
            *kinds.entry(kind).or_default() += 1;
        }
        kinds
    }

    #[test]
    fn a_five_percent_rate_faults_about_one_request_in_twenty_with_every_kind() {
        let mut draw = RandomDraw::new(RandomFaults::new(0.05, 7));
        let kinds = kinds_of(&mut draw, 100_000);
        let faulted = 100_000 - kinds["none"];
        assert!((4_000..6_000).contains(&faulted), "{kinds:?}");
        for kind in [
            "status",
            "rate_limited",
            "drop",
            "delay",
            "retryable_fail",
            "fail_after_apply",
            "drop_after_apply",
        ] {
            assert!(kinds.get(kind).copied().unwrap_or(0) > 400, "{kinds:?}");
        }
    }

    #[test]
    fn the_same_seed_draws_the_same_faults_and_rate_zero_draws_none() {
        let mut first = RandomDraw::new(RandomFaults::new(0.3, 42));
        let mut second = RandomDraw::new(RandomFaults::new(0.3, 42));
        let a: Vec<_> = (0..1_000).map(|_| first.next()).collect();
        let b: Vec<_> = (0..1_000).map(|_| second.next()).collect();
        assert_eq!(a, b);
        let mut off = RandomDraw::new(RandomFaults::new(0.0, 42));
        assert!((0..1_000).all(|_| off.next().is_none()));
    }

    #[test]
    fn a_drawn_delay_and_429_use_the_configured_durations() {
        let faults = RandomFaults {
            delay_ms: 3_000,
            reset_ms: 20,
            ..RandomFaults::new(1.0, 1)
        };
        let mut draw = RandomDraw::new(faults);
        let drawn: Vec<Fault> = (0..200).filter_map(|_| draw.next()).collect();
        assert_eq!(drawn.len(), 200, "rate 1 faults every request");
        assert!(drawn.contains(&Fault::Delay { ms: 3_000 }));
        assert!(drawn.contains(&Fault::RateLimited { reset_ms: 20 }));
    }

    #[test]
    fn a_rate_outside_zero_to_one_is_refused() {
        assert!(RandomFaults::new(1.5, 0).check().is_err());
        assert!(RandomFaults::new(-0.1, 0).check().is_err());
        assert!(RandomFaults::new(f64::NAN, 0).check().is_err());
        assert!(RandomFaults::new(0.05, 0).check().is_ok());
    }
}
