//! Declares the worker's three queues, accepting an operator's own, and checks the jobs queue's delivery limit.

use std::collections::BTreeMap;

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Connection, ErrorKind};
use tracing::{debug, info, warn};

use super::BrokerError;
use crate::config::QueueNames;

/// The delivery limit RabbitMQ 4.0 and later give a quorum queue that sets none.
const DEFAULT_QUORUM_DELIVERY_LIMIT: i64 = 20;

/// Declarations tried while reading a queue's arguments; RabbitMQ checks about 20
/// arguments of a quorum queue, so this is never reached by a real queue.
const MAX_PROBES: usize = 32;

const QUEUE_TYPE: &str = "x-queue-type";
const DELIVERY_LIMIT: &str = "x-delivery-limit";
const DEAD_LETTER_EXCHANGE: &str = "x-dead-letter-exchange";
const DEAD_LETTER_ROUTING_KEY: &str = "x-dead-letter-routing-key";

/// Declares the three queues durable; a queue that exists with other arguments is
/// used as it is. When the jobs queue is such a queue, warns if it is a quorum queue
/// whose delivery limit would drop messages for want of a dead-letter route.
pub async fn declare(connection: &Connection, queues: &QueueNames) -> Result<(), BrokerError> {
    for name in [&queues.jobs, &queues.results, &queues.dead] {
        let declared = declare_one(connection, name).await?;
        if declared == Declared::Existing && name == &queues.jobs {
            check_delivery_limit(connection, queues).await;
        }
    }
    Ok(())
}

/// Declares a queue the worker consumes besides the jobs queue (a shard); one
/// an operator made with other arguments (single active consumer) is used as is.
pub async fn declare_consumed(connection: &Connection, name: &str) -> Result<(), BrokerError> {
    declare_one(connection, name).await.map(|_| ())
}

/// Messages ready in an existing queue.
pub async fn queue_depth(channel: &lapin::Channel, queue: &str) -> Result<u32, BrokerError> {
    inspect_queue(channel, queue)
        .await
        .map(|declared| declared.message_count())
}

/// What the broker reports of an existing queue: its ready messages and its
/// consumers (a passive declare: it creates nothing).
pub async fn inspect_queue(
    channel: &lapin::Channel,
    queue: &str,
) -> Result<lapin::Queue, BrokerError> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|cause| BrokerError::Topology {
            queue: queue.to_owned(),
            cause,
        })
}

/// How a queue declaration went.
#[derive(Debug, PartialEq, Eq)]
enum Declared {
    /// The queue was created, or already existed, with the worker's own arguments.
    AsAsked,
    /// The queue already existed with other arguments; it is used as it is.
    Existing,
}

