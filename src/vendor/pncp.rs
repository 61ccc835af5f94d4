//! PNCP Modify Account: one signed `PUT /account/{id}` per item, following 202 tasks.

use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};
use url::Url;

use super::{http, signing, CallReport, ItemOutcome, VendorError};
use crate::config::PncpSettings;
use crate::job::{Item, ItemError};
use crate::limiter::VendorLimiter;

/// First wait between two polls of a 202 task; doubles up to [`MAX_POLL_DELAY`].
const FIRST_POLL_DELAY: Duration = Duration::from_millis(50);
const MAX_POLL_DELAY: Duration = Duration::from_secs(5);

/// A signed PNCP client.
#[derive(Clone)]
pub struct PncpClient {
    http: reqwest::Client,
    base_url: Url,
    application_key: SecretString,
    shared_secret: SecretString,
    media_type: String,
    task_timeout: Duration,
}

impl std::fmt::Debug for PncpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PncpClient")
            .field("base_url", &self.base_url.as_str())
            .field("media_type", &self.media_type)
            .finish_non_exhaustive()
    }
}

impl PncpClient {
    /// A client for the configured API root and keys.
    pub fn new(http: reqwest::Client, settings: &PncpSettings) -> Self {
        Self {
            http,
            base_url: settings.base_url.clone(),
            application_key: settings.application_key.clone(),
            shared_secret: settings.shared_secret.clone(),
            media_type: settings.media_type.clone(),
            // A task is followed for at most a minute; each poll is bounded by VENDOR_TIMEOUT.
            task_timeout: Duration::from_secs(60),
        }
    }

    /// Sends each item (PNCP takes one account per request; the pipeline sends one).
    pub async fn send(
        &self,
        items: &[&Item],
        limiter: &VendorLimiter,
    ) -> Result<CallReport, VendorError> {
        let mut outcomes = Vec::with_capacity(items.len());
        let mut last_status = 200;
        for item in items {
            let (status, outcome) = self.modify_account(item, limiter).await?;
            last_status = status;
            outcomes.push(outcome);
        }
        Ok(CallReport {
            http_status: last_status,
            outcomes,
            quota: None,
        })
    }

