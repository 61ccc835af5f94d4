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
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::job::JobId;
use crate::ledger::Evidence;

/// Recently claimed keys remembered (about 32 bytes each): ~0.5 MB at most.
const RECENT: usize = 16_384;

/// What is remembered of a recently claimed key.
#[derive(Debug, Clone, Copy)]
struct Memory {
    /// Hash of the body's fingerprint, so a copy with another body is told apart
    /// even when the ledger lost the fingerprint with the entry.
    body: u64,
    /// Whether this process published the job's answer.
    answered: bool,
}

#[derive(Debug, Default)]
struct Inner {
    /// Key hash -> deliveries of this process holding it now, and their body.
    held: HashMap<u64, (u32, u64)>,
    /// Keys claimed recently, and their order for eviction.
    recent: HashMap<u64, Memory>,
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

fn hash(text: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // The record stays consistent whatever panicked while it was locked.
    inner.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Seen {
    /// What an absent entry of `key` means to this process now, for a copy
    /// whose body has `fingerprint` (`None`: a body that could not be read,
    /// which is never taken for another job's).
    pub(crate) fn evidence(&self, key: &JobId, fingerprint: Option<&str>) -> Evidence {
        let key = hash(key.as_str());
        let same = |body: u64| fingerprint.is_none_or(|f| hash(f) == body);
        let inner = lock(&self.inner);
        if let Some(&(_, body)) = inner.held.get(&key) {
            Evidence::HeldHere {
                same_body: same(body),
            }
        } else if let Some(memory) = inner.recent.get(&key) {
            Evidence::Seen {
                same_body: same(memory.body),
                answered: memory.answered,
            }
        } else {
            Evidence::None
        }
    }

    /// Records that a delivery of this process owns `key`, with the body of
    /// `fingerprint`, until the hold drops.
    pub(crate) fn hold(&self, key: &JobId, fingerprint: &str) -> SeenHold {
        let key = hash(key.as_str());
        let body = hash(fingerprint);
        let mut inner = lock(&self.inner);
        inner.held.entry(key).or_insert((0, body)).0 += 1;
        let fresh = Memory {
            body,
            answered: false,
        };
        if inner.recent.insert(key, fresh).is_none() {
            inner.order.push_back(key);
            if inner.order.len() > RECENT {
                if let Some(old) = inner.order.pop_front() {
                    inner.recent.remove(&old);
                }
            }
        }
        SeenHold {
            inner: self.inner.clone(),
            key,
        }
    }
}

impl SeenHold {
    /// The job's outcome is stored and about to be published: should the
    /// ledger lose it, a later copy must get no second, different answer.
    pub(crate) fn answered(&self) {
        if let Some(memory) = lock(&self.inner).recent.get_mut(&self.key) {
            memory.answered = true;
        }
    }
}

impl Drop for SeenHold {
    fn drop(&mut self) {
        let mut inner = lock(&self.inner);
        if let Some((count, _)) = inner.held.get_mut(&self.key) {
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
    fn a_held_job_is_held_here_then_seen_with_its_body_and_answer_and_forgotten_past_the_cap() {
        let seen = Seen::default();
        let job = JobId::parse("j").unwrap();
        assert_eq!(seen.evidence(&job, Some("f1")), Evidence::None);
        let hold = seen.hold(&job, "f1");
        assert_eq!(
            seen.evidence(&job, Some("f1")),
            Evidence::HeldHere { same_body: true }
        );
        assert_eq!(
            seen.evidence(&job, Some("f2")),
            Evidence::HeldHere { same_body: false }
        );
        hold.answered();
        drop(hold);
        assert_eq!(
            seen.evidence(&job, Some("f1")),
            Evidence::Seen {
                same_body: true,
                answered: true
            }
        );
        assert_eq!(
            seen.evidence(&job, None),
            Evidence::Seen {
                same_body: true,
                answered: true
            },
            "an unreadable body is never taken for another"
        );
        for i in 0..RECENT {
            drop(seen.hold(&JobId::parse(&format!("other-{i}")).unwrap(), "f"));
        }
        assert_eq!(
            seen.evidence(&job, Some("f1")),
            Evidence::None,
            "memory stays bounded: the oldest key is forgotten"
        );
    }
}
