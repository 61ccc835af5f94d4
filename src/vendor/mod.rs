//! The vendor seam: one enum the pipeline calls, returning per-item outcomes.
//!
//! A vendor module turns a slice of validated items into one HTTP call (or, for
//! PNCP, one call per item) and reports, item by item, what the vendor did. Every
//! way a call can go wrong is a [`VendorError`] variant; deciding what to do about
//! it is `retry::classify`'s job, not the client's.

use std::time::Duration;

use serde_json::Value;

use crate::config::Settings;
use crate::job::{Item, ItemError, VendorKind};
use crate::limiter::VendorLimiter;
use crate::metrics::Metrics;

mod http;
pub mod mimecast;
pub mod pncp;
pub mod signing;

pub use mimecast::MimecastClient;
pub use pncp::PncpClient;

/// What the vendor did with one item of a call that ran.
#[derive(Debug, Clone, PartialEq)]
pub enum ItemOutcome {
    /// Applied; the vendor's data element for the item.
    Applied(Value),
    /// Refused; the vendor's errors, passed through unchanged.
    Failed(Vec<ItemError>),
    /// The call ran but the response does not mention the item.
    Unaccounted,
}

/// Quota the vendor reported on its last response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaHint {
    /// Calls left in the current window.
    pub remaining: u64,
    /// Time until the quota returns.
    pub reset: Duration,
}

/// What a 429 said about the vendor's quota, for the limiter to learn from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ThrottleHint {
    /// When the quota returns, if the vendor said.
    pub retry_after: Option<Duration>,
    /// Whether `retry_after` came from `Retry-After` in whole seconds: an upper
    /// bound rounded up, not `X-RateLimit-Reset`'s milliseconds until a slot frees.
    pub whole_seconds: bool,
    /// `X-RateLimit-Limit`: calls per second the API user is allowed, if it said.
    pub limit: Option<u64>,
}

/// The report of one call that the vendor answered with a result.
#[derive(Debug, Clone, PartialEq)]
pub struct CallReport {
    /// HTTP status of the final response.
    pub http_status: u16,
    /// One outcome per item sent, in the same order.
    pub outcomes: Vec<ItemOutcome>,
    /// Quota headers, when the vendor sent them.
    pub quota: Option<QuotaHint>,
}

/// Why a call produced no per-item report.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VendorError {
    /// Nothing was sent (connection refused, DNS): safe to resend.
    #[error("could not reach the vendor ({0}); check its base URL and the network")]
    Unreachable(String),
    /// The request may have reached the vendor but no answer came back.
    #[error("connection lost after the request was sent ({0})")]
    Interrupted(String),
    /// No complete answer within `VENDOR_TIMEOUT`.
    #[error("no answer within VENDOR_TIMEOUT")]
    Timeout,
    /// 429: the call was not executed.
    #[error("throttled by the vendor (HTTP 429)")]
    Throttled {
        /// When the quota returns, if the vendor said.
        retry_after: Option<Duration>,
        /// What else the 429 said about the quota.
        hint: ThrottleHint,
    },
    /// 401/403: the credentials, not the job, are at fault.
    #[error("credentials refused (HTTP {status} {code}: {message}); check the API keys, application id/key and the API user's binding")]
    Credentials {
        /// HTTP status.
        status: u16,
        /// Vendor error code.
        code: String,
        /// Vendor message.
        message: String,
    },
    /// Any other non-success status.
    #[error("HTTP {status} {code}: {message}")]
    Http {
        /// HTTP status.
        status: u16,
        /// Vendor error code, or `err_http_<status>`.
        code: String,
        /// Vendor message.
        message: String,
    },
    /// PNCP accepted the change (202) but its task was still open when the task
    /// timeout ran out: the vendor is working on it, not failing.
    #[error("the vendor accepted the change but its task was still open after {waited:?}; Modify Account is idempotent, so it is sent again")]
    TaskStillOpen {
        /// How long the task was followed.
        waited: Duration,
    },
    /// A success status whose body could not be understood.
    #[error("unreadable vendor response (HTTP {status}): {detail}")]
    BadResponse {
        /// HTTP status.
        status: u16,
        /// What could not be read.
        detail: String,
    },
}

impl VendorError {
    /// The `status` label of the vendor-calls metric: the HTTP status, or what
    /// happened instead of one.
    pub fn status_label(&self) -> String {
        match self {
            Self::Unreachable(_) => "unreachable".to_owned(),
            Self::Interrupted(_) => "interrupted".to_owned(),
            Self::Timeout => "timeout".to_owned(),
            Self::Throttled { .. } => "429".to_owned(),
            Self::TaskStillOpen { .. } => "task_open".to_owned(),
            Self::Credentials { status, .. }
            | Self::Http { status, .. }
            | Self::BadResponse { status, .. } => status.to_string(),
        }
    }
}

