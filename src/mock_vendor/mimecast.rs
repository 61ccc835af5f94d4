//! The mock `POST /api/account/update-account`: Mimecast's checks, throttle, faults and answer.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{json, Value};

use super::mimecast_items::{apply_items, data_items, retryable_failures, ItemsOutcome};
use super::model::{Fault, Vendor, STATUS_DROPPED};
use super::state::{Inner, Pending, Shared};
use super::throttle::{RateInfo, ThrottleMode};
use super::wire::{dropped_connection, header_str, json_response, media_type_is, status_code};
use super::MockVendorConfig;
use crate::vendor::signing;

/// The endpoint's path, which is also the `<uri path>` of the string to sign.
pub(super) const PATH: &str = "/api/account/update-account";
const JSON: &str = "application/json";
/// How far `x-mc-date` may be from the mock's clock.
const MAX_CLOCK_SKEW_MINUTES: i64 = 15;

/// Serves one update-account call: checks, throttle, latency, the next fault, then
/// applies and records in one synchronous step.
pub(super) async fn update_account(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let request_id = header_str(&headers, "x-mc-req-id").map(str::to_owned);
    let mut pending = Pending::new(
        &shared,
        Vendor::Mimecast,
        "POST",
        PATH.to_owned(),
        request_id,
        body,
    );
    let checked = check_headers(&shared.config, &headers, Utc::now());
    let body_ok = data_items(pending.body()).is_some();
    let now_ms = shared.elapsed_ms();
    let rate = {
        let mut inner = shared.lock();
        let (verdict, rate) = admit(&mut inner, checked, body_ok, now_ms);
        if let Err(rejection) = verdict {
            if let Some(kind) = rejection.fault {
                pending.set_fault(kind);
            }
            pending.finish(&mut inner, rejection.status.as_u16(), false);
            drop(inner);
            return error_response(rejection.status, rejection.code, &rejection.message, rate);
        }
        rate
    };

    let latency = shared.lock().latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let fault = shared.lock().admit_next(Vendor::Mimecast);
    if let Some(fault) = &fault {
        pending.set_fault(fault.kind());
    }
    if let Some(Fault::Delay { ms }) = fault {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let answer = conclude(&shared, &mut pending, fault);
    answer.into_response(rate)
}

/// Why a request is refused before anything else happens.
#[derive(Debug)]
struct Rejection {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// The fault kind to record when the mock's steering (throttle, outage)
    /// refused the request rather than a vendor check.
    fault: Option<&'static str>,
}

impl Rejection {
    fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code,
            message: message.into(),
            fault: None,
        }
    }

    /// The answer of a request that arrives during the vendor's full outage.
    fn outage(status: u16) -> Self {
        let status = status_code(status);
        let code = match status.as_u16() {
            401 => "err_xdk_invalid_access_key",
            403 => "err_xdk_forbidden",
            _ => "err_service_unavailable",
        };
        Self {
            status,
            code,
            message: format!("Vendor outage (mock): HTTP {}", status.as_u16()),
            fault: Some(super::OUTAGE_FAULT),
        }
    }
}

/// Headers that passed checks 1–4, with the signature verdict kept for after the
/// request id check (the vendor reports a reused id before a bad signature).
#[derive(Debug)]
struct Signed<'a> {
    request_id: &'a str,
    signature_ok: bool,
}

