//! The shared HTTP client and the mapping of transport failures and headers.

use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::Response;

use super::{QuotaHint, VendorError};
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

/// Maps a failure of `send()`: only a connect error proves nothing was sent.
pub(super) fn send_error(error: reqwest::Error) -> VendorError {
    if error.is_connect() {
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

/// The error and its causes on one line (reqwest's own text hides the cause).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
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

/// When a throttled call may be retried: `X-RateLimit-Reset` (ms) or `Retry-After` (s).
pub(super) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    header_u64(headers, "x-ratelimit-reset")
        .map(Duration::from_millis)
        .or_else(|| header_u64(headers, "retry-after").map(Duration::from_secs))
}

/// The quota the vendor reported, when it did.
pub(super) fn quota(headers: &HeaderMap) -> Option<QuotaHint> {
    Some(QuotaHint {
        remaining: header_u64(headers, "x-ratelimit-remaining")?,
        reset: Duration::from_millis(header_u64(headers, "x-ratelimit-reset")?),
    })
}

/// Reads the whole body, mapping a broken connection to an unknown outcome.
pub(super) async fn body_bytes(response: Response) -> Result<bytes::Bytes, VendorError> {
    response.bytes().await.map_err(body_error)
}
