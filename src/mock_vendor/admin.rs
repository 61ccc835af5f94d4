//! The mock's JSON admin API, so the demo script and external checks can steer and inspect it over HTTP.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::model::{Fault, Vendor};
use super::random::RandomFaults;
use super::state::Shared;
use super::throttle::ThrottleMode;

/// The `/admin/*` routes; they are never recorded and skip latency and faults.
pub(super) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/admin/requests", get(requests))
        .route("/admin/accounts", get(accounts))
        .route("/admin/faults", post(faults))
        .route("/admin/latency", post(latency))
        .route("/admin/throttle", post(throttle))
        .route("/admin/random-faults", post(random_faults))
        .route("/admin/outage", post(outage))
        .route("/admin/reset", post(reset))
}

async fn requests(State(shared): State<Arc<Shared>>) -> Response {
    let records = shared.lock().records.clone();
    Json(records).into_response()
}

async fn accounts(State(shared): State<Arc<Shared>>) -> Response {
    let snapshot = {
        let inner = shared.lock();
        let sorted = |counts: &std::collections::HashMap<String, usize>| {
            counts.clone().into_iter().collect::<BTreeMap<_, _>>()
        };
        json!({
            "mimecast": inner.mimecast_accounts.iter().collect::<BTreeMap<_, _>>(),
            "pncp": inner.pncp_accounts.iter().collect::<BTreeMap<_, _>>(),
            "applied": {
                "mimecast": sorted(&inner.applied[Vendor::Mimecast]),
                "pncp": sorted(&inner.applied[Vendor::Pncp]),
            },
        })
    };
    Json(snapshot).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultsBody {
    vendor: Vendor,
    faults: Vec<Fault>,
}

async fn faults(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let body: FaultsBody = match parse(&body) {
        Ok(body) => body,
        Err(message) => return bad_request(message),
    };
    for fault in &body.faults {
        if let Err(message) = check_fault(body.vendor, fault) {
            return bad_request(message);
        }
    }
    shared.lock().faults[body.vendor].extend(body.faults);
    StatusCode::NO_CONTENT.into_response()
}

/// Refuses faults the mock could not carry out as described.
fn check_fault(vendor: Vendor, fault: &Fault) -> Result<(), String> {
    match fault {
        Fault::Status { status } | Fault::FailAfterApply { status }
            if !(200..=599).contains(status) =>
        {
            Err(format!("status {status} is not between 200 and 599"))
        }
        Fault::AcceptedTask { .. } if vendor == Vendor::Mimecast => {
            Err("accepted_task is a PNCP-only fault".to_owned())
        }
        _ => Ok(()),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LatencyBody {
    ms: u64,
}

async fn latency(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    match parse::<LatencyBody>(&body) {
        Ok(body) => {
            shared.lock().latency = Duration::from_millis(body.ms);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(message) => bad_request(message),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ThrottleBody {
    vendor: Vendor,
    per_second: Option<u32>,
    /// Absent: the mode stays as it is.
    #[serde(default)]
    mode: Option<ThrottleMode>,
}

async fn throttle(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    match parse::<ThrottleBody>(&body) {
        Ok(body) => {
            let now_ms = shared.elapsed_ms();
            let mut inner = shared.lock();
            let throttle = &mut inner.throttles[body.vendor];
            if let Some(mode) = body.mode {
                throttle.set_mode(mode, now_ms);
            }
            throttle.set(body.per_second, now_ms);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(message) => bad_request(message),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutageBody {
    vendor: Vendor,
    /// The status every request answers; `null` ends the outage.
    status: Option<u16>,
}

/// Body: `{"vendor": "mimecast", "status": 503}` starts a full outage of the
/// vendor, `{"vendor": "mimecast", "status": null}` ends it
/// ([`super::MockVendor::set_outage`]).
async fn outage(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let body = match parse::<OutageBody>(&body) {
        Ok(body) => body,
        Err(message) => return bad_request(message),
    };
    if let Some(status) = body.status.filter(|s| !(400..=599).contains(s)) {
        return bad_request(format!(
            "outage status {status} is not an error status (400 to 599)"
        ));
    }
    shared.lock().outage[body.vendor] = body.status;
    StatusCode::NO_CONTENT.into_response()
}

/// Body: a [`RandomFaults`] (`{"rate": 0.05, "seed": 1, "delay_ms": 3000}`);
/// a rate of 0 turns the mode off.
async fn random_faults(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let faults = match parse::<RandomFaults>(&body) {
        Ok(faults) => faults,
        Err(message) => return bad_request(message),
    };
    if let Err(message) = faults.check() {
        return bad_request(message);
    }
    super::set_random(&shared, Some(faults));
    StatusCode::NO_CONTENT.into_response()
}

async fn reset(State(shared): State<Arc<Shared>>) -> Response {
    shared.lock().reset();
    StatusCode::NO_CONTENT.into_response()
}

/// Parses an admin body; the error is serde's explanation, for a 400.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|error| format!("invalid body: {error}"))
}

fn bad_request(message: String) -> Response {
    let body: Value = json!({ "error": message });
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}