/// Checks 1–4 and computes the signature, all without the lock.
fn check_headers<'a>(
    config: &MockVendorConfig,
    headers: &'a HeaderMap,
    now: DateTime<Utc>,
) -> Result<Signed<'a>, Rejection> {
    if !media_type_is(header_str(headers, "content-type"), JSON) {
        return Err(Rejection {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: "err_invalid_content_type",
            message: "Content-Type must be application/json".into(),
            fault: None,
        });
    }
    let Some((access_key, signature)) = header_str(headers, "authorization")
        .and_then(|value| value.strip_prefix("MC "))
        .and_then(|value| value.split_once(':'))
    else {
        return Err(Rejection::unauthorized(
            "err_xdk_missing_authorization",
            "Authorization header missing or not of the form 'MC <accessKey>:<signature>'",
        ));
    };
    if access_key != config.mimecast_access_key {
        return Err(Rejection::unauthorized(
            "err_xdk_invalid_access_key",
            "The access key is not valid",
        ));
    }
    if header_str(headers, "x-mc-app-id") != Some(config.mimecast_app_id.as_str()) {
        return Err(Rejection::unauthorized(
            "err_xdk_invalid_app_id",
            "x-mc-app-id is missing or not valid",
        ));
    }
    let date = header_str(headers, "x-mc-date").unwrap_or_default();
    let fresh = signing::parse_mimecast_date(date)
        .is_some_and(|sent| (now - sent).abs() <= TimeDelta::minutes(MAX_CLOCK_SKEW_MINUTES));
    if !fresh {
        return Err(Rejection::unauthorized(
            "err_xdk_invalid_date",
            "x-mc-date is missing, malformed or more than 15 minutes from the server time",
        ));
    }
    let Some(request_id) = header_str(headers, "x-mc-req-id").filter(|id| !id.is_empty()) else {
        return Err(Rejection::unauthorized(
            "err_xdk_request_id_reused",
            "x-mc-req-id is missing",
        ));
    };
    let expected = signing::mimecast_signature(
        &config.mimecast_secret_key,
        date,
        request_id,
        PATH,
        &config.mimecast_app_key,
    );
    Ok(Signed {
        request_id,
        signature_ok: signature == expected,
    })
}

/// Checks 5–7, the vendor's outage and the throttle, under the lock so a request id is claimed atomically;
/// returns the verdict and the quota to report.
fn admit(
    inner: &mut Inner,
    checked: Result<Signed<'_>, Rejection>,
    body_ok: bool,
    now_ms: u64,
) -> (Result<(), Rejection>, RateInfo) {
    let verdict = checked.and_then(|signed| {
        if inner.seen_request_ids.contains(signed.request_id) {
            Err(Rejection::unauthorized(
                "err_xdk_request_id_reused",
                format!("x-mc-req-id {} was already used", signed.request_id),
            ))
        } else if !signed.signature_ok {
            Err(Rejection::unauthorized(
                "err_xdk_invalid_signature",
                "The request signature is not valid",
            ))
        } else {
            inner.seen_request_ids.insert(signed.request_id.to_owned());
            Ok(())
        }
    });
    let verdict = verdict.and_then(|()| {
        if body_ok {
            Ok(())
        } else {
            Err(Rejection {
                status: StatusCode::BAD_REQUEST,
                code: "err_invalid_request_body",
                message: "The body must be a JSON object with a 'data' array".into(),
                fault: None,
            })
        }
    });
    let verdict = verdict.and_then(|()| match inner.outage_status(Vendor::Mimecast) {
        Some(status) => Err(Rejection::outage(status)),
        None => Ok(()),
    });
    let throttle = &mut inner.throttles[Vendor::Mimecast];
    match verdict {
        Err(rejection) => (Err(rejection), throttle.peek(now_ms)),
        Ok(()) => match throttle.take(now_ms) {
            Ok(rate) => (Ok(()), rate),
            Err(rate) => (
                Err(Rejection {
                    status: StatusCode::TOO_MANY_REQUESTS,
                    code: "err_rate_limit_exceeded",
                    message: format!("Rate limit exceeded, retry in {} ms", rate.reset_ms),
                    fault: Some("throttled"),
                }),
                rate,
            ),
        },
    }
}

/// The answer decided under the lock, rendered after it is released.
#[derive(Debug)]
enum Answer {
    Items(ItemsOutcome),
    Error(StatusCode),
    RateLimited(u64),
    Drop,
}

