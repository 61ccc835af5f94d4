//! Declares the jobs, results and dead-letter queues, accepting queues an operator
//! already made with other arguments (quorum queues, delivery limits).

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ErrorKind};
use tracing::{info, warn};

use super::BrokerError;
use crate::config::QueueNames;

/// Declares the three queues durable; a queue that exists with other arguments is
/// used as it is.
pub async fn declare(connection: &Connection, queues: &QueueNames) -> Result<(), BrokerError> {
    for name in [&queues.jobs, &queues.results, &queues.dead] {
        declare_one(connection, name).await?;
    }
    Ok(())
}

async fn declare_one(connection: &Connection, name: &str) -> Result<(), BrokerError> {
    let topology = |source| BrokerError::Topology {
        queue: name.to_owned(),
        source,
    };
    let channel = connection.create_channel().await?;
    let declared = channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(_) => {
            let _ = channel.close(200, "declared".into()).await;
            Ok(())
        }
        Err(error) if is_precondition_failed(&error) => {
            // The broker closed that channel; check existence on a fresh one.
            let channel = connection.create_channel().await?;
            let queue = channel
                .queue_declare(
                    name.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(topology)?;
            info!(
                queue = name,
                messages = queue.message_count(),
                "using existing queue with its own arguments"
            );
            let _ = channel.close(200, "checked".into()).await;
            Ok(())
        }
        Err(error) => {
            warn!(queue = name, error = %error, "queue declaration failed");
            Err(topology(error))
        }
    }
}

fn is_precondition_failed(error: &lapin::Error) -> bool {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => amqp.get_id() == 406,
        _ => false,
    }
}
