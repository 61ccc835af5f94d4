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
    /// The [`crate::job::Job::fingerprint`] of the body the ledger accepted for
    /// this `jobId`: a copy with another body is a conflict, not the same job.
    /// `None` for entries written before fingerprints, or re-created after a loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// The answer given to the current owner's claim, so that a claim retried
    /// after a lost reply gets exactly that answer instead of counting itself
    /// as an earlier delivery (the progress cannot tell: a crashed earlier
    /// delivery can leave it equal to the claim's own marker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted: Option<Granted>,
    /// The entry was re-created after the ledger lost it (a Redis restart
    /// without persistence, eviction, an unreadable row): its progress may not
    /// say what was sent, so every additive item not settled in it is an
    /// unknown outcome for the next delivery.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lost: bool,
}

/// The answer stored with a claim (see [`Entry::granted`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Granted {
    /// The progress the owner resumes from.
    pub progress: Progress,
    /// Deliveries counted for it.
    pub deliveries: u32,
    /// Whether the claim stored the first call's marker.
    pub marked: bool,
    /// Whether the claim found the ledger had lost the job's entry.
    #[serde(default)]
    pub lost: bool,
}

impl Entry {
    /// An entry written again after the ledger lost it, keeping the body's
    /// fingerprint: a later copy with another body is still a conflict, never
    /// adopted as the job's body.
    fn recreated(
        owner: &str,
        lease_until_ms: u64,
        progress: Progress,
        fingerprint: Option<&str>,
    ) -> Self {
        let mut entry = Self::new(owner, lease_until_ms, progress);
        entry.fingerprint = fingerprint.map(str::to_owned);
        entry
    }

    /// An entry of `owner`, created where the store had none.
    fn new(owner: &str, lease_until_ms: u64, progress: Progress) -> Self {
        Self {
            owner: owner.to_owned(),
            lease_until_ms,
            deliveries: 1,
            progress,
            finished: None,
            fingerprint: None,
            granted: None,
            lost: false,
        }
    }
}

/// What the store holds for a job, as a `decide_*` function sees it.
// Built once per ledger operation and consumed by its decision: boxing the
// entry would cost an allocation on every operation to save stack space.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Stored {
    /// No entry: a new job, or one the ledger lost.
    Absent,
    /// The entry.
    Present(Entry),
    /// An entry that cannot be decoded: ledger loss, never "not started".
    Unreadable(String),
}

impl From<Option<Entry>> for Stored {
    fn from(entry: Option<Entry>) -> Self {
        entry.map_or(Self::Absent, Self::Present)
    }
}

/// What this process knows of a job whose entry is absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evidence {
    /// Nothing: an absent entry is a job seen for the first time.
    None,
    /// This process claimed it recently: an absent entry was lost.
    Seen {
        /// The body claimed then is this one.
        same_body: bool,
        /// This process published the job's answer.
        answered: bool,
    },
    /// Another delivery in this process holds it now: wait for it (it stores
    /// its entry again with its next write).
    HeldHere {
        /// That delivery's body is this one.
        same_body: bool,
    },
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
        /// The ledger lost the job's entry: every additive item not settled in
        /// `progress` may have been sent, and must not be sent again.
        lost: bool,
    },
    /// The job is finished: publish this again.
    Done(Box<Finished>),
    /// Another delivery holds a live lease: wait for its outcome.
    Busy,
    /// The `jobId` is known with a different body: nothing may be sent, and
    /// the stored outcome (if any) stands.
    Conflict,
    /// This process answered the job, and the ledger has lost that answer:
    /// nothing may be sent (it may all be applied), and publishing another
    /// result would give the `jobId` a second, different answer.
    Forgotten,
}

/// Whether a write kept the entry it found or had to re-create a lost one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The entry was there and is updated.
    Kept,
    /// The entry was missing or unreadable: ledger loss, written again.
    Recreated,
}

/// The arguments of a claim.
#[derive(Debug, Clone, Copy)]
pub struct ClaimRequest<'a> {
    /// The claiming delivery.
    pub owner: &'a str,
    /// Now, in Unix milliseconds.
    pub now_ms: u64,
    /// The lease to take.
    pub lease: Duration,
    /// The first call's in-flight marker, to store with a new job's claim.
    pub first_marker: Option<&'a Progress>,
    /// The body's fingerprint; `None` checks nothing.
    pub fingerprint: Option<&'a str>,
    /// What this process knows of the job, for an absent entry.
    pub evidence: Evidence,
}

