//! Label values from bounded sets, so no input can grow `/metrics` without limit.
//!
//! A Prometheus family keeps every label value it has seen for the life of the
//! process. A job's `vendor` string and its field names are the producer's own,
//! and vendor codes are the vendor's, so each is folded here into a fixed set
//! (anything else becomes `other`). The metrics methods call these for every
//! label, and no caller can hand a raw string to a family.

use std::collections::HashSet;
use std::sync::Mutex;

use crate::job::{MIMECAST_FIELDS, PNCP_FIELDS};

/// The value every unknown label folds into.
pub(super) const OTHER: &str = "other";

/// Distinct vendor error codes kept as labels before the rest fold into `other`.
pub(super) const MAX_VENDOR_CODES: usize = 32;

/// Longest vendor code kept as a label.
const MAX_VENDOR_CODE_BYTES: usize = 64;

/// The worker's own error codes (besides `err_validation_<field>`).
const WORKER_CODES: &[&str] = &[
    "err_job_malformed",
    "err_retries_exhausted",
    "err_outcome_unknown",
    "err_vendor_not_configured",
    "err_job_conflict",
    "err_poison_message",
    "err_publish_failed",
    "err_invalid_access_key",
    "err_request_not_built",
];

/// A job's vendor as written: `mimecast`, `pncp` or `other`.
pub(super) fn vendor(text: &str) -> &'static str {
    match text {
        "mimecast" => "mimecast",
        "pncp" => "pncp",
        _ => OTHER,
    }
}

/// A job's outcome: one of the result statuses, `malformed`, or `other`.
pub(super) fn job_outcome(text: &str) -> &'static str {
    match text {
        "succeeded" => "succeeded",
        "partial" => "partial",
        "failed" => "failed",
        "malformed" => "malformed",
        _ => OTHER,
    }
}

/// A vendor call's status: an HTTP status (100-599), what happened instead of
/// one, or `other`.
pub(super) fn call_status(text: &str) -> String {
    match text {
        "unreachable" | "interrupted" | "timeout" | "task_open" | "not_sent" => text.to_owned(),
        _ if is_http_status(text) => text.to_owned(),
        _ => OTHER.to_owned(),
    }
}

fn is_http_status(text: &str) -> bool {
    text.len() == 3
        && text.bytes().all(|b| b.is_ascii_digit())
        && matches!(text.as_bytes()[0], b'1'..=b'5')
}

/// Error codes as labels: the worker's own codes, `err_validation_<known field>`,
/// `err_http_<status>`, and the first [`MAX_VENDOR_CODES`] distinct vendor codes
/// of a plain shape (lower-case letters, digits, `_`); anything else is `other`.
#[derive(Debug, Default)]
pub(super) struct Codes {
    vendor_codes: Mutex<HashSet<String>>,
}

impl Codes {
    /// The label for `code`.
    pub(super) fn label(&self, code: &str) -> String {
        if WORKER_CODES.contains(&code) {
            return code.to_owned();
        }
        if let Some(field) = code.strip_prefix("err_validation_") {
            let known =
                field == "item" || MIMECAST_FIELDS.contains(&field) || PNCP_FIELDS.contains(&field);
            return if known { code } else { OTHER }.to_owned();
        }
        if let Some(status) = code.strip_prefix("err_http_") {
            return if is_http_status(status) { code } else { OTHER }.to_owned();
        }
        let plain = !code.is_empty()
            && code.len() <= MAX_VENDOR_CODE_BYTES
            && code
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !plain {
            return OTHER.to_owned();
        }
        let mut seen = self.vendor_codes.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(code) {
            return code.to_owned();
        }
        if seen.len() < MAX_VENDOR_CODES {
            seen.insert(code.to_owned());
            return code.to_owned();
        }
        OTHER.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_producers_vendor_string_folds_into_other() {
        assert_eq!(vendor("mimecast"), "mimecast");
        assert_eq!(vendor("pncp"), "pncp");
        assert_eq!(vendor(&"v".repeat(200_000)), OTHER);
        assert_eq!(vendor("unknown"), OTHER);
    }

    #[test]
    fn codes_outside_the_known_set_fold_into_other() {
        let codes = Codes::default();
        for kept in [
            "err_job_malformed",
            "err_validation_accountCode",
            "err_validation_email",
            "err_validation_item",
            "err_http_404",
            "err_account_not_found",
        ] {
            assert_eq!(codes.label(kept), kept);
        }
        for folded in [
            "err_validation_color",
            "err_http_4040",
            "err_http_abc",
            "Err Weird\n",
            "",
        ] {
            assert_eq!(codes.label(folded), OTHER, "{folded:?}");
        }
    }

    #[test]
    fn only_a_few_distinct_vendor_codes_become_labels() {
        let codes = Codes::default();
        let labels: HashSet<String> = (0..1000)
            .map(|n| codes.label(&format!("err_vendor_{n}")))
            .collect();
        assert_eq!(labels.len(), MAX_VENDOR_CODES + 1);
        assert!(labels.contains(OTHER));
        // A code seen before the cap keeps its label.
        assert_eq!(codes.label("err_vendor_0"), "err_vendor_0");
    }

    #[test]
    fn call_statuses_are_http_statuses_or_named_events() {
        assert_eq!(call_status("200"), "200");
        assert_eq!(call_status("timeout"), "timeout");
        assert_eq!(call_status("0"), OTHER);
        assert_eq!(call_status("999"), OTHER);
    }
}
