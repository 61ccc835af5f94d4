//! Confirmed, persistent, mandatory publishing of results and dead letters.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};

use super::BrokerError;
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
            .with_correlation_id(ShortString::from(result.job_id.as_str()))
            .with_delivery_mode(2);
        self.publish(&self.queues.results, &body, properties).await
    }

    /// Publishes a dead letter to `<JOBS_QUEUE>.dead` with the contract's headers.
    pub async fn dead_letter(&self, letter: &DeadLetter) -> Result<(), BrokerError> {
        let mut headers = FieldTable::default();
        let text = |value: &str| AMQPValue::LongString(LongString::from(value));
        headers.insert("x-error-code".into(), text(&letter.error_code));
        headers.insert("x-error-message".into(), text(&letter.error_message));
        headers.insert(
            "x-attempts".into(),
            AMQPValue::LongLongInt(i64::from(letter.attempts)),
        );
        let mut properties = BasicProperties::default().with_delivery_mode(2);
        // Outcome ids are short printable tokens (`OutcomeId`), so they need no
        // bounding. Every copy of a dead letter carries the same ones: they key
        // its replay.
        if let Some(outcome_id) = &letter.outcome_id {
            headers.insert(OUTCOME_ID_HEADER.into(), text(outcome_id.as_str()));
        }
        if let Some(run) = &letter.run_replay_id {
            headers.insert(RUN_REPLAY_ID_HEADER.into(), text(run.as_str()));
        }
        if let Some(job_id) = &letter.job_id {
            headers.insert("x-job-id".into(), text(job_id));
            properties = properties.with_correlation_id(ShortString::from(job_id.as_str()));
        }
        if serde_json::from_slice::<serde_json::Value>(&letter.body).is_ok() {
            properties = properties.with_content_type("application/json".into());
        }
        self.publish(
            &self.queues.dead,
            &letter.body,
            properties.with_headers(headers),
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
