//! Whether a message's replay headers are believed: a replay runs under its own
//! ledger entry only when it is a dead letter the ledger stored, so that no one
//! can bypass the ledger by setting `x-replay-id`, and each dead letter is
//! applied at most once however many copies of it are replayed.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{Pipeline, Stop};
use crate::job::{Job, JobId, OutcomeId, ReplayClaim};
use crate::ledger::{Entry, LedgerError, Stored, StoredDeadLetter};

/// Why the ledger does not vouch for a replay.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Refusal {
    /// There is no entry where the replayed dead letter's outcome would be
    /// stored: it was never stored here, or it is past `LEDGER_RETENTION`.
    NoOrigin,
    /// The entry is there and does not hold this dead letter.
    Mismatch(&'static str),
}

/// The outcome id of a stored dead letter: the one stored with it, or, for one
/// stored before outcome ids existed, the id derived from its content (the same
/// derivation `dlq replay` makes from the dead letter's headers and body).
pub(crate) fn stored_identity(stored: &StoredDeadLetter, job_id: &JobId) -> OutcomeId {
    stored.outcome_id.clone().unwrap_or_else(|| {
        OutcomeId::of_content(
            Some(job_id.as_str()),
            stored.run_replay_id.as_ref(),
            stored.body.as_bytes(),
        )
    })
}

/// Checks a replay claiming `id` against `origin`, the entry of the run whose
/// stored outcome it says it replays: that run must have finished with a dead
/// letter whose outcome id is `id` and whose body is `body`, byte for byte.
fn check_origin(
    id: &OutcomeId,
    job_id: &JobId,
    body: &[u8],
    origin: Option<&Entry>,
) -> Result<(), Refusal> {
    let origin = origin.ok_or(Refusal::NoOrigin)?;
    let finished = origin.finished.as_ref().ok_or(Refusal::Mismatch(
        "the run it names has no stored outcome yet, so it produced no dead letter",
    ))?;
    let stored = finished.dead_letter.as_ref().ok_or(Refusal::Mismatch(
        "the stored outcome it names has no dead letter",
    ))?;
    if stored_identity(stored, job_id) != *id {
        return Err(Refusal::Mismatch(
            "it is not the outcome id of the stored dead letter (it was not set by `dlq replay`)",
        ));
    }
    if stored.body.as_bytes() != body {
        return Err(Refusal::Mismatch(
            "the message body is not the stored dead letter's body",
        ));
    }
    Ok(())
}

/// A header value as a log shows it: at most 64 characters, escaped.
fn shown(value: &str) -> String {
    let head: String = value.chars().take(64).collect();
    format!("{head:?}")
}

impl Pipeline {
    /// The outcome id `job` runs under as a replay, or `None` when its replay
    /// headers are not believed (each reason is logged) and it is processed as a
    /// plain copy of its job: a finished job's stored outcome is published again
    /// and nothing is sent. `Err` when the worker stops while the ledger cannot
    /// be read.
    ///
    /// Believed are replays the ledger vouches for: the run the dead letter came
    /// from (the job's own run, or the replay `x-replay-origin` names) stored it
    /// with this outcome id and this body; or the replay's own entry exists, so
    /// a replay of this dead letter was believed before (its origin may have
    /// expired since, and its own entry must be found again, not started over).
    pub(super) async fn verified_replay(
        &self,
        job: &Job,
        body: &[u8],
        claim: &ReplayClaim,
        stopping: &CancellationToken,
    ) -> Result<Option<OutcomeId>, Stop> {
        let ignore = |reason: String| {
            warn!(
                replay_id = %shown(&claim.id),
                reason,
                "x-replay-id not honoured: processing the message as a plain copy of its job (if it finished, its stored outcome is published again and nothing is sent); replay dead letters with `account-worker dlq replay`"
            );
            Ok(None)
        };
        let id = match OutcomeId::parse(&claim.id) {
            Ok(id) => id,
            Err(why) => return ignore(format!("x-replay-id {why}")),
        };
        let origin = match claim.origin.as_deref().map(OutcomeId::parse).transpose() {
            Ok(origin) => origin,
            Err(why) => return ignore(format!("x-replay-origin {why}")),
        };
        let origin_key = origin
            .as_ref()
            .map_or_else(|| job.id.clone(), |run| job.id.replayed(run));
        let refusal = match self.read_entry(&origin_key, stopping).await? {
            Ok(entry) => match check_origin(&id, &job.id, body, entry.as_ref()) {
                Ok(()) => {
                    info!(replay_id = %id, "replaying a stored dead letter under its own ledger entry");
                    return Ok(Some(id));
                }
                Err(Refusal::NoOrigin) => format!(
                    "the ledger holds no outcome of {origin_key} (never finished on this ledger, or older than LEDGER_RETENTION)"
                ),
                Err(Refusal::Mismatch(why)) => why.to_owned(),
            },
            Err(e) => format!("the ledger entry to check it against is unreadable ({e})"),
        };
        match self.read_entry(&job.id.replayed(&id), stopping).await? {
            Ok(Some(_)) => {
                info!(replay_id = %id, "this dead letter's replay already has a ledger entry; going on with it");
                Ok(Some(id))
            }
            _ => ignore(refusal),
        }
    }

