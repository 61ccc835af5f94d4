//! The mock's public data types: vendors, injectable faults, recorded requests and accounts.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Which vendor API a request, fault or throttle concerns; one mock serves both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Vendor {
    /// Mimecast API 1.0: `POST /api/account/update-account`.
    Mimecast,
    /// PNCP: `PUT /pncp-external-api-rest/account/{id}` and its tasks.
    Pncp,
}

/// One injected misbehaviour. Faults queue per vendor and each request that passes
/// the vendor's checks consumes the oldest one, so a test can script an outage, a
/// lost answer or a slow call exactly where it wants it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// Answer this status with a vendor-shaped error; the change is not applied.
    Status {
        /// HTTP status to answer (200..=599).
        status: u16,
    },
    /// Answer 429; Mimecast sets `X-RateLimit-Reset: <reset_ms>`, PNCP
    /// `Retry-After: <seconds, rounded up>`; the change is not applied.
    RateLimited {
        /// Milliseconds until the quota "returns".
        reset_ms: u64,
    },
    /// Drop the connection without a response; the change is not applied.
    Drop,
    /// Wait this long, then answer normally.
    Delay {
        /// Extra wait in milliseconds.
        ms: u64,
    },
    /// Mimecast: 200 with every item in `fail`, `retryable: true`
    /// (`err_temporary_failure`). PNCP: 503. The change is not applied.
    RetryableFail,
    /// Apply the change, then answer this status: the "did it happen?" case.
    FailAfterApply {
        /// HTTP status to answer after applying (200..=599).
        status: u16,
    },
    /// Apply the change, then drop the connection without a response.
    DropAfterApply,
    /// PNCP only: answer 202 with a task that reads OPEN for `polls` GETs, then
    /// CLOSED; the change is applied when the task closes successfully.
    AcceptedTask {
        /// Whether the task ends SUCCESSFUL (applied) or FAILED (not applied).
        succeed: bool,
        /// How many GETs read OPEN before the task closes.
        polls: u32,
    },
}

impl Fault {
    /// The fault's `kind` as written in JSON, which is also what
    /// [`RecordedRequest::fault`] holds for the request that consumed it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Status { .. } => "status",
            Self::RateLimited { .. } => "rate_limited",
            Self::Drop => "drop",
            Self::Delay { .. } => "delay",
            Self::RetryableFail => "retryable_fail",
            Self::FailAfterApply { .. } => "fail_after_apply",
            Self::DropAfterApply => "drop_after_apply",
            Self::AcceptedTask { .. } => "accepted_task",
        }
    }
}

/// One request that reached a vendor endpoint, as the mock saw and answered it;
/// the evidence tests and benchmarks check the worker's behaviour against.
/// Headers are not kept, so no `Authorization` value is ever stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordedRequest {
    /// Position in the record, from 1 (restarts after a reset).
    pub seq: u64,
    /// Which vendor endpoint was called.
    pub vendor: Vendor,
    /// HTTP method.
    pub method: String,
    /// Request path as received, PNCP root included, query excluded.
    pub path: String,
    /// Mimecast `x-mc-req-id`; PNCP `x-request-id` if the client sent one.
    pub request_id: Option<String>,
    /// The JSON body, or `null` when absent or unparsable.
    pub body: Value,
    /// Status answered; [`STATUS_DROPPED`] when the connection was dropped on purpose,
    /// [`STATUS_CLIENT_GONE`] when the client went away before the answer was ready.
    pub status: u16,
    /// Whether this request changed an account.
    pub applied: bool,
    /// The consumed fault's kind ([`Fault::kind`]), or `throttled` when the mock's
    /// own throttle answered 429.
    pub fault: Option<String>,
    /// Arrival time in milliseconds since the mock started.
    pub at_ms: u64,
}

/// [`RecordedRequest::status`] of a request whose connection the mock dropped on purpose.
pub const STATUS_DROPPED: u16 = 0;
/// [`RecordedRequest::status`] of a request whose client disconnected (or timed out)
/// before the mock answered; such a request never applies anything.
pub const STATUS_CLIENT_GONE: u16 = 499;

/// A Mimecast customer account as the mock keeps it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MimecastAccount {
    /// The account code items address.
    pub account_code: String,
    /// Last `accountName` set.
    pub account_name: Option<String>,
    /// Last `contactName` set.
    pub contact_name: Option<String>,
    /// Last `contactEmail` set.
    pub contact_email: Option<String>,
    /// Last `telephone` set.
    pub telephone: Option<String>,
    /// Sum of every applied `numberOfUsers`: the additive field double-applies would inflate.
    pub user_count: i64,
    /// Last `products` set (replaced as a whole).
    pub products: Vec<i64>,
}

impl MimecastAccount {
    /// A fresh account: no users, no products (every code but `MISSING*` exists).
    pub(super) fn new(code: &str) -> Self {
        Self {
            account_code: code.to_owned(),
            ..Self::default()
        }
    }
}