/// A configured vendor client.
#[derive(Debug, Clone)]
pub enum VendorClient {
    /// Mimecast API 1.0.
    Mimecast(MimecastClient),
    /// PNCP.
    Pncp(PncpClient),
}

impl VendorClient {
    /// Which vendor this client calls.
    pub fn kind(&self) -> VendorKind {
        match self {
            Self::Mimecast(_) => VendorKind::Mimecast,
            Self::Pncp(_) => VendorKind::Pncp,
        }
    }

    /// Most items one call may carry.
    pub fn max_items_per_call(&self) -> usize {
        match self {
            Self::Mimecast(_) => crate::job::MAX_ITEMS,
            Self::Pncp(_) => 1,
        }
    }

    /// The item of a probe for `item`'s vendor: a call that changes nothing, so a
    /// held vendor can be asked whether it answers again without risking an
    /// additive change. Mimecast: update-account with only the account code
    /// changes nothing and returns the account. PNCP: Modify Account is
    /// idempotent, so the item itself is safe to send.
    pub fn probe_item(&self, item: &Item) -> Item {
        match self {
            Self::Mimecast(_) => {
                let mut body = serde_json::Map::new();
                if let Some(code) = item.body.get("accountCode") {
                    body.insert("accountCode".to_owned(), code.clone());
                }
                Item {
                    index: item.index,
                    account: item.account.clone(),
                    body,
                }
            }
            Self::Pncp(_) => item.clone(),
        }
    }

    /// Sends the items in one call and reports per item. The caller has taken
    /// the call's rate-limit turn; `limiter` charges any follow-up request the
    /// call needs (PNCP's task polls), so those count against the ceiling too.
    pub async fn send(
        &self,
        items: &[&Item],
        limiter: &VendorLimiter,
    ) -> Result<CallReport, VendorError> {
        match self {
            Self::Mimecast(client) => client.send(items).await,
            Self::Pncp(client) => client.send(items, limiter).await,
        }
    }

    /// [`Self::send`], then what every call owes the rest of the worker: its
    /// status and latency in the metrics, and what the vendor's answer tells the
    /// limiter. A 429 pauses the limiter at once, not once a job's other calls
    /// are back, since they may be held behind this call as the limiter's probe.
    pub async fn call(
        &self,
        items: &[&Item],
        limiter: &VendorLimiter,
        metrics: &Metrics,
    ) -> Result<CallReport, VendorError> {
        let started = std::time::Instant::now();
        let sent = self.send(items, limiter).await;
        let status = match &sent {
            Ok(report) => report.http_status.to_string(),
            Err(error) => error.status_label(),
        };
        metrics.vendor_call(self.kind(), &status, started.elapsed());
        match &sent {
            Ok(report) => limiter.call_answered(report.quota),
            Err(VendorError::Throttled { hint, .. }) => limiter.call_throttled(*hint),
            // Its 202 and polls told the limiter already; a 429 on the last
            // poll may have re-armed it, which must stand.
            Err(VendorError::TaskStillOpen { .. }) => {}
            Err(_) => limiter.call_answered(None),
        }
        metrics.learned_rate(self.kind(), limiter.learned_rate());
        sent
    }
}

/// The clients of every configured vendor.
#[derive(Debug, Clone, Default)]
pub struct Vendors {
    /// `None` while `MIMECAST_BASE_URL` is unset.
    pub mimecast: Option<VendorClient>,
    /// `None` while `PNCP_BASE_URL` is unset.
    pub pncp: Option<VendorClient>,
}

impl Vendors {
    /// Builds a client for each configured vendor, sharing one connection pool.
    pub fn from_settings(settings: &Settings) -> Result<Self, reqwest::Error> {
        let http = http::client(settings)?;
        Ok(Self {
            mimecast: settings
                .mimecast
                .as_ref()
                .map(|s| VendorClient::Mimecast(MimecastClient::new(http.clone(), s))),
            pncp: settings
                .pncp
                .as_ref()
                .map(|s| VendorClient::Pncp(PncpClient::new(http.clone(), s))),
        })
    }

    /// The client for a vendor, if configured.
    pub fn get(&self, kind: VendorKind) -> Option<&VendorClient> {
        match kind {
            VendorKind::Mimecast => self.mimecast.as_ref(),
            VendorKind::Pncp => self.pncp.as_ref(),
        }
    }
}
