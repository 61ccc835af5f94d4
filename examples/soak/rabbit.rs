//! The soak's side of RabbitMQ: its own vhost, publishing with confirms, reading
//! results and dead letters, queue counts, and closing the workers' connections.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::Value;

use account_worker::config::QueueNames;

use crate::jobs::PlannedJob;
use crate::tally::Seen;

/// The name of the soak's own connection: the one the closer spares.
pub const DRIVER_CONNECTION: &str = "account-worker soak driver";

/// Runs `rabbitmqctl` with `args` and returns its standard output, or an error
/// naming the command and what it printed.
pub async fn rabbitmqctl(args: &[&str]) -> anyhow::Result<String> {
    let output = tokio::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .await
        .context("cannot run rabbitmqctl; the soak needs it (as root, on the broker's host) to make its vhost and close connections")?;
    if !output.status.success() {
        bail!(
            "rabbitmqctl {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Makes the run's own vhost, so that closing "every connection" touches only this
/// run's workers, never another user of the broker.
pub async fn create_vhost(vhost: &str, user: &str) -> anyhow::Result<()> {
    rabbitmqctl(&["add_vhost", vhost]).await?;
    rabbitmqctl(&["set_permissions", "-p", vhost, user, ".*", ".*", ".*"]).await?;
    Ok(())
}

/// Deletes the run's vhost and its queues.
pub async fn delete_vhost(vhost: &str) -> anyhow::Result<()> {
    rabbitmqctl(&["delete_vhost", vhost]).await.map(|_| ())
}

/// Closes every connection in `vhost` except the soak's own; returns how many.
pub async fn close_worker_connections(vhost: &str) -> anyhow::Result<usize> {
    // The name a client gives its connection shows only in its client
    // properties (`name` is the peer address pair). `list_connections` ignores
    // `-p` and lists the whole broker's, so the vhost is filtered here: without
    // it, a soak closes the workers of every other run on the same broker.
    let listing = rabbitmqctl(&[
        "list_connections",
        "pid",
        "vhost",
        "client_properties",
        "--silent",
    ])
    .await?;
    let mut closed = 0;
    for line in listing.lines() {
        let mut fields = line.splitn(3, '\t');
        let (Some(pid), Some(their_vhost), Some(properties)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if their_vhost.trim() != vhost || properties.contains(DRIVER_CONNECTION) {
            continue;
        }
        rabbitmqctl(&[
            "close_connection",
            pid.trim(),
            "soak: scheduled connection close",
        ])
        .await?;
        closed += 1;
    }
    Ok(closed)
}

/// Ready and unacknowledged messages of each of the run's queues.
pub async fn queue_counts(vhost: &str) -> anyhow::Result<HashMap<String, (u64, u64)>> {
    let listing = rabbitmqctl(&[
        "list_queues",
        "-p",
        vhost,
        "name",
        "messages_ready",
        "messages_unacknowledged",
        "--silent",
    ])
    .await?;
    let mut counts = HashMap::new();
    for line in listing.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        if let [name, ready, unacked] = fields[..] {
            if let (Ok(ready), Ok(unacked)) = (ready.trim().parse(), unacked.trim().parse()) {
                counts.insert(name.to_owned(), (ready, unacked));
            }
        }
    }
    Ok(counts)
}

/// What the publisher has done so far, for the outage figures.
#[derive(Debug, Default)]
pub struct PublishLog {
    /// Messages published (copies included).
    pub count: AtomicUsize,
    /// When each jobId was first published: the start of its publish-to-answer latency.
    pub first_at: Mutex<HashMap<String, std::time::Instant>>,
}

/// The soak's connection (spared by the closer) with a confirm channel.
pub async fn connect(url: &str) -> anyhow::Result<(Connection, Channel)> {
    let properties = ConnectionProperties::default().with_connection_name(DRIVER_CONNECTION.into());
    let connection = Connection::connect(url, properties)
        .await
        .with_context(|| {
            format!(
                "cannot connect to RabbitMQ at {}",
                account_worker::config::redact_url(url)
            )
        })?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok((connection, channel))
}

/// Publishes each job (persistent, confirmed), `window` confirms in flight at most,
/// noting in `log` how many are out and when each jobId first went;
/// with `per_second`, job `n` goes no earlier than `n / per_second` after the
/// start, so an outage run has jobs of both vendors arriving all along.
pub async fn publish(
    channel: &Channel,
    queue: &str,
    jobs: impl Iterator<Item = &PlannedJob>,
    window: usize,
    per_second: Option<f64>,
    log: &PublishLog,
) -> anyhow::Result<usize> {
    let mut pending = Vec::with_capacity(window);
    let mut published = 0;
    let started = tokio::time::Instant::now();
    for job in jobs {
        if let Some(rate) = per_second {
            let due = started + std::time::Duration::from_secs_f64(published as f64 / rate);
            tokio::time::sleep_until(due).await;
        }
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &job.body,
                properties,
            )
            .await
            .context("publishing a soak job")?;
        pending.push(confirm);
        published += 1;
        log.count.store(published, Ordering::SeqCst);
        log.first_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(job.id.clone())
            .or_insert_with(std::time::Instant::now);
        if pending.len() >= window {
            settle(&mut pending).await?;
        }
    }
    settle(&mut pending).await?;
    Ok(published)
}

async fn settle(pending: &mut Vec<lapin::PublisherConfirm>) -> anyhow::Result<()> {
    for confirm in pending.drain(..) {
        let confirmation = confirm.await.context("waiting for a publish confirm")?;
        if !confirmation.is_ack() {
            bail!("the broker refused a soak job (nack)");
        }
    }
    Ok(())
}

/// Consumes results and dead letters into `seen` until the connection ends;
/// each message is recorded before it is acked.
pub async fn collect(
    channel: Channel,
    names: QueueNames,
    seen: Arc<Mutex<Seen>>,
) -> anyhow::Result<()> {
    let options = BasicConsumeOptions::default();
    let mut results = channel
        .basic_consume(
            names.results.as_str().into(),
            "".into(),
            options,
            FieldTable::default(),
        )
        .await?;
    let mut dead = channel
        .basic_consume(
            names.dead.as_str().into(),
            "".into(),
            options,
            FieldTable::default(),
        )
        .await?;
    loop {
        let (delivery, is_result) = tokio::select! {
            Some(delivery) = results.next() => (delivery?, true),
            Some(delivery) = dead.next() => (delivery?, false),
            else => return Ok(()),
        };
        {
            let mut seen = seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if is_result {
                record_result(&mut seen, &delivery.data);
            } else {
                record_dead_letter(&mut seen, &delivery);
            }
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
}

fn record_result(seen: &mut Seen, body: &[u8]) {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let job_id = parsed
        .as_ref()
        .and_then(|v| v.get("jobId"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    match (job_id, parsed) {
        (Some(id), Some(result)) => {
            seen.note_answer(&id);
            seen.results.entry(id).or_default().push(result);
        }
        _ => seen.strays += 1,
    }
}

fn record_dead_letter(seen: &mut Seen, delivery: &lapin::message::Delivery) {
    let headers = delivery.properties.headers().clone().unwrap_or_default();
    let header = |name: &str| account_worker::broker::header_text(&headers, name);
    let job_id = header("x-job-id").or_else(|| {
        serde_json::from_slice::<Value>(&delivery.data)
            .ok()
            .and_then(|v| v.get("jobId").and_then(Value::as_str).map(str::to_owned))
    });
    let code = header("x-error-code").unwrap_or_else(|| "(no x-error-code)".into());
    match job_id {
        Some(id) => {
            seen.note_answer(&id);
            seen.dead.entry(id).or_default().push(code);
        }
        None => seen.strays += 1,
    }
}
