//! Coalesces items of different jobs into one vendor call (`MIMECAST_BATCH_MAX`).
//!
//! Under a calls-per-second limit, throughput is items per call × calls per
//! second: update-account takes up to 100 items, so sending ten jobs' items in
//! one call multiplies what the quota carries. Each item's outcome is routed
//! back to the job that submitted it, so a job's result is what it would have
//! been alone; a failure of the whole call is reported to each of its items.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use crate::job::{Item, VendorKind};
use crate::limiter::Limiters;
use crate::metrics::Metrics;
use crate::vendor::{ItemOutcome, VendorClient, VendorError};

/// What one submitted item learns: its own outcome and the call's HTTP status,
/// or the error of the whole call.
pub type ItemReply = Result<(ItemOutcome, u16), VendorError>;

struct Submission {
    item: Item,
    reply: oneshot::Sender<ItemReply>,
}

/// The handle jobs submit items through; cheap to clone.
#[derive(Debug, Clone)]
pub struct Batcher {
    sender: mpsc::Sender<Submission>,
}

impl std::fmt::Debug for Submission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submission")
            .field("account", &self.item.account)
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
        let (sender, receiver) = mpsc::channel(max_items.max(1) * 64);
        tokio::spawn(run(client, limiters, metrics, receiver, max_items, linger));
        Self { sender }
    }

    /// Sends one item in the next batch and waits for its outcome.
    pub async fn submit(&self, item: Item) -> ItemReply {
        let (reply, answer) = oneshot::channel();
        // Not queued: nothing was sent, so resending is safe.
        self.sender
            .send(Submission { item, reply })
            .await
            .map_err(|_| VendorError::Unreachable("the batching task stopped".to_owned()))?;
        // Queued but unanswered: the call may have reached the vendor.
        answer.await.map_err(|_| {
            VendorError::Interrupted("the batching task stopped before answering".to_owned())
        })?
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
    while let Some(first) = receiver.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + linger;
        while batch.len() < max_items {
            match tokio::time::timeout_at(deadline, receiver.recv()).await {
                Ok(Some(next)) => batch.push(next),
                Ok(None) | Err(_) => break,
            }
        }
        // The token is taken for the call, not per item: that is the point.
        let waited = limiters.get(vendor).acquire().await;
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

async fn send(
    client: Arc<VendorClient>,
    limiters: Arc<Limiters>,
    metrics: Arc<Metrics>,
    vendor: VendorKind,
    batch: Vec<Submission>,
) {
    let items: Vec<&Item> = batch.iter().map(|s| &s.item).collect();
    debug!(items = items.len(), "sending a coalesced call");
    let sent = client.call(&items, limiters.get(vendor), &metrics).await;
    match sent {
        Ok(report) => {
            let http_status = report.http_status;
            for (submission, outcome) in batch.into_iter().zip(report.outcomes) {
                let _ = submission.reply.send(Ok((outcome, http_status)));
            }
        }
        Err(error) => {
            for submission in batch {
                let _ = submission.reply.send(Err(error.clone()));
            }
        }
    }
}
