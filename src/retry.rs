//! One classification of vendor errors into retry, permanent, unknown outcome or
//! vendor-wide, and the backoff schedule between attempts.
//!
//! Nothing else in the crate decides whether a failure is worth another attempt.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use rand::Rng;

use crate::config::RetrySettings;
use crate::job::ItemError;
use crate::vendor::VendorError;

/// What to do after a call failed as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The call was not executed: resend, not before the given wait if any.
    Retry {
        /// The vendor's own wait (429 reset), if it gave one.
        not_before: Option<Duration>,
    },
    /// The call may have been executed: resend only what is safe to apply twice.
    OutcomeUnknown,
    /// Resending cannot help; the items fail with this error.
    Permanent(ItemError),
    /// The credentials or the vendor itself are at fault, not the job: hold the job.
    VendorWide,
}

/// Maps every way a call can fail to what the pipeline does next.
pub fn classify(error: &VendorError) -> Decision {
    match error {
        VendorError::Unreachable(_) => Decision::Retry { not_before: None },
        // Only PNCP answers with tasks, and Modify Account is idempotent.
        VendorError::TaskStillOpen { .. } => Decision::Retry { not_before: None },
        VendorError::Throttled { retry_after, .. } => Decision::Retry {
            not_before: *retry_after,
        },
        VendorError::Interrupted(_) | VendorError::Timeout | VendorError::BadResponse { .. } => {
            Decision::OutcomeUnknown
        }
        VendorError::Credentials { .. } => Decision::VendorWide,
        // 408: the server gave up reading the request, so it did not act on it.
        VendorError::Http { status: 408, .. } => Decision::Retry { not_before: None },
        VendorError::Http { status, .. } if *status >= 500 => Decision::OutcomeUnknown,
        VendorError::Http { code, message, .. } => {
            Decision::Permanent(ItemError::permanent(code.clone(), message.clone()))
        }
    }
}

/// Exponential backoff with full jitter between the configured bounds.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    settings: RetrySettings,
}

impl Backoff {
    /// A schedule for the given bounds.
    pub fn new(settings: RetrySettings) -> Self {
        Self { settings }
    }

    /// Attempts allowed per item, the first included.
    pub fn max_attempts(&self) -> u32 {
        self.settings.max_attempts.get()
    }

    /// The exponential ceiling for the wait after `attempt` (1-based), capped at the maximum.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        ExponentialBuilder::default()
            .with_min_delay(self.settings.initial_delay)
            .with_max_delay(self.settings.max_delay)
            .with_factor(2.0)
            .without_max_times()
            .build()
            .nth(attempt.saturating_sub(1) as usize)
            .unwrap_or(self.settings.max_delay)
    }

    /// The wait after `attempt`: uniformly drawn between the initial delay and the
    /// ceiling ("full jitter"), so that many jobs failing together do not retry together.
    pub fn delay(&self, attempt: u32) -> Duration {
        let floor = self.settings.initial_delay;
        let ceiling = self.ceiling(attempt).max(floor);
        if ceiling == floor {
            return floor;
        }
        let span = (ceiling - floor).as_secs_f64();
        floor + Duration::from_secs_f64(rand::rng().random_range(0.0..=span))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn backoff(initial_ms: u64, max_ms: u64) -> Backoff {
        Backoff::new(RetrySettings {
            initial_delay: Duration::from_millis(initial_ms),
            max_delay: Duration::from_millis(max_ms),
            max_attempts: NonZeroU32::new(8).unwrap(),
        })
    }

    #[test]
    fn ceilings_double_up_to_the_maximum() {
        let b = backoff(100, 1000);
        let ceilings: Vec<u128> = (1..=6).map(|n| b.ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, vec![100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn jittered_delays_stay_within_the_bounds() {
        let b = backoff(100, 1000);
        for attempt in 1..=10 {
            for _ in 0..50 {
                let d = b.delay(attempt);
                assert!(
                    d >= Duration::from_millis(100) && d <= b.ceiling(attempt),
                    "{d:?}"
                );
            }
        }
    }

    #[test]
    fn only_unsent_or_unexecuted_calls_are_plain_retries() {
        assert_eq!(
            classify(&VendorError::Unreachable("refused".into())),
            Decision::Retry { not_before: None }
        );
        assert_eq!(
            classify(&VendorError::Throttled {
                retry_after: Some(Duration::from_millis(300)),
                hint: crate::vendor::ThrottleHint::default(),
            }),
            Decision::Retry {
                not_before: Some(Duration::from_millis(300))
            }
        );
        assert_eq!(classify(&VendorError::Timeout), Decision::OutcomeUnknown);
        // A task still open is the vendor working, not failing: no circuit, no
        // unknown outcome, just another try.
        assert_eq!(
            classify(&VendorError::TaskStillOpen {
                waited: Duration::from_secs(60)
            }),
            Decision::Retry { not_before: None }
        );
        let server = VendorError::Http {
            status: 503,
            code: "err_http_503".into(),
            message: "down".into(),
        };
        assert_eq!(classify(&server), Decision::OutcomeUnknown);
    }

    #[test]
    fn client_errors_are_permanent_and_credentials_are_vendor_wide() {
        let bad = VendorError::Http {
            status: 400,
            code: "err_bad".into(),
            message: "no".into(),
        };
        assert!(matches!(classify(&bad), Decision::Permanent(e) if e.code == "err_bad"));
        let denied = VendorError::Credentials {
            status: 401,
            code: "err_xdk_invalid_signature".into(),
            message: "bad".into(),
        };
        assert_eq!(classify(&denied), Decision::VendorWide);
    }
}
