//! Keeps jobs that touch the same account in delivery order within one worker.
//!
//! `products` replaces and names overwrite, so two jobs for one account must take
//! effect in the order they were queued. Each job takes its place behind the
//! earlier jobs of the same accounts when it is delivered (synchronously, in the
//! consume loop, so places follow delivery order) and waits for them before it
//! calls the vendor; jobs for other accounts run in parallel.
//!
//! A job put back at the tail of its queue (it waited too long for a held
//! vendor or for its turn) leaves the line, but its account stays parked behind
//! it: until its copy comes back and is settled, every later job of the account
//! goes back to the tail too, behind it, so the account's jobs still take
//! effect in the order they were queued.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::future::{FutureExt, Shared};
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tracing::warn;

type Done = Shared<oneshot::Receiver<()>>;

/// The last job in line for each account, and the jobs put back in the queue.
#[derive(Debug)]
pub struct AccountOrder {
    tails: Mutex<HashMap<String, Tail>>,
    next: Mutex<u64>,
    /// Per account, the jobs put back at the tail of the queue, earliest first.
    parked: Mutex<HashMap<String, VecDeque<Parked>>>,
    /// How long a parked job may stay away before its account stops waiting
    /// for it (its copy went to another worker, or was purged).
    stale_after: Duration,
}

/// The last job in line for an account: its number, its settling, and how to
/// tell it a later job waits behind it.
type Tail = (u64, Done, Arc<Notify>);

/// A job put back at the tail of its queue, and when it last went back.
#[derive(Debug)]
struct Parked {
    job: String,
    /// Its first place in line: parked jobs go in this order, whichever went
    /// back first (a job that gave up waiting for its turn can go back before
    /// the earlier job it waited for).
    rank: u64,
    at: Instant,
}

impl Default for AccountOrder {
    fn default() -> Self {
        Self::new(Duration::from_secs(30 * 60))
    }
}

/// A job's place in line: wait for it, and drop it when the job is settled.
#[derive(Debug)]
pub struct Place {
    order: Arc<AccountOrder>,
    seq: u64,
    keys: Vec<String>,
    /// The job's id: a parked job's copy finds its own place in the parking.
    job: Option<String>,
    before: Vec<Done>,
    done: Option<oneshot::Sender<()>>,
    /// Notified when a later job of one of its accounts takes its place behind
    /// this one: a job waiting for a held vendor then goes back to the queue at
    /// once, and its followers after it, rather than filling the prefetch.
    followed: Arc<Notify>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl AccountOrder {
    /// An empty line whose parked jobs are given up after `stale_after` away.
    pub fn new(stale_after: Duration) -> Self {
        Self {
            tails: Mutex::default(),
            next: Mutex::default(),
            parked: Mutex::default(),
            stale_after,
        }
    }

    /// Takes a place behind every earlier job that shares one of `keys`.
    /// `job` is the job's id (none for a message that is not a job).
    pub fn enter(self: &Arc<Self>, mut keys: Vec<String>, job: Option<&str>) -> Place {
        keys.sort();
        keys.dedup();
        let seq = {
            let mut next = lock(&self.next);
            *next += 1;
            *next
        };
        let (done, signal) = oneshot::channel();
        let signal = signal.shared();
        let followed = Arc::new(Notify::new());
        let mut tails = lock(&self.tails);
        let before = keys
            .iter()
            .filter_map(|key| tails.insert(key.clone(), (seq, signal.clone(), followed.clone())))
            .map(|(_, done, earlier_followed)| {
                // Kept as a permit if the earlier job is not waiting for it yet.
                earlier_followed.notify_one();
                done
            })
            .collect();
        Place {
            order: self.clone(),
            seq,
            keys,
            job: job.map(str::to_owned),
            before,
            done: Some(done),
            followed,
        }
    }

    /// Stops waiting for a parked job: its copy was settled elsewhere (another
    /// worker of a fleet on the same queue took it).
    pub fn forget_parked(&self, job: &str) {
        let mut parked = lock(&self.parked);
        parked.retain(|_, line| {
            line.retain(|p| p.job != job);
            !line.is_empty()
        });
    }

    /// Accounts with a job in line now (for tests).
    pub fn accounts_in_line(&self) -> usize {
        lock(&self.tails).len()
    }
}

impl Place {
    /// Waits until every earlier job of the same accounts is settled.
    pub async fn wait_turn(&mut self) {
        for done in self.before.drain(..) {
            // An error only means the earlier job's place was dropped: settled.
            let _ = done.await;
        }
    }

    /// Notified once a later job of its accounts waits behind it.
    pub fn followed(&self) -> Arc<Notify> {
        self.followed.clone()
    }

    /// Whether the job may go on now that it has its turn: none of its accounts
    /// is parked behind an earlier job put back in the queue (other than this
    /// job itself). A job that may not go must be put back too ([`Place::park`]).
    pub fn may_go(&self) -> bool {
        let mut parked = lock(&self.order.parked);
        let now = Instant::now();
        self.keys.iter().all(|key| {
            let Some(line) = parked.get_mut(key) else {
                return true;
            };
            while let Some(oldest) = line.front() {
                if now.saturating_duration_since(oldest.at) < self.order.stale_after {
                    break;
                }
                warn!(account = %key, job_id = %oldest.job, away = ?self.order.stale_after, "a job put back at the tail of the queue has not come back; its account's later jobs go on without it, so their order may not hold (was it consumed by another worker not on a shard of its own?)");
                line.pop_front();
            }
            let go = line.front().is_none_or(|oldest| Some(&oldest.job) == self.job.as_ref());
            if line.is_empty() {
                parked.remove(key);
            }
            go
        })
    }

