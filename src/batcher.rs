//! Coalesces items of different jobs into one vendor call (`MIMECAST_BATCH_MAX`).
//!
//! Under a calls-per-second limit, throughput is items per call × calls per
//! second: update-account takes up to 100 items, so sending ten jobs' items in
//! one call multiplies what the quota carries. Each item's outcome is routed
//! back to the job that submitted it, so a job's result is what it would have
//! been alone; a failure of the whole call is reported to each of its items.
//!
//! A batch first takes its rate-limit turn, then lets each submitter get ready
//! (store its in-flight marker) or withdraw (the worker is stopping), and sends
//! only the items whose submitters are ready. A submission still waiting for the
//! turn, which a 429's pause can make long, has left no marker behind, so a crash
//! or a stop there never reports an unknown outcome for a call never sent.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::job::{Item, VendorKind};
use crate::limiter::Limiters;
use crate::metrics::Metrics;
use crate::vendor::{ItemOutcome, VendorClient, VendorError};

/// What one submission learns once its items were sent: one outcome per item
/// and the call's HTTP status, or the error of the whole call.
pub type CallReply = Result<(Vec<ItemOutcome>, u16), VendorError>;

/// How long a batch that has its turn waits for its submitters to get ready
/// (their markers are one ledger write each) before it leaves without the late
/// ones, so that one slow ledger write cannot hold every other job's items.
const READY_WAIT: Duration = Duration::from_secs(5);

/// Why a submission's items were not sent; each is safe to send again.
#[derive(Debug)]
pub enum NotSent<E> {
    /// The worker began stopping while the items waited for the batch's turn.
    Stopping,
    /// The submitter's last step before the call failed.
    NotReady(E),
    /// The batch left without them: the submitter was not ready within
    /// [`READY_WAIT`], or the batching task has stopped.
    Left,
}

/// The batch's turn came: the submitter sends its reply slot to be included.
type Ready = oneshot::Sender<oneshot::Sender<CallReply>>;

struct Submission {
    items: Vec<Item>,
    turn: oneshot::Sender<Ready>,
}

/// The handle jobs submit items through; cheap to clone.
#[derive(Debug, Clone)]
pub struct Batcher {
    sender: mpsc::Sender<Submission>,
    max_items: usize,
}

impl std::fmt::Debug for Submission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submission")
            .field("items", &self.items.len())
            .finish()
    }
}

impl Batcher {
    /// Starts the batching task for one vendor.
    pub fn start(
        client: VendorClient,
        limiters: Arc<Limiters>,
        metrics: Arc<Metrics>,
        max_items: usize,
        linger: Duration,
    ) -> Self {
        let max_items = max_items.max(1);
        let (sender, receiver) = mpsc::channel(max_items * 64);
        tokio::spawn(run(client, limiters, metrics, receiver, max_items, linger));
        Self { sender, max_items }
    }

    /// Most items one submission (and one call) may carry.
    pub fn max_items(&self) -> usize {
        self.max_items
    }

    /// Sends `items` (at most [`Self::max_items`]) in the next batch and waits
    /// for their outcomes. Once the batch has its rate-limit turn, `ready` runs
    /// (the caller stores its in-flight marker there) and the items go only if it
    /// succeeds. While `stopping` is given, its cancellation before the turn
    /// withdraws the items.
    pub async fn submit<F, Fut, E>(
        &self,
        items: Vec<Item>,
        stopping: Option<&CancellationToken>,
        ready: F,
    ) -> Result<CallReply, NotSent<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(), E>>,
    {
        let (turn, granted) = oneshot::channel();
        if self.sender.send(Submission { items, turn }).await.is_err() {
            return Err(NotSent::Left);
        }
        let granted = match stopping {
            Some(stopping) => tokio::select! {
                biased;
                _ = stopping.cancelled() => return Err(NotSent::Stopping),
                granted = granted => granted,
            },
            None => granted.await,
        };
        let Ok(include) = granted else {
            return Err(NotSent::Left);
        };
        ready().await.map_err(NotSent::NotReady)?;
        let (reply, answer) = oneshot::channel();
        // Refused only when the batch left without these items: nothing sent.
        if include.send(reply).is_err() {
            return Err(NotSent::Left);
        }
        // Included but unanswered: the call may have reached the vendor.
        Ok(answer.await.unwrap_or_else(|_| {
            Err(VendorError::Interrupted(
                "the batching task stopped before answering".to_owned(),
            ))
        }))
    }
}

