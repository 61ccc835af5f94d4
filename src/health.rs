//! Liveness and readiness of the worker, as `/healthz` and `/readyz` report them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::circuit::Circuits;
use crate::job::VendorKind;
use crate::metrics::Metrics;

/// Shared state read by the HTTP endpoints.
#[derive(Debug)]
pub struct Health {
    consuming: AtomicBool,
    circuits: Arc<Circuits>,
    metrics: Arc<Metrics>,
    sessions: tokio::sync::watch::Sender<u64>,
}

impl Health {
    /// Not consuming yet, no jobs, closed circuits.
    pub fn new(circuits: Arc<Circuits>, metrics: Arc<Metrics>) -> Self {
        Self {
            consuming: AtomicBool::new(false),
            circuits,
            metrics,
            sessions: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Counts a broker session that started consuming.
    pub(crate) fn session_started(&self) {
        self.sessions.send_modify(|n| *n += 1);
    }

    /// Broker sessions that started consuming so far.
    pub(crate) fn sessions_started(&self) -> u64 {
        *self.sessions.borrow()
    }

    /// Resolves once at least `n` broker sessions have started consuming (the
    /// first one included), so tests can await a reconnection.
    pub async fn wait_for_sessions(&self, n: u64) {
        let mut sessions = self.sessions.subscribe();
        let _ = sessions.wait_for(|started| *started >= n).await;
    }

    /// The worker's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Marks whether a broker consumer is active.
    pub fn set_consuming(&self, consuming: bool) {
        self.consuming.store(consuming, Ordering::SeqCst);
    }

    /// Whether a broker consumer is active.
    pub fn is_consuming(&self) -> bool {
        self.consuming.load(Ordering::SeqCst)
    }

    /// Broker sessions lost so far.
    pub fn reconnects(&self) -> u64 {
        self.metrics.broker_reconnects()
    }

    /// The open circuit's reason per vendor.
    pub fn open_circuits(&self) -> Vec<(VendorKind, String)> {
        [VendorKind::Mimecast, VendorKind::Pncp]
            .into_iter()
            .filter_map(|v| self.circuits.get(v).open_reason().map(|r| (v, r)))
            .collect()
    }

    /// `Ok` while connected and taking jobs from every vendor; otherwise why not.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.is_consuming() {
            return Err(
                "not consuming: the broker connection is down or the worker is stopping".to_owned(),
            );
        }
        if let Some(reason) = self.metrics.ledger_failure() {
            return Err(format!(
                "the idempotency ledger is failing, so jobs wait for it: {reason}"
            ));
        }
        let open = self.open_circuits();
        if let Some((vendor, reason)) = open.first() {
            return Err(format!("holding {vendor} jobs: {reason}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_ledger_makes_the_worker_unready_and_says_why() {
        let metrics = Arc::new(Metrics::new());
        let health = Health::new(Arc::new(Circuits::default()), metrics.clone());
        health.set_consuming(true);
        assert!(health.readiness().is_ok());

        metrics.ledger_failed("embedded ledger at data/ledger: No space left on device".into());
        let why = health.readiness().unwrap_err();
        assert!(
            why.contains("ledger") && why.contains("No space left"),
            "{why}"
        );
        assert!(metrics.render().contains("account_worker_ledger_down 1"));

        metrics.ledger_ok();
        assert!(health.readiness().is_ok());
        assert!(metrics.render().contains("account_worker_ledger_down 0"));
    }
}