    /// The parked jobs this job waits behind (the earliest of each account).
    pub fn blocked_by(&self) -> Vec<String> {
        let parked = lock(&self.order.parked);
        let mut blockers: Vec<String> = self
            .keys
            .iter()
            .filter_map(|key| parked.get(key)?.front())
            .filter(|oldest| Some(&oldest.job) != self.job.as_ref())
            .map(|oldest| oldest.job.clone())
            .collect();
        blockers.dedup();
        blockers
    }

    /// The job goes back to the tail of its queue: its accounts' later jobs go
    /// back behind it until its copy is settled, and so do earlier jobs' copies
    /// that come back after it. Call before the place is dropped.
    pub fn park(&self) {
        let Some(job) = &self.job else { return };
        let mut parked = lock(&self.order.parked);
        let now = Instant::now();
        for key in &self.keys {
            let line = parked.entry(key.clone()).or_default();
            match line.iter_mut().find(|p| &p.job == job) {
                Some(mine) => mine.at = now,
                None => {
                    let at = line.partition_point(|p| p.rank < self.seq);
                    line.insert(
                        at,
                        Parked {
                            job: job.clone(),
                            rank: self.seq,
                            at: now,
                        },
                    );
                }
            }
        }
    }

    /// The job is settled: its accounts no longer wait for it.
    pub fn unpark(&self) {
        let Some(job) = &self.job else { return };
        let mut parked = lock(&self.order.parked);
        for key in &self.keys {
            if let Some(line) = parked.get_mut(key) {
                line.retain(|p| &p.job != job);
                if line.is_empty() {
                    parked.remove(key);
                }
            }
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(());
        }
        let mut tails = lock(&self.order.tails);
        for key in &self.keys {
            if tails.get(key).is_some_and(|(seq, _, _)| *seq == self.seq) {
                tails.remove(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_later_job_for_the_same_account_waits_for_the_earlier_one() {
        let order = Arc::new(AccountOrder::default());
        let first = order.enter(vec!["mimecast:A".into()], Some("1"));
        let mut second = order.enter(vec!["mimecast:A".into(), "mimecast:B".into()], Some("2"));
        let mut other = order.enter(vec!["mimecast:C".into()], Some("3"));
        other.wait_turn().await;
        let waiting = tokio::spawn(async move {
            second.wait_turn().await;
            second
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "B's job waits for A's earlier job");
        drop(first);
        let second = waiting.await.unwrap();
        drop(second);
        drop(other);
        assert_eq!(order.accounts_in_line(), 0, "settled jobs leave no trace");
    }

    #[tokio::test]
    async fn later_jobs_of_a_parked_account_go_back_behind_it_until_it_is_settled() {
        let order = Arc::new(AccountOrder::default());
        let mut first = order.enter(vec!["mimecast:A".into()], Some("1"));
        first.wait_turn().await;
        assert!(first.may_go());
        first.park();
        drop(first);
        // A later job of the account, and a job of another account.
        let mut later = order.enter(vec!["mimecast:A".into(), "mimecast:B".into()], Some("2"));
        let mut other = order.enter(vec!["mimecast:C".into()], Some("3"));
        later.wait_turn().await;
        other.wait_turn().await;
        assert!(
            !later.may_go(),
            "A's later job goes back behind the parked one"
        );
        assert!(other.may_go());
        later.park();
        drop(later);
        // B is parked behind job 2 now, A behind job 1 then job 2.
        let b_only = order.enter(vec!["mimecast:B".into()], Some("4"));
        assert!(!b_only.may_go());
        drop(b_only);
        // The first job's copy comes back: it goes, and once it is settled
        // the second one's copy may go.
        let mut copy = order.enter(vec!["mimecast:A".into()], Some("1"));
        copy.wait_turn().await;
        assert!(copy.may_go());
        copy.unpark();
        drop(copy);
        let second_copy = order.enter(vec!["mimecast:A".into(), "mimecast:B".into()], Some("2"));
        assert!(second_copy.may_go());
        second_copy.unpark();
        drop(second_copy);
        drop(other);
        assert!(order.enter(vec!["mimecast:B".into()], Some("5")).may_go());
    }

    #[tokio::test(start_paused = true)]
    async fn a_parked_job_that_never_comes_back_stops_holding_its_account() {
        let order = Arc::new(AccountOrder::new(Duration::from_secs(60)));
        let gone = order.enter(vec!["pncp:7".into()], Some("gone"));
        gone.park();
        drop(gone);
        let later = order.enter(vec!["pncp:7".into()], Some("later"));
        assert!(!later.may_go());
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(later.may_go(), "given up after its time away");
    }

    #[tokio::test]
    async fn a_job_that_went_back_before_the_earlier_job_it_waited_for_still_goes_after_it() {
        let order = Arc::new(AccountOrder::default());
        let earlier = order.enter(vec!["mimecast:A".into()], Some("1"));
        let impatient = order.enter(vec!["mimecast:A".into()], Some("2"));
        // The later job gives up waiting for its turn first.
        impatient.park();
        drop(impatient);
        earlier.park();
        drop(earlier);
        let second_copy = order.enter(vec!["mimecast:A".into()], Some("2"));
        assert!(
            !second_copy.may_go(),
            "its copy came back first, but job 1 goes first"
        );
        second_copy.park();
        drop(second_copy);
        let first_copy = order.enter(vec!["mimecast:A".into()], Some("1"));
        assert!(first_copy.may_go());
    }
}
