//! The checks PNCP applies before serving a request: media types, signature, account and body.

use axum::http::{HeaderMap, StatusCode, Uri};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde_json::Value;

use super::wire::{accept_lists, header_str, media_type_is};
use super::{MockVendorConfig, PNCP_ROOT};
use crate::vendor::signing;

/// A refusal: its status and the `X-Application-Error-Description`.
pub(super) type Refusal = (StatusCode, String);

/// Modify Account's checks, in the vendor's order: media types, signature, account, body.
pub(super) fn check_put(
    config: &MockVendorConfig,
    uri: &Uri,
    headers: &HeaderMap,
    account_id: &str,
    body: &Value,
) -> Result<(), Refusal> {
    let media_type = config.pncp_media_type.as_str();
    if !media_type_is(header_str(headers, "content-type"), media_type) {
        let description = format!("Content-Type must be {media_type}");
        return Err((StatusCode::UNSUPPORTED_MEDIA_TYPE, description));
    }
    if !accept_lists(header_str(headers, "accept"), media_type) {
        return Err((
            StatusCode::NOT_ACCEPTABLE,
            format!("Accept must be {media_type}"),
        ));
    }
    check_signature(config, "PUT", uri, headers)?;
    if account_id.starts_with("404") {
        return Err(not_found("Account", account_id));
    }
    let Some(fields) = body.as_object() else {
        let description = "The body must be a JSON object".to_owned();
        return Err((StatusCode::BAD_REQUEST, description));
    };
    for required in ["name", "email"] {
        let filled = fields
            .get(required)
            .and_then(Value::as_str)
            .is_some_and(|value| !value.trim().is_empty());
        if !filled {
            let description = format!("Field '{required}' is required");
            return Err((StatusCode::BAD_REQUEST, description));
        }
    }
    Ok(())
}

/// A task poll's checks: an `Accept` that admits the media type, and the signature.
pub(super) fn check_get(
    config: &MockVendorConfig,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(), Refusal> {
    let media_type = config.pncp_media_type.as_str();
    let accept = header_str(headers, "accept");
    let acceptable = accept.is_none_or(|accept| {
        accept_lists(Some(accept), media_type) || accept_lists(Some(accept), "*/*")
    });
    if !acceptable {
        return Err((
            StatusCode::NOT_ACCEPTABLE,
            format!("Accept must be {media_type}"),
        ));
    }
    check_signature(config, "GET", uri, headers)
}

/// Verifies `Authorization: PNCP base64("<application key>:<signature>")` over the
/// method, the path relative to the API root and the sorted query.
fn check_signature(
    config: &MockVendorConfig,
    method: &str,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(), Refusal> {
    let Some(credentials) = header_str(headers, "authorization") else {
        let description = "Missing Authorization header".to_owned();
        return Err((StatusCode::UNAUTHORIZED, description));
    };
    let resource = uri.path().strip_prefix(PNCP_ROOT).unwrap_or(uri.path());
    let query: Vec<(&str, &str)> = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .collect();
    let key = config.pncp_application_key.as_str();
    let to_sign = signing::pncp_string_to_sign(method, resource, &query, key);
    let expected = signing::pncp_signature(config.pncp_shared_secret.as_bytes(), &to_sign);
    let valid = credentials
        .strip_prefix("PNCP ")
        .and_then(|encoded| BASE64.decode(encoded.trim()).ok())
        .and_then(|decoded| String::from_utf8(decoded).ok())
        .is_some_and(|decoded| decoded.split_once(':') == Some((key, expected.as_str())));
    if valid {
        Ok(())
    } else {
        Err((StatusCode::UNAUTHORIZED, "Invalid signature".to_owned()))
    }
}

pub(super) fn not_found(what: &str, id: &str) -> Refusal {
    (StatusCode::NOT_FOUND, format!("{what} {id} not found"))
}
