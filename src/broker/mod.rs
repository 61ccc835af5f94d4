//! RabbitMQ: connection, topology, confirmed publishing, and the consume loop.

use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use secrecy::{ExposeSecret, SecretString};

pub mod headers;
mod publisher;
mod topology;

pub use publisher::{publish_failed_letter, PublishFailures, Publisher, PUBLISH_FAILED};
pub use topology::{declare, declare_consumed, inspect_queue, queue_depth};

/// A broker operation that failed; every message says what to check.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The connection could not be opened.
    #[error("cannot connect to RabbitMQ at {url} ({cause}); check AMQP_URL, that the broker is running, and the user's permissions on the vhost")]
    Connect {
        /// The URL with its password hidden.
        url: String,
        /// The cause: printed in the message, so not chained as a source too.
        cause: lapin::Error,
    },
    /// Declaring or checking a queue failed.
    #[error("cannot declare queue {queue} ({cause}); check the user's configure permission on the vhost")]
    Topology {
        /// The queue.
        queue: String,
        /// The cause: printed in the message, so not chained as a source too.
        cause: lapin::Error,
    },
    /// A publish was refused (nack), returned unroutable, or the channel failed before its confirm.
    #[error("publish to {queue} not confirmed: {reason}")]
    NotConfirmed {
        /// The target queue.
        queue: String,
        /// Why.
        reason: String,
    },
    /// Any other channel or connection failure.
    #[error("broker channel failed: {0}")]
    Channel(#[from] lapin::Error),
}

impl BrokerError {
    /// Whether this very message was refused: the broker nacked or returned it,
    /// or the client could not write its frames. Such a refusal comes back every
    /// time the same outcome is published, so it counts towards giving up on it.
    /// A closed channel or connection never does, whatever its reason: it fails
    /// every publish in flight on it alike (an operator's `CONNECTION_FORCED`, a
    /// missed heartbeat, another message's error), so it says nothing about this
    /// one, and the outcomes of innocent jobs must not be given up for it.
    pub fn is_refusal(&self) -> bool {
        match self {
            Self::NotConfirmed { .. } => true,
            Self::Channel(cause) => {
                matches!(cause.kind(), lapin::ErrorKind::SerialisationError(_))
            }
            Self::Connect { .. } | Self::Topology { .. } => false,
        }
    }
}

/// Opens a connection named after this process, so operators can tell workers apart
/// in the management dashboard.
pub async fn connect(url: &SecretString, name: &str) -> Result<Connection, BrokerError> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url.expose_secret(), properties)
        .await
        .map_err(|cause| BrokerError::Connect {
            url: crate::config::redact_url(url.expose_secret()),
            cause,
        })
}

/// A header as text, whatever AMQP type it was sent as.
pub fn header_text(headers: &FieldTable, name: &str) -> Option<String> {
    let value = headers.inner().get(name)?;
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        other => format!("{other:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_refusal_of_the_message_counts_towards_giving_up_on_it() {
        let refused = BrokerError::NotConfirmed {
            queue: "q.results".into(),
            reason: "the broker refused it (nack)".into(),
        };
        assert!(refused.is_refusal());
        let lost = BrokerError::Channel(lapin::Error::from(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert!(!lost.is_refusal());
        let heartbeat = BrokerError::Channel(lapin::ErrorKind::MissingHeartbeatError.into());
        assert!(!heartbeat.is_refusal());
        let forced = BrokerError::Channel(
            lapin::ErrorKind::ProtocolError(lapin::protocol::AMQPError::new(
                lapin::protocol::AMQPErrorKind::Hard(
                    lapin::protocol::AMQPHardError::CONNECTIONFORCED,
                ),
                "CONNECTION_FORCED - closed by an operator".into(),
            ))
            .into(),
        );
        assert!(!forced.is_refusal());
    }
}
