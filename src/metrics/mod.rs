//! Named events that both log and count, and the Prometheus registry behind `/metrics`.
//!
//! Every counter the README documents is here, so that what operators see on a
//! dashboard and what the code records cannot drift apart.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tracing::{info, warn};

use crate::job::VendorKind;

mod http;
mod labels;

pub use http::{bind, serve};

/// A vendor as a label value.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum VendorLabel {
    mimecast,
    pncp,
}

impl From<VendorKind> for VendorLabel {
    fn from(vendor: VendorKind) -> Self {
        match vendor {
            VendorKind::Mimecast => Self::mimecast,
            VendorKind::Pncp => Self::pncp,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VendorLabels {
    vendor: VendorLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    vendor: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    vendor: VendorLabel,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: String,
}

/// The worker's metrics; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    jobs: Family<JobLabels, Counter>,
    items: Family<OutcomeLabels, Counter>,
    vendor_calls: Family<CallLabels, Counter>,
    vendor_latency: Family<VendorLabels, Histogram>,
    retries: Family<VendorLabels, Counter>,
    dead_letters: Family<CodeLabels, Counter>,
    jobs_in_flight: Gauge,
    rate_limit_wait: Family<VendorLabels, Counter<f64, AtomicU64>>,
    rate_limit_waiting: Family<VendorLabels, Gauge>,
    rate_limit_learned: Family<VendorLabels, Gauge<f64, AtomicU64>>,
    /// The learned rate last logged per vendor (Mimecast, PNCP), to log only
    /// changes by more than a factor of two.
    learned_logged: std::sync::Mutex<[Option<f64>; 2]>,
    ledger_duplicates: Counter,
    broker_reconnects: Counter,
    held_requeued: Counter,
    circuit_open: Family<VendorLabels, Gauge>,
    ledger_errors: Counter,
    ledger_lost: Counter,
    ledger_down: Gauge,
    /// Why the last ledger operation failed, while it is down; for `/readyz`.
    ledger_failure: std::sync::Mutex<Option<String>>,
    /// Folds error codes into a bounded set of labels.
    codes: labels::Codes,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under the `account_worker` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("account_worker");
        let jobs = Family::<JobLabels, Counter>::default();
        let items = Family::<OutcomeLabels, Counter>::default();
        let vendor_calls = Family::<CallLabels, Counter>::default();
        let vendor_latency = Family::<VendorLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.005, 2.0, 14))) as fn() -> Histogram,
        );
        let retries = Family::<VendorLabels, Counter>::default();
        let dead_letters = Family::<CodeLabels, Counter>::default();
        let jobs_in_flight = Gauge::default();
        let rate_limit_wait = Family::<VendorLabels, Counter<f64, AtomicU64>>::default();
        let rate_limit_waiting = Family::<VendorLabels, Gauge>::default();
        let rate_limit_learned = Family::<VendorLabels, Gauge<f64, AtomicU64>>::default();
        for vendor in [VendorKind::Mimecast, VendorKind::Pncp] {
            let _ = rate_limit_learned.get_or_create(&VendorLabels {
                vendor: vendor.into(),
            });
        }
        let ledger_duplicates = Counter::default();
        let broker_reconnects = Counter::default();
        let held_requeued = Counter::default();
        let circuit_open = Family::<VendorLabels, Gauge>::default();
        let ledger_errors = Counter::default();
        let ledger_lost = Counter::default();
        let ledger_down = Gauge::default();
        registry.register(
            "ledger_lost",
            "Ledger entries found missing or unreadable where this worker expected one (ledger loss): additive items were not resent; check the ledger's persistence and eviction settings",
            ledger_lost.clone(),
        );
        registry.register(
            "ledger_errors",
            "Ledger operations that failed: the jobs concerned wait, or go back to the queue",
            ledger_errors.clone(),
        );
        registry.register(
            "ledger_down",
            "1 while the last ledger operation failed (jobs wait for the ledger)",
            ledger_down.clone(),
        );
        registry.register(
            "jobs",
            "Jobs finished, by vendor and outcome (succeeded, partial, failed, malformed)",
            jobs.clone(),
        );
        registry.register(
            "items",
            "Items finished, by outcome (succeeded, failed)",
            items.clone(),
        );
        registry.register(
            "vendor_calls",
            "Vendor HTTP calls, by vendor and HTTP status (or timeout, unreachable, interrupted)",
            vendor_calls.clone(),
        );
        registry.register(
            "vendor_call_duration_seconds",
            "Vendor call latency, end to end",
            vendor_latency.clone(),
        );
        registry.register(
            "retries",
            "Retry rounds: a job sending pending items again",
            retries.clone(),
        );
        registry.register(
            "dead_letters",
            "Dead letters published, by x-error-code",
            dead_letters.clone(),
        );
        registry.register(
            "jobs_in_flight",
            "Jobs this worker holds now: running, waiting for a concurrency slot or their account's turn, or publishing (at most the prefetch, 3 x WORKER_CONCURRENCY)",
            jobs_in_flight.clone(),
        );
        registry.register(
            "rate_limit_wait_seconds",
            "Time calls spent waiting for the rate limiter or a 429 pause",
            rate_limit_wait.clone(),
        );
        registry.register(
            "rate_limit_waiting",
            "Calls waiting now for their turn under the rate limit or a 429 pause",
            rate_limit_waiting.clone(),
        );
        registry.register(
            "rate_limit_learned",
            "Calls per second the limiter learned the vendor allows, from its 429s (0 while nothing is learned: calls are not paced)",
            rate_limit_learned.clone(),
        );
        registry.register("ledger_duplicates", "Deliveries of already finished jobs, answered from the ledger without calling the vendor", ledger_duplicates.clone());
        registry.register(
            "broker_reconnects",
            "Broker sessions lost and reopened",
            broker_reconnects.clone(),
        );
        registry.register(
            "held_requeued",
            "Deliveries put back at the tail of their queue while their job waited (vendor held, another copy running), so none stays unacked near the broker's consumer_timeout",
            held_requeued.clone(),
        );
        registry.register(
            "circuit_open",
            "1 while a vendor's jobs are held (credentials refused or vendor unreachable)",
            circuit_open.clone(),
        );
        Self {
            registry,
            jobs,
            items,
            vendor_calls,
            vendor_latency,
            retries,
            dead_letters,
            jobs_in_flight,
            rate_limit_wait,
            rate_limit_waiting,
            rate_limit_learned,
            learned_logged: std::sync::Mutex::new([None; 2]),
            ledger_duplicates,
            broker_reconnects,
            held_requeued,
            circuit_open,
            ledger_errors,
            ledger_lost,
            ledger_down,
            ledger_failure: std::sync::Mutex::new(None),
            codes: labels::Codes::default(),
        }
    }

    /// The registry in Prometheus (OpenMetrics) text form.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            warn!(error = %e, "cannot encode metrics");
        }
        text
    }

    /// A job finished with this outcome and these item counts. `vendor` is the
    /// job's as written: anything but a known vendor counts as `other`.
    pub fn job_finished(&self, vendor: &str, outcome: &str, succeeded: usize, failed: usize) {
        self.jobs
            .get_or_create(&JobLabels {
                vendor: labels::vendor(vendor).to_owned(),
                outcome: labels::job_outcome(outcome).to_owned(),
            })
            .inc();
        for (outcome, count) in [("succeeded", succeeded), ("failed", failed)] {
            if count > 0 {
                self.items
                    .get_or_create(&OutcomeLabels {
                        outcome: outcome.to_owned(),
                    })
                    .inc_by(count as u64);
            }
        }
    }

    /// One vendor call ended with `status` after `elapsed`.
    pub fn vendor_call(&self, vendor: VendorKind, status: &str, elapsed: Duration) {
        self.vendor_calls
            .get_or_create(&CallLabels {
                vendor: vendor.into(),
                status: labels::call_status(status),
            })
            .inc();
        self.vendor_latency
            .get_or_create(&VendorLabels {
                vendor: vendor.into(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// A job sends pending items again.
    pub fn retry(&self, vendor: VendorKind) {
        self.retries
            .get_or_create(&VendorLabels {
                vendor: vendor.into(),
            })
            .inc();
    }

    /// A dead letter was confirmed by the broker. Codes outside a bounded set
    /// (see `labels`) count as `other`.
    pub fn dead_lettered(&self, code: &str) {
        self.dead_letters
            .get_or_create(&CodeLabels {
                code: self.codes.label(code),
            })
            .inc();
    }

    /// A job started (+1) or ended (-1).
    pub fn in_flight(&self, delta: i64) {
        self.jobs_in_flight.inc_by(delta);
    }

    /// Jobs being processed now.
    pub fn jobs_in_flight(&self) -> i64 {
        self.jobs_in_flight.get()
    }

    /// A call waited this long for its rate-limit token.
    pub fn rate_limit_waited(&self, vendor: VendorKind, waited: Duration) {
        if !waited.is_zero() {
            self.rate_limit_wait
                .get_or_create(&VendorLabels {
                    vendor: vendor.into(),
                })
                .inc_by(waited.as_secs_f64());
        }
    }

    /// A call starts (`1`) or stops (`-1`) waiting for its turn under the rate limit.
    pub fn rate_limit_queue(&self, vendor: VendorKind, delta: i64) {
        self.rate_limit_waiting
            .get_or_create(&VendorLabels {
                vendor: vendor.into(),
            })
            .inc_by(delta);
    }

    /// Calls waiting now for their turn under the vendor's rate limit.
    pub fn rate_limit_waiting(&self, vendor: VendorKind) -> i64 {
        self.rate_limit_waiting
            .get_or_create(&VendorLabels {
                vendor: vendor.into(),
            })
            .get()
    }

    /// The rate the limiter learned for `vendor` now (`None`: nothing learned).
    /// Logs when it differs from the last logged value by more than a factor of
    /// two, so a quota that halves or doubles is one line, not one per 429.
    pub fn learned_rate(&self, vendor: VendorKind, rate: Option<f64>) {
        // Nothing learned costs nothing per call: the gauge starts at 0, and a
        // learned rate is never forgotten.
        let Some(rate) = rate else {
            return;
        };
        self.rate_limit_learned
            .get_or_create(&VendorLabels {
                vendor: vendor.into(),
            })
            .set(rate);
        let index = match vendor {
            VendorKind::Mimecast => 0,
            VendorKind::Pncp => 1,
        };
        let mut logged = self
            .learned_logged
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let changed = logged[index].is_none_or(|last| rate > last * 2.0 || rate < last / 2.0);
        if changed {
            let previous = logged[index].replace(rate);
            drop(logged);
            info!(%vendor, rate = format!("{rate:.2}/s"), previous = previous.map(|p| format!("{p:.2}/s")), "learned rate limit changed: the vendor's 429s say it allows about this many calls per second");
        }
    }

    /// A finished job was delivered again and answered from the ledger.
    pub fn ledger_duplicate(&self) {
        self.ledger_duplicates.inc();
    }

    /// The broker session was lost.
    pub fn broker_reconnect(&self) {
        self.broker_reconnects.inc();
    }

    /// A waiting job's delivery was put back at the tail of its queue.
    pub fn held_requeue(&self) {
        self.held_requeued.inc();
    }

    /// Deliveries put back at the tail of their queue so far.
    pub fn held_requeues(&self) -> u64 {
        self.held_requeued.get()
    }

    /// Broker sessions lost so far.
    pub fn broker_reconnects(&self) -> u64 {
        self.broker_reconnects.get()
    }

    /// A job's ledger entry was missing or unreadable where one was expected.
    pub fn ledger_lost(&self) {
        self.ledger_lost.inc();
    }

    /// A ledger operation failed for a reason other than a lost lease.
    pub fn ledger_failed(&self, reason: String) {
        self.ledger_errors.inc();
        *self
            .ledger_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(reason);
        self.ledger_down.set(1);
    }

    /// A ledger operation succeeded; cheap when the ledger was not down.
    pub fn ledger_ok(&self) {
        if self.ledger_down.get() != 0 {
            self.ledger_down.set(0);
            *self
                .ledger_failure
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// Why the ledger is failing, while it is.
    pub fn ledger_failure(&self) -> Option<String> {
        if self.ledger_down.get() == 0 {
            return None;
        }
        self.ledger_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A vendor's circuit opened or closed.
    pub fn circuit(&self, vendor: VendorKind, open: bool) {
        self.circuit_open
            .get_or_create(&VendorLabels {
                vendor: vendor.into(),
            })
            .set(i64::from(open));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_metrics_carry_the_documented_names() {
        let metrics = Metrics::new();
        metrics.job_finished("mimecast", "partial", 1, 1);
        metrics.vendor_call(VendorKind::Mimecast, "200", Duration::from_millis(12));
        metrics.dead_lettered("err_account_not_found");
        metrics.circuit(VendorKind::Pncp, true);
        metrics.learned_rate(VendorKind::Mimecast, Some(9.75));
        let text = metrics.render();
        for line in [
            "account_worker_jobs_total{vendor=\"mimecast\",outcome=\"partial\"} 1",
            "account_worker_items_total{outcome=\"failed\"} 1",
            "account_worker_vendor_calls_total{vendor=\"mimecast\",status=\"200\"} 1",
            "account_worker_dead_letters_total{code=\"err_account_not_found\"} 1",
            "account_worker_circuit_open{vendor=\"pncp\"} 1",
            "account_worker_rate_limit_learned{vendor=\"mimecast\"} 9.75",
            "account_worker_vendor_call_duration_seconds_count{vendor=\"mimecast\"} 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn hostile_jobs_do_not_grow_the_metrics() {
        let metrics = Metrics::new();
        metrics.job_finished("mimecast", "failed", 0, 1);
        metrics.dead_lettered("err_validation_accountCode");
        let before = metrics.render().len();
        for n in 0..200 {
            let vendor = format!("{n}{}", "v".repeat(1000));
            metrics.job_finished(&vendor, "malformed", 0, 0);
            metrics.dead_lettered(&format!("err_validation_{n}{}", "k".repeat(1000)));
            metrics.dead_lettered(&format!("err_vendor_code_{n}"));
            metrics.vendor_call(VendorKind::Pncp, &format!("x{n}"), Duration::ZERO);
        }
        let text = metrics.render();
        assert!(
            text.len() < before + 8 * 1024,
            "grew from {before} to {} bytes:\n{text}",
            text.len()
        );
        assert!(
            text.contains("account_worker_jobs_total{vendor=\"other\",outcome=\"malformed\"} 200")
        );
        assert!(text.contains("account_worker_dead_letters_total{code=\"other\"}"));
    }
}
