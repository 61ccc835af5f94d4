//! An in-memory stand-in for the Mimecast and PNCP APIs that checks signatures, records requests and injects faults.
//!
//! Tests, the demo script and the benchmarks point the real worker at this server
//! instead of the vendors. It checks every request the way the vendor documents,
//! keeps accounts in memory, records each request that reaches a vendor endpoint,
//! and misbehaves on demand (see [`Fault`]). State sits behind one `std` mutex that
//! is only ever held for a few synchronous steps, never across an `.await`, and a
//! change is applied in the same synchronous step that records it, so a handler
//! dropped by a disconnecting client never leaves a half-applied change behind.

mod admin;
mod mimecast;
mod mimecast_items;
mod model;
mod pncp;
mod pncp_checks;
mod random;
mod state;
mod throttle;
mod wire;

#[cfg(test)]
mod tests;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post, put};
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use model::{
    Fault, MimecastAccount, RecordedRequest, Vendor, STATUS_CLIENT_GONE, STATUS_DROPPED,
};
pub use random::RandomFaults;
use state::Shared;
pub use throttle::ThrottleMode;

/// Demo Mimecast access key, shared by the demo script and the mock's demo configuration.
pub const DEMO_MIMECAST_ACCESS_KEY: &str = "demo-access-key";
/// Demo Mimecast secret key as the worker is configured with it: base64 of `demo-secret-key`.
pub const DEMO_MIMECAST_SECRET_KEY_B64: &str = "ZGVtby1zZWNyZXQta2V5";
/// Demo Mimecast application id (`x-mc-app-id`).
pub const DEMO_MIMECAST_APP_ID: &str = "demo-app-id";
/// Demo Mimecast application key (the last part of the string to sign).
pub const DEMO_MIMECAST_APP_KEY: &str = "demo-app-key";
/// Demo PNCP application key.
pub const DEMO_PNCP_APPLICATION_KEY: &str = "demo-pncp-app-key";
/// Demo PNCP shared secret (the HMAC-SHA256 key).
pub const DEMO_PNCP_SHARED_SECRET: &str = "demo-pncp-shared-secret";
/// [`RecordedRequest::fault`] of a request answered by a vendor's full outage
/// ([`MockVendor::set_outage`]).
pub const OUTAGE_FAULT: &str = "outage";
/// PNCP API root path on the mock; `PNCP_BASE_URL` = `http://ADDR/pncp-external-api-rest`.
pub const PNCP_ROOT: &str = "/pncp-external-api-rest";
/// The PNCP media type the vendor's page documents, and the mock's default.
pub const DEFAULT_PNCP_MEDIA_TYPE: &str = "application/vnd.pncp.v1.0+json";

/// The credentials the mock accepts and its initial latency; the worker under test
/// must be configured with the same values to get past the signature checks.
#[derive(Clone)]
pub struct MockVendorConfig {
    /// Mimecast access key expected in `Authorization: MC <access key>:<signature>`.
    pub mimecast_access_key: String,
    /// Mimecast secret key, already base64-decoded: the HMAC-SHA1 key.
    pub mimecast_secret_key: Vec<u8>,
    /// Mimecast application id expected in `x-mc-app-id`.
    pub mimecast_app_id: String,
    /// Mimecast application key, the last part of the string to sign.
    pub mimecast_app_key: String,
    /// PNCP application key expected inside the `Authorization` header.
    pub pncp_application_key: String,
    /// PNCP shared secret: the HMAC-SHA256 key, used as UTF-8 bytes.
    pub pncp_shared_secret: String,
    /// The media type PNCP requests must send in `Content-Type` and `Accept`, and
    /// that its responses carry.
    pub pncp_media_type: String,
    /// Wait added to every vendor request that passes the checks (admin requests excluded).
    pub latency: Duration,
}

