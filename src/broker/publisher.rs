//! Confirmed, persistent, mandatory publishing of results and dead letters.

use std::collections::HashMap;
use std::sync::Mutex;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};

use super::{headers, BrokerError};
use crate::config::QueueNames;
use crate::job::{JobResult, OUTCOME_ID_HEADER, RUN_REPLAY_ID_HEADER};
use crate::pipeline::DeadLetter;

/// Publishes on a confirm channel: a publish returns only once the broker has
/// taken responsibility for the message.
#[derive(Debug, Clone)]
pub struct Publisher {
    channel: Channel,
    queues: QueueNames,
}

impl Publisher {
    /// Opens a confirm channel on the connection.
    pub async fn open(connection: &Connection, queues: QueueNames) -> Result<Self, BrokerError> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self { channel, queues })
    }

    /// Publishes a job's result to `<JOBS_QUEUE>.results`.
    pub async fn result(&self, result: &JobResult) -> Result<(), BrokerError> {
        let body = serde_json::to_vec(result).map_err(|e| BrokerError::NotConfirmed {
            queue: self.queues.results.clone(),
            reason: format!("result could not be serialised: {e}"),
        })?;
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_correlation_id(ShortString::from(headers::job_id(&result.job_id)))
            .with_delivery_mode(2);
        self.publish(&self.queues.results, &body, properties).await
    }

    /// Publishes a dead letter to `<JOBS_QUEUE>.dead` with the contract's headers,
    /// each bounded and printable ([`headers`]); the body keeps the full detail.
    pub async fn dead_letter(&self, letter: &DeadLetter) -> Result<(), BrokerError> {
        let mut table = FieldTable::default();
        let text = |value: String| AMQPValue::LongString(LongString::from(value));
        table.insert(
            "x-error-code".into(),
            text(headers::code(&letter.error_code)),
        );
        table.insert(
            "x-error-message".into(),
            text(headers::message(&letter.error_message)),
        );
        table.insert(
            "x-attempts".into(),
            AMQPValue::LongLongInt(i64::from(letter.attempts)),
        );
        let mut properties = BasicProperties::default().with_delivery_mode(2);
        // Outcome ids are short printable tokens (`OutcomeId`), so they need no
        // bounding. Every copy of a dead letter carries the same ones: they key
        // its replay.
        if let Some(outcome_id) = &letter.outcome_id {
            table.insert(OUTCOME_ID_HEADER.into(), text(outcome_id.to_string()));
        }
        if let Some(run) = &letter.run_replay_id {
            table.insert(RUN_REPLAY_ID_HEADER.into(), text(run.to_string()));
        }
        if let Some(job_id) = &letter.job_id {
            let job_id = headers::job_id(job_id);
            table.insert("x-job-id".into(), text(job_id.clone()));
            properties = properties.with_correlation_id(ShortString::from(job_id));
        }
        if serde_json::from_slice::<serde_json::Value>(&letter.body).is_ok() {
            properties = properties.with_content_type("application/json".into());
        }
        self.publish(
            &self.queues.dead,
            &letter.body,
            properties.with_headers(table),
        )
        .await
    }

    /// Publishes any body to a queue through the default exchange, confirmed.
    pub async fn publish(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        let not_confirmed = |reason: String| BrokerError::NotConfirmed {
            queue: queue.to_owned(),
            reason,
        };
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                queue.into(),
                // Mandatory: a deleted queue must not swallow a result silently.
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await?
            .await?;
        if !confirm.is_ack() {
            return Err(not_confirmed("the broker refused it (nack)".to_owned()));
        }
        if let Some(returned) = confirm.take_message() {
            return Err(not_confirmed(format!(
                "returned unroutable ({}); does the queue exist?",
                returned.reply_text
            )));
        }
        Ok(())
    }
}

/// Counts, per `jobId`, the finished jobs whose outcome the broker refused
/// ([`super::BrokerError::is_refusal`]: a lost connection does not count), so
/// that one the broker keeps refusing is dead-lettered once with the reason
/// instead of being redelivered and republished for ever.
///
/// In-process and bounded: at most [`PublishFailures::MAX_TRACKED`] jobs are
/// counted at once (past that the counts start again, which only delays a
/// give-up), and a job's count goes once its outcome is confirmed.
#[derive(Debug, Default)]
pub struct PublishFailures {
    /// Per job: failures so far and the last one's reason (bounded).
    counts: Mutex<HashMap<String, (u32, String)>>,
}

