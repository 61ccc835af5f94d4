//! The broker's `consumer_timeout`, lowered for an outage run and put back afterwards.
//!
//! RabbitMQ closes a channel whose delivery stays unacked longer than this
//! (checked on each channel tick, every minute by default), and reads the value
//! when a channel opens: it must be set before the workers connect. It is a
//! setting of the whole broker, not of the run's vhost, so the soak restores the
//! value it found however the run ends.

use std::time::Duration;

use anyhow::{bail, Context};

use crate::rabbit::rabbitmqctl;

/// The broker's value before the run: milliseconds, or unset (RabbitMQ's default applies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Previous {
    Millis(u64),
    Unset,
}

/// Reads the broker's current `consumer_timeout`.
pub async fn read() -> anyhow::Result<Previous> {
    let answer = rabbitmqctl(&["eval", "application:get_env(rabbit, consumer_timeout)."]).await?;
    parse(&answer)
}

/// Parses what `application:get_env` prints: `{ok,1800000}` or `undefined`.
fn parse(answer: &str) -> anyhow::Result<Previous> {
    let answer = answer.trim();
    if answer == "undefined" {
        return Ok(Previous::Unset);
    }
    let millis = answer
        .strip_prefix("{ok,")
        .and_then(|rest| rest.strip_suffix('}'))
        .and_then(|value| value.trim().parse().ok());
    match millis {
        Some(millis) => Ok(Previous::Millis(millis)),
        None => bail!("cannot read rabbitmqctl's answer for consumer_timeout: {answer:?}"),
    }
}

/// Sets `consumer_timeout` for channels opened from now on.
pub async fn set(timeout: Duration) -> anyhow::Result<()> {
    let millis = u64::try_from(timeout.as_millis()).context("consumer timeout too long")?;
    let call = format!("application:set_env(rabbit, consumer_timeout, {millis}).");
    rabbitmqctl(&["eval", &call]).await.map(|_| ())
}

/// Puts back the value [`read`] found.
pub async fn restore(previous: Previous) -> anyhow::Result<()> {
    let call = match previous {
        Previous::Millis(millis) => {
            format!("application:set_env(rabbit, consumer_timeout, {millis}).")
        }
        Previous::Unset => "application:unset_env(rabbit, consumer_timeout).".to_owned(),
    };
    rabbitmqctl(&["eval", &call]).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_answers_of_get_env_are_understood_and_others_refused() {
        assert_eq!(
            parse("{ok,1800000}\n").ok(),
            Some(Previous::Millis(1_800_000))
        );
        assert_eq!(parse("undefined\n").ok(), Some(Previous::Unset));
        assert!(parse("{badrpc,nodedown}").is_err());
    }
}