    /// Reads one ledger entry, waiting while the ledger is unavailable; an
    /// unreadable entry is returned as its error. `Err` when the worker stops.
    async fn read_entry(
        &self,
        key: &JobId,
        stopping: &CancellationToken,
    ) -> Result<Result<Option<Entry>, LedgerError>, Stop> {
        let mut wait = Duration::from_millis(50);
        loop {
            match self.ledger.get(key).await {
                Ok(Stored::Present(entry)) => {
                    self.metrics.ledger_ok();
                    return Ok(Ok(Some(entry)));
                }
                Ok(Stored::Absent) => {
                    self.metrics.ledger_ok();
                    return Ok(Ok(None));
                }
                Ok(Stored::Unreadable(reason)) => {
                    self.metrics.ledger_ok();
                    return Ok(Err(LedgerError::Corrupt {
                        job_id: key.to_string(),
                        reason,
                    }));
                }
                Err(e @ LedgerError::Corrupt { .. }) => return Ok(Err(e)),
                Err(e) => {
                    self.metrics.ledger_failed(e.to_string());
                    error!(error = %e, "ledger unavailable; the replay waits to be checked");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stopping.cancelled() => return Err(Stop::UNTOUCHED),
            }
            wait = (wait * 2).min(Duration::from_secs(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{JobResult, JobStatus, ResultMeta};
    use crate::ledger::{Finished, Progress};

    const BODY: &str =
        r#"{"jobId":"j-1","vendor":"mimecast","data":[{"accountCode":"A","numberOfUsers":5}]}"#;

    fn job_id() -> JobId {
        JobId::parse("j-1").expect("valid")
    }

    fn stored(outcome_id: Option<OutcomeId>) -> StoredDeadLetter {
        StoredDeadLetter {
            body: BODY.to_owned(),
            error_code: "err_http_400".to_owned(),
            error_message: "bad request".to_owned(),
            attempts: 1,
            outcome_id,
            run_replay_id: None,
        }
    }

    fn entry(dead_letter: Option<StoredDeadLetter>, finished: bool) -> Entry {
        Entry {
            owner: String::new(),
            lease_until_ms: 0,
            deliveries: 1,
            progress: Progress::default(),
            finished: finished.then(|| Finished {
                result: JobResult {
                    job_id: "j-1".to_owned(),
                    vendor: "mimecast".to_owned(),
                    status: JobStatus::Failed,
                    meta: ResultMeta { status: 400 },
                    data: Vec::new(),
                    fail: Vec::new(),
                    attempts: 1,
                },
                dead_letter,
            }),
            fingerprint: None,
            granted: None,
            lost: false,
        }
    }

    #[test]
    fn a_replay_of_the_stored_dead_letter_is_believed() {
        let id = OutcomeId::new();
        let origin = entry(Some(stored(Some(id.clone()))), true);
        assert_eq!(
            check_origin(&id, &job_id(), BODY.as_bytes(), Some(&origin)),
            Ok(())
        );
    }

    #[test]
    fn an_id_the_ledger_did_not_store_is_refused() {
        let origin = entry(Some(stored(Some(OutcomeId::new()))), true);
        let forged = OutcomeId::new();
        assert!(matches!(
            check_origin(&forged, &job_id(), BODY.as_bytes(), Some(&origin)),
            Err(Refusal::Mismatch(_))
        ));
    }

    #[test]
    fn a_replay_id_on_a_job_without_a_dead_letter_or_not_finished_is_refused() {
        let id = OutcomeId::new();
        for origin in [
            entry(None, true),
            entry(Some(stored(Some(id.clone()))), false),
        ] {
            assert!(matches!(
                check_origin(&id, &job_id(), BODY.as_bytes(), Some(&origin)),
                Err(Refusal::Mismatch(_))
            ));
        }
    }

    #[test]
    fn a_stored_id_on_another_body_is_refused() {
        let id = OutcomeId::new();
        let origin = entry(Some(stored(Some(id.clone()))), true);
        let other = BODY.replace("5", "50");
        assert!(matches!(
            check_origin(&id, &job_id(), other.as_bytes(), Some(&origin)),
            Err(Refusal::Mismatch(_))
        ));
    }

    #[test]
    fn a_missing_origin_is_told_apart_from_a_mismatch() {
        assert_eq!(
            check_origin(&OutcomeId::new(), &job_id(), BODY.as_bytes(), None),
            Err(Refusal::NoOrigin)
        );
    }

    #[test]
    fn a_dead_letter_stored_before_outcome_ids_is_believed_by_its_content_id() {
        let origin = entry(Some(stored(None)), true);
        // What `dlq replay` derives from such a dead letter's x-job-id and body.
        let id = OutcomeId::of_content(Some("j-1"), None, BODY.as_bytes());
        assert_eq!(
            check_origin(&id, &job_id(), BODY.as_bytes(), Some(&origin)),
            Ok(())
        );
    }

    #[test]
    fn an_old_entry_still_reads_and_its_dead_letter_has_no_outcome_id() {
        let old = r#"{"body":"{}","error_code":"err_x","error_message":"m","attempts":2}"#;
        let letter: StoredDeadLetter = serde_json::from_str(old).expect("old entries read");
        assert_eq!((letter.outcome_id, letter.run_replay_id), (None, None));
    }
}