    /// The absolute URL of a path relative to the API root, and that path as signed.
    fn resource(&self, segments: &[&str]) -> (Url, String) {
        let mut url = self.base_url.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty();
            path.extend(segments);
        }
        let root = self.base_url.path().trim_end_matches('/');
        let relative = url
            .path()
            .strip_prefix(root)
            .unwrap_or(url.path())
            .to_owned();
        (url, relative)
    }

    fn signed(&self, method: Method, url: Url, relative_path: &str) -> reqwest::RequestBuilder {
        let to_sign = signing::pncp_string_to_sign(
            method.as_str(),
            relative_path,
            &[],
            self.application_key.expose_secret(),
        );
        let signature =
            signing::pncp_signature(self.shared_secret.expose_secret().as_bytes(), &to_sign);
        let header = signing::pncp_authorization(self.application_key.expose_secret(), &signature);
        let mut request = self
            .http
            .request(method, url)
            .header(ACCEPT, &self.media_type);
        if let Ok(mut value) = HeaderValue::from_str(&header) {
            value.set_sensitive(true);
            request = request.header(AUTHORIZATION, value);
        }
        request
    }

    async fn modify_account(
        &self,
        item: &Item,
        limiter: &VendorLimiter,
    ) -> Result<(u16, ItemOutcome), VendorError> {
        let (url, path) = self.resource(&["account", &item.account]);
        let mut body: Map<String, Value> = item.body.clone();
        body.remove("accountId");
        let bytes = serde_json::to_vec(&body).map_err(|e| VendorError::BadResponse {
            status: 0,
            detail: e.to_string(),
        })?;
        let response = self
            .signed(Method::PUT, url, &path)
            .header(CONTENT_TYPE, &self.media_type)
            .body(bytes)
            .send()
            .await
            .map_err(http::send_error)?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = http::body_bytes(response).await?;
        match status {
            200 => Ok((status, ItemOutcome::Applied(parse_json(status, &body)?))),
            202 => {
                let task = parse_json(status, &body)?;
                let resource =
                    task.get("resourceURL")
                        .and_then(Value::as_str)
                        .ok_or_else(|| VendorError::BadResponse {
                            status,
                            detail: "202 without a resourceURL".to_owned(),
                        })?;
                self.follow_task(resource, limiter).await
            }
            _ => Err(error_of(status, &headers)).or_else(|error| per_item_failure(status, error)),
        }
    }

    /// Polls a task until it is closed, with doubling waits, within the task timeout.
    async fn follow_task(
        &self,
        resource: &str,
        limiter: &VendorLimiter,
    ) -> Result<(u16, ItemOutcome), VendorError> {
        let segments: Vec<&str> = resource.split('/').filter(|s| !s.is_empty()).collect();
        let (url, path) = self.resource(&segments);
        let deadline = Instant::now() + self.task_timeout;
        let mut delay = FIRST_POLL_DELAY;
        // The 202 is the vendor's answer: calls held behind this one (the probe
        // after a start or a 429) may go, and its own polls must not wait for it.
        limiter.call_answered(None);
        loop {
            // Each poll is a call to the vendor and is charged like one.
            limiter.acquire().await;
            let response = self
                .signed(Method::GET, url.clone(), &path)
                .send()
                .await
                .map_err(http::send_error)?;
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let body = http::body_bytes(response).await?;
            if status == 429 {
                // The vendor holds the change already: wait out the pause (the
                // next `acquire`) and poll the same task, rather than send the
                // change again and start a second task.
                let hint = http::throttle_hint(&headers);
                let retry_after = hint.retry_after;
                limiter.call_throttled(hint);
                if Instant::now() + retry_after.unwrap_or(delay) > deadline {
                    return Err(VendorError::TaskStillOpen {
                        waited: self.task_timeout,
                    });
                }
                // The pause holds the next poll for `retry_after`; a shorter
                // (or no) wait still keeps the polls apart, growing each time.
                let paused = retry_after.unwrap_or_default();
                if paused < delay {
                    tokio::time::sleep(delay - paused).await;
                }
                delay = (delay * 2).min(MAX_POLL_DELAY);
                continue;
            }
            if status != 200 {
                return Err(error_of(status, &headers));
            }
            // An answer: calls held behind this poll (the probe after a 429) may go.
            limiter.call_answered(None);
            let task = parse_json(status, &body)?;
            if task.get("state").and_then(Value::as_str) == Some("CLOSED") {
                let succeeded = task.get("result").and_then(Value::as_str) == Some("SUCCESSFUL");
                return Ok((
                    status,
                    if succeeded {
                        ItemOutcome::Applied(task)
                    } else {
                        let reason = task
                            .get("errorDescription")
                            .and_then(Value::as_str)
                            .unwrap_or("the task closed without success");
                        ItemOutcome::Failed(vec![ItemError::permanent(
                            "err_task_failed",
                            reason.to_owned(),
                        )])
                    },
                ));
            }
            if Instant::now() + delay > deadline {
                // Modify Account is idempotent, so the caller may resend it.
                return Err(VendorError::TaskStillOpen {
                    waited: self.task_timeout,
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_POLL_DELAY);
        }
    }
}

fn parse_json(status: u16, body: &[u8]) -> Result<Value, VendorError> {
    serde_json::from_slice(body).map_err(|e| VendorError::BadResponse {
        status,
        detail: e.to_string(),
    })
}

/// The error of a non-success answer, from its status and `X-Application-Error-*` headers.
fn error_of(status: u16, headers: &HeaderMap) -> VendorError {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let description = header("x-application-error-description")
        .unwrap_or_else(|| format!("the vendor answered HTTP {status}"));
    let message = match header("x-application-error-reference") {
        Some(reference) => format!("{description} (reference {reference})"),
        None => description,
    };
    let code = format!("err_http_{status}");
    match status {
        401 | 403 => VendorError::Credentials {
            status,
            code,
            message,
        },
        429 => http::throttled(headers),
        _ => VendorError::Http {
            status,
            code,
            message,
        },
    }
}

/// A 4xx about the item itself (404, 400, ...) is that item's permanent failure;
/// everything else stays a call error for the retry policy to judge.
fn per_item_failure(status: u16, error: VendorError) -> Result<(u16, ItemOutcome), VendorError> {
    match error {
        VendorError::Http { code, message, .. }
            if (400..500).contains(&status) && status != 408 =>
        {
            Ok((
                status,
                ItemOutcome::Failed(vec![ItemError::permanent(code, message)]),
            ))
        }
        other => Err(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    #[test]
    fn a_404_becomes_the_items_own_failure_with_the_vendor_reason() {
        let h = headers(&[
            ("x-application-error-description", "Account 404x not found"),
            ("x-application-error-reference", "ref-1"),
        ]);
        let (status, outcome) = per_item_failure(404, error_of(404, &h)).unwrap();
        assert_eq!(status, 404);
        let ItemOutcome::Failed(errors) = outcome else {
            panic!("expected a failure")
        };
        assert_eq!(errors[0].code, "err_http_404");
        assert_eq!(
            errors[0].message,
            "Account 404x not found (reference ref-1)"
        );
        assert!(!errors[0].retryable);
    }

    #[test]
    fn server_errors_and_throttling_stay_call_errors() {
        assert!(per_item_failure(503, error_of(503, &HeaderMap::new())).is_err());
        let throttled = error_of(429, &headers(&[("retry-after", "2")]));
        assert!(matches!(
            throttled,
            VendorError::Throttled { retry_after: Some(d), .. } if d == Duration::from_secs(2)
        ));
        assert!(matches!(
            error_of(401, &HeaderMap::new()),
            VendorError::Credentials { .. }
        ));
    }
}
