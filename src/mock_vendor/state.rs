//! The mock's in-memory state: accounts, the request record, fault queues, throttles and tasks.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::{Index, IndexMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio::sync::watch;

use super::model::{Fault, MimecastAccount, RecordedRequest, Vendor, STATUS_CLIENT_GONE};
use super::random::RandomDraw;
use super::throttle::Throttle;
use super::MockVendorConfig;

/// Everything the handlers share: fixed configuration plus the locked state.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) config: MockVendorConfig,
    started: Instant,
    inner: Mutex<Inner>,
    /// Requests being served now, and the most at once since the last reset:
    /// what a client's concurrency limit is checked against.
    serving: AtomicUsize,
    peak_serving: AtomicUsize,
}

impl Shared {
    pub(super) fn new(config: MockVendorConfig) -> Self {
        let latency = config.latency;
        Self {
            config,
            started: Instant::now(),
            inner: Mutex::new(Inner::new(latency)),
            serving: AtomicUsize::new(0),
            peak_serving: AtomicUsize::new(0),
        }
    }

    /// The most requests served at once since the last [`Self::reset_peak`].
    pub(super) fn peak_serving(&self) -> usize {
        self.peak_serving.load(Ordering::SeqCst)
    }

    /// Starts the peak count again from the requests being served now.
    pub(super) fn reset_peak(&self) {
        self.peak_serving
            .store(self.serving.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// Locks the state; hold the guard for a few synchronous steps only.
    /// A panic elsewhere while locked leaves the data usable, so poisoning is ignored.
    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Milliseconds since the mock started: the clock of `at_ms` and of throttle windows.
    pub(super) fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// One value per vendor, indexed by [`Vendor`].
#[derive(Debug, Default)]
pub(super) struct PerVendor<T> {
    mimecast: T,
    pncp: T,
}

impl<T> Index<Vendor> for PerVendor<T> {
    type Output = T;
    fn index(&self, vendor: Vendor) -> &T {
        match vendor {
            Vendor::Mimecast => &self.mimecast,
            Vendor::Pncp => &self.pncp,
        }
    }
}

impl<T> IndexMut<Vendor> for PerVendor<T> {
    fn index_mut(&mut self, vendor: Vendor) -> &mut T {
        match vendor {
            Vendor::Mimecast => &mut self.mimecast,
            Vendor::Pncp => &mut self.pncp,
        }
    }
}

/// The mutable state behind the mutex.
#[derive(Debug)]
pub(super) struct Inner {
    pub(super) latency: Duration,
    pub(super) records: Vec<RecordedRequest>,
    recorded: watch::Sender<usize>,
    /// Requests that passed the checks and are being handled (counted on
    /// arrival, before any delay, unlike `records`).
    admitted: watch::Sender<usize>,
    pub(super) seen_request_ids: HashSet<String>,
    pub(super) mimecast_accounts: HashMap<String, MimecastAccount>,
    pub(super) pncp_accounts: HashMap<String, Value>,
    pub(super) applied: PerVendor<HashMap<String, usize>>,
    pub(super) faults: PerVendor<VecDeque<Fault>>,
    pub(super) throttles: PerVendor<Throttle>,
    /// The status every request to the vendor answers while its full outage is
    /// on ([`super::MockVendor::set_outage`]); nothing is applied meanwhile.
    pub(super) outage: PerVendor<Option<u16>>,
    pub(super) tasks: HashMap<String, Task>,
    /// The random fault mode, when on: draws a fault for requests that find none queued.
    pub(super) random: Option<RandomDraw>,
}

impl Inner {
    fn new(latency: Duration) -> Self {
        Self {
            latency,
            records: Vec::new(),
            recorded: watch::Sender::new(0),
            admitted: watch::Sender::new(0),
            seen_request_ids: HashSet::new(),
            mimecast_accounts: HashMap::new(),
            pncp_accounts: HashMap::new(),
            applied: PerVendor::default(),
            faults: PerVendor::default(),
            throttles: PerVendor::default(),
            outage: PerVendor::default(),
            tasks: HashMap::new(),
            random: None,
        }
    }

    /// Takes the next fault for `vendor` (a queued one, else one the random fault
    /// mode may draw) and counts the request as admitted.
    pub(super) fn admit_next(
        &mut self,
        vendor: crate::mock_vendor::Vendor,
    ) -> Option<crate::mock_vendor::Fault> {
        self.admitted.send_modify(|n| *n += 1);
        self.faults[vendor]
            .pop_front()
            .or_else(|| self.random.as_mut().and_then(RandomDraw::next))
    }

    /// The status a request to `vendor` answers instead of being served, while
    /// the vendor's full outage is on. Checked after the vendor's own checks and
    /// before its throttle, so an outage answers like a proxy in front of a
    /// vendor that is down: one status for everything, nothing applied.
    pub(super) fn outage_status(&self, vendor: Vendor) -> Option<u16> {
        self.outage[vendor]
    }

    /// A receiver of the number of admitted requests.
    pub(super) fn subscribe_admitted(&self) -> watch::Receiver<usize> {
        self.admitted.subscribe()
    }

    /// A receiver of the number of recorded requests.
    pub(super) fn subscribe(&self) -> watch::Receiver<usize> {
        self.recorded.subscribe()
    }

    /// Clears everything a test run leaves behind, keeping latency, throttles,
    /// outages and the random fault mode (they steer the mock, like its config).
    pub(super) fn reset(&mut self) {
        self.records.clear();
        self.recorded.send_replace(0);
        self.admitted.send_replace(0);
        self.seen_request_ids.clear();
        self.mimecast_accounts.clear();
        self.pncp_accounts.clear();
        self.applied = PerVendor::default();
        self.faults = PerVendor::default();
        self.tasks.clear();
    }

    /// Counts one applied change to `account`.
    pub(super) fn count_applied(&mut self, vendor: Vendor, account: &str) {
        match self.applied[vendor].get_mut(account) {
            Some(count) => *count += 1,
            None => {
                self.applied[vendor].insert(account.to_owned(), 1);
            }
        }
    }

    /// Merges a Modify Account body into the PNCP account and returns the account as
    /// the vendor answers it (body fields, `signUpDate`, `accountResource`).
    pub(super) fn apply_pncp(&mut self, account_id: &str, body: &Map<String, Value>) -> Value {
        let account = self
            .pncp_accounts
            .entry(account_id.to_owned())
            .or_insert_with(|| {
                let mut fresh = Map::new();
                let signed_up = chrono::Utc::now().format("%Y/%m/%d %H:%M:%S");
                fresh.insert("signUpDate".into(), Value::String(signed_up.to_string()));
                Value::Object(fresh)
            });
        if let Value::Object(fields) = account {
            for (key, value) in body {
                fields.insert(key.clone(), value.clone());
            }
            let resource = serde_json::json!({ "resourceURL": format!("/account/{account_id}") });
            fields.insert("accountResource".into(), resource);
        }
        let answer = account.clone();
        self.count_applied(Vendor::Pncp, account_id);
        answer
    }

    fn record(&mut self, draft: Draft, status: u16, applied: bool) {
        let seq = self.records.len() as u64 + 1;
        self.records.push(RecordedRequest {
            seq,
            vendor: draft.vendor,
            method: draft.method.to_owned(),
            path: draft.path,
            request_id: draft.request_id,
            body: draft.body,
            status,
            applied,
            fault: draft.fault.map(str::to_owned),
            at_ms: draft.at_ms,
        });
        self.recorded.send_replace(self.records.len());
    }
}

/// An accepted PNCP change waiting behind a task the client polls.
#[derive(Debug)]
pub(super) struct Task {
    pub(super) account_id: String,
    pub(super) body: Map<String, Value>,
    pub(super) succeed: bool,
    pub(super) polls_left: u32,
    pub(super) closed: bool,
}

/// A request being served. It is recorded exactly once: by [`Pending::finish`], or,
/// if the handler is dropped first (client gone), on drop with
/// [`STATUS_CLIENT_GONE`] and nothing applied.
#[derive(Debug)]
pub(super) struct Pending {
    shared: Arc<Shared>,
    draft: Option<Draft>,
}

#[derive(Debug)]
struct Draft {
    vendor: Vendor,
    method: &'static str,
    path: String,
    request_id: Option<String>,
    body: Value,
    fault: Option<&'static str>,
    at_ms: u64,
}

impl Pending {
    pub(super) fn new(
        shared: &Arc<Shared>,
        vendor: Vendor,
        method: &'static str,
        path: String,
        request_id: Option<String>,
        body: Value,
    ) -> Self {
        let at_ms = shared.elapsed_ms();
        let serving = shared.serving.fetch_add(1, Ordering::SeqCst) + 1;
        shared.peak_serving.fetch_max(serving, Ordering::SeqCst);
        Self {
            shared: Arc::clone(shared),
            draft: Some(Draft {
                vendor,
                method,
                path,
                request_id,
                body,
                fault: None,
                at_ms,
            }),
        }
    }

    /// The request's JSON body (`null` when unparsable).
    pub(super) fn body(&self) -> &Value {
        self.draft
            .as_ref()
            .map_or(&Value::Null, |draft| &draft.body)
    }

    /// Notes which fault (or `throttled`) shaped the answer.
    pub(super) fn set_fault(&mut self, kind: &'static str) {
        if let Some(draft) = &mut self.draft {
            draft.fault = Some(kind);
        }
    }

    /// The draft to record, the first time only; from then on the request no
    /// longer counts as being served.
    fn take_draft(&mut self) -> Option<Draft> {
        let draft = self.draft.take()?;
        self.shared.serving.fetch_sub(1, Ordering::SeqCst);
        Some(draft)
    }

    /// Records the request with its outcome, inside the caller's lock so that an
    /// applied change and its record appear together.
    pub(super) fn finish(&mut self, inner: &mut Inner, status: u16, applied: bool) {
        if let Some(draft) = self.take_draft() {
            inner.record(draft, status, applied);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(draft) = self.take_draft() {
            self.shared.lock().record(draft, STATUS_CLIENT_GONE, false);
        }
    }
}
