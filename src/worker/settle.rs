//! A job's last step: publish its result and dead letter, ack once both are
//! confirmed, and give up on an outcome the broker keeps refusing; or put a
//! waiting job back at the tail of its queue.

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::Worker;
use crate::broker::{self, Publisher};
use crate::job::JobResult;
use crate::pipeline::DeadLetter;

impl Worker {
    /// Publishes what a finished job produced and acks only once every publish
    /// is confirmed. A publish that fails leaves the delivery unacked and cancels
    /// `broken`: the session is reopened, the broker redelivers the job, and the
    /// ledger's stored outcome is published again. A refusal of the outcome
    /// itself is counted, so one the broker will never take ends as a dead letter
    /// instead of that loop going on for ever.
    pub(super) async fn settle_finished(
        &self,
        delivery: &Delivery,
        result: Option<JobResult>,
        dead_letter: Option<DeadLetter>,
        publisher: &Publisher,
        broken: &CancellationToken,
    ) -> Result<(), lapin::Error> {
        let job_id = result
            .as_ref()
            .map(|r| r.job_id.clone())
            .or_else(|| dead_letter.as_ref().and_then(|d| d.job_id.clone()));
        if let Some(job_id) = &job_id {
            if let Some((failures, reason)) = self.publish_failures.exhausted(job_id) {
                let attempts = result.as_ref().map_or(0, |r| r.attempts);
                let letter = broker::publish_failed_letter(job_id, attempts, failures, &reason);
                return self
                    .give_up_publishing(delivery, job_id, &letter, publisher, broken)
                    .await;
            }
        }
        let publish_result = async {
            match &result {
                Some(result) => publisher.result(result).await,
                None => Ok(()),
            }
        };
        let publish_dead = async {
            match &dead_letter {
                Some(letter) => publisher.dead_letter(letter).await,
                None => Ok(()),
            }
        };
        match tokio::join!(publish_result, publish_dead) {
            (Ok(()), Ok(())) => {
                if let Some(job_id) = &job_id {
                    self.publish_failures.settled(job_id);
                }
                delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map(|_| ())
            }
            (Err(e), _) | (_, Err(e)) => {
                if let Some(job_id) = job_id.as_deref().filter(|_| e.is_refusal()) {
                    self.publish_failures.failed(job_id, &e.to_string());
                }
                error!(error = %e, job_id, "job outcome not confirmed by the broker; reopening the broker session");
                broken.cancel();
                Ok(())
            }
        }
    }

    /// Publishes the small `err_publish_failed` dead letter in place of an
    /// outcome the broker refused too often, and acks: a job whose outcome the
    /// broker will never accept (a policy refusing it, a limit it is over) would
    /// otherwise reopen the session and come back for ever.
    async fn give_up_publishing(
        &self,
        delivery: &Delivery,
        job_id: &str,
        letter: &DeadLetter,
        publisher: &Publisher,
        broken: &CancellationToken,
    ) -> Result<(), lapin::Error> {
        match publisher.dead_letter(letter).await {
            Ok(()) => {
                self.publish_failures.settled(job_id);
                self.health.metrics().dead_lettered(broker::PUBLISH_FAILED);
                error!(job_id, reason = %letter.error_message, "the broker kept refusing a finished job's outcome; dead-lettered it as err_publish_failed instead");
                delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map(|_| ())
            }
            Err(e) => {
                error!(error = %e, job_id, "the err_publish_failed dead letter was not confirmed either; reopening the broker session");
                broken.cancel();
                Ok(())
            }
        }
    }

    /// Puts a waiting job's delivery back at the tail of its queue: the same
    /// body and headers published again (confirmed), then the delivery acked.
    /// A plain nack-requeue would put it back at the head, where the same held
    /// jobs come straight back and the jobs behind them never arrive, and on a
    /// quorum queue each requeue counts towards its delivery limit. When the
    /// publish fails, the delivery is nacked back instead: never lost.
    pub(super) async fn requeue(
        &self,
        delivery: &Delivery,
        queue: &str,
        publisher: &Publisher,
    ) -> Result<(), lapin::Error> {
        let mut properties: BasicProperties = delivery.properties.clone().with_delivery_mode(2);
        if let Some(headers) = properties.headers().clone() {
            // The broker's own count of this message's deliveries: the copy is a
            // new message, and a stale count must not reach its dead-letter logic.
            let mut kept = FieldTable::default();
            for (name, value) in headers.inner() {
                if name.as_str() != "x-delivery-count" {
                    kept.insert(name.clone(), value.clone());
                }
            }
            properties = properties.with_headers(kept);
        }
        match publisher.publish(queue, &delivery.data, properties).await {
            Ok(()) => {
                self.health.metrics().held_requeue();
                delivery.acker.ack(BasicAckOptions::default()).await
            }
            Err(e) => {
                warn!(error = %e, queue, "cannot put a waiting job back at the tail of its queue; handing it back to the head instead");
                delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await
            }
        }
        .map(|_| ())
    }
}