async fn run(
    client: VendorClient,
    limiters: Arc<Limiters>,
    metrics: Arc<Metrics>,
    mut receiver: mpsc::Receiver<Submission>,
    max_items: usize,
    linger: Duration,
) {
    let vendor = client.kind();
    let client = Arc::new(client);
    let mut carried: Option<Submission> = None;
    loop {
        let first = match carried.take() {
            Some(first) => first,
            None => match receiver.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        let mut size = first.items.len();
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + linger;
        while size < max_items {
            match tokio::time::timeout_at(deadline, receiver.recv()).await {
                Ok(Some(next)) if size + next.items.len() > max_items => {
                    carried = Some(next);
                    break;
                }
                Ok(Some(next)) => {
                    size += next.items.len();
                    batch.push(next);
                }
                Ok(None) | Err(_) => break,
            }
        }
        // The token is taken for the call, not per item: that is the point.
        metrics.rate_limit_queue(vendor, 1);
        let waited = limiters.get(vendor).acquire().await;
        metrics.rate_limit_queue(vendor, -1);
        metrics.rate_limit_waited(vendor, waited);
        // Calls run concurrently; the next batch fills while this one is out.
        tokio::spawn(send(
            client.clone(),
            limiters.clone(),
            metrics.clone(),
            vendor,
            batch,
        ));
    }
}

/// Lets each submitter of a batch whose turn came get ready or withdraw; returns
/// the submissions to send, each with its reply slot.
async fn gather_ready(batch: Vec<Submission>) -> Vec<(Vec<Item>, oneshot::Sender<CallReply>)> {
    let asked: Vec<_> = batch
        .into_iter()
        .filter_map(|submission| {
            let (include, ready) = oneshot::channel();
            // A submitter gone (stopping) is not asked.
            submission.turn.send(include).ok()?;
            Some((submission.items, ready))
        })
        .collect();
    let deadline = tokio::time::Instant::now() + READY_WAIT;
    let answers = asked.into_iter().map(|(items, mut ready)| async move {
        let reply = match tokio::time::timeout_at(deadline, &mut ready).await {
            Ok(reply) => reply.ok(),
            Err(_) => {
                // Closed first, so a submitter either got in before this or
                // learns from its refused send that its items stayed behind.
                ready.close();
                ready.try_recv().ok()
            }
        };
        reply.map(|reply| (items, reply))
    });
    join_all(answers).await.into_iter().flatten().collect()
}

async fn send(
    client: Arc<VendorClient>,
    limiters: Arc<Limiters>,
    metrics: Arc<Metrics>,
    vendor: VendorKind,
    batch: Vec<Submission>,
) {
    let ready = gather_ready(batch).await;
    if ready.is_empty() {
        return;
    }
    let items: Vec<&Item> = ready.iter().flat_map(|(items, _)| items.iter()).collect();
    debug!(items = items.len(), "sending a coalesced call");
    let sent = client.call(&items, limiters.get(vendor), &metrics).await;
    match sent {
        Ok(report) => {
            let http_status = report.http_status;
            let mut outcomes = report.outcomes.into_iter();
            for (items, reply) in ready {
                let own: Vec<ItemOutcome> = outcomes.by_ref().take(items.len()).collect();
                let _ = reply.send(Ok((own, http_status)));
            }
        }
        Err(error) => {
            for (_, reply) in ready {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}
