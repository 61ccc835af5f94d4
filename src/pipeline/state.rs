//! The progress of one job: which items succeeded, failed, or still wait for a call.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::job::{FailEntry, Item, ItemError, Job, JobResult, JobStatus, ResultMeta};
use crate::ledger::Progress;

/// Item by item progress; turned into the job's result when nothing is pending.
#[derive(Debug, Clone)]
pub(crate) struct JobState {
    pub(crate) job: Job,
    succeeded: BTreeMap<usize, Value>,
    failed: BTreeMap<usize, FailEntry>,
    /// Indices into `job.items` still to be sent.
    pending: Vec<usize>,
    pub(crate) attempts: u32,
    pub(crate) last_http_status: Option<u16>,
}

impl JobState {
    pub(crate) fn new(job: Job) -> Self {
        let failed = job.rejected.iter().cloned().collect();
        let pending = (0..job.items.len()).collect();
        Self {
            job,
            succeeded: BTreeMap::new(),
            failed,
            pending,
            attempts: 0,
            last_http_status: None,
        }
    }

    /// Rebuilds the state an interrupted delivery left in the ledger. An additive
    /// item whose call was in flight may have been applied: it is reported as an
    /// unknown outcome instead of being sent again.
    ///
    /// When the ledger `lost` the job's entry, nothing says what an earlier
    /// delivery sent: every additive item the progress does not settle is an
    /// unknown outcome (idempotent ones are simply sent).
    pub(crate) fn resume(job: Job, progress: Progress, lost: bool) -> Self {
        let mut state = Self::new(job);
        state.attempts = progress.attempts;
        state.last_http_status = progress.last_http_status;
        for (index, data) in progress.succeeded {
            state.succeed(index, data);
        }
        for (index, entry) in progress.failed {
            if state.take_pending(index).is_some() {
                state.failed.insert(index, entry);
            }
        }
        let unknown: Vec<usize> = progress
            .in_flight
            .iter()
            .copied()
            .filter(|&index| {
                state
                    .position(index)
                    .is_some_and(|p| state.job.items[p].is_additive())
            })
            .collect();
        for index in unknown {
            state.fail(
                index,
                vec![ItemError::permanent(
                    "err_outcome_unknown",
                    "an earlier delivery of this job was interrupted while this item's call was in flight; numberOfUsers is additive, so it is not resent: reconcile the account before replaying",
                )],
            );
        }
        if lost {
            let additive: Vec<usize> = state
                .pending_items()
                .iter()
                .filter(|item| item.is_additive())
                .map(|item| item.index)
                .collect();
            for index in additive {
                state.fail(
                    index,
                    vec![ItemError::permanent(
                        "err_outcome_unknown",
                        "the ledger lost this job's entry (a Redis restart without persistence, eviction, or an unreadable entry) after it had been seen, so an earlier delivery may have applied this item; numberOfUsers is additive, so it is not resent: reconcile the account before replaying, and check the ledger's persistence settings",
                    )],
                );
            }
        }
        state
    }

    /// The progress to checkpoint, with `in_flight` the items about to be sent.
    pub(crate) fn progress(&self, in_flight: &[&Item]) -> Progress {
        Progress {
            succeeded: self.succeeded.clone(),
            failed: self
                .failed
                .iter()
                .filter(|(index, _)| !self.job.rejected.iter().any(|(r, _)| r == *index))
                .map(|(index, entry)| (*index, entry.clone()))
                .collect(),
            in_flight: in_flight.iter().map(|item| item.index).collect(),
            attempts: self.attempts,
            last_http_status: self.last_http_status,
        }
    }

    /// The items still waiting for a call, in order.
    pub(crate) fn pending_items(&self) -> Vec<&Item> {
        self.pending.iter().map(|&i| &self.job.items[i]).collect()
    }

    pub(crate) fn is_done(&self) -> bool {
        self.pending.is_empty()
    }

    fn position(&self, item_index: usize) -> Option<usize> {
        self.job
            .items
            .iter()
            .position(|item| item.index == item_index)
    }

    fn take_pending(&mut self, item_index: usize) -> Option<&Item> {
        let position = self.position(item_index)?;
        let slot = self.pending.iter().position(|&p| p == position)?;
        self.pending.remove(slot);
        Some(&self.job.items[position])
    }

    /// The item was applied; `data` is the vendor's element for it.
    pub(crate) fn succeed(&mut self, item_index: usize, data: Value) {
        if self.take_pending(item_index).is_some() {
            // The vendor's element is stored in the ledger: bounded, so the
            // stored outcome can always be read back.
            self.succeeded
                .insert(item_index, crate::job::bounded_echo(data));
        }
    }

    /// The item failed for good.
    pub(crate) fn fail(&mut self, item_index: usize, errors: Vec<ItemError>) {
        if let Some(item) = self.take_pending(item_index) {
            let key = item.to_value();
            self.failed.insert(item_index, FailEntry { key, errors });
        }
    }

    /// Every pending item fails with the same error.
    pub(crate) fn fail_all_pending(&mut self, error: &ItemError) {
        let pending: Vec<usize> = self.pending_items().iter().map(|item| item.index).collect();
        for index in pending {
            self.fail(index, vec![error.clone()]);
        }
    }

    /// The job's one result.
    pub(crate) fn result(&self) -> JobResult {
        let status = JobStatus::from_counts(self.succeeded.len(), self.failed.len());
        JobResult {
            job_id: self.job.id.to_string(),
            vendor: self.job.vendor.to_string(),
            status,
            // Nothing valid to send is a bad request, as the vendor would have said.
            meta: ResultMeta {
                status: self.last_http_status.unwrap_or(400),
            },
            data: self.succeeded.values().cloned().collect(),
            fail: self.failed.values().cloned().collect(),
            attempts: self.attempts,
        }
    }

    /// The job with only its failed items, for the dead-letter queue.
    pub(crate) fn failed_job_body(&self) -> Option<Vec<u8>> {
        if self.failed.is_empty() {
            return None;
        }
        let items: Vec<&Value> = self.failed.values().map(|f| &f.key).collect();
        serde_json::to_vec(&json!({
            "jobId": self.job.id.as_str(),
            "vendor": self.job.vendor,
            "data": items,
        }))
        .ok()
    }
}
