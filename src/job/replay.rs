//! The identity of a dead letter, which its replay runs under, and the headers
//! that carry it from the dead letter through `dlq replay` back to the worker.
//!
//! A replay's ledger entry is keyed by the dead letter it replays, never by a
//! random id: every copy of a dead letter (the first publish, each republish of
//! the stored outcome, a copy left behind by a replay killed before its ack)
//! names the same stored outcome, so however many copies are replayed and
//! however often, they all land on one ledger entry and the change is applied
//! at most once.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Dead-letter header: the id of the stored outcome the dead letter belongs to.
pub const OUTCOME_ID_HEADER: &str = "x-outcome-id";
/// Dead-letter header, set when the run that produced the dead letter was itself a
/// replay: that run's replay id, which locates its ledger entry.
pub const RUN_REPLAY_ID_HEADER: &str = "x-run-replay-id";
/// Replay header: the replay's id, the outcome id of the dead letter it replays.
pub const REPLAY_ID_HEADER: &str = "x-replay-id";
/// Replay header, set when the replayed dead letter came from a replayed run: that
/// run's replay id (the dead letter's `x-run-replay-id`), so the worker knows which
/// ledger entry holds the stored outcome to check the replay against.
pub const REPLAY_ORIGIN_HEADER: &str = "x-replay-origin";

/// Longest outcome id accepted from a header: a UUID is 36 characters, a content
/// id 39.
const MAX_CHARS: usize = 64;
/// Hex digits of the SHA-256 kept in a content id (128 bits).
const CONTENT_HEX: usize = 32;

/// The identity of one stored outcome with a dead letter, and so the id of that
/// dead letter's replay: printable ASCII (letters, digits, `-`), 1 to 64
/// characters, so it is safe in a header and a ledger key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OutcomeId(String);

impl OutcomeId {
    /// A new id for an outcome being stored now.
    pub fn new() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }

    /// The id of a dead letter that carries no outcome id (stored before outcome
    /// ids existed, or a malformed message, which is never stored): derived from
    /// what every copy of it has in common, its job, the run that produced it and
    /// its body, so `dlq replay` and the worker compute the same id.
    pub fn of_content(job_id: Option<&str>, run: Option<&OutcomeId>, body: &[u8]) -> Self {
        let mut hash = Sha256::new();
        // Each part is length-prefixed, so no two different inputs can run together.
        for part in [
            job_id.unwrap_or("").as_bytes(),
            run.map_or("", |r| r.as_str()).as_bytes(),
            body,
        ] {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part);
        }
        let digest = hash.finalize();
        let hex: String = digest
            .iter()
            .flat_map(|byte| [byte >> 4, byte & 0xf])
            .take(CONTENT_HEX)
            .map(|nibble| char::from_digit(u32::from(nibble), 16).unwrap_or('0'))
            .collect();
        Self(format!("sha256-{hex}"))
    }

    /// Accepts an id read from a header or the ledger, or says why not.
    pub fn parse(value: &str) -> Result<Self, String> {
        let chars = value.chars().count();
        if chars == 0 || chars > MAX_CHARS {
            return Err(format!("must be 1 to {MAX_CHARS} characters, got {chars}"));
        }
        if !value.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err("may hold only letters, digits and '-'".to_owned());
        }
        Ok(Self(value.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for OutcomeId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for OutcomeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for OutcomeId {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<OutcomeId> for String {
    fn from(id: OutcomeId) -> Self {
        id.0
    }
}

/// What a delivery's replay headers claim, as read and not yet believed: the
/// pipeline honours it only if it names a dead letter the ledger stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayClaim {
    /// `x-replay-id`.
    pub id: String,
    /// `x-replay-origin`, when set.
    pub origin: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_outcome_ids_are_distinct_and_parse_back() {
        let (a, b) = (OutcomeId::new(), OutcomeId::new());
        assert_ne!(a, b);
        assert_eq!(OutcomeId::parse(a.as_str()), Ok(a));
    }

    #[test]
    fn a_content_id_depends_on_job_run_and_body_and_nothing_else() {
        let body = br#"{"jobId":"j","vendor":"mimecast","data":[]}"#;
        let id = OutcomeId::of_content(Some("j"), None, body);
        assert_eq!(id, OutcomeId::of_content(Some("j"), None, body), "stable");
        assert!(id.as_str().starts_with("sha256-") && id.as_str().len() == 39);
        assert_eq!(OutcomeId::parse(id.as_str()), Ok(id.clone()));
        assert_ne!(id, OutcomeId::of_content(Some("k"), None, body));
        assert_ne!(id, OutcomeId::of_content(None, None, body));
        let run = OutcomeId::new();
        assert_ne!(id, OutcomeId::of_content(Some("j"), Some(&run), body));
        assert_ne!(id, OutcomeId::of_content(Some("j"), None, b"other"));
        // Parts cannot run together: ("ab", "") is not ("a", "b").
        assert_ne!(
            OutcomeId::of_content(Some("ab"), None, b""),
            OutcomeId::of_content(Some("a"), None, b"b")
        );
    }

    #[test]
    fn ids_that_are_not_short_printable_tokens_are_refused() {
        for bad in ["", "a b", "x#replay:y", "é", &"a".repeat(65), "a\r\nb"] {
            assert!(OutcomeId::parse(bad).is_err(), "{bad:?}");
        }
        assert!(OutcomeId::parse(&"a".repeat(64)).is_ok());
    }

    #[test]
    fn a_stored_id_that_is_not_valid_does_not_deserialize() {
        assert!(serde_json::from_str::<OutcomeId>("\"no spaces\"").is_err());
        let id: OutcomeId = serde_json::from_str("\"abc-123\"").expect("valid");
        assert_eq!(
            serde_json::to_string(&id).expect("serialize"),
            "\"abc-123\""
        );
    }
}
