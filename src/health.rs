//! Liveness and readiness of the worker, as `/healthz` and `/readyz` report them.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use crate::circuit::Circuits;
use crate::job::VendorKind;

/// Shared state read by the HTTP endpoints.
#[derive(Debug)]
pub struct Health {
    consuming: AtomicBool,
    in_flight: AtomicI64,
    reconnects: AtomicU64,
    circuits: Arc<Circuits>,
}

impl Health {
    /// Not consuming yet, no jobs, closed circuits.
    pub fn new(circuits: Arc<Circuits>) -> Self {
        Self {
            consuming: AtomicBool::new(false),
            in_flight: AtomicI64::new(0),
            reconnects: AtomicU64::new(0),
            circuits,
        }
    }

    /// Marks whether a broker consumer is active.
    pub fn set_consuming(&self, consuming: bool) {
        self.consuming.store(consuming, Ordering::SeqCst);
    }

    /// Whether a broker consumer is active.
    pub fn is_consuming(&self) -> bool {
        self.consuming.load(Ordering::SeqCst)
    }

    /// Counts a lost broker session.
    pub fn count_reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// Broker sessions lost so far.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    pub(crate) fn job_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn job_finished(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Jobs being processed right now.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
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
        let open = self.open_circuits();
        if let Some((vendor, reason)) = open.first() {
            return Err(format!("holding {vendor} jobs: {reason}"));
        }
        Ok(())
    }
}
