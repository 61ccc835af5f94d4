//! The idempotency ledger: who is processing a job, what its items' progress is,
//! and its final outcome, keyed by `jobId`.
//!
//! It is what keeps a change from being applied twice when the same job arrives
//! again (producer retry, broker redelivery, a crash between confirm and ack): a
//! finished job's stored outcome is republished, a job another delivery holds is
//! waited for, and a job whose processing was interrupted resumes from its last
//! checkpoint with every in-flight additive item reported as an unknown outcome.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{LedgerLocation, LedgerSettings};
use crate::job::{FailEntry, JobId, JobResult, OutcomeId};
use crate::pipeline::DeadLetter;

mod file;
mod redis;

pub use file::FileLedger;
pub use redis::RedisLedger;

/// A ledger operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The embedded store could not be opened or written.
    #[error("embedded ledger at {path}: {reason}")]
    File {
        /// The store's path.
        path: String,
        /// What went wrong and what to do.
        reason: String,
    },
    /// Redis could not be reached or refused a command.
    #[error("redis ledger: {0}; check LEDGER_URL and that Redis is running")]
    Redis(String),
    /// Another delivery took this job's lease (this one stalled past it): this
    /// delivery must stop and leave the job to the new owner.
    #[error("job {job_id}: another delivery took over its lease; handing this delivery back")]
    LeaseLost {
        /// The job.
        job_id: String,
    },
    /// A stored entry could not be read back.
    #[error("ledger entry for job {job_id} is unreadable: {reason}")]
    Corrupt {
        /// The job.
        job_id: String,
        /// The decoding error.
        reason: String,
    },
}

/// Item-by-item progress of a job, checkpointed around every vendor call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Item index -> the vendor's data element.
    pub succeeded: BTreeMap<usize, Value>,
    /// Item index -> the failure.
    pub failed: BTreeMap<usize, FailEntry>,
    /// Item indices sent in a call whose outcome is not recorded yet.
    pub in_flight: Vec<usize>,
    /// Vendor attempts made so far.
    pub attempts: u32,
    /// Last vendor HTTP status.
    pub last_http_status: Option<u16>,
}

/// The stored outcome of a finished job: published again, byte for byte the same,
/// whenever the job is delivered again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finished {
    /// The job's result.
    pub result: JobResult,
    /// The dead letter of its failed items, if any.
    pub dead_letter: Option<StoredDeadLetter>,
}

/// A dead letter as stored in the ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredDeadLetter {
    /// The dead letter's body as JSON text.
    pub body: String,
    /// `x-error-code`.
    pub error_code: String,
    /// `x-error-message`.
    pub error_message: String,
    /// `x-attempts`.
    pub attempts: u32,
    /// `x-outcome-id`: what its replay is keyed by. `None` in entries stored
    /// before outcome ids existed; their replays are keyed by the dead letter's
    /// content instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome_id: Option<OutcomeId>,
    /// `x-run-replay-id`: the replay id of the run that stored it, when that run
    /// was a replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_replay_id: Option<OutcomeId>,
}

impl StoredDeadLetter {
    /// Stores a dead letter (its body is the JSON the pipeline built).
    pub fn from_letter(letter: &DeadLetter) -> Self {
        Self {
            body: String::from_utf8_lossy(&letter.body).into_owned(),
            error_code: letter.error_code.clone(),
            error_message: letter.error_message.clone(),
            attempts: letter.attempts,
            outcome_id: letter.outcome_id.clone(),
            run_replay_id: letter.run_replay_id.clone(),
        }
    }

    /// The dead letter to publish again.
    pub fn to_letter(&self, job_id: &str) -> DeadLetter {
        DeadLetter {
            body: self.body.clone().into_bytes(),
            error_code: self.error_code.clone(),
            error_message: self.error_message.clone(),
            attempts: self.attempts,
            job_id: Some(job_id.to_owned()),
            outcome_id: self.outcome_id.clone(),
            run_replay_id: self.run_replay_id.clone(),
        }
    }
}

/// One job's entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The delivery holding the lease.
    pub owner: String,
    /// Unix milliseconds until which the lease holds.
    pub lease_until_ms: u64,
    /// Deliveries that took the lease, this one included.
    pub deliveries: u32,
    /// Progress so far.
    pub progress: Progress,
    /// Set once the job is finished.
    pub finished: Option<Finished>,
}