/// Decides a claim from the current entry; returns the entry to store, if it changes.
/// Shared by both backends so they cannot disagree.
///
/// `first_marker` is stored as the progress of a job with nothing recorded yet
/// (seen for the first time, or handed back before any call): the in-flight
/// marker of its first call, saved in the same write. The claim says whether it
/// stored it; a caller must not infer that from the delivery count, since a
/// hand-back takes that count back down.
///
/// An absent entry is a new job only when this process has no evidence of it;
/// an unreadable one never is. Either way a lost entry is claimed as `lost`, so
/// nothing additive is sent on the strength of its absence.
pub fn decide_claim(current: Stored, request: &ClaimRequest<'_>) -> (Claim, Option<Entry>) {
    let owner = request.owner;
    let lease_until_ms = request.now_ms + request.lease.as_millis() as u64;
    let granted = |entry: &mut Entry, grant: Granted| {
        let claim = Claim::Owned {
            progress: grant.progress.clone(),
            deliveries: grant.deliveries,
            marked: grant.marked,
            lost: grant.lost,
        };
        entry.granted = Some(grant);
        claim
    };
    let lost_claim = || {
        let mut entry = Entry::new(owner, lease_until_ms, Progress::default());
        entry.fingerprint = request.fingerprint.map(str::to_owned);
        entry.lost = true;
        let grant = Granted {
            progress: Progress::default(),
            deliveries: 1,
            marked: false,
            lost: true,
        };
        let claim = granted(&mut entry, grant);
        (claim, Some(entry))
    };
    match (current, request.evidence) {
        // Whatever the store lost, this process knows the job by another body.
        (
            Stored::Absent | Stored::Unreadable(_),
            Evidence::Seen {
                same_body: false, ..
            }
            | Evidence::HeldHere { same_body: false },
        ) => (Claim::Conflict, None),
        (Stored::Absent | Stored::Unreadable(_), Evidence::Seen { answered: true, .. }) => {
            (Claim::Forgotten, None)
        }
        (Stored::Unreadable(_), _) => lost_claim(),
        (Stored::Absent, evidence) => match evidence {
            Evidence::Seen { .. } => lost_claim(),
            Evidence::HeldHere { .. } => (Claim::Busy, None),
            Evidence::None => {
                let progress = request.first_marker.cloned().unwrap_or_default();
                let mut entry = Entry::new(owner, lease_until_ms, progress);
                entry.fingerprint = request.fingerprint.map(str::to_owned);
                let grant = Granted {
                    progress: Progress::default(),
                    deliveries: 1,
                    marked: request.first_marker.is_some(),
                    lost: false,
                };
                let claim = granted(&mut entry, grant);
                (claim, Some(entry))
            }
        },
        (Stored::Present(entry), _)
            if matches!(
                (entry.fingerprint.as_deref(), request.fingerprint),
                (Some(stored), Some(offered)) if stored != offered
            ) =>
        {
            (Claim::Conflict, None)
        }
        (
            Stored::Present(Entry {
                finished: Some(finished),
                ..
            }),
            _,
        ) => (Claim::Done(Box::new(finished)), None),
        (
            Stored::Present(Entry {
                granted: Some(grant),
                owner: current,
                ..
            }),
            _,
        ) if current == owner => {
            // This owner's claim was already answered (its reply was lost).
            (
                Claim::Owned {
                    progress: grant.progress,
                    deliveries: grant.deliveries,
                    marked: grant.marked,
                    lost: grant.lost,
                },
                None,
            )
        }
        (Stored::Present(entry), _)
            if entry.owner != owner && entry.lease_until_ms > request.now_ms =>
        {
            (Claim::Busy, None)
        }
        (Stored::Present(mut entry), _) => {
            entry.deliveries = entry.deliveries.saturating_add(1);
            entry.owner = owner.to_owned();
            entry.lease_until_ms = lease_until_ms;
            if entry.fingerprint.is_none() {
                entry.fingerprint = request.fingerprint.map(str::to_owned);
            }
            let progress = entry.progress.clone();
            let marked = match request.first_marker {
                Some(marker) if progress == Progress::default() && !entry.lost => {
                    entry.progress = marker.clone();
                    true
                }
                _ => false,
            };
            let grant = Granted {
                progress,
                deliveries: entry.deliveries,
                marked,
                lost: entry.lost,
            };
            let claim = granted(&mut entry, grant);
            (claim, Some(entry))
        }
    }
}

