//! The soak's chaos: what it did, and the scheduled closes of the workers' connections.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::rabbit;

/// What the chaos tasks did, for the report.
#[derive(Debug, Default)]
pub struct Chaos {
    pub close_rounds: usize,
    pub connections_closed: usize,
    pub close_errors: Vec<String>,
    pub killed_at: Option<Duration>,
    pub unexpected_exits: Vec<String>,
}

/// Locks the record; a panic elsewhere leaves its plain counts usable.
pub fn lock(chaos: &Mutex<Chaos>) -> std::sync::MutexGuard<'_, Chaos> {
    chaos.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Closes every worker connection each `every`, until `stop`.
pub async fn close_on_schedule(
    vhost: String,
    every: Duration,
    chaos: Arc<Mutex<Chaos>>,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let outcome = rabbit::close_worker_connections(&vhost).await;
        let mut chaos = lock(&chaos);
        chaos.close_rounds += 1;
        match outcome {
            Ok(closed) => chaos.connections_closed += closed,
            Err(error) => chaos.close_errors.push(format!("{error:#}")),
        }
    }
}