impl MockVendorConfig {
    /// The demo credentials (`DEMO_*` constants), the default media type and no latency,
    /// so that the demo script and the tests need no configuration at all.
    pub fn demo() -> Self {
        Self {
            mimecast_access_key: DEMO_MIMECAST_ACCESS_KEY.to_owned(),
            // The bytes DEMO_MIMECAST_SECRET_KEY_B64 decodes to (checked by a test).
            mimecast_secret_key: b"demo-secret-key".to_vec(),
            mimecast_app_id: DEMO_MIMECAST_APP_ID.to_owned(),
            mimecast_app_key: DEMO_MIMECAST_APP_KEY.to_owned(),
            pncp_application_key: DEMO_PNCP_APPLICATION_KEY.to_owned(),
            pncp_shared_secret: DEMO_PNCP_SHARED_SECRET.to_owned(),
            pncp_media_type: DEFAULT_PNCP_MEDIA_TYPE.to_owned(),
            latency: Duration::ZERO,
        }
    }
}

/// Secrets stay out of `Debug` output so a logged config never leaks them.
impl fmt::Debug for MockVendorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockVendorConfig")
            .field("mimecast_access_key", &self.mimecast_access_key)
            .field("mimecast_secret_key", &"<redacted>")
            .field("mimecast_app_id", &self.mimecast_app_id)
            .field("mimecast_app_key", &"<redacted>")
            .field("pncp_application_key", &self.pncp_application_key)
            .field("pncp_shared_secret", &"<redacted>")
            .field("pncp_media_type", &self.pncp_media_type)
            .field("latency", &self.latency)
            .finish()
    }
}

/// A running mock server and the handle tests use to steer and inspect it.
/// Cheap to clone: every clone talks to the same server.
#[derive(Clone)]
pub struct MockVendor {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: CancellationToken,
}