/// Records progress if this delivery still owns the job, extending its lease.
/// A missing or unreadable entry is ledger loss: the owning delivery stores its
/// progress anyway (it knows it exactly) and says so.
pub fn decide_checkpoint(
    current: Stored,
    job_id: &str,
    owner: &str,
    fingerprint: Option<&str>,
    progress: &Progress,
    now_ms: u64,
    lease: Duration,
) -> (Result<Written, LedgerError>, Option<Entry>) {
    let lease_until_ms = now_ms + lease.as_millis() as u64;
    match current {
        Stored::Present(mut entry) if entry.owner == owner && entry.finished.is_none() => {
            entry.progress = progress.clone();
            entry.lease_until_ms = entry.lease_until_ms.max(lease_until_ms);
            // The owner's progress is exact: nothing it does not know of was sent.
            entry.lost = false;
            (Ok(Written::Kept), Some(entry))
        }
        Stored::Absent | Stored::Unreadable(_) => (
            Ok(Written::Recreated),
            Some(Entry::recreated(
                owner,
                lease_until_ms,
                progress.clone(),
                fingerprint,
            )),
        ),
        Stored::Present(_) => (
            Err(LedgerError::LeaseLost {
                job_id: job_id.to_owned(),
            }),
            None,
        ),
    }
}