/// What a delivery may do with its job.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// This delivery holds the lease; resume from `progress` (empty for a new job).
    Owned {
        /// Progress left by an interrupted delivery, if any.
        progress: Progress,
        /// Deliveries that took the lease, this one included.
        deliveries: u32,
        /// The claim stored the first call's in-flight marker with the lease,
        /// so that call may go without a checkpoint of its own.
        marked: bool,
    },
    /// The job is finished: publish this again.
    Done(Box<Finished>),
    /// Another delivery holds a live lease: wait for its outcome.
    Busy,
}

/// Decides a claim from the current entry; returns the entry to store, if it changes.
/// Shared by both backends so they cannot disagree.
///
/// `first_marker` is stored as the progress of a job with nothing recorded yet
/// (seen for the first time, or handed back before any call): the in-flight
/// marker of its first call, saved in the same write. The claim says whether it
/// stored it; a caller must not infer that from the delivery count, since a
/// hand-back takes that count back down.
pub fn decide_claim(
    current: Option<Entry>,
    owner: &str,
    now_ms: u64,
    lease: Duration,
    first_marker: Option<&Progress>,
) -> (Claim, Option<Entry>) {
    let lease_until_ms = now_ms + lease.as_millis() as u64;
    match current {
        None => (
            Claim::Owned {
                progress: Progress::default(),
                deliveries: 1,
                marked: first_marker.is_some(),
            },
            Some(Entry {
                owner: owner.to_owned(),
                lease_until_ms,
                deliveries: 1,
                progress: first_marker.cloned().unwrap_or_default(),
                finished: None,
            }),
        ),
        Some(Entry {
            finished: Some(finished),
            ..
        }) => (Claim::Done(Box::new(finished)), None),
        Some(entry) if entry.owner != owner && entry.lease_until_ms > now_ms => (Claim::Busy, None),
        Some(mut entry) => {
            entry.deliveries = entry.deliveries.saturating_add(1);
            entry.owner = owner.to_owned();
            entry.lease_until_ms = lease_until_ms;
            let progress = entry.progress.clone();
            let marked = match first_marker {
                Some(marker) if progress == Progress::default() => {
                    entry.progress = marker.clone();
                    true
                }
                _ => false,
            };
            (
                Claim::Owned {
                    progress,
                    deliveries: entry.deliveries,
                    marked,
                },
                Some(entry),
            )
        }
    }
}

/// Records progress if this delivery still owns the job, extending its lease.
pub fn decide_checkpoint(
    current: Option<Entry>,
    job_id: &str,
    owner: &str,
    progress: &Progress,
    now_ms: u64,
    lease: Duration,
) -> (Result<(), LedgerError>, Option<Entry>) {
    match current {
        Some(mut entry) if entry.owner == owner && entry.finished.is_none() => {
            entry.progress = progress.clone();
            entry.lease_until_ms = entry.lease_until_ms.max(now_ms + lease.as_millis() as u64);
            (Ok(()), Some(entry))
        }
        _ => (
            Err(LedgerError::LeaseLost {
                job_id: job_id.to_owned(),
            }),
            None,
        ),
    }
}

/// Stores the outcome; the first outcome stored wins and is what every later
/// delivery publishes, so one `jobId` never has two different results.
pub fn decide_finish(
    current: Option<Entry>,
    job_id: &str,
    owner: &str,
    finished: &Finished,
) -> (Result<Finished, LedgerError>, Option<Entry>) {
    match current {
        Some(Entry {
            finished: Some(existing),
            ..
        }) => (Ok(existing), None),
        Some(mut entry) if entry.owner == owner => {
            entry.finished = Some(finished.clone());
            (Ok(finished.clone()), Some(entry))
        }
        _ => (
            Err(LedgerError::LeaseLost {
                job_id: job_id.to_owned(),
            }),
            None,
        ),
    }
}

/// Gives the lease up for a delivery handed back: the next delivery need not
/// wait for it to lapse, and the hand-back does not count as a delivery.
/// `progress`, when given, replaces the stored progress: the caller knows none of
/// its own calls was applied, so its state (inherited unknowns included) is exact.
pub fn decide_release(
    current: Option<Entry>,
    owner: &str,
    progress: Option<&Progress>,
) -> ((), Option<Entry>) {
    match current {
        Some(mut entry) if entry.owner == owner && entry.finished.is_none() => {
            // No owner any more: a renewal still on its way cannot revive the lease.
            entry.owner = String::new();
            entry.lease_until_ms = 0;
            entry.deliveries = entry.deliveries.saturating_sub(1);
            if let Some(progress) = progress {
                entry.progress = progress.clone();
            }
            ((), Some(entry))
        }
        _ => ((), None),
    }
}

