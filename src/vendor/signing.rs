//! Pure request-signing functions for both vendors, tested against fixed vectors.
//!
//! Kept free of I/O and clocks so that the client and the mock vendor compute the
//! very same strings, and so that a known-answer test can pin each one down.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;

/// The `x-mc-date` layout Mimecast documents: `Tue, 24 Nov 2015 12:50:11 UTC`.
pub const MIMECAST_DATE_FORMAT: &str = "%a, %d %b %Y %H:%M:%S UTC";

/// Formats `now` as an `x-mc-date` header value.
pub fn mimecast_date(now: DateTime<Utc>) -> String {
    now.format(MIMECAST_DATE_FORMAT).to_string()
}

/// Parses an `x-mc-date` header value; `None` when it is not exactly the documented shape.
pub fn parse_mimecast_date(value: &str) -> Option<DateTime<Utc>> {
    chrono::NaiveDateTime::parse_from_str(value, MIMECAST_DATE_FORMAT)
        .ok()
        .map(|naive| naive.and_utc())
        // Reject shapes chrono tolerates but Mimecast does not (e.g. a one-digit day).
        .filter(|parsed| mimecast_date(*parsed) == value)
}

/// Base64 HMAC-SHA1 over `"<date>:<request id>:<uri path>:<app key>"`, keyed with
/// the already base64-decoded secret key, as Mimecast API 1.0 requires.
pub fn mimecast_signature(
    secret_key: &[u8],
    date: &str,
    request_id: &str,
    uri_path: &str,
    app_key: &str,
) -> String {
    let mut mac =
        Hmac::<Sha1>::new_from_slice(secret_key).expect("HMAC accepts keys of any length");
    mac.update(format!("{date}:{request_id}:{uri_path}:{app_key}").as_bytes());
    BASE64.encode(mac.finalize().into_bytes())
}

/// The `Authorization` header value: `MC <access key>:<signature>`.
pub fn mimecast_authorization(access_key: &str, signature: &str) -> String {
    format!("MC {access_key}:{signature}")
}

/// PNCP's string to sign: `"<METHOD> <path>[?<sorted query>] <application key>"`,
/// with the path relative to the API root.
pub fn pncp_string_to_sign(
    method: &str,
    resource_path: &str,
    query: &[(&str, &str)],
    application_key: &str,
) -> String {
    let mut pairs: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    let resource = if pairs.is_empty() {
        resource_path.to_owned()
    } else {
        format!("{resource_path}?{}", pairs.join("&"))
    };
    format!("{method} {resource} {application_key}")
}

/// Base64 HMAC-SHA256 of the string to sign, keyed with the shared secret's bytes.
pub fn pncp_signature(shared_secret: &[u8], string_to_sign: &str) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(shared_secret).expect("HMAC accepts keys of any length");
    mac.update(string_to_sign.as_bytes());
    BASE64.encode(mac.finalize().into_bytes())
}

/// The `Authorization` header value: `PNCP base64("<application key>:<signature>")`.
pub fn pncp_authorization(application_key: &str, signature: &str) -> String {
    format!(
        "PNCP {}",
        BASE64.encode(format!("{application_key}:{signature}"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn mimecast_date_has_the_documented_shape() {
        let at = Utc.with_ymd_and_hms(2015, 11, 24, 12, 50, 11).unwrap();
        assert_eq!(mimecast_date(at), "Tue, 24 Nov 2015 12:50:11 UTC");
        let early = Utc.with_ymd_and_hms(2026, 3, 1, 4, 5, 6).unwrap();
        assert_eq!(mimecast_date(early), "Sun, 01 Mar 2026 04:05:06 UTC");
    }

    #[test]
    fn mimecast_date_round_trips_and_rejects_other_shapes() {
        let header = "Tue, 24 Nov 2015 12:50:11 UTC";
        let parsed = parse_mimecast_date(header).unwrap();
        assert_eq!(mimecast_date(parsed), header);
        assert!(parse_mimecast_date("Tue, 24 Nov 2015 12:50:11 GMT").is_none());
        assert!(parse_mimecast_date("2015-11-24T12:50:11Z").is_none());
        assert!(parse_mimecast_date("Tue, 24 Nov 2015 12:50:11").is_none());
    }

    /// Expected value computed independently with Python 3:
    ///
    /// ```text
    /// import base64, hmac, hashlib
    /// key = base64.b64decode("c2VjcmV0LWtleS1mb3ItdGVzdHM=")   # b"secret-key-for-tests"
    /// msg = "Tue, 24 Nov 2015 12:50:11 UTC:8578FCFC-A305-4D9A-99CB-F4D5ECEFE297:/api/account/update-account:app-key-1"
    /// base64.b64encode(hmac.new(key, msg.encode(), hashlib.sha1).digest()).decode()
    /// ```
    ///
    /// and cross-checked with
    /// `printf '%s' "$msg" | openssl dgst -sha1 -hmac 'secret-key-for-tests' -binary | base64`.
    #[test]
    fn mimecast_signature_matches_known_answer() {
        let signature = mimecast_signature(
            b"secret-key-for-tests",
            "Tue, 24 Nov 2015 12:50:11 UTC",
            "8578FCFC-A305-4D9A-99CB-F4D5ECEFE297",
            "/api/account/update-account",
            "app-key-1",
        );
        assert_eq!(signature, "ucdie2JlzKttgZPTjEDheRYJwL8=");
        assert_eq!(
            mimecast_authorization("access-1", &signature),
            format!("MC access-1:{signature}")
        );
    }

    /// Expected value computed independently:
    /// `printf '%s' 'PUT /account/99 12424d8fa15afb4' | openssl dgst -sha256 -hmac 'shared-secret-1' -binary | base64`
    /// and the header with `printf '%s' "12424d8fa15afb4:$sig" | base64 -w0`.
    #[test]
    fn pncp_signature_matches_known_answer() {
        let to_sign = pncp_string_to_sign("PUT", "/account/99", &[], "12424d8fa15afb4");
        assert_eq!(to_sign, "PUT /account/99 12424d8fa15afb4");
        let signature = pncp_signature(b"shared-secret-1", &to_sign);
        assert_eq!(signature, "FEpZjHF46RGvb91Dp5cUaL1VSpIObEuSOVVgG5YDr38=");
        assert_eq!(
            pncp_authorization("12424d8fa15afb4", &signature),
            "PNCP MTI0MjRkOGZhMTVhZmI0OkZFcFpqSEY0NlJHdmI5MURwNWNVYUwxVlNwSU9iRXVTT1ZWZ0c1WURyMzg9"
        );
    }

    #[test]
    fn pncp_query_parameters_are_sorted() {
        let to_sign = pncp_string_to_sign("GET", "/account", &[("z", "1"), ("a", "2")], "k");
        assert_eq!(to_sign, "GET /account?a=2&z=1 k");
    }
}
