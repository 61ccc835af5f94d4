//! The mock PNCP endpoints: Modify Account (`PUT /account/{id}`) and task polling (`GET /task/{id}`).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::Response;
use serde_json::{json, Value};

use super::model::{Fault, Vendor, STATUS_DROPPED};
use super::pncp_checks::{check_get, check_put, not_found, Refusal};
use super::state::{Pending, Shared, Task};
use super::wire::{dropped_connection, header_str, header_value_lossy, json_response, status_code};

/// Serves Modify Account: checks, throttle, latency, the next fault, then applies
/// and records in one synchronous step.
pub(super) async fn modify_account(
    State(shared): State<Arc<Shared>>,
    Path(account_id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut pending = pending(&shared, "PUT", &uri, &headers, body);
    let config = &shared.config;
    let checked = check_put(config, &uri, &headers, &account_id, pending.body());
    if let Some(refusal) = refuse_or_admit(&shared, &mut pending, checked) {
        return refusal;
    }

    let latency = shared.lock().latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let fault = shared.lock().admit_next(Vendor::Pncp);
    if let Some(fault) = &fault {
        pending.set_fault(fault.kind());
    }
    if let Some(Fault::Delay { ms }) = fault {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    let media_type = config.pncp_media_type.as_str();
    let fields = pending.body().as_object().cloned().unwrap_or_default();
    let mut inner = shared.lock();
    match fault {
        None | Some(Fault::Delay { .. }) => {
            let account = inner.apply_pncp(&account_id, &fields);
            pending.finish(&mut inner, 200, true);
            drop(inner);
            json_response(StatusCode::OK, media_type, &account)
        }
        Some(Fault::Status { status }) => {
            let status = status_code(status);
            pending.finish(&mut inner, status.as_u16(), false);
            error_response(status, &format!("Injected fault: HTTP {status}"))
        }
        Some(Fault::RateLimited { reset_ms }) => {
            pending.finish(&mut inner, 429, false);
            too_many_requests(reset_ms)
        }
        Some(Fault::Drop) => {
            pending.finish(&mut inner, STATUS_DROPPED, false);
            dropped_connection()
        }
        Some(Fault::RetryableFail) => {
            pending.finish(&mut inner, 503, false);
            let description = "Injected fault: service temporarily unavailable";
            error_response(StatusCode::SERVICE_UNAVAILABLE, description)
        }
        Some(Fault::FailAfterApply { status }) => {
            let status = status_code(status);
            inner.apply_pncp(&account_id, &fields);
            pending.finish(&mut inner, status.as_u16(), true);
            error_response(
                status,
                &format!("Injected fault after applying: HTTP {status}"),
            )
        }
        Some(Fault::DropAfterApply) => {
            inner.apply_pncp(&account_id, &fields);
            pending.finish(&mut inner, STATUS_DROPPED, true);
            dropped_connection()
        }
        Some(Fault::AcceptedTask { succeed, polls }) => {
            let task_id = uuid::Uuid::new_v4().simple().to_string();
            let task = Task {
                account_id,
                body: fields,
                succeed,
                polls_left: polls,
                closed: false,
            };
            inner.tasks.insert(task_id.clone(), task);
            pending.finish(&mut inner, 202, false);
            drop(inner);
            let body = json!({"resourceURL": format!("/task/{task_id}")});
            json_response(StatusCode::ACCEPTED, media_type, &body)
        }
    }
}

/// Serves a task poll: OPEN while polls remain, then CLOSED, applying the change
/// at the moment a successful task closes. Polls never consume faults.
pub(super) async fn get_task(
    State(shared): State<Arc<Shared>>,
    Path(task_id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let mut pending = pending(&shared, "GET", &uri, &headers, Value::Null);
    let checked = check_get(&shared.config, &uri, &headers);
    let checked = checked.and_then(|()| {
        if shared.lock().tasks.contains_key(&task_id) {
            Ok(())
        } else {
            Err(not_found("Task", &task_id))
        }
    });
    if let Some(refusal) = refuse_or_admit(&shared, &mut pending, checked) {
        return refusal;
    }
    let latency = shared.lock().latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }

    let mut inner = shared.lock();
    // A reset during the latency may have removed the task.
    let Some(task) = inner.tasks.get_mut(&task_id) else {
        pending.finish(&mut inner, 404, false);
        drop(inner);
        let (status, description) = not_found("Task", &task_id);
        return error_response(status, &description);
    };
    let mut body = json!({"taskId": task_id, "state": "OPEN"});
    let mut applied = false;
    if task.polls_left > 0 && !task.closed {
        task.polls_left -= 1;
    } else {
        let newly_closed = !task.closed;
        task.closed = true;
        let (account_id, succeed) = (task.account_id.clone(), task.succeed);
        if newly_closed && succeed {
            let fields = task.body.clone();
            inner.apply_pncp(&account_id, &fields);
            applied = true;
        }
        body["state"] = json!("CLOSED");
        body["result"] = json!(if succeed { "SUCCESSFUL" } else { "FAILED" });
        body["accountResource"] = json!({"resourceURL": format!("/account/{account_id}")});
        if !succeed {
            body["errorDescription"] = json!("Injected fault: the task failed");
        }
    }
    pending.finish(&mut inner, 200, applied);
    drop(inner);
    json_response(StatusCode::OK, &shared.config.pncp_media_type, &body)
}

fn pending(
    shared: &Arc<Shared>,
    method: &'static str,
    uri: &Uri,
    headers: &HeaderMap,
    body: Value,
) -> Pending {
    let request_id = header_str(headers, "x-request-id").map(str::to_owned);
    let path = uri.path().to_owned();
    Pending::new(shared, Vendor::Pncp, method, path, request_id, body)
}

/// Records a refusal (a failed check, the vendor's outage, the throttle) and
/// returns its response, or takes from the throttle and returns `None` when the
/// request may go on. Both endpoints come through here, so an outage answers
/// task polls too.
fn refuse_or_admit(
    shared: &Shared,
    pending: &mut Pending,
    checked: Result<(), Refusal>,
) -> Option<Response> {
    let now_ms = shared.elapsed_ms();
    let mut inner = shared.lock();
    let refusal = match (checked, inner.outage_status(Vendor::Pncp)) {
        (Err((status, description)), _) => error_response(status, &description),
        (Ok(()), Some(status)) => {
            let status = status_code(status);
            pending.set_fault(super::OUTAGE_FAULT);
            let description = format!("Vendor outage (mock): HTTP {}", status.as_u16());
            error_response(status, &description)
        }
        (Ok(()), None) => match inner.throttles[Vendor::Pncp].take(now_ms) {
            Ok(_) => return None,
            Err(rate) => {
                pending.set_fault("throttled");
                too_many_requests(rate.reset_ms)
            }
        },
    };
    pending.finish(&mut inner, refusal.status().as_u16(), false);
    Some(refusal)
}

/// PNCP's error shape: no body, the reason in `X-Application-Error-*` headers.
fn error_response(status: StatusCode, description: &str) -> Response {
    let mut response = Response::default();
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        "x-application-error-description",
        header_value_lossy(description),
    );
    let reference = uuid::Uuid::new_v4().to_string();
    headers.insert(
        "x-application-error-reference",
        header_value_lossy(&reference),
    );
    response
}

/// 429 with `Retry-After` in whole seconds, rounded up.
fn too_many_requests(reset_ms: u64) -> Response {
    let mut response = error_response(StatusCode::TOO_MANY_REQUESTS, "Rate limit exceeded");
    let seconds = reset_ms.div_ceil(1000);
    response
        .headers_mut()
        .insert("retry-after", HeaderValue::from(seconds));
    response
}
