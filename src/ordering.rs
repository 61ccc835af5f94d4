//! Keeps jobs that touch the same account in delivery order within one worker.
//!
//! `products` replaces and names overwrite, so two jobs for one account must take
//! effect in the order they were queued. Each job takes its place behind the
//! earlier jobs of the same accounts when it is delivered (synchronously, in the
//! consume loop, so places follow delivery order) and waits for them before it
//! calls the vendor; jobs for other accounts run in parallel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::future::{FutureExt, Shared};
use tokio::sync::oneshot;

type Done = Shared<oneshot::Receiver<()>>;

/// The last job in line for each account.
#[derive(Debug, Default)]
pub struct AccountOrder {
    tails: Mutex<HashMap<String, (u64, Done)>>,
    next: Mutex<u64>,
}

/// A job's place in line: wait for it, and drop it when the job is settled.
#[derive(Debug)]
pub struct Place {
    order: Arc<AccountOrder>,
    seq: u64,
    keys: Vec<String>,
    before: Vec<Done>,
    done: Option<oneshot::Sender<()>>,
}

impl AccountOrder {
    /// Takes a place behind every earlier job that shares one of `keys`.
    pub fn enter(self: &Arc<Self>, mut keys: Vec<String>) -> Place {
        keys.sort();
        keys.dedup();
        let seq = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            *next += 1;
            *next
        };
        let (done, signal) = oneshot::channel();
        let signal = signal.shared();
        let mut tails = self.tails.lock().unwrap_or_else(|p| p.into_inner());
        let before = keys
            .iter()
            .filter_map(|key| tails.insert(key.clone(), (seq, signal.clone())))
            .map(|(_, done)| done)
            .collect();
        Place {
            order: self.clone(),
            seq,
            keys,
            before,
            done: Some(done),
        }
    }

    /// Accounts with a job in line now (for tests).
    pub fn accounts_in_line(&self) -> usize {
        self.tails.lock().unwrap_or_else(|p| p.into_inner()).len()
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
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(());
        }
        let mut tails = self.order.tails.lock().unwrap_or_else(|p| p.into_inner());
        for key in &self.keys {
            if tails.get(key).is_some_and(|(seq, _)| *seq == self.seq) {
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
        let first = order.enter(vec!["mimecast:A".into()]);
        let mut second = order.enter(vec!["mimecast:A".into(), "mimecast:B".into()]);
        let mut other = order.enter(vec!["mimecast:C".into()]);
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
}
