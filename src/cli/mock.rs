//! `account-worker mock-vendor`: serves the mock vendor with the configured or demo keys.

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::mock_vendor::{self, MockVendorConfig, RandomFaults};

/// Serves until `shutdown` is cancelled; uses the worker's own credentials when set,
/// so that a worker and a mock started from one environment agree.
pub async fn run(
    settings: &Settings,
    listen: SocketAddr,
    latency: Duration,
    random: Option<RandomFaults>,
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
    let shutdown = async move { shutdown.cancelled().await };
    mock_vendor::serve_with(listener, config, random, shutdown).await
}

/// The `mock-vendor` flags of the random fault mode (see [`RandomFaults`]).
#[derive(Debug, Clone, clap::Args)]
pub struct RandomFaultArgs {
    /// Share of vendor calls that get a random fault (5xx, 429, drops before and
    /// after applying, slow calls, retryable item failures): `5%` or `0.05`; 0 is off.
    #[arg(long, default_value = "0", value_parser = parse_share)]
    pub fault_rate: f64,
    /// Seed of the random faults, to repeat a run's sequence of faults.
    #[arg(long, default_value_t = 0)]
    pub fault_seed: u64,
    /// How long a random slow call waits before answering; set it past the
    /// worker's VENDOR_TIMEOUT.
    #[arg(long, default_value = "35s", value_parser = humantime::parse_duration)]
    pub fault_delay: Duration,
    /// The reset (Mimecast `X-RateLimit-Reset`, PNCP `Retry-After`) of a random 429.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    pub fault_reset: Duration,
}

impl RandomFaultArgs {
    /// The mode the flags ask for; `None` when the rate is 0.
    pub fn random_faults(&self) -> Option<RandomFaults> {
        (self.fault_rate > 0.0).then(|| RandomFaults {
            rate: self.fault_rate,
            seed: self.fault_seed,
            delay_ms: millis(self.fault_delay),
            reset_ms: millis(self.fault_reset),
        })
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A share from 0 to 1, written `5%` or `0.05`.
pub fn parse_share(text: &str) -> Result<f64, String> {
    let trimmed = text.trim();
    let (number, scale) = match trimmed.strip_suffix('%') {
        Some(percent) => (percent.trim(), 100.0),
        None => (trimmed, 1.0),
    };
    let share = number
        .parse::<f64>()
        .map(|n| n / scale)
        .map_err(|_| format!("{text:?} is not a share; write e.g. 5% or 0.05"))?;
    RandomFaults::new(share, 0).check().map(|()| share)
}

#[cfg(test)]
mod tests {
    use super::parse_share;

    #[test]
    fn a_share_is_read_as_a_percentage_or_a_fraction_between_zero_and_one() {
        assert_eq!(parse_share("5%"), Ok(0.05));
        assert_eq!(parse_share("0.05"), Ok(0.05));
        assert_eq!(parse_share("0"), Ok(0.0));
        assert!(parse_share("150%").is_err());
        assert!(parse_share("lots").is_err());
        assert!(parse_share("NaN").is_err());
    }
}