async fn declare_one(connection: &Connection, name: &str) -> Result<Declared, BrokerError> {
    let topology = |cause| BrokerError::Topology {
        queue: name.to_owned(),
        cause,
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
            Ok(Declared::AsAsked)
        }
        Err(error) if is_precondition_failed(&error) => {
            // The broker closed that channel; check existence on a fresh one.
            let channel = connection.create_channel().await?;
            let messages = queue_depth(&channel, name).await?;
            info!(
                queue = name,
                messages, "using existing queue with its own arguments"
            );
            let _ = channel.close(200, "checked".into()).await;
            Ok(Declared::Existing)
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

/// Warns when the jobs queue is a quorum queue that drops a message delivered too
/// often because it has no dead-letter route. Never fails: a queue whose arguments
/// cannot be read is only noted at debug level.
///
/// AMQP 0-9-1 has no way to read a queue's arguments (`declare-ok` carries only the
/// message and consumer counts), and the management API may be absent or closed to
/// the worker's user. But RabbitMQ checks a redeclaration's arguments against the
/// queue's, one by one, and a mismatch closes the channel naming the argument and
/// its current value ("inequivalent arg 'x-delivery-limit' for queue 'q' in vhost
/// '/': received none but current is the value '20' of type 'long'"). So the check
/// redeclares the queue as a quorum queue dead-lettering to `<jobs>.dead`, each time
/// on a new channel, taking in the value the broker reported, until the
/// declaration matches (it then changes nothing on the broker) or the dead-letter
/// route is known to be there. Policies stay invisible to it: a
/// `dead-letter-exchange` or `delivery-limit` set by policy is not seen, which the
/// warning says.
async fn check_delivery_limit(connection: &Connection, queues: &QueueNames) {
    let queue = queues.jobs.as_str();
    match read_quorum_arguments(connection, queues).await {
        Probe::Quorum(arguments) => {
            if let Some(limit) = limit_without_route(&arguments) {
                let explicit = arguments.contains_key(DELIVERY_LIMIT);
                warn!(
                    queue,
                    delivery_limit = limit,
                    limit_source = if explicit { "x-delivery-limit" } else { "RabbitMQ 4 default" },
                    dead_letter_queue = queues.dead.as_str(),
                    "the jobs queue is a quorum queue with a delivery limit and no dead-letter route: \
                     RabbitMQ drops a message returned to it more than delivery_limit times; give it \
                     a route to dead_letter_queue (a policy with dead-letter-exchange \"\" and \
                     dead-letter-routing-key, or those x- arguments when re-creating it), or ignore \
                     this if a policy already sets one (the worker cannot see policies)"
                );
            } else {
                debug!(
                    queue,
                    ?arguments,
                    "jobs queue is a quorum queue that dead-letters or never drops"
                );
            }
        }
        Probe::Routed => debug!(queue, "jobs queue dead-letters to the dead-letter queue"),
        Probe::NotQuorum => debug!(queue, "jobs queue is not a quorum queue"),
        Probe::Unreadable(reason) => {
            debug!(
                queue,
                reason, "could not read the jobs queue's arguments; delivery limit not checked"
            );
        }
    }
}

/// What redeclaring a queue as a quorum queue revealed.
#[derive(Debug, PartialEq)]
enum Probe {
    /// A quorum queue with exactly these arguments (those RabbitMQ compares).
    Quorum(BTreeMap<String, ArgValue>),
    /// The queue dead-letters along the route the check proposed, whatever its type.
    Routed,
    /// A classic queue or a stream: no delivery limit applies.
    NotQuorum,
    /// The broker's answer could not be read; why.
    Unreadable(String),
}

/// A queue argument value as RabbitMQ reports it in an equivalence error.
#[derive(Debug, Clone, PartialEq)]
enum ArgValue {
    Text(String),
    Int(i64),
    Bool(bool),
    Float(f64),
}

impl ArgValue {
    /// A value as RabbitMQ prints it, given the AMQP field type it names.
    fn parse(kind: &str, text: &str) -> Option<Self> {
        Some(match kind {
            "longstr" | "shortstr" | "binary" => ArgValue::Text(text.to_owned()),
            "byte" | "short" | "signedint" | "long" | "unsignedbyte" | "unsignedshort"
            | "unsignedint" => ArgValue::Int(text.parse().ok()?),
            "bool" => ArgValue::Bool(text.parse().ok()?),
            "float" | "double" => ArgValue::Float(text.parse().ok()?),
            _ => return None,
        })
    }

    /// The AMQP field type `to_amqp` sends.
    fn kind(&self) -> &'static str {
        match self {
            ArgValue::Text(_) => "longstr",
            ArgValue::Int(_) => "long",
            ArgValue::Bool(_) => "bool",
            ArgValue::Float(_) => "double",
        }
    }

    fn to_amqp(&self) -> AMQPValue {
        match self {
            ArgValue::Text(text) => AMQPValue::LongString(LongString::from(text.as_str())),
            ArgValue::Int(n) => AMQPValue::LongLongInt(*n),
            ArgValue::Bool(b) => AMQPValue::Boolean(*b),
            ArgValue::Float(x) => AMQPValue::Double(*x),
        }
    }
}

async fn read_quorum_arguments(connection: &Connection, queues: &QueueNames) -> Probe {
    let text = |value: &str| ArgValue::Text(value.to_owned());
    // Start from the set-up the warning recommends: a well-configured queue then
    // costs a single refused declaration.
    let mut arguments = BTreeMap::from([
        (QUEUE_TYPE.to_owned(), text("quorum")),
        (DEAD_LETTER_EXCHANGE.to_owned(), text("")),
        (DEAD_LETTER_ROUTING_KEY.to_owned(), text(&queues.dead)),
    ]);
    for _ in 0..MAX_PROBES {
        let channel = match connection.create_channel().await {
            Ok(channel) => channel,
            Err(error) => return Probe::Unreadable(error.to_string()),
        };
        let mut table = FieldTable::default();
        for (key, value) in &arguments {
            table.insert(key.as_str().into(), value.to_amqp());
        }
        let options = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let refusal = match channel
            .queue_declare(queues.jobs.as_str().into(), options, table)
            .await
        {
            Ok(_) => {
                let _ = channel.close(200, "arguments read".into()).await;
                return Probe::Quorum(arguments);
            }
            Err(error) => match error.kind() {
                ErrorKind::ProtocolError(amqp) if amqp.get_id() == 406 => {
                    amqp.get_message().as_str().to_owned()
                }
                _ => return Probe::Unreadable(error.to_string()),
            },
        };
        let Some((key, current)) = parse_inequivalent_arg(&refusal, &arguments) else {
            return Probe::Unreadable(refusal);
        };
        if key == QUEUE_TYPE {
            return Probe::NotQuorum;
        }
        // RabbitMQ (3.10 and later) compares a quorum queue's dead-letter arguments
        // before all others: a refusal over another one means those matched.
        let dead_letter_key = key == DEAD_LETTER_EXCHANGE || key == DEAD_LETTER_ROUTING_KEY;
        if !dead_letter_key && has_dead_letter_route(&arguments) {
            return Probe::Routed;
        }
        if arguments.get(&key) == current.as_ref() {
            return Probe::Unreadable(refusal);
        }
        match current {
            Some(value) => arguments.insert(key, value),
            None => arguments.remove(&key),
        };
    }
    Probe::Unreadable(format!("no matching declaration after {MAX_PROBES} tries"))
}

/// Reads RabbitMQ's argument equivalence error: the argument's name and its current
/// value (`None` when the queue does not have it). RabbitMQ names the value's type
/// only when the refused declaration did not carry that argument; otherwise the
/// value is read as the type of the one `sent`.
fn parse_inequivalent_arg(
    text: &str,
    sent: &BTreeMap<String, ArgValue>,
) -> Option<(String, Option<ArgValue>)> {
    let rest = text.split_once("inequivalent arg '")?.1;
    let (key, rest) = rest.split_once("' for ")?;
    let current = rest.rsplit_once(" but current is ")?.1;
    if current == "none" {
        return Some((key.to_owned(), None));
    }
    let value = match current.strip_prefix("the value '") {
        Some(typed) => {
            let (value, kind) = typed.rsplit_once("' of type '")?;
            ArgValue::parse(kind.strip_suffix('\'')?, value)?
        }
        None => {
            let value = current.strip_prefix('\'')?.strip_suffix('\'')?;
            ArgValue::parse(sent.get(key)?.kind(), value)?
        }
    };
    Some((key.to_owned(), Some(value)))
}

/// Whether these arguments send dead letters somewhere else than back to the queue.
fn has_dead_letter_route(arguments: &BTreeMap<String, ArgValue>) -> bool {
    // The default exchange with the original routing key leads back to this very
    // queue, where RabbitMQ's cycle detection drops the message.
    match arguments.get(DEAD_LETTER_EXCHANGE) {
        Some(ArgValue::Text(name)) => {
            !name.is_empty() || arguments.contains_key(DEAD_LETTER_ROUTING_KEY)
        }
        Some(_) => true,
        None => false,
    }
}

/// The delivery limit past which the queue drops messages, when it has no
/// dead-letter route; `None` when it dead-letters them or has no limit.
fn limit_without_route(arguments: &BTreeMap<String, ArgValue>) -> Option<i64> {
    if has_dead_letter_route(arguments) {
        return None;
    }
    match arguments.get(DELIVERY_LIMIT) {
        None => Some(DEFAULT_QUORUM_DELIVERY_LIMIT),
        Some(ArgValue::Int(limit)) if *limit >= 0 => Some(*limit),
        // A negative limit turns the limit off (RabbitMQ 4).
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A quorum queue's arguments: `x-queue-type` and these.
    fn quorum(pairs: &[(&str, ArgValue)]) -> BTreeMap<String, ArgValue> {
        let mut arguments = BTreeMap::from([(
            "x-queue-type".to_owned(),
            ArgValue::Text("quorum".to_owned()),
        )]);
        for (key, value) in pairs {
            arguments.insert((*key).to_owned(), value.clone());
        }
        arguments
    }

    #[test]
    fn equivalence_error_yields_the_current_value() {
        let sent = quorum(&[]);
        let text = "PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue 'jobs' in vhost '/': received none but current is the value '20' of type 'long'";
        assert_eq!(
            parse_inequivalent_arg(text, &sent),
            Some(("x-delivery-limit".to_owned(), Some(ArgValue::Int(20))))
        );
        let text = "PRECONDITION_FAILED - inequivalent arg 'x-dead-letter-exchange' for queue 'it's' in vhost 'v': received none but current is the value '' of type 'longstr'";
        assert_eq!(
            parse_inequivalent_arg(text, &sent),
            Some((
                "x-dead-letter-exchange".to_owned(),
                Some(ArgValue::Text(String::new()))
            ))
        );
        let text = "PRECONDITION_FAILED - inequivalent arg 'x-single-active-consumer' for queue 'q' in vhost '/': received none but current is the value 'true' of type 'bool'";
        assert_eq!(
            parse_inequivalent_arg(text, &sent),
            Some((
                "x-single-active-consumer".to_owned(),
                Some(ArgValue::Bool(true))
            ))
        );
    }

    #[test]
    fn equivalence_error_over_a_sent_value_is_read_as_its_type() {
        // When both sides carry the argument, RabbitMQ prints bare values.
        let sent = quorum(&[
            ("x-dead-letter-routing-key", ArgValue::Text("q.dead".into())),
            ("x-delivery-limit", ArgValue::Int(20)),
        ]);
        let text = "PRECONDITION_FAILED - inequivalent arg 'x-dead-letter-routing-key' for queue 'q' in vhost '/': received 'q.dead' but current is 'elsewhere'";
        assert_eq!(
            parse_inequivalent_arg(text, &sent),
            Some((
                "x-dead-letter-routing-key".to_owned(),
                Some(ArgValue::Text("elsewhere".into()))
            ))
        );
        let text = "PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue 'q' in vhost '/': received '20' but current is '5'";
        assert_eq!(
            parse_inequivalent_arg(text, &sent),
            Some(("x-delivery-limit".to_owned(), Some(ArgValue::Int(5))))
        );
    }

    #[test]
    fn equivalence_error_on_the_queue_type_names_it_without_value() {
        let text = "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost '/': received the value 'quorum' of type 'longstr' but current is none";
        assert_eq!(
            parse_inequivalent_arg(text, &quorum(&[])),
            Some(("x-queue-type".to_owned(), None))
        );
    }

    #[test]
    fn other_errors_and_truncated_texts_are_not_read() {
        let sent = quorum(&[]);
        assert_eq!(
            parse_inequivalent_arg("NOT_FOUND - no queue 'q'", &sent),
            None
        );
        let truncated = "PRECONDITION_FAILED - inequivalent arg 'x-dead-letter-routing-key' for queue 'q' in vhost '/': received none but current is the value 'q.de";
        assert_eq!(parse_inequivalent_arg(truncated, &sent), None);
        let unsent = "PRECONDITION_FAILED - inequivalent arg 'x-expires' for queue 'q' in vhost '/': received '1' but current is '2'";
        assert_eq!(parse_inequivalent_arg(unsent, &sent), None);
    }

    #[test]
    fn quorum_queue_without_dead_letter_route_drops_past_its_limit() {
        assert_eq!(limit_without_route(&quorum(&[])), Some(20));
        assert_eq!(
            limit_without_route(&quorum(&[("x-delivery-limit", ArgValue::Int(5))])),
            Some(5)
        );
        assert_eq!(
            limit_without_route(&quorum(&[(
                "x-dead-letter-exchange",
                ArgValue::Text(String::new())
            )])),
            Some(20),
            "the default exchange without a routing key leads back to the queue itself"
        );
    }

    #[test]
    fn quorum_queue_with_dead_letter_route_or_no_limit_is_fine() {
        assert_eq!(
            limit_without_route(&quorum(&[
                ("x-delivery-limit", ArgValue::Int(20)),
                ("x-dead-letter-exchange", ArgValue::Text(String::new())),
                (
                    "x-dead-letter-routing-key",
                    ArgValue::Text("jobs.dead".into())
                ),
            ])),
            None
        );
        assert_eq!(
            limit_without_route(&quorum(&[(
                "x-dead-letter-exchange",
                ArgValue::Text("dlx".into())
            )])),
            None
        );
        assert_eq!(
            limit_without_route(&quorum(&[("x-delivery-limit", ArgValue::Int(-1))])),
            None
        );
    }
}