impl PublishFailures {
    /// Refused publishes of one job's outcome before it is dead-lettered instead.
    /// Each refusal reopens the session after the reconnect backoff (0.2 s, then
    /// doubling), so five in a row span seconds: a refusal that passes (a quorum
    /// queue without a leader for a moment) is outlasted, one that never
    /// passes is given up on within about ten seconds.
    pub const MAX_FAILURES: u32 = 5;
    /// Jobs counted at once.
    pub const MAX_TRACKED: usize = 10_000;

    /// Records a failed publish of `job_id`'s outcome and why it failed.
    pub fn failed(&self, job_id: &str, reason: &str) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if counts.len() >= Self::MAX_TRACKED && !counts.contains_key(job_id) {
            counts.clear();
        }
        let entry = counts.entry(job_id.to_owned()).or_default();
        entry.0 += 1;
        entry.1 = headers::message(reason);
    }

    /// When `job_id`'s outcome has failed to publish often enough to give up:
    /// how many times, and the last reason.
    pub fn exhausted(&self, job_id: &str) -> Option<(u32, String)> {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts
            .get(job_id)
            .filter(|(n, _)| *n >= Self::MAX_FAILURES)
            .cloned()
    }

    /// `job_id`'s outcome (or the dead letter in its place) was confirmed.
    pub fn settled(&self, job_id: &str) {
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(job_id);
    }
}

/// The small dead letter that stands for a finished job whose outcome the broker
/// refused [`PublishFailures::MAX_FAILURES`] times: code `err_publish_failed`,
/// the last refusal as the message, and a body naming the job. The outcome itself
/// stays in the ledger; the job's change was made, so it must not be replayed.
pub fn publish_failed_letter(
    job_id: &str,
    attempts: u32,
    failures: u32,
    reason: &str,
) -> DeadLetter {
    let reason = headers::message(reason);
    let message = format!(
        "the job finished but the broker refused its outcome {failures} times (last: {reason}); its outcome is kept in the ledger; do not replay this message, the change was already made"
    );
    let body = serde_json::json!({
        "jobId": job_id,
        "error": {"code": PUBLISH_FAILED, "message": message},
    });
    DeadLetter {
        body: serde_json::to_vec(&body).unwrap_or_default(),
        error_code: PUBLISH_FAILED.to_owned(),
        error_message: message,
        attempts,
        job_id: Some(job_id.to_owned()),
        outcome_id: None,
        run_replay_id: None,
    }
}

/// `x-error-code` of a job whose outcome could not be published.
pub const PUBLISH_FAILED: &str = "err_publish_failed";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_is_given_up_after_the_allowed_failures_and_forgotten_once_settled() {
        let failures = PublishFailures::default();
        for _ in 1..PublishFailures::MAX_FAILURES {
            failures.failed("j", "nack");
            assert_eq!(failures.exhausted("j"), None);
        }
        failures.failed("j", "nack");
        assert_eq!(
            failures.exhausted("j"),
            Some((PublishFailures::MAX_FAILURES, "nack".to_owned()))
        );
        assert_eq!(failures.exhausted("other"), None);
        failures.settled("j");
        assert_eq!(failures.exhausted("j"), None);
    }

    #[test]
    fn the_counts_stay_bounded() {
        let failures = PublishFailures::default();
        for n in 0..(PublishFailures::MAX_TRACKED * 2) {
            failures.failed(&n.to_string(), "nack");
        }
        assert!(failures.counts.lock().unwrap().len() <= PublishFailures::MAX_TRACKED);
    }

    #[test]
    fn the_stand_in_letter_is_small_and_names_the_job() {
        let reason = "x".repeat(300_000);
        let letter = publish_failed_letter("job-1", 2, 3, &reason);
        assert_eq!(letter.error_code, PUBLISH_FAILED);
        let body: serde_json::Value = serde_json::from_slice(&letter.body).unwrap();
        assert_eq!(body["jobId"], "job-1");
        assert!(headers::message(&letter.error_message).len() <= headers::MAX_MESSAGE_BYTES);
    }
}
