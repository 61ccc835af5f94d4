//! HTTP helpers both vendors share: header reading, media-type matching, JSON and dropped responses.

use std::io;

use axum::body::{Body, Bytes};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use serde_json::Value;

/// A header's value as text; `None` when absent or not visible ASCII.
pub(super) fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// Whether a `Content-Type` names `expected`, parameters such as `charset` ignored.
pub(super) fn media_type_is(value: Option<&str>, expected: &str) -> bool {
    value.is_some_and(|value| essence(value).eq_ignore_ascii_case(expected))
}

/// Whether an `Accept` header lists `expected` among its media ranges.
pub(super) fn accept_lists(value: Option<&str>, expected: &str) -> bool {
    value.is_some_and(|value| {
        value
            .split(',')
            .any(|range| essence(range).eq_ignore_ascii_case(expected))
    })
}

fn essence(value: &str) -> &str {
    value.split(';').next().unwrap_or(value).trim()
}

/// A header value made of `text`, with anything a header cannot carry replaced by `?`.
pub(super) fn header_value_lossy(text: &str) -> HeaderValue {
    let cleaned: String = text
        .chars()
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect();
    HeaderValue::from_str(&cleaned).unwrap_or_else(|_| HeaderValue::from_static("?"))
}

/// A status from a fault or a test; anything HTTP cannot carry becomes 500.
pub(super) fn status_code(status: u16) -> StatusCode {
    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// A JSON response with the given status and media type.
pub(super) fn json_response(status: StatusCode, media_type: &str, body: &Value) -> Response {
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, header_value_lossy(media_type));
    response
}

/// A response whose body fails before its first byte: hyper then aborts the
/// connection without sending anything, and the client sees a transport error.
pub(super) fn dropped_connection() -> Response {
    let failing = futures_util::stream::once(futures_util::future::ready(Err::<Bytes, _>(
        io::Error::other("mock vendor drops this connection on purpose"),
    )));
    Response::new(Body::from_stream(failing))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_match_without_parameters_and_case() {
        assert!(media_type_is(
            Some("Application/JSON; charset=utf-8"),
            "application/json"
        ));
        assert!(!media_type_is(Some("text/plain"), "application/json"));
        assert!(!media_type_is(None, "application/json"));
        assert!(accept_lists(
            Some("text/html, application/vnd.pncp.v1.0+json;q=0.9"),
            "application/vnd.pncp.v1.0+json"
        ));
        assert!(!accept_lists(
            Some("application/vnd.pncp.v.1.0+json"),
            "application/vnd.pncp.v1.0+json"
        ));
    }

    #[test]
    fn header_values_survive_non_ascii_text() {
        assert_eq!(
            header_value_lossy("Account é1 not found"),
            "Account ?1 not found"
        );
    }
}
