//! The shared HTTP client and the mapping of transport failures and headers.

use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::Response;

use super::{QuotaHint, ThrottleHint, VendorError};
use crate::config::Settings;

/// One pooled client for every vendor: keep-alive connections are what make
/// thousands of calls a second cheap.
pub(super) fn client(settings: &Settings) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(settings.vendor_timeout)
        .connect_timeout(settings.vendor_timeout.min(Duration::from_secs(10)))
        .pool_max_idle_per_host(settings.broker.concurrency.get())
        .user_agent(concat!("account-worker/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Maps a failure of `send()`: only a connect error, or a request that could
/// not even be built, proves nothing was sent.
pub(super) fn send_error(error: reqwest::Error) -> VendorError {
    if error.is_builder() {
        VendorError::Unreachable(format!(
            "the request could not be built, so nothing was sent: {}; check the vendor settings for control characters",
            error_chain(&error)
        ))
    } else if error.is_connect() {
        VendorError::Unreachable(error_chain(&error))
    } else if error.is_timeout() {
        VendorError::Timeout
    } else {
        VendorError::Interrupted(error_chain(&error))
    }
}

/// Maps a failure while reading a response body: the vendor has acted.
pub(super) fn body_error(error: reqwest::Error) -> VendorError {
    if error.is_timeout() {
        VendorError::Timeout
    } else {
        VendorError::Interrupted(error_chain(&error))
    }
}

/// The error and its causes on one line (reqwest's own text hides the cause),
/// with the userinfo of any URL in it hidden: the text reaches results,
/// `x-error-message` and logs.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    crate::telemetry::redact::url_userinfo(&text).into_owned()
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers
        .get(name)?
        .to_str()
        .ok()?
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(|v| v.ceil() as u64)
}

/// The longest wait a vendor's header can impose. A value past it is most likely
/// a time of day sent where a delay was meant; obeying it would hold every call
/// to the vendor for years (and overflow the clock), while retrying after this
/// long at worst earns another 429.
const MAX_VENDOR_WAIT: Duration = Duration::from_secs(15 * 60);

/// When a throttled call may be retried: `X-RateLimit-Reset` (ms) or `Retry-After` (s).
pub(super) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    header_u64(headers, "x-ratelimit-reset")
        .map(Duration::from_millis)
        .or_else(|| header_u64(headers, "retry-after").map(Duration::from_secs))
        .map(|wait| wait.min(MAX_VENDOR_WAIT))
}

/// What a 429's headers say: when to retry, how precisely, and the limit.
pub(super) fn throttle_hint(headers: &HeaderMap) -> ThrottleHint {
    let retry_after = retry_after(headers);
    ThrottleHint {
        retry_after,
        whole_seconds: retry_after.is_some() && header_u64(headers, "x-ratelimit-reset").is_none(),
        limit: header_u64(headers, "x-ratelimit-limit").filter(|limit| *limit > 0),
    }
}

/// A 429's error.
pub(super) fn throttled(headers: &HeaderMap) -> VendorError {
    let hint = throttle_hint(headers);
    VendorError::Throttled {
        retry_after: hint.retry_after,
        hint,
    }
}

/// The quota the vendor reported, when it did.
pub(super) fn quota(headers: &HeaderMap) -> Option<QuotaHint> {
    Some(QuotaHint {
        remaining: header_u64(headers, "x-ratelimit-remaining")?,
        reset: Duration::from_millis(header_u64(headers, "x-ratelimit-reset")?)
            .min(MAX_VENDOR_WAIT),
    })
}

/// Reads the whole body, mapping a broken connection to an unknown outcome.
pub(super) async fn body_bytes(response: Response) -> Result<bytes::Bytes, VendorError> {
    response.bytes().await.map_err(body_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn a_request_that_cannot_be_built_was_not_sent() {
        let error = reqwest::Client::new()
            .post("http://127.0.0.1:9/")
            .header("x-mc-app-id", "app\n1")
            .build()
            .expect_err("a line break in a header value cannot be sent");
        assert!(
            matches!(send_error(error), VendorError::Unreachable(_)),
            "not sent, so never an unknown outcome"
        );
    }

    #[test]
    fn a_wait_the_vendor_asks_for_is_kept() {
        assert_eq!(
            retry_after(&headers(&[("retry-after", "2")])),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            retry_after(&headers(&[("x-ratelimit-reset", "1500")])),
            Some(Duration::from_millis(1500))
        );
    }

    #[test]
    fn an_absurd_wait_is_capped_instead_of_holding_the_vendor_for_years() {
        assert_eq!(
            retry_after(&headers(&[("retry-after", "1e300")])),
            Some(MAX_VENDOR_WAIT)
        );
        // A Unix time in milliseconds where a delay was meant.
        let quota = quota(&headers(&[
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "1795497943000"),
        ]))
        .unwrap();
        assert_eq!(quota.reset, MAX_VENDOR_WAIT);
    }
}
