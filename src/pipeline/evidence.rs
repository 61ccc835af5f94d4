//! What this process knows of the jobs it claimed, for when their ledger entry
//! is gone.
//!
//! An absent entry normally means a job seen for the first time. For a job this
//! process holds, or claimed a moment ago, it means the ledger lost the entry
//! (Redis restarted without persistence, failed over, evicted the key): such a
//! claim must never be taken as "not started", or an additive change would be
//! sent twice. The record is small on purpose: the jobs held now, plus a capped
//! set of hashes of recently claimed keys.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::job::JobId;
use crate::ledger::Evidence;

/// Recently claimed keys remembered (8 bytes each, twice): ~0.5 MB at most.
const RECENT: usize = 16_384;

#[derive(Debug, Default)]
struct Inner {
    /// Key hash -> deliveries of this process holding it now.
    held: HashMap<u64, u32>,
    /// Hashes of keys claimed recently, and their order for eviction.
    recent: HashSet<u64>,
    order: VecDeque<u64>,
}

/// The record, shared by every job of the process.
#[derive(Debug, Clone, Default)]
pub(crate) struct Seen {
    inner: Arc<Mutex<Inner>>,
}

/// One delivery's hold on its job; remembered as recent when dropped.
#[derive(Debug)]
pub(crate) struct SeenHold {
    inner: Arc<Mutex<Inner>>,
    key: u64,
}

fn key_hash(key: &JobId) -> u64 {
    let mut hasher = DefaultHasher::new();
    key.as_str().hash(&mut hasher);
    hasher.finish()
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // The record stays consistent whatever panicked while it was locked.
    inner.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Seen {
    /// What an absent entry of `key` means to this process now.
    pub(crate) fn evidence(&self, key: &JobId) -> Evidence {
        let hash = key_hash(key);
        let inner = lock(&self.inner);
        if inner.held.contains_key(&hash) {
            Evidence::HeldHere
        } else if inner.recent.contains(&hash) {
            Evidence::Seen
        } else {
            Evidence::None
        }
    }

    /// Records that a delivery of this process owns `key` until the hold drops.
    pub(crate) fn hold(&self, key: &JobId) -> SeenHold {
        let hash = key_hash(key);
        let mut inner = lock(&self.inner);
        *inner.held.entry(hash).or_insert(0) += 1;
        if inner.recent.insert(hash) {
            inner.order.push_back(hash);
            if inner.order.len() > RECENT {
                if let Some(old) = inner.order.pop_front() {
                    inner.recent.remove(&old);
                }
            }
        }
        SeenHold {
            inner: self.inner.clone(),
            key: hash,
        }
    }
}

impl Drop for SeenHold {
    fn drop(&mut self) {
        let mut inner = lock(&self.inner);
        if let Some(count) = inner.held.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                inner.held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_job_is_held_here_then_seen_and_forgotten_past_the_cap() {
        let seen = Seen::default();
        let job = JobId::parse("j").unwrap();
        assert_eq!(seen.evidence(&job), Evidence::None);
        let hold = seen.hold(&job);
        assert_eq!(seen.evidence(&job), Evidence::HeldHere);
        drop(hold);
        assert_eq!(seen.evidence(&job), Evidence::Seen);
        for i in 0..RECENT {
            drop(seen.hold(&JobId::parse(&format!("other-{i}")).unwrap()));
        }
        assert_eq!(
            seen.evidence(&job),
            Evidence::None,
            "memory stays bounded: the oldest key is forgotten"
        );
    }
}