impl fmt::Debug for MockVendor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockVendor")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl MockVendor {
    /// Binds `listen` (use `127.0.0.1:0` in tests) and serves in a spawned tokio task,
    /// so a test gets a ready server and its address in one call.
    pub async fn start(listen: SocketAddr, config: MockVendorConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(config));
        let stop = CancellationToken::new();
        let app = router(Arc::clone(&shared));
        let stopped = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await
            {
                tracing::error!(%error, "mock vendor server stopped");
            }
        });
        Ok(Self { shared, addr, stop })
    }

    /// The bound address (useful when started on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`: the value for `MIMECAST_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://ADDR/pncp-external-api-rest`: the value for `PNCP_BASE_URL`.
    pub fn pncp_base_url(&self) -> String {
        format!("{}{PNCP_ROOT}", self.base_url())
    }

    /// Every request that reached a vendor endpoint since start (or the last reset), in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().records.clone()
    }

    /// The Mimecast account with this code, if a change ever created it.
    pub fn mimecast_account(&self, code: &str) -> Option<MimecastAccount> {
        self.shared.lock().mimecast_accounts.get(code).cloned()
    }

    /// The PNCP account with this id as the mock stores it, if a change ever created it.
    pub fn pncp_account(&self, id: &str) -> Option<serde_json::Value> {
        self.shared.lock().pncp_accounts.get(id).cloned()
    }

    /// How many times a change to this account was actually applied (each item that
    /// landed in `data`, each PNCP modification), so tests can prove "at most once".
    pub fn applied_count(&self, vendor: Vendor, account: &str) -> usize {
        self.shared.lock().applied[vendor]
            .get(account)
            .copied()
            .unwrap_or(0)
    }

    /// Queues a fault for the vendor; each request that passes the vendor's checks
    /// consumes the oldest one. `AcceptedTask` is PNCP only: Mimecast ignores it
    /// (answers normally, records the fault's kind).
    pub fn push_fault(&self, vendor: Vendor, fault: Fault) {
        self.shared.lock().faults[vendor].push_back(fault);
    }

    /// Turns the random fault mode on (or, with `None` or a rate of 0, off) for both
    /// vendors from the next request on; see [`RandomFaults`]. Queued faults
    /// still come first.
    pub fn set_random_faults(&self, faults: Option<RandomFaults>) {
        set_random(&self.shared, faults);
    }

    /// Changes the wait added to every vendor request from now on.
    pub fn set_latency(&self, latency: Duration) {
        self.shared.lock().latency = latency;
    }

    /// Caps accepted requests per 1-second window (windows start at this call);
    /// `None` lifts the cap. `Some(0)` rejects everything, a 429 storm.
    pub fn set_throttle(&self, vendor: Vendor, per_second: Option<u32>) {
        let now_ms = self.shared.elapsed_ms();
        self.shared.lock().throttles[vendor].set(per_second, now_ms);
    }

    /// Starts (`Some(status)`) or ends (`None`) a full outage of `vendor`: from
    /// the next request on, every call to it (Mimecast update-account, PNCP
    /// Modify Account and task polls) that passes the vendor's checks answers
    /// `status` with the vendor's error shape, applies nothing, and is recorded
    /// with the fault kind [`OUTAGE_FAULT`]. Queued and random faults wait until
    /// it ends. It is how a soak holds one vendor down for minutes while the
    /// other keeps answering.
    pub fn set_outage(&self, vendor: Vendor, status: Option<u16>) {
        self.shared.lock().outage[vendor] = status;
    }

    /// Chooses how the throttle counts and what its answers say about the
    /// quota (see [`ThrottleMode`]); the cap set by [`Self::set_throttle`] stays.
    pub fn set_throttle_mode(&self, vendor: Vendor, mode: ThrottleMode) {
        let now_ms = self.shared.elapsed_ms();
        self.shared.lock().throttles[vendor].set_mode(mode, now_ms);
    }

    /// Forgets accounts, recorded requests, queued faults, tasks and seen request ids;
    /// latency and throttles stay as they are.
    pub fn reset(&self) {
        self.shared.lock().reset();
        self.shared.reset_peak();
    }

    /// The most requests this mock served at once since it started or was
    /// reset: what a client's concurrency limit must hold below.
    pub fn peak_concurrent_requests(&self) -> usize {
        self.shared.peak_serving()
    }

    /// Resolves once at least `n` requests have been recorded, so tests await
    /// events instead of sleeping.
    pub async fn wait_for_requests(&self, n: usize) {
        let mut count = self.shared.lock().subscribe();
        // The sender lives as long as `self.shared`, so this cannot fail while we wait.
        let _ = count.wait_for(|recorded| *recorded >= n).await;
    }

    /// Resolves once at least `n` requests have passed the vendor's checks and
    /// are being handled: unlike [`MockVendor::wait_for_requests`], a request held
    /// by a `Delay` fault counts as soon as it arrives.
    pub async fn wait_for_admitted(&self, n: usize) {
        let mut count = self.shared.lock().subscribe_admitted();
        let _ = count.wait_for(|admitted| *admitted >= n).await;
    }

    /// Stops accepting connections; requests in flight are allowed to finish.
    pub fn shutdown(&self) {
        self.stop.cancel();
    }
}

/// Runs the mock on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    config: MockVendorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, config, None, shutdown).await
}

/// [`serve`], started in the random fault mode when `random` is given; the body
/// of the `account-worker mock-vendor` subcommand.
pub async fn serve_with(
    listener: TcpListener,
    config: MockVendorConfig,
    random: Option<RandomFaults>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let shared = Arc::new(Shared::new(config));
    set_random(&shared, random);
    let app = router(shared);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// One place that turns the random fault mode on or off; a rate of 0 is off.
fn set_random(shared: &Shared, faults: Option<RandomFaults>) {
    let draw = faults
        .filter(|faults| faults.rate > 0.0)
        .map(random::RandomDraw::new);
    shared.lock().random = draw;
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(mimecast::PATH, post(mimecast::update_account))
        .route(
            &format!("{PNCP_ROOT}/account/{{account_id}}"),
            put(pncp::modify_account),
        )
        .route(
            &format!("{PNCP_ROOT}/task/{{task_id}}"),
            get(pncp::get_task),
        )
        .merge(admin::routes())
        .with_state(shared)
}