/// Stores the outcome; the first outcome stored wins and is what every later
/// delivery publishes, so one `jobId` never has two different results. The
/// owning delivery stores its outcome even when the entry was lost.
pub fn decide_finish(
    current: Stored,
    job_id: &str,
    owner: &str,
    fingerprint: Option<&str>,
    finished: &Finished,
) -> (Result<(Finished, Written), LedgerError>, Option<Entry>) {
    match current {
        Stored::Present(Entry {
            finished: Some(existing),
            ..
        }) => (Ok((existing, Written::Kept)), None),
        Stored::Present(mut entry) if entry.owner == owner => {
            entry.finished = Some(finished.clone());
            (Ok((finished.clone(), Written::Kept)), Some(entry))
        }
        Stored::Absent | Stored::Unreadable(_) => {
            let mut entry = Entry::recreated(owner, 0, Progress::default(), fingerprint);
            entry.finished = Some(finished.clone());
            (Ok((finished.clone(), Written::Recreated)), Some(entry))
        }
        Stored::Present(_) => (
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
/// A lost entry is written again, so the next delivery anywhere finds it: with
/// the exact progress, or else marked lost.
pub fn decide_release(
    current: Stored,
    owner: &str,
    fingerprint: Option<&str>,
    progress: Option<&Progress>,
) -> (Written, Option<Entry>) {
    match current {
        Stored::Present(mut entry) if entry.owner == owner && entry.finished.is_none() => {
            // No owner any more: a renewal still on its way cannot revive the lease.
            entry.owner = String::new();
            entry.lease_until_ms = 0;
            entry.deliveries = entry.deliveries.saturating_sub(1);
            entry.granted = None;
            if let Some(progress) = progress {
                entry.progress = progress.clone();
                entry.lost = false;
            }
            (Written::Kept, Some(entry))
        }
        Stored::Absent | Stored::Unreadable(_) => {
            let mut entry =
                Entry::recreated("", 0, progress.cloned().unwrap_or_default(), fingerprint);
            entry.deliveries = 0;
            entry.lost = progress.is_none();
            (Written::Recreated, Some(entry))
        }
        Stored::Present(_) => (Written::Kept, None),
    }
}

/// Extends the lease if this delivery still owns the job. A lost entry is
/// written again as this owner's, marked lost: the delivery is mid-call and
/// its next checkpoint stores the exact progress, while a delivery elsewhere
/// must meanwhile neither take the job as new nor resend what may be applied.
pub fn decide_renew(
    current: Stored,
    owner: &str,
    fingerprint: Option<&str>,
    now_ms: u64,
    lease: Duration,
) -> (Option<Written>, Option<Entry>) {
    let lease_until_ms = now_ms + lease.as_millis() as u64;
    match current {
        Stored::Present(mut entry) if entry.owner == owner && entry.finished.is_none() => {
            entry.lease_until_ms = lease_until_ms;
            (Some(Written::Kept), Some(entry))
        }
        Stored::Absent | Stored::Unreadable(_) => {
            let mut entry =
                Entry::recreated(owner, lease_until_ms, Progress::default(), fingerprint);
            entry.lost = true;
            (Some(Written::Recreated), Some(entry))
        }
        Stored::Present(_) => (None, None),
    }
}

/// What a malformed message with a readable `jobId` is answered with.
#[derive(Debug, Clone, PartialEq)]
pub enum MalformedAnswer {
    /// The job has an outcome: publish it again, and only dead-letter the body.
    Finished(Box<Finished>),
    /// Another copy is being processed, or the entry is unreadable: only
    /// dead-letter the body, and let that copy's outcome be the answer.
    Pending,
    /// The malformed failure was stored as the job's outcome: publish it.
    Stored,
}

/// Settles a malformed copy of a job against the ledger, so one `jobId` gets
/// one answer whichever copy arrives first.
pub fn decide_malformed(
    current: Stored,
    evidence: Evidence,
    failure: &Finished,
) -> (MalformedAnswer, Option<Entry>) {
    match current {
        Stored::Present(Entry {
            finished: Some(existing),
            ..
        }) => (MalformedAnswer::Finished(Box::new(existing)), None),
        Stored::Present(_) | Stored::Unreadable(_) => (MalformedAnswer::Pending, None),
        // This process holds or held the job: its entry was lost, and the
        // owner's outcome (or the one it published) is the answer.
        Stored::Absent if evidence != Evidence::None => (MalformedAnswer::Pending, None),
        Stored::Absent => {
            let mut entry = Entry::new("", 0, Progress::default());
            entry.deliveries = 0;
            entry.finished = Some(failure.clone());
            (MalformedAnswer::Stored, Some(entry))
        }
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

    /// One atomic read-modify-write of a job's entry: `change` sees what is
    /// stored and returns its answer and the entry to store, if it changes. Every
    /// operation below is a `decide_*` function run through here, so the two
    /// backends differ only in how they store, never in what they decide.
    async fn update<T: Send + 'static>(
        &self,
        job: &JobId,
        change: impl FnMut(Stored) -> (T, Option<Entry>) + Send + 'static,
    ) -> Result<T, LedgerError> {
        match self {
            Self::File(l) => l.update(job, change).await,
            Self::Redis(l) => l.update(job, change).await,
        }
    }

    /// Reads a job's entry without changing it.
    pub async fn get(&self, job: &JobId) -> Result<Stored, LedgerError> {
        self.update(job, |current| (current, None)).await
    }

    /// Takes the job's lease, or reports that it is finished or held elsewhere.
    /// A job seen for the first time stores `first_marker` as its progress.
    /// Checks no fingerprint and has no evidence (tools and benchmarks).
    pub async fn claim(
        &self,
        job: &JobId,
        owner: &str,
        lease: Duration,
        first_marker: Option<&Progress>,
    ) -> Result<Claim, LedgerError> {
        self.claim_job(job, owner, lease, first_marker, None, Evidence::None)
            .await
    }

    /// As [`Ledger::claim`], refusing a body whose `fingerprint` differs from
    /// the one the ledger accepted, and treating an absent entry as lost when
    /// `evidence` says this process knows the job. A retried claim by the same
    /// owner gets the answer its first try got.
    pub async fn claim_job(
        &self,
        job: &JobId,
        owner: &str,
        lease: Duration,
        first_marker: Option<&Progress>,
        fingerprint: Option<&str>,
        evidence: Evidence,
    ) -> Result<Claim, LedgerError> {
        let job_id = job.to_string();
        let (owner, marker) = (owner.to_owned(), first_marker.cloned());
        let fingerprint = fingerprint.map(str::to_owned);
        let claim = self
            .update(job, move |current| {
                if let Stored::Unreadable(reason) = &current {
                    report_loss(&job_id, "claim", Some(reason));
                }
                let request = ClaimRequest {
                    owner: &owner,
                    now_ms: now_ms(),
                    lease,
                    first_marker: marker.as_ref(),
                    fingerprint: fingerprint.as_deref(),
                    evidence,
                };
                decide_claim(current, &request)
            })
            .await?;
        if matches!(claim, Claim::Owned { lost: true, .. }) {
            report_loss(job.as_str(), "claim", None);
        }
        Ok(claim)
    }

    /// Extends the lease while the job runs; false when another delivery took it.
    pub async fn renew(
        &self,
        job: &JobId,
        owner: &str,
        fingerprint: Option<&str>,
        lease: Duration,
    ) -> Result<bool, LedgerError> {
        let (owner, fingerprint) = (owner.to_owned(), fingerprint.map(str::to_owned));
        let renewed = self
            .update(job, move |current| {
                decide_renew(current, &owner, fingerprint.as_deref(), now_ms(), lease)
            })
            .await?;
        if renewed == Some(Written::Recreated) {
            report_loss(job.as_str(), "lease renewal", None);
        }
        Ok(renewed.is_some())
    }

    /// Records progress (before a call: what is in flight; after: what happened),
    /// extending the lease; fails with `LeaseLost` if another delivery owns the job.
    /// Says whether the entry had to be re-created (ledger loss, logged here).
    pub async fn checkpoint(
        &self,
        job: &JobId,
        owner: &str,
        fingerprint: Option<&str>,
        progress: &Progress,
        lease: Duration,
    ) -> Result<Written, LedgerError> {
        let (job_id, owner, progress) = (job.to_string(), owner.to_owned(), progress.clone());
        let fingerprint = fingerprint.map(str::to_owned);
        let written = self
            .update(job, move |current| {
                decide_checkpoint(
                    current,
                    &job_id,
                    &owner,
                    fingerprint.as_deref(),
                    &progress,
                    now_ms(),
                    lease,
                )
            })
            .await??;
        if written == Written::Recreated {
            report_loss(job.as_str(), "checkpoint", None);
        }
        Ok(written)
    }

    /// Stores the final outcome, kept for the retention period, and returns the
    /// outcome to publish (an earlier stored one wins) and whether the entry had
    /// to be re-created (ledger loss, logged here).
    pub async fn finish(
        &self,
        job: &JobId,
        owner: &str,
        fingerprint: Option<&str>,
        finished: &Finished,
    ) -> Result<(Finished, Written), LedgerError> {
        let (job_id, owner, finished) = (job.to_string(), owner.to_owned(), finished.clone());
        let fingerprint = fingerprint.map(str::to_owned);
        let kept = self
            .update(job, move |current| {
                decide_finish(current, &job_id, &owner, fingerprint.as_deref(), &finished)
            })
            .await??;
        if kept.1 == Written::Recreated {
            report_loss(job.as_str(), "storing the outcome", None);
        }
        Ok(kept)
    }

    /// Gives up the lease of a delivery handed back; `progress` replaces the
    /// stored one when none of this delivery's calls can have been applied.
    pub async fn release(
        &self,
        job: &JobId,
        owner: &str,
        fingerprint: Option<&str>,
        progress: Option<&Progress>,
    ) -> Result<(), LedgerError> {
        let (owner, progress) = (owner.to_owned(), progress.cloned());
        let fingerprint = fingerprint.map(str::to_owned);
        let written = self
            .update(job, move |current| {
                decide_release(current, &owner, fingerprint.as_deref(), progress.as_ref())
            })
            .await?;
        if written == Written::Recreated {
            report_loss(job.as_str(), "hand-back", None);
        }
        Ok(())
    }

    /// Settles a malformed copy of a job (see [`decide_malformed`]).
    pub async fn settle_malformed(
        &self,
        job: &JobId,
        evidence: Evidence,
        failure: &Finished,
    ) -> Result<MalformedAnswer, LedgerError> {
        let job_id = job.to_string();
        let failure = failure.clone();
        self.update(job, move |current| {
            if let Stored::Unreadable(reason) = &current {
                report_loss(&job_id, "malformed copy", Some(reason));
            }
            decide_malformed(current, evidence, &failure)
        })
        .await
    }
}

/// Logs ledger loss: an entry that vanished or cannot be read where this
/// process expected one. The job goes on safely (nothing additive is resent),
/// but the ledger is not keeping what the guarantee needs.
fn report_loss(job_id: &str, during: &str, unreadable: Option<&str>) {
    match unreadable {
        Some(reason) => tracing::error!(
            job_id,
            during,
            reason,
            "ledger entry unreadable: treated as ledger loss (additive items are not resent); inspect the ledger store"
        ),
        None => tracing::error!(
            job_id,
            during,
            "ledger lost this job's entry (Redis restarted without AOF, failed over, or evicted the key?): written again; additive items are not resent. Check the ledger's persistence and eviction settings"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{JobStatus, ResultMeta};

    const LEASE: Duration = Duration::from_secs(30);

    /// A claim with no fingerprint and no evidence, as before either existed.
    fn decide(
        current: Option<Entry>,
        owner: &str,
        now_ms: u64,
        first_marker: Option<&Progress>,
    ) -> (Claim, Option<Entry>) {
        decide_claim(
            current.into(),
            &ClaimRequest {
                owner,
                now_ms,
                lease: LEASE,
                first_marker,
                fingerprint: None,
                evidence: Evidence::None,
            },
        )
    }

    fn request<'a>(owner: &'a str, fingerprint: &'a str, evidence: Evidence) -> ClaimRequest<'a> {
        ClaimRequest {
            owner,
            now_ms: 1_000,
            lease: LEASE,
            first_marker: None,
            fingerprint: Some(fingerprint),
            evidence,
        }
    }

    fn marker() -> Progress {
        Progress {
            in_flight: vec![0],
            ..Progress::default()
        }
    }

    fn outcome(status: JobStatus) -> Finished {
        Finished {
            result: JobResult {
                job_id: "j".to_owned(),
                vendor: "mimecast".to_owned(),
                status,
                meta: ResultMeta { status: 200 },
                data: vec![],
                fail: vec![],
                attempts: 1,
            },
            dead_letter: None,
        }
    }

    #[test]
    fn a_new_job_is_owned_by_its_first_delivery() {
        let (claim, entry) = decide(None, "a", 1_000, None);
        assert_eq!(
            claim,
            Claim::Owned {
                progress: Progress::default(),
                deliveries: 1,
                marked: false,
                lost: false,
            }
        );
        assert_eq!(entry.unwrap().lease_until_ms, 31_000);
    }

    #[test]
    fn a_live_lease_of_another_delivery_is_busy_and_an_expired_one_resumes() {
        let (_, entry) = decide(None, "a", 1_000, None);
        let mut entry = entry.unwrap();
        entry.progress.in_flight = vec![0];
        let (claim, write) = decide(Some(entry.clone()), "b", 2_000, None);
        assert_eq!(claim, Claim::Busy);
        assert!(write.is_none());
        let (claim, write) = decide(Some(entry), "b", 40_000, None);
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
        // The first delivery claimed without a marker (its call would have had
        // to wait), then was handed back before calling: deliveries is 1 again.
        let (_, entry) = decide(None, "a", 1_000, None);
        let (_, released) = decide_release(entry.into(), "a", None, Some(&Progress::default()));
        let (claim, write) = decide(released, "b", 2_000, Some(&marker()));
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
            marker(),
            "the in-flight marker is stored before the call may go"
        );
    }

    #[test]
    fn a_claim_of_a_job_with_progress_keeps_it_and_stores_no_marker() {
        let (_, entry) = decide(None, "a", 1_000, None);
        let mut entry = entry.unwrap();
        entry.progress.attempts = 1;
        let (_, released) = decide_release(Stored::Present(entry), "a", None, None);
        let (claim, write) = decide(released, "b", 2_000, Some(&marker()));
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
        let (_, entry) = decide(None, "a", 1_000, None);
        let (_, released) = decide_release(entry.into(), "a", None, None);
        let (renewed, write) = decide_renew(released.clone().into(), "a", None, 2_000, LEASE);
        assert!(
            renewed.is_none() && write.is_none(),
            "the released delivery owns nothing"
        );
        let (claim, _) = decide(released, "b", 2_000, None);
        assert!(
            matches!(claim, Claim::Owned { .. }),
            "the next delivery takes it at once"
        );
    }

    #[test]
    fn a_release_after_nothing_was_applied_stores_the_exact_progress() {
        let (_, entry) = decide(None, "a", 1_000, Some(&marker()));
        let entry = entry.unwrap();
        assert_eq!(
            entry.progress.in_flight,
            vec![0],
            "the claim carries the marker"
        );
        let (_, released) = decide_release(
            Stored::Present(entry.clone()),
            "a",
            None,
            Some(&Progress::default()),
        );
        let released = released.unwrap();
        assert!(
            released.progress.in_flight.is_empty(),
            "stopped before its call"
        );
        assert_eq!((released.lease_until_ms, released.deliveries), (0, 0));
        let (_, kept) = decide_release(Stored::Present(entry), "a", None, None);
        assert_eq!(
            kept.unwrap().progress.in_flight,
            vec![0],
            "a call may have run"
        );
    }

    #[test]
    fn a_claim_retried_by_the_same_owner_gets_the_same_answer() {
        // Both shapes a first claim can have: a new job with its marker, and a
        // resumed job whose crashed delivery left progress equal to the marker.
        let (_, crashed) = decide(None, "a", 1_000, Some(&marker()));
        let cases = [(None, 1_000), (crashed, 40_000)];
        for (current, now) in cases {
            let (first, written) = decide(current, "b", now, Some(&marker()));
            let (retried, rewrite) = decide(written.clone(), "b", now + 10, Some(&marker()));
            assert_eq!(retried, first, "the retry is the same claim");
            assert!(rewrite.is_none(), "and changes nothing");
            // A different delivery after the lease still counts as one more.
            let (other, _) = decide(written, "c", now + 60_000, Some(&marker()));
            let Claim::Owned { deliveries, .. } = other else {
                panic!("expected the lease")
            };
            assert_eq!(deliveries, first_deliveries(&first) + 1);
        }
    }

    fn first_deliveries(claim: &Claim) -> u32 {
        match claim {
            Claim::Owned { deliveries, .. } => *deliveries,
            other => panic!("expected the lease, got {other:?}"),
        }
    }

    #[test]
    fn an_absent_or_unreadable_entry_is_new_only_without_evidence() {
        let unreadable = || Stored::Unreadable("EOF while parsing".to_owned());
        let cases: [(&str, Stored, Evidence, Option<bool>); 6] = [
            ("first sight", Stored::Absent, Evidence::None, Some(false)),
            (
                "claimed here recently",
                Stored::Absent,
                Evidence::Seen {
                    same_body: true,
                    answered: false,
                },
                Some(true),
            ),
            (
                "held here now",
                Stored::Absent,
                Evidence::HeldHere { same_body: true },
                None,
            ),
            (
                "unreadable, first sight",
                unreadable(),
                Evidence::None,
                Some(true),
            ),
            (
                "unreadable, seen",
                unreadable(),
                Evidence::Seen {
                    same_body: true,
                    answered: false,
                },
                Some(true),
            ),
            (
                "unreadable, held here",
                unreadable(),
                Evidence::HeldHere { same_body: true },
                Some(true),
            ),
        ];
        for (case, current, evidence, expect_lost) in cases {
            let (claim, write) = decide_claim(current, &request("a", "f1", evidence));
            match expect_lost {
                None => assert_eq!(claim, Claim::Busy, "{case}: wait for the holder"),
                Some(expect_lost) => {
                    let Claim::Owned { lost, marked, .. } = claim else {
                        panic!("{case}: expected the lease, got {claim:?}")
                    };
                    assert_eq!(lost, expect_lost, "{case}");
                    assert!(!marked || !lost, "{case}: a lost job stores no marker");
                    let entry = write.expect("the claim is stored");
                    assert_eq!(entry.lost, expect_lost, "{case}: the loss is stored");
                    // Whoever claims that entry next also treats it as lost.
                    let (next, _) = decide_claim(
                        Stored::Present(entry),
                        &ClaimRequest {
                            now_ms: 60_000,
                            ..request("b", "f1", Evidence::None)
                        },
                    );
                    assert!(
                        matches!(next, Claim::Owned { lost, .. } if lost == expect_lost),
                        "{case}: {next:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_different_body_under_a_known_job_id_is_a_conflict() {
        let (_, entry) = decide_claim(Stored::Absent, &request("a", "f1", Evidence::None));
        let mut entry = entry.unwrap();
        let (claim, write) = decide_claim(
            Stored::Present(entry.clone()),
            &request("b", "f2", Evidence::None),
        );
        assert_eq!(claim, Claim::Conflict, "while it runs");
        assert!(write.is_none());
        entry.finished = Some(outcome(JobStatus::Succeeded));
        let (claim, _) = decide_claim(
            Stored::Present(entry.clone()),
            &request("b", "f2", Evidence::None),
        );
        assert_eq!(claim, Claim::Conflict, "once finished");
        let (claim, _) = decide_claim(
            Stored::Present(entry.clone()),
            &request("b", "f1", Evidence::None),
        );
        assert!(matches!(claim, Claim::Done(_)), "the same body is answered");
        entry.fingerprint = None;
        let (claim, _) = decide_claim(Stored::Present(entry), &request("b", "f2", Evidence::None));
        assert!(
            matches!(claim, Claim::Done(_)),
            "an entry without a fingerprint (older, or re-created) answers its outcome"
        );
    }

    #[test]
    fn the_owner_stores_anyway_when_its_entry_vanished_and_others_lose_the_lease() {
        let (_, entry) = decide(None, "a", 1_000, None);
        let entry = entry.unwrap();
        let progress = marker();
        let finished = outcome(JobStatus::Succeeded);
        let lost = || [Stored::Absent, Stored::Unreadable("bad".to_owned())];
        for current in lost() {
            let (answer, write) =
                decide_checkpoint(current, "j", "a", None, &progress, 2_000, LEASE);
            assert_eq!(answer.unwrap(), Written::Recreated);
            let write = write.unwrap();
            assert_eq!((write.owner.as_str(), &write.progress), ("a", &progress));
        }
        for current in lost() {
            let (answer, write) = decide_finish(current, "j", "a", None, &finished);
            assert_eq!(answer.unwrap(), (finished.clone(), Written::Recreated));
            assert_eq!(write.unwrap().finished, Some(finished.clone()));
        }
        for current in lost() {
            let (answer, write) = decide_renew(current, "a", None, 2_000, LEASE);
            assert_eq!(answer, Some(Written::Recreated));
            assert!(write.unwrap().lost, "mid-call: what was sent is unknown");
        }
        let (answer, _) = decide_checkpoint(
            Stored::Present(entry.clone()),
            "j",
            "b",
            None,
            &progress,
            2_000,
            LEASE,
        );
        assert!(matches!(answer, Err(LedgerError::LeaseLost { .. })));
        let (answer, _) = decide_finish(Stored::Present(entry), "j", "b", None, &finished);
        assert!(matches!(answer, Err(LedgerError::LeaseLost { .. })));
    }

    #[test]
    fn a_malformed_copy_gets_the_jobs_one_answer() {
        let failure = outcome(JobStatus::Failed);
        let (answer, write) = decide_malformed(Stored::Absent, Evidence::None, &failure);
        assert_eq!(answer, MalformedAnswer::Stored);
        let stored = write.unwrap();
        let (later, _) = decide(Some(stored), "b", 2_000, None);
        assert_eq!(
            later,
            Claim::Done(Box::new(failure.clone())),
            "a later copy gets the same answer"
        );

        let (_, mut running) = decide(None, "a", 1_000, None);
        let (answer, write) = decide_malformed(running.clone().into(), Evidence::None, &failure);
        assert_eq!(answer, MalformedAnswer::Pending);
        assert!(write.is_none());
        let succeeded = outcome(JobStatus::Succeeded);
        if let Some(entry) = running.as_mut() {
            entry.finished = Some(succeeded.clone());
        }
        let (answer, write) = decide_malformed(running.into(), Evidence::None, &failure);
        assert_eq!(answer, MalformedAnswer::Finished(Box::new(succeeded)));
        assert!(write.is_none());
    }

    #[test]
    fn an_entry_of_an_older_worker_still_reads() {
        let old = r#"{"owner":"a","lease_until_ms":1,"deliveries":1,"progress":{"succeeded":{},"failed":{},"in_flight":[],"attempts":0,"last_http_status":null},"finished":null}"#;
        let entry: Entry = serde_json::from_str(old).unwrap();
        assert!(entry.fingerprint.is_none() && entry.granted.is_none() && !entry.lost);
    }
}
