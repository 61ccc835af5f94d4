//! Wire types of the job contract: parsing and validation of jobs, and the result shape.
//!
//! A delivery becomes a [`Job`] here or nothing does: malformed messages are
//! refused as a whole ([`Malformed`]), while an invalid item is set aside with an
//! `err_validation_<field>` error so that it never reaches a vendor and the
//! valid items of the same job still run.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

mod replay;
mod validate;

pub use replay::{
    OutcomeId, ReplayClaim, OUTCOME_ID_HEADER, REPLAY_ID_HEADER, REPLAY_ORIGIN_HEADER,
    RUN_REPLAY_ID_HEADER,
};
pub use validate::{MIMECAST_FIELDS, PNCP_FIELDS};

/// Largest message body accepted; a real job of 100 items is far below it.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Most items one job may carry.
pub const MAX_ITEMS: usize = 100;
/// Longest `jobId`.
pub const MAX_JOB_ID_CHARS: usize = 200;

/// The vendor a job is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VendorKind {
    /// Mimecast API 1.0 update-account.
    Mimecast,
    /// PNCP Modify Account.
    Pncp,
}

impl VendorKind {
    /// The name used in jobs, results, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mimecast => "mimecast",
            Self::Pncp => "pncp",
        }
    }
}

impl fmt::Display for VendorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A job id: non-empty, at most [`MAX_JOB_ID_CHARS`] characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct JobId(String);

impl JobId {
    /// Accepts a candidate id, or says why not.
    pub fn parse(value: &str) -> Result<Self, String> {
        let chars = value.chars().count();
        if chars == 0 || chars > MAX_JOB_ID_CHARS {
            return Err(format!(
                "jobId must be 1 to {MAX_JOB_ID_CHARS} characters, got {chars}"
            ));
        }
        // It becomes the result's AMQP correlation_id, a short string of at most
        // 255 bytes: 200 multi-byte characters can exceed that.
        if value.len() > 255 {
            return Err(format!(
                "jobId must be at most 255 bytes in UTF-8, got {}",
                value.len()
            ));
        }
        Ok(Self(value.to_owned()))
    }

    /// The ledger key of the replay of this job's dead letter whose stored outcome
    /// is `outcome`: a new attempt at the change, so it must not find the failed
    /// outcome, and one key per dead letter, so every copy of it and every run of
    /// `dlq replay` over it finds the first replay's outcome instead of applying
    /// the change again.
    pub fn replayed(&self, outcome: &OutcomeId) -> Self {
        Self(format!("{}#replay:{outcome}", self.0))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One validated item, kept as the JSON object the producer sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// Position in the job's `data`, to keep results in the producer's order.
    pub index: usize,
    /// The account the item changes (`accountCode` or `accountId`).
    pub account: String,
    /// The item exactly as sent.
    pub body: Map<String, Value>,
}

impl Item {
    /// Whether resending this item after an unknown outcome could apply it twice.
    ///
    /// Only Mimecast's `numberOfUsers` is additive; every other field replaces.
    pub fn is_additive(&self) -> bool {
        self.body
            .get("numberOfUsers")
            .and_then(Value::as_i64)
            .is_some_and(|n| n != 0)
    }

    /// The item as JSON, for `fail[].key` and dead letters.
    pub fn to_value(&self) -> Value {
        Value::Object(self.body.clone())
    }
}

/// A parsed job: valid items to send, and items refused by validation.
#[derive(Debug, Clone)]
pub struct Job {
    /// The producer's id for this change.
    pub id: JobId,
    /// The key of this job in the idempotency ledger: the id, or the id and a
    /// replay id when an operator replayed it from the dead-letter queue.
    pub ledger_key: JobId,
    /// The replay id this run is under, when it replays a verified dead letter:
    /// its own dead letters say so (`x-run-replay-id`), so they can be replayed
    /// in turn.
    pub replay: Option<OutcomeId>,
    /// Which vendor the items go to.
    pub vendor: VendorKind,
    /// Items that passed validation, in order.
    pub items: Vec<Item>,
    /// Items that failed validation, with their errors, in order.
    pub rejected: Vec<(usize, FailEntry)>,
    /// SHA-256 (hex) of the canonical vendor and `data` (object keys sorted, no
    /// whitespace): the ledger keeps the fingerprint of the body it accepted, so
    /// a different body under a known `jobId` is a conflict, never resumed onto
    /// another item's progress.
    pub fingerprint: String,
}

impl Job {
    /// Runs this job as the replay of the dead letter whose outcome id is `outcome`.
    pub fn replay_as(&mut self, outcome: OutcomeId) {
        self.ledger_key = self.id.replayed(&outcome);
        self.replay = Some(outcome);
    }
}

/// A message that is not a job at all; it is dead-lettered byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    /// The job id, when one could be read.
    pub job_id: Option<JobId>,
    /// The vendor as written, when it was a string, so the result names it.
    pub vendor: Option<String>,
    /// What is wrong, for `x-error-message`.
    pub reason: String,
}