/// Extends the lease if this delivery still owns the job.
pub fn decide_renew(
    current: Option<Entry>,
    owner: &str,
    now_ms: u64,
    lease: Duration,
) -> (bool, Option<Entry>) {
    match current {
        Some(mut entry) if entry.owner == owner && entry.finished.is_none() => {
            entry.lease_until_ms = now_ms + lease.as_millis() as u64;
            (true, Some(entry))
        }
        _ => (false, None),
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The configured backend.
#[derive(Debug, Clone)]
pub enum Ledger {
    /// Embedded store for a single worker.
    File(FileLedger),
    /// Redis, shared by a fleet.
    Redis(RedisLedger),
}

impl Ledger {
    /// Opens the backend `LEDGER_URL` names.
    pub async fn open(settings: &LedgerSettings) -> Result<Self, LedgerError> {
        Ok(match &settings.location {
            LedgerLocation::File(path) => Self::File(FileLedger::open(path, settings.retention)?),
            LedgerLocation::Redis(url) => {
                Self::Redis(RedisLedger::open(url, settings.retention).await?)
            }
        })
    }

    /// One atomic read-modify-write of a job's entry: `change` sees the current
    /// entry and returns its answer and the entry to store, if it changes. Every
    /// operation below is a `decide_*` function run through here, so the two
    /// backends differ only in how they store, never in what they decide.
    async fn update<T: Send + 'static>(
        &self,
        job: &JobId,
        change: impl FnMut(Option<Entry>) -> (T, Option<Entry>) + Send + 'static,
    ) -> Result<T, LedgerError> {
        match self {
            Self::File(l) => l.update(job, change).await,
            Self::Redis(l) => l.update(job, change).await,
        }
    }

    /// Reads a job's entry without changing it (`None`: no entry).
    pub async fn get(&self, job: &JobId) -> Result<Option<Entry>, LedgerError> {
        self.update(job, |current| (current, None)).await
    }

    /// Takes the job's lease, or reports that it is finished or held elsewhere.
    /// A job seen for the first time stores `first_marker` as its progress.
    pub async fn claim(
        &self,
        job: &JobId,
        owner: &str,
        lease: Duration,
        first_marker: Option<&Progress>,
    ) -> Result<Claim, LedgerError> {
        let (owner, marker) = (owner.to_owned(), first_marker.cloned());
        self.update(job, move |current| {
            decide_claim(current, &owner, now_ms(), lease, marker.as_ref())
        })
        .await
    }

    /// Extends the lease while the job runs; false when another delivery took it.
    pub async fn renew(
        &self,
        job: &JobId,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, LedgerError> {
        let owner = owner.to_owned();
        self.update(job, move |current| {
            decide_renew(current, &owner, now_ms(), lease)
        })
        .await
    }

    /// Records progress (before a call: what is in flight; after: what happened),
    /// extending the lease; fails with `LeaseLost` if another delivery owns the job.
    pub async fn checkpoint(
        &self,
        job: &JobId,
        owner: &str,
        progress: &Progress,
        lease: Duration,
    ) -> Result<(), LedgerError> {
        let (job_id, owner, progress) = (job.to_string(), owner.to_owned(), progress.clone());
        self.update(job, move |current| {
            decide_checkpoint(current, &job_id, &owner, &progress, now_ms(), lease)
        })
        .await?
    }

    /// Stores the final outcome, kept for the retention period, and returns the
    /// outcome to publish: an earlier stored one wins.
    pub async fn finish(
        &self,
        job: &JobId,
        owner: &str,
        finished: &Finished,
    ) -> Result<Finished, LedgerError> {
        let (job_id, owner, finished) = (job.to_string(), owner.to_owned(), finished.clone());
        self.update(job, move |current| {
            decide_finish(current, &job_id, &owner, &finished)
        })
        .await?
    }

    /// Gives up the lease of a delivery handed back; `progress` replaces the
    /// stored one when none of this delivery's calls can have been applied.
    pub async fn release(
        &self,
        job: &JobId,
        owner: &str,
        progress: Option<&Progress>,
    ) -> Result<(), LedgerError> {
        let (owner, progress) = (owner.to_owned(), progress.cloned());
        self.update(job, move |current| {
            decide_release(current, &owner, progress.as_ref())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(30);

    #[test]
    fn a_new_job_is_owned_by_its_first_delivery() {
        let (claim, entry) = decide_claim(None, "a", 1_000, LEASE, None);
        assert_eq!(
            claim,
            Claim::Owned {
                progress: Progress::default(),
                deliveries: 1,
                marked: false,
            }
        );
        assert_eq!(entry.unwrap().lease_until_ms, 31_000);
    }

    #[test]
    fn a_live_lease_of_another_delivery_is_busy_and_an_expired_one_resumes() {
        let (_, entry) = decide_claim(None, "a", 1_000, LEASE, None);
        let mut entry = entry.unwrap();
        entry.progress.in_flight = vec![0];
        let (claim, write) = decide_claim(Some(entry.clone()), "b", 2_000, LEASE, None);
        assert_eq!(claim, Claim::Busy);
        assert!(write.is_none());
        let (claim, write) = decide_claim(Some(entry), "b", 40_000, LEASE, None);
        let Claim::Owned {
            progress,
            deliveries,
            ..
        } = claim
        else {
            panic!("expected the lease")
        };
        assert_eq!(progress.in_flight, vec![0]);
        assert_eq!(deliveries, 2);
        assert_eq!(write.unwrap().owner, "b");
    }

    #[test]
    fn a_claim_after_a_hand_back_before_any_call_stores_the_marker_and_says_so() {
        let marker = Progress {
            in_flight: vec![0],
            ..Progress::default()
        };
        // The first delivery claimed without a marker (its call would have had
        // to wait), then was handed back before calling: deliveries is 1 again.
        let (_, entry) = decide_claim(None, "a", 1_000, LEASE, None);
        let (_, released) = decide_release(entry, "a", Some(&Progress::default()));
        let (claim, write) = decide_claim(released, "b", 2_000, LEASE, Some(&marker));
        assert!(matches!(
            claim,
            Claim::Owned {
                deliveries: 1,
                marked: true,
                ..
            }
        ));
        assert_eq!(
            write.unwrap().progress,
            marker,
            "the in-flight marker is stored before the call may go"
        );
    }

    #[test]
    fn a_claim_of_a_job_with_progress_keeps_it_and_stores_no_marker() {
        let marker = Progress {
            in_flight: vec![0],
            ..Progress::default()
        };
        let (_, entry) = decide_claim(None, "a", 1_000, LEASE, None);
        let mut entry = entry.unwrap();
        entry.progress.attempts = 1;
        let (_, released) = decide_release(Some(entry), "a", None);
        let (claim, write) = decide_claim(released, "b", 2_000, LEASE, Some(&marker));
        let Claim::Owned {
            progress, marked, ..
        } = claim
        else {
            panic!("expected the lease")
        };
        assert!(!marked, "the caller must checkpoint before its call");
        assert_eq!(progress.attempts, 1);
        assert_eq!(write.unwrap().progress.attempts, 1);
    }

    #[test]
    fn a_renewal_arriving_after_a_release_does_not_revive_the_lease() {
        let (_, entry) = decide_claim(None, "a", 1_000, LEASE, None);
        let (_, released) = decide_release(entry, "a", None);
        let (renewed, write) = decide_renew(released.clone(), "a", 2_000, LEASE);
        assert!(
            !renewed && write.is_none(),
            "the released delivery owns nothing"
        );
        let (claim, _) = decide_claim(released, "b", 2_000, LEASE, None);
        assert!(
            matches!(claim, Claim::Owned { .. }),
            "the next delivery takes it at once"
        );
    }

    #[test]
    fn a_release_after_nothing_was_applied_stores_the_exact_progress() {
        let marker = Progress {
            in_flight: vec![0],
            ..Progress::default()
        };
        let (_, entry) = decide_claim(None, "a", 1_000, LEASE, Some(&marker));
        let entry = entry.unwrap();
        assert_eq!(
            entry.progress.in_flight,
            vec![0],
            "the claim carries the marker"
        );
        let (_, released) = decide_release(Some(entry.clone()), "a", Some(&Progress::default()));
        let released = released.unwrap();
        assert!(
            released.progress.in_flight.is_empty(),
            "stopped before its call"
        );
        assert_eq!((released.lease_until_ms, released.deliveries), (0, 0));
        let (_, kept) = decide_release(Some(entry), "a", None);
        assert_eq!(
            kept.unwrap().progress.in_flight,
            vec![0],
            "a call may have run"
        );
    }
}
