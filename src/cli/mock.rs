//! `account-worker mock-vendor`: serves the mock vendor with the configured or demo keys.

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::mock_vendor::{self, MockVendorConfig};

/// Serves until `shutdown` is cancelled; uses the worker's own credentials when set,
/// so that a worker and a mock started from one environment agree.
pub async fn run(
    settings: &Settings,
    listen: SocketAddr,
    latency: Duration,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut config = MockVendorConfig::demo();
    config.latency = latency;
    if let Some(m) = &settings.mimecast {
        config.mimecast_access_key = m.access_key.expose_secret().to_owned();
        config.mimecast_secret_key = m.secret_key.expose_secret().to_vec();
        config.mimecast_app_id = m.app_id.clone();
        config.mimecast_app_key = m.app_key.expose_secret().to_owned();
    }
    if let Some(p) = &settings.pncp {
        config.pncp_application_key = p.application_key.expose_secret().to_owned();
        config.pncp_shared_secret = p.shared_secret.expose_secret().to_owned();
        config.pncp_media_type = p.media_type.clone();
    }
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!("mock vendor listening on http://{}", listener.local_addr()?);
    mock_vendor::serve(listener, config, async move { shutdown.cancelled().await }).await
}