/// Longest reason a log line carries: the full one, which may quote a field name
/// or vendor string of any length, stays in the result and the dead letter.
const MAX_LOGGED_REASON_BYTES: usize = 1024;

impl Malformed {
    /// The reason cut to [`MAX_LOGGED_REASON_BYTES`] (on a character boundary,
    /// ending in `...[truncated]`), so a hostile message cannot make a huge log line.
    pub fn logged_reason(&self) -> std::borrow::Cow<'_, str> {
        if self.reason.len() <= MAX_LOGGED_REASON_BYTES {
            return std::borrow::Cow::Borrowed(&self.reason);
        }
        let mut end = MAX_LOGGED_REASON_BYTES;
        while !self.reason.is_char_boundary(end) {
            end -= 1;
        }
        std::borrow::Cow::Owned(format!("{}...[truncated]", &self.reason[..end]))
    }
}

/// One error of one item, as Mimecast reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemError {
    /// Vendor code passed through unchanged, or one of the worker's `err_` codes.
    pub code: String,
    /// Human-readable reason.
    #[serde(default)]
    pub message: String,
    /// Whether sending the item again could succeed.
    #[serde(default)]
    pub retryable: bool,
}

impl ItemError {
    /// A permanent error with the worker's own code.
    pub fn permanent(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            retryable: false,
        }
    }
}

/// One failed item: the item as sent and why it failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailEntry {
    /// The item as sent (or as received, when it never was).
    pub key: Value,
    /// At least one error.
    pub errors: Vec<ItemError>,
}

/// The overall outcome of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Every item succeeded.
    Succeeded,
    /// Some items succeeded, some failed.
    Partial,
    /// No item succeeded.
    Failed,
}

impl JobStatus {
    /// Derives the status from the counts of succeeded and failed items.
    pub fn from_counts(succeeded: usize, failed: usize) -> Self {
        match (succeeded, failed) {
            (_, 0) if succeeded > 0 => Self::Succeeded,
            (0, _) => Self::Failed,
            _ => Self::Partial,
        }
    }

    /// The name used in results and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Partial => "partial",
            Self::Failed => "failed",
        }
    }
}

/// `meta` of a result: the last HTTP status the vendor answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultMeta {
    /// HTTP status of the last vendor response, or the status the worker
    /// answered in the vendor's place (400 when nothing was valid to send).
    pub status: u16,
}

/// The one result published per job on `<JOBS_QUEUE>.results`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobResult {
    /// The job's id (also the message's `correlation_id`).
    pub job_id: String,
    /// The job's vendor, as the job named it.
    pub vendor: String,
    /// Overall outcome.
    pub status: JobStatus,
    /// Last vendor HTTP status.
    pub meta: ResultMeta,
    /// The vendor's data element for each item that succeeded.
    pub data: Vec<Value>,
    /// Each item that failed, with its errors.
    pub fail: Vec<FailEntry>,
    /// Vendor attempts made (0 when nothing was sent).
    pub attempts: u32,
}

impl JobResult {
    /// The first error code of the first failed item: the dead letter's `x-error-code`.
    pub fn first_error(&self) -> Option<&ItemError> {
        self.fail.first().and_then(|f| f.errors.first())
    }
}

/// Deepest nesting of an invalid item echoed as JSON into a result, a dead
/// letter and the ledger; deeper ones are echoed as (truncated) text. The
/// ledger wraps an echoed item in a few levels of its own, and a stored outcome
/// past serde_json's limit of 128 could never be read back.
pub const MAX_ECHO_DEPTH: usize = 16;
/// Longest text an over-deep echoed value is cut to.
const MAX_ECHO_TEXT: usize = 4096;

/// `value` as it may be echoed and stored: itself when at most
/// [`MAX_ECHO_DEPTH`] levels deep, else its JSON text, cut to a bounded length.
pub fn bounded_echo(value: Value) -> Value {
    if depth(&value) <= MAX_ECHO_DEPTH {
        return value;
    }
    let mut text = value.to_string();
    if text.len() > MAX_ECHO_TEXT {
        let mut cut = MAX_ECHO_TEXT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("…(truncated)");
    }
    Value::String(text)
}

/// Nesting depth of a JSON value (a scalar is 0). Bounded by the parser's own
/// limit, so the recursion is too.
fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(fields) => 1 + fields.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// The fingerprint of a job body (see [`Job::fingerprint`]).
pub fn fingerprint(vendor: &str, data: &[Value]) -> String {
    use sha2::{Digest, Sha256};
    let mut canonical = String::new();
    write_canonical(&Value::String(vendor.to_owned()), &mut canonical);
    canonical.push(',');
    for item in data {
        write_canonical(item, &mut canonical);
        canonical.push(',');
    }
    Sha256::digest(canonical.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Compact JSON with object keys sorted: key order and whitespace never change
/// a fingerprint.
fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(fields) => {
            let mut keys: Vec<&String> = fields.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                if let Some(field) = fields.get(key) {
                    write_canonical(field, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// Parses and validates one message body.
pub fn parse(body: &[u8]) -> Result<Job, Malformed> {
    validate::parse_job(body)
}