/// Applies (or not) according to the fault and records, in one locked step.
fn conclude(shared: &Shared, pending: &mut Pending, fault: Option<Fault>) -> Answer {
    let items: Vec<Value> = data_items(pending.body()).unwrap_or_default().to_vec();
    let mut inner = shared.lock();
    let (status, applied, answer) = match fault {
        None | Some(Fault::Delay { .. } | Fault::AcceptedTask { .. }) => {
            let outcome = apply_items(&mut inner, &items);
            (200, outcome.applied, Answer::Items(outcome))
        }
        Some(Fault::Status { status }) => {
            let status = status_code(status);
            (status.as_u16(), false, Answer::Error(status))
        }
        Some(Fault::RateLimited { reset_ms }) => (429, false, Answer::RateLimited(reset_ms)),
        Some(Fault::Drop) => (STATUS_DROPPED, false, Answer::Drop),
        Some(Fault::RetryableFail) => {
            let outcome = ItemsOutcome {
                data: Vec::new(),
                fail: retryable_failures(&items),
                applied: false,
            };
            (200, false, Answer::Items(outcome))
        }
        Some(Fault::FailAfterApply { status }) => {
            let status = status_code(status);
            let applied = apply_items(&mut inner, &items).applied;
            (status.as_u16(), applied, Answer::Error(status))
        }
        Some(Fault::DropAfterApply) => {
            let applied = apply_items(&mut inner, &items).applied;
            (STATUS_DROPPED, applied, Answer::Drop)
        }
    };
    pending.finish(&mut inner, status, applied);
    answer
}

impl Answer {
    fn into_response(self, rate: RateInfo) -> Response {
        match self {
            Self::Items(outcome) => {
                let body =
                    json!({"meta": {"status": 200}, "data": outcome.data, "fail": outcome.fail});
                with_rate_headers(json_response(StatusCode::OK, JSON, &body), rate)
            }
            Self::Error(status) => {
                let code = format!("err_http_{}", status.as_u16());
                let message = format!("Injected fault: HTTP {status}");
                error_response(status, &code, &message, rate)
            }
            Self::RateLimited(reset_ms) => {
                let rate = RateInfo {
                    remaining: 0,
                    reset_ms,
                    ..rate
                };
                let message = format!("Rate limit exceeded, retry in {reset_ms} ms");
                let status = StatusCode::TOO_MANY_REQUESTS;
                error_response(status, "err_rate_limit_exceeded", &message, rate)
            }
            Self::Drop => dropped_connection(),
        }
    }
}

/// Mimecast's error shape: the error sits in one `fail` entry without a key.
fn error_response(status: StatusCode, code: &str, message: &str, rate: RateInfo) -> Response {
    let body = json!({
        "meta": {"status": status.as_u16()},
        "data": [],
        "fail": [{"errors": [{"code": code, "message": message, "retryable": false}]}],
    });
    with_rate_headers(json_response(status, JSON, &body), rate)
}

/// The quota headers the throttle's mode sends with this answer.
fn with_rate_headers(mut response: Response, rate: RateInfo) -> Response {
    let throttled = response.status() == StatusCode::TOO_MANY_REQUESTS;
    let headers = response.headers_mut();
    match rate.mode {
        ThrottleMode::Headers => {
            headers.insert("x-ratelimit-limit", HeaderValue::from(rate.limit));
            headers.insert("x-ratelimit-remaining", HeaderValue::from(rate.remaining));
            headers.insert("x-ratelimit-reset", HeaderValue::from(rate.reset_ms));
        }
        ThrottleMode::QuotaOn429 if throttled => {
            headers.insert("x-ratelimit-limit", HeaderValue::from(rate.limit));
            headers.insert("x-ratelimit-reset", HeaderValue::from(rate.reset_ms));
        }
        ThrottleMode::RetryAfterOnly if throttled => {
            let seconds = rate.reset_ms.div_ceil(1000);
            headers.insert("retry-after", HeaderValue::from(seconds));
        }
        ThrottleMode::QuotaOn429 | ThrottleMode::RetryAfterOnly => {}
    }
    response
}
