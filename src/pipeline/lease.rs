//! Keeps the ledger leases of every job in flight alive from one task.
//!
//! A lease lapses when its delivery stops renewing it, which is how a crashed
//! worker's jobs become claimable again. Renewing from a timer task per job cost
//! a task spawn, a timer and an abort for every job, measured in
//! `account-worker bench` as a few percent of throughput at 0 ms vendor latency;
//! one task renewing all held leases each third of the lease costs nothing per job.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::join_all;
use tracing::warn;

use crate::job::JobId;
use crate::ledger::Ledger;

/// The leases held now, by hold id.
/// Hold id -> the job's key, its owner and its body's fingerprint (kept in an
/// entry the renewal has to write again after a ledger loss).
type Held = Arc<Mutex<HashMap<u64, Renewal>>>;

#[derive(Debug, Clone)]
struct Renewal {
    job: JobId,
    owner: String,
    fingerprint: String,
}

/// The renewing task and the leases it renews; stops the task when dropped.
#[derive(Debug)]
pub(crate) struct LeaseKeeper {
    held: Held,
    next_id: AtomicU64,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One job's lease, renewed until this is dropped (on every path out of the
/// job, a panic included).
#[derive(Debug)]
pub(crate) struct LeaseHold {
    held: Held,
    id: u64,
}

impl Drop for LeaseHold {
    fn drop(&mut self) {
        lock(&self.held).remove(&self.id);
    }
}

fn lock(held: &Held) -> std::sync::MutexGuard<'_, HashMap<u64, Renewal>> {
    // The map stays consistent whatever panicked while it was locked.
    held.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LeaseKeeper {
    /// Starts renewing, every third of `lease`, the leases held through [`Self::hold`].
    /// Must be called inside a Tokio runtime.
    pub(crate) fn start(ledger: Ledger, lease: Duration) -> Self {
        let held: Held = Arc::default();
        let task = tokio::spawn(renew_held(ledger, lease, held.clone()));
        Self {
            held,
            next_id: AtomicU64::new(0),
            task,
        }
    }

    /// Renews `owner`'s lease on `job` until the returned hold is dropped.
    pub(crate) fn hold(&self, job: &JobId, owner: &str, fingerprint: &str) -> LeaseHold {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let renewal = Renewal {
            job: job.clone(),
            owner: owner.to_owned(),
            fingerprint: fingerprint.to_owned(),
        };
        lock(&self.held).insert(id, renewal);
        LeaseHold {
            held: self.held.clone(),
            id,
        }
    }
}

async fn renew_held(ledger: Ledger, lease: Duration, held: Held) {
    let mut tick = tokio::time::interval(lease / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let due: Vec<(u64, Renewal)> = lock(&held)
            .iter()
            .map(|(id, renewal)| (*id, renewal.clone()))
            .collect();
        let renewals = due.iter().map(|(id, renewal)| {
            let ledger = &ledger;
            let held = &held;
            let Renewal {
                job,
                owner,
                fingerprint,
            } = renewal;
            async move {
                match ledger.renew(job, owner, Some(fingerprint), lease).await {
                    Ok(true) => {}
                    // A job that finished meanwhile has nothing left to renew.
                    Ok(false) if lock(held).contains_key(id) => {
                        warn!(job_id = %job, "lost the job's lease to another delivery")
                    }
                    Ok(false) => {}
                    Err(e) => warn!(job_id = %job, error = %e, "cannot renew the job's lease"),
                }
            }
        });
        join_all(renewals).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Claim, FileLedger};

    /// Long enough that an fsync stall of a loaded machine cannot make a
    /// renewal late (renewals run every third of it).
    const LEASE: Duration = Duration::from_millis(1500);

    async fn claim(ledger: &Ledger, job: &JobId, owner: &str) -> Claim {
        ledger.claim(job, owner, LEASE, None).await.unwrap()
    }

    #[tokio::test]
    async fn a_held_lease_outlives_its_term_and_lapses_once_released() {
        let dir = tempfile::tempdir().unwrap();
        let ledger =
            Ledger::File(FileLedger::open(&dir.path().join("l"), Duration::from_secs(60)).unwrap());
        let keeper = LeaseKeeper::start(ledger.clone(), LEASE);
        let job = JobId::parse("held").unwrap();
        assert!(matches!(
            claim(&ledger, &job, "a").await,
            Claim::Owned { .. }
        ));
        let hold = keeper.hold(&job, "a", "f");

        // Time passing is what is tested here: three lease terms.
        tokio::time::sleep(LEASE * 3).await;
        assert_eq!(claim(&ledger, &job, "b").await, Claim::Busy);

        drop(hold);
        tokio::time::sleep(LEASE * 2).await;
        assert!(matches!(
            claim(&ledger, &job, "b").await,
            Claim::Owned { deliveries: 2, .. }
        ));
    }
}
