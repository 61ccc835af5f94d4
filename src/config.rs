//! Settings, loaded embedded defaults -> optional file -> environment, validated into typed values.
//!
//! Every setting is read as text and parsed here, once, so that a bad value is
//! reported with the name the operator used (`WORKER_CONCURRENCY`, not a serde path)
//! and nothing past this module can hold an invalid value.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use secrecy::{SecretSlice, SecretString};
use serde::Deserialize;
use url::Url;

/// The embedded defaults: the same file the README documents, compiled in so the
/// binary runs from any directory.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// A setting that could not be accepted; the message names the variable and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value is present but unusable.
    #[error("invalid configuration: {setting}: {reason}")]
    Invalid {
        /// The environment variable name of the setting.
        setting: &'static str,
        /// What is wrong and what is expected.
        reason: String,
    },
    /// The configuration file could not be read or parsed.
    #[error("invalid configuration file: {0}")]
    File(String),
}

fn invalid(setting: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        reason: reason.into(),
    }
}

/// Every setting as text, exactly as the file and environment gave it.
#[derive(Deserialize)]
struct RawSettings {
    amqp_url: String,
    jobs_queue: String,
    consume_queues: String,
    worker_concurrency: String,
    mimecast_base_url: String,
    mimecast_access_key: String,
    mimecast_secret_key: String,
    mimecast_app_id: String,
    mimecast_app_key: String,
    mimecast_rate_limit: String,
    mimecast_batch_max: String,
    mimecast_batch_linger: String,
    pncp_base_url: String,
    pncp_application_key: String,
    pncp_shared_secret: String,
    pncp_media_type: String,
    pncp_rate_limit: String,
    rate_limit_scope: String,
    retry_initial_delay: String,
    retry_max_delay: String,
    retry_max_attempts: String,
    vendor_timeout: String,
    ledger_url: String,
    ledger_retention: String,
    ledger_lease: String,
    metrics_addr: String,
    shutdown_timeout: String,
    max_deliveries: String,
    held_delivery_max: String,
    rust_log: String,
    log_format: String,
}

/// The keys of [`RawSettings`]; each is also read from the upper-cased environment variable.
const KEYS: &[&str] = &[
    "amqp_url",
    "jobs_queue",
    "consume_queues",
    "worker_concurrency",
    "mimecast_base_url",
    "mimecast_access_key",
    "mimecast_secret_key",
    "mimecast_app_id",
    "mimecast_app_key",
    "mimecast_rate_limit",
    "mimecast_batch_max",
    "mimecast_batch_linger",
    "pncp_base_url",
    "pncp_application_key",
    "pncp_shared_secret",
    "pncp_media_type",
    "pncp_rate_limit",
    "rate_limit_scope",
    "retry_initial_delay",
    "retry_max_delay",
    "retry_max_attempts",
    "vendor_timeout",
    "ledger_url",
    "ledger_retention",
    "ledger_lease",
    "metrics_addr",
    "shutdown_timeout",
    "max_deliveries",
    "held_delivery_max",
    "rust_log",
    "log_format",
];

/// The whole validated configuration of a worker process.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where jobs come from and results go.
    pub broker: BrokerSettings,
    /// Mimecast credentials and limits; `None` while `MIMECAST_BASE_URL` is unset.
    pub mimecast: Option<MimecastSettings>,
    /// PNCP credentials and limits; `None` while `PNCP_BASE_URL` is unset.
    pub pncp: Option<PncpSettings>,
    /// Whether rate ceilings are per process or shared by the fleet.
    pub rate_limit_scope: RateLimitScope,
    /// Backoff bounds and attempt budget for vendor calls.
    pub retry: RetrySettings,
    /// One vendor HTTP call, end to end.
    pub vendor_timeout: Duration,
    /// Where the idempotency ledger lives and how long entries are kept.
    pub ledger: LedgerSettings,
    /// Address of the `/metrics`, `/healthz`, `/readyz` endpoint.
    pub metrics_addr: SocketAddr,
    /// How long a stop signal waits for in-flight jobs.
    pub shutdown_timeout: Duration,
    /// Logging filter and format.
    pub log: LogSettings,
}

/// Broker connection and queue names.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// Broker URL; may carry a password, so it is shown only through [`redact_url`].
    pub amqp_url: SecretString,
    /// The jobs queue and the results and dead-letter queues named after it.
    pub jobs_queue: QueueNames,
    /// Queues consumed: the jobs queue, or the shards an operator routes jobs to
    /// by account (see the README's per-account ordering section).
    pub consume_queues: Vec<String>,
    /// Jobs handled at once; also the prefetch.
    pub concurrency: NonZeroUsize,
    /// Deliveries of one job before it is dead-lettered as poison.
    pub max_deliveries: NonZeroU32,
    /// `HELD_DELIVERY_MAX`: the longest a delivery stays unacked while its job
    /// waits (its vendor held, another copy running) before it is put back at
    /// the tail of its queue. Kept well under the broker's `consumer_timeout`
    /// (30 min by default), which would close the channel and every job on it.
    pub held_delivery_max: Duration,
}

/// The three queue names derived from `JOBS_QUEUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueNames {
    /// Where jobs arrive.
    pub jobs: String,
    /// `<jobs>.results`: one result per job.
    pub results: String,
    /// `<jobs>.dead`: failed items and malformed messages.
    pub dead: String,
}

impl QueueNames {
    /// Derives the results and dead-letter queue names from the jobs queue name.
    pub fn new(jobs: &str) -> Result<Self, ConfigError> {
        // AMQP queue names are short strings (255 bytes); leave room for ".results".
        if jobs.is_empty() || jobs.len() > 200 {
            return Err(invalid(
                "JOBS_QUEUE",
                "must be 1 to 200 characters (e.g. account-updates)",
            ));
        }
        if jobs.starts_with("amq.") {
            return Err(invalid(
                "JOBS_QUEUE",
                "names starting with amq. are reserved by RabbitMQ; choose another name",
            ));
        }
        Ok(Self {
            jobs: jobs.to_owned(),
            results: format!("{jobs}.results"),
            dead: format!("{jobs}.dead"),
        })
    }
}

/// Mimecast API 1.0 settings.
#[derive(Debug, Clone)]
pub struct MimecastSettings {
    /// API root, e.g. `https://eu-api.mimecast.com`.
    pub base_url: Url,
    /// Access key of the API user's binding.
    pub access_key: SecretString,
    /// Secret key, already base64-decoded.
    pub secret_key: SecretSlice<u8>,
    /// Registered application id (not secret; sent as `x-mc-app-id`).
    pub app_id: String,
    /// Registered application key.
    pub app_key: SecretString,
    /// Client-side call ceiling; `None` is unlimited.
    pub rate_limit: Option<RateLimit>,
    /// Items per coalesced call (1 = no batching).
    pub batch_max: NonZeroUsize,
    /// Longest wait for a batch to fill.
    pub batch_linger: Duration,
}

/// PNCP settings.
#[derive(Debug, Clone)]
pub struct PncpSettings {
    /// API root, e.g. `https://host/pncp-external-api-rest`.
    pub base_url: Url,
    /// Application key, part of every signature.
    pub application_key: SecretString,
    /// Shared secret keying the HMAC.
    pub shared_secret: SecretString,
    /// Sent as `Content-Type` and `Accept`.
    pub media_type: String,
    /// Client-side call ceiling; `None` is unlimited.
    pub rate_limit: Option<RateLimit>,
}

/// A ceiling of `count` calls per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Calls allowed in each period.
    pub count: NonZeroU32,
    /// The period: one second, minute or hour.
    pub per: Duration,
}

impl RateLimit {
    /// Parses `N/s`, `N/min` or `N/h`.
    pub fn parse(text: &str) -> Option<Self> {
        let (count, unit) = text.trim().split_once('/')?;
        let count: NonZeroU32 = count.trim().parse().ok()?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "min" | "m" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return None,
        };
        Some(Self { count, per })
    }

    /// Calls per second, for reports.
    pub fn per_second(&self) -> f64 {
        f64::from(self.count.get()) / self.per.as_secs_f64()
    }
}

/// Scope of the rate ceilings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimitScope {
    /// Each worker process has the whole ceiling.
    Process,
    /// One ceiling shared through Redis by every worker.
    Fleet,
}

/// Backoff bounds for vendor retries.
#[derive(Debug, Clone, Copy)]
pub struct RetrySettings {
    /// First delay.
    pub initial_delay: Duration,
    /// Largest delay.
    pub max_delay: Duration,
    /// Attempts per item, the first included.
    pub max_attempts: NonZeroU32,
}

/// Where the idempotency ledger lives.
#[derive(Clone, PartialEq, Eq)]
pub enum LedgerLocation {
    /// Embedded store at this path (one worker).
    File(PathBuf),
    /// Redis URL (shared by a fleet); may carry a password.
    Redis(String),
}

/// By hand, so that printing the settings never shows a Redis password.
impl std::fmt::Debug for LedgerLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
            Self::Redis(url) => f.debug_tuple("Redis").field(&redact_url(url)).finish(),
        }
    }
}

/// Idempotency ledger settings.
#[derive(Debug, Clone)]
pub struct LedgerSettings {
    /// Backend and address.
    pub location: LedgerLocation,
    /// How long finished entries are kept.
    pub retention: Duration,
    /// How long a worker's claim on a job holds without renewal; a crashed
    /// worker's jobs wait this long before another worker resumes them.
    pub lease: Duration,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging settings.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// Filter used when `RUST_LOG` is unset.
    pub filter: String,
    /// Text or JSON.
    pub format: LogFormat,
}

impl Settings {
    /// Loads the embedded defaults, then `file` (if any), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, |key| std::env::var(key).ok())
    }

    /// As [`Settings::load`], with the environment given as a lookup (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::File(format!(
                    "{} does not exist or is not a file; check --config / WORKER_CONFIG",
                    path.display()
                )));
            }
            builder = builder.add_source(config::File::from(path).required(true));
        }
        for key in KEYS {
            if let Some(value) = env(&key.to_ascii_uppercase()) {
                builder = builder
                    .set_override(*key, value)
                    .map_err(|e| ConfigError::File(e.to_string()))?;
            }
        }
        let raw: RawSettings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError::File(e.to_string()))?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawSettings) -> Result<Self, ConfigError> {
        let amqp_url = parse_amqp_url(&raw.amqp_url)?;
        let jobs_queue = QueueNames::new(raw.jobs_queue.trim())?;
        let mut consume_queues: Vec<String> = raw
            .consume_queues
            .split(',')
            .map(str::trim)
            .filter(|q| !q.is_empty())
            .map(str::to_owned)
            .collect();
        if consume_queues.is_empty() {
            consume_queues.push(jobs_queue.jobs.clone());
        }
        if let Some(bad) = consume_queues
            .iter()
            .find(|q| q.len() > 255 || q.starts_with("amq."))
        {
            return Err(invalid(
                "CONSUME_QUEUES",
                format!("{bad:?} is not a usable queue name (at most 255 bytes, not amq.*)"),
            ));
        }
        let broker = BrokerSettings {
            amqp_url,
            jobs_queue,
            consume_queues,
            concurrency: parse_bounded("WORKER_CONCURRENCY", &raw.worker_concurrency, 1, 4096)
                .map(|n| NonZeroUsize::new(n as usize).unwrap_or(NonZeroUsize::MIN))?,
            max_deliveries: parse_bounded("MAX_DELIVERIES", &raw.max_deliveries, 1, 1000)
                .map(|n| NonZeroU32::new(n as u32).unwrap_or(NonZeroU32::MIN))?,
            held_delivery_max: parse_positive_duration(
                "HELD_DELIVERY_MAX",
                &raw.held_delivery_max,
            )?,
        };
        let retry = RetrySettings {
            initial_delay: parse_duration("RETRY_INITIAL_DELAY", &raw.retry_initial_delay)?,
            max_delay: parse_duration("RETRY_MAX_DELAY", &raw.retry_max_delay)?,
            max_attempts: parse_bounded("RETRY_MAX_ATTEMPTS", &raw.retry_max_attempts, 1, 100)
                .map(|n| NonZeroU32::new(n as u32).unwrap_or(NonZeroU32::MIN))?,
        };
        if retry.max_delay < retry.initial_delay {
            return Err(invalid(
                "RETRY_MAX_DELAY",
                "must not be shorter than RETRY_INITIAL_DELAY",
            ));
        }
        let settings = Self {
            broker,
            mimecast: parse_mimecast(&raw)?,
            pncp: parse_pncp(&raw)?,
            rate_limit_scope: match raw.rate_limit_scope.trim() {
                "process" => RateLimitScope::Process,
                "fleet" => RateLimitScope::Fleet,
                other => {
                    return Err(invalid(
                        "RATE_LIMIT_SCOPE",
                        format!("{other:?} is neither process nor fleet"),
                    ))
                }
            },
            retry,
            vendor_timeout: parse_positive_duration("VENDOR_TIMEOUT", &raw.vendor_timeout)?,
            ledger: LedgerSettings {
                location: parse_ledger_url(&raw.ledger_url)?,
                retention: parse_positive_duration("LEDGER_RETENTION", &raw.ledger_retention)?,
                lease: parse_positive_duration("LEDGER_LEASE", &raw.ledger_lease)?,
            },
            metrics_addr: raw.metrics_addr.trim().parse().map_err(|_| {
                invalid(
                    "METRICS_ADDR",
                    format!(
                        "{:?} is not an IP:port address (e.g. 127.0.0.1:9090 or 0.0.0.0:9090)",
                        raw.metrics_addr
                    ),
                )
            })?,
            shutdown_timeout: parse_duration("SHUTDOWN_TIMEOUT", &raw.shutdown_timeout)?,
            log: LogSettings {
                filter: raw.rust_log,
                format: match raw.log_format.trim() {
                    "text" => LogFormat::Text,
                    "json" => LogFormat::Json,
                    other => {
                        return Err(invalid(
                            "LOG_FORMAT",
                            format!("{other:?} is neither text nor json"),
                        ))
                    }
                },
            },
        };
        settings.check_retention()?;
        Ok(settings)
    }

    /// The longest a job can live while its entry matters, and so the least
    /// `LEDGER_RETENTION` may be: an entry that expires while a copy of its
    /// job can still arrive turns that copy into a new job, applied again.
    pub fn job_lifetime(&self) -> Duration {
        self.ledger.lease + self.vendor_timeout * self.retry.max_attempts.get()
    }

    fn check_retention(&self) -> Result<(), ConfigError> {
        let least = self.job_lifetime() * RETENTION_MULTIPLE;
        if self.ledger.retention < least {
            return Err(invalid(
                "LEDGER_RETENTION",
                format!(
                    "{} is shorter than {RETENTION_MULTIPLE} x (LEDGER_LEASE + VENDOR_TIMEOUT x RETRY_MAX_ATTEMPTS) = {}: an entry could expire while a copy of its job is still on its way, and that copy would be applied again; set LEDGER_RETENTION to at least {} (the default is 7d)",
                    humantime::format_duration(self.ledger.retention),
                    humantime::format_duration(least),
                    humantime::format_duration(least),
                ),
            ));
        }
        Ok(())
    }
}

/// How many job lifetimes (see [`Settings::job_lifetime`]) a ledger entry is
/// kept at least: redeliveries, replays and producer retries arrive well after
/// a job's own last call.
const RETENTION_MULTIPLE: u32 = 10;

fn non_empty(value: &str) -> Option<&str> {
    let value = value.trim();
    (!value.is_empty()).then_some(value)
}

fn parse_amqp_url(text: &str) -> Result<SecretString, ConfigError> {
    let url = Url::parse(text.trim()).map_err(|e| {
        invalid(
            "AMQP_URL",
            format!(
                "{} is not a URL ({e}); expected amqp://user:pass@host:5672/vhost",
                redact_url(text)
            ),
        )
    })?;
    if !matches!(url.scheme(), "amqp" | "amqps") || url.host_str().is_none() {
        return Err(invalid(
            "AMQP_URL",
            format!(
                "{} must be amqp:// or amqps:// with a host, e.g. amqp://guest:guest@127.0.0.1:5672/%2f",
                redact_url(text)
            ),
        ));
    }
    // Let lapin's own parser have the last word, so a URL we accept is one it accepts.
    text.trim()
        .parse::<lapin::uri::AMQPUri>()
        .map_err(|e| invalid("AMQP_URL", format!("{}: {e}", redact_url(text))))?;
    Ok(SecretString::from(text.trim().to_owned()))
}

/// Shows a URL with any password replaced, for logs and error messages.
pub fn redact_url(text: &str) -> String {
    match Url::parse(text.trim()) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("***"));
            url.to_string()
        }
        Ok(url) => url.to_string(),
        Err(_) => "the value".to_owned(),
    }
}

fn parse_bounded(
    setting: &'static str,
    text: &str,
    min: u64,
    max: u64,
) -> Result<u64, ConfigError> {
    let value: u64 = text.trim().parse().map_err(|_| {
        invalid(
            setting,
            format!("{text:?} is not a whole number from {min} to {max}"),
        )
    })?;
    if value < min || value > max {
        return Err(invalid(
            setting,
            format!("{value} is out of range; use a whole number from {min} to {max}"),
        ));
    }
    Ok(value)
}

fn parse_duration(setting: &'static str, text: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        invalid(
            setting,
            format!("{text:?} is not a duration ({e}); use e.g. 500ms, 30s, 5m, 7d"),
        )
    })
}

fn parse_positive_duration(setting: &'static str, text: &str) -> Result<Duration, ConfigError> {
    let value = parse_duration(setting, text)?;
    if value.is_zero() {
        return Err(invalid(setting, "must be longer than zero"));
    }
    Ok(value)
}

fn parse_rate(setting: &'static str, text: &str) -> Result<Option<RateLimit>, ConfigError> {
    match non_empty(text) {
        None => Ok(None),
        Some(text) => RateLimit::parse(text).map(Some).ok_or_else(|| {
            invalid(
                setting,
                format!("{text:?} is not a rate; use N/s, N/min or N/h with N > 0 (e.g. 20/s)"),
            )
        }),
    }
}

/// A vendor's API root. Any `user:password@` in it is dropped here: the vendors
/// authenticate by signature only, the HTTP client would otherwise send it as a
/// second, conflicting `Authorization: Basic` header, and a URL that carries no
/// credentials cannot leak them into an error, a result or a log line.
fn parse_base_url(setting: &'static str, text: &str) -> Result<Url, ConfigError> {
    let mut url = Url::parse(text).map_err(|e| {
        invalid(
            setting,
            format!(
                "{} is not a URL ({e}); expected e.g. https://eu-api.mimecast.com",
                crate::telemetry::redact::url_userinfo(&format!("{text:?}"))
            ),
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(
            setting,
            "must start with https:// (or http:// for a local mock)",
        ));
    }
    // Cannot fail: an http(s) URL has a host.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    Ok(url)
}

fn required_secret(
    setting: &'static str,
    value: &str,
    because: &str,
) -> Result<SecretString, ConfigError> {
    // Every credential goes into a request header or the signed text of one:
    // a control character (a pasted line break) would make every call fail in
    // the client, so it is refused here, without echoing the value.
    let value = non_empty(value)
        .ok_or_else(|| invalid(setting, format!("is required when {because} is set")))?;
    header_safe(setting, value.to_owned()).map(SecretString::from)
}

fn parse_mimecast(raw: &RawSettings) -> Result<Option<MimecastSettings>, ConfigError> {
    let batch_max = parse_bounded("MIMECAST_BATCH_MAX", &raw.mimecast_batch_max, 1, 100)
        .map(|n| NonZeroUsize::new(n as usize).unwrap_or(NonZeroUsize::MIN))?;
    let batch_linger = parse_duration("MIMECAST_BATCH_LINGER", &raw.mimecast_batch_linger)?;
    let rate_limit = parse_rate("MIMECAST_RATE_LIMIT", &raw.mimecast_rate_limit)?;
    let Some(base) = non_empty(&raw.mimecast_base_url) else {
        return Ok(None);
    };
    let because = "MIMECAST_BASE_URL";
    let secret_b64 = required_secret("MIMECAST_SECRET_KEY", &raw.mimecast_secret_key, because)?;
    let secret_key = {
        use secrecy::ExposeSecret;
        BASE64
            .decode(secret_b64.expose_secret().as_bytes())
            .map_err(|_| {
                invalid(
                    "MIMECAST_SECRET_KEY",
                    "is not valid base64; paste the secret key exactly as Mimecast issued it",
                )
            })?
    };
    Ok(Some(MimecastSettings {
        base_url: parse_base_url("MIMECAST_BASE_URL", base)?,
        access_key: required_secret("MIMECAST_ACCESS_KEY", &raw.mimecast_access_key, because)?,
        secret_key: SecretSlice::from(secret_key),
        app_id: non_empty(&raw.mimecast_app_id)
            .map(str::to_owned)
            .ok_or_else(|| {
                invalid(
                    "MIMECAST_APP_ID",
                    "is required when MIMECAST_BASE_URL is set",
                )
            })
            .and_then(|id| header_safe("MIMECAST_APP_ID", id))?,
        app_key: required_secret("MIMECAST_APP_KEY", &raw.mimecast_app_key, because)?,
        rate_limit,
        batch_max,
        batch_linger,
    }))
}

fn parse_pncp(raw: &RawSettings) -> Result<Option<PncpSettings>, ConfigError> {
    let rate_limit = parse_rate("PNCP_RATE_LIMIT", &raw.pncp_rate_limit)?;
    let media_type = non_empty(&raw.pncp_media_type)
        .ok_or_else(|| invalid("PNCP_MEDIA_TYPE", "must not be empty"))
        .and_then(|media_type| header_safe("PNCP_MEDIA_TYPE", media_type.to_owned()))?;
    let Some(base) = non_empty(&raw.pncp_base_url) else {
        return Ok(None);
    };
    let because = "PNCP_BASE_URL";
    Ok(Some(PncpSettings {
        base_url: parse_base_url("PNCP_BASE_URL", base.trim_end_matches('/'))?,
        application_key: required_secret(
            "PNCP_APPLICATION_KEY",
            &raw.pncp_application_key,
            because,
        )?,
        shared_secret: required_secret("PNCP_SHARED_SECRET", &raw.pncp_shared_secret, because)?,
        media_type,
        rate_limit,
    }))
}

/// A setting sent as an HTTP header value: one that no request could carry
/// (a control character, a line break) is refused here, at start-up, instead of
/// failing every call in the client.
fn header_safe(setting: &'static str, value: String) -> Result<String, ConfigError> {
    match reqwest::header::HeaderValue::from_str(&value) {
        Ok(_) => Ok(value),
        Err(_) => Err(invalid(
            setting,
            "contains a control character or line break, which no HTTP header can carry; set it to the plain value the vendor issued",
        )),
    }
}

fn parse_ledger_url(text: &str) -> Result<LedgerLocation, ConfigError> {
    let text = text.trim();
    if let Some(path) = text.strip_prefix("file:") {
        if path.is_empty() {
            return Err(invalid(
                "LEDGER_URL",
                "file: needs a path, e.g. file:data/ledger",
            ));
        }
        return Ok(LedgerLocation::File(PathBuf::from(path)));
    }
    if text.starts_with("redis://") || text.starts_with("rediss://") {
        Url::parse(text).map_err(|e| {
            invalid(
                "LEDGER_URL",
                format!("{} is not a URL ({e})", redact_url(text)),
            )
        })?;
        return Ok(LedgerLocation::Redis(text.to_owned()));
    }
    Err(invalid(
        "LEDGER_URL",
        "must be file:PATH (one worker) or redis://host:port/db (a fleet)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let env: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::load_from(None, |k| env.get(k).cloned())
    }

    fn setting_of(error: ConfigError) -> &'static str {
        match error {
            ConfigError::Invalid { setting, .. } => setting,
            ConfigError::File(message) => panic!("expected an invalid setting, got {message}"),
        }
    }

    #[test]
    fn a_retention_shorter_than_a_job_can_live_is_refused() {
        let error = load(&[("LEDGER_RETENTION", "300ms")]).unwrap_err();
        assert_eq!(setting_of(error), "LEDGER_RETENTION");
        // 10 x (30s + 30s x 8) = 45 min with the defaults.
        assert!(load(&[("LEDGER_RETENTION", "44min")]).is_err());
        assert!(load(&[("LEDGER_RETENTION", "45min")]).is_ok());
        let short_jobs = [
            ("LEDGER_RETENTION", "1min"),
            ("LEDGER_LEASE", "1s"),
            ("VENDOR_TIMEOUT", "1s"),
            ("RETRY_MAX_ATTEMPTS", "2"),
        ];
        assert!(load(&short_jobs).is_ok(), "30s of job life needs 30s");
    }

    #[test]
    fn a_header_setting_no_request_could_carry_is_refused_at_start_up() {
        let mimecast = [
            ("MIMECAST_BASE_URL", "https://eu-api.mimecast.com"),
            ("MIMECAST_ACCESS_KEY", "ak"),
            ("MIMECAST_SECRET_KEY", "c2VjcmV0"),
            ("MIMECAST_APP_KEY", "key"),
        ];
        let with = |name, value| {
            let mut vars = mimecast.to_vec();
            vars.push((name, value));
            load(&vars)
        };
        assert!(with("MIMECAST_APP_ID", "app-1").is_ok());
        for bad in ["app\n1", "app\r\nX-Evil: 1", "app\u{7f}"] {
            let error = with("MIMECAST_APP_ID", bad).unwrap_err();
            assert_eq!(setting_of(error), "MIMECAST_APP_ID", "{bad:?}");
        }
        let error = load(&[("PNCP_MEDIA_TYPE", "application/json\u{1}")]).unwrap_err();
        assert_eq!(setting_of(error), "PNCP_MEDIA_TYPE");
    }

    #[test]
    fn defaults_match_the_contract() {
        let settings = load(&[]).unwrap();
        assert_eq!(settings.broker.jobs_queue.jobs, "account-updates");
        assert_eq!(
            settings.broker.jobs_queue.results,
            "account-updates.results"
        );
        assert_eq!(settings.broker.jobs_queue.dead, "account-updates.dead");
        assert_eq!(settings.broker.consume_queues, vec!["account-updates"]);
        assert_eq!(settings.broker.concurrency.get(), 16);
        assert!(settings.mimecast.is_none());
        assert!(settings.pncp.is_none());
        assert_eq!(settings.retry.initial_delay, Duration::from_millis(500));
        assert_eq!(settings.retry.max_delay, Duration::from_secs(60));
        assert_eq!(settings.retry.max_attempts.get(), 8);
        assert_eq!(settings.vendor_timeout, Duration::from_secs(30));
        assert_eq!(
            settings.ledger.location,
            LedgerLocation::File(PathBuf::from("data/ledger"))
        );
        assert_eq!(
            settings.ledger.retention,
            Duration::from_secs(7 * 24 * 3600)
        );
        assert_eq!(settings.shutdown_timeout, Duration::from_secs(25));
        assert_eq!(settings.rate_limit_scope, RateLimitScope::Process);
        assert_eq!(settings.log.format, LogFormat::Text);
    }

    #[test]
    fn every_variable_works_on_its_own() {
        let s = load(&[("WORKER_CONCURRENCY", "3")]).unwrap();
        assert_eq!(s.broker.concurrency.get(), 3);
        let s = load(&[("JOBS_QUEUE", "q1")]).unwrap();
        assert_eq!(s.broker.jobs_queue.dead, "q1.dead");
        assert_eq!(s.broker.consume_queues, vec!["q1"]);
        let s = load(&[("CONSUME_QUEUES", "q.0, q.1")]).unwrap();
        assert_eq!(s.broker.consume_queues, vec!["q.0", "q.1"]);
        let s = load(&[("MIMECAST_RATE_LIMIT", "20/s")]).unwrap();
        assert!(s.mimecast.is_none());
        let s = load(&[("PNCP_RATE_LIMIT", "120/min")]).unwrap();
        assert!(s.pncp.is_none());
        let s = load(&[("RETRY_MAX_ATTEMPTS", "2")]).unwrap();
        assert_eq!(s.retry.max_attempts.get(), 2);
        let s = load(&[("LEDGER_URL", "redis://127.0.0.1:6379/0")]).unwrap();
        assert!(matches!(s.ledger.location, LedgerLocation::Redis(_)));
        let s = load(&[("LOG_FORMAT", "json")]).unwrap();
        assert_eq!(s.log.format, LogFormat::Json);
        let s = load(&[("SHUTDOWN_TIMEOUT", "2s")]).unwrap();
        assert_eq!(s.shutdown_timeout, Duration::from_secs(2));
        let s = load(&[("HELD_DELIVERY_MAX", "2s")]).unwrap();
        assert_eq!(s.broker.held_delivery_max, Duration::from_secs(2));
    }

    #[test]
    fn held_delivery_max_defaults_under_the_consumer_timeout_and_must_be_positive() {
        let s = load(&[]).unwrap();
        assert_eq!(s.broker.held_delivery_max, Duration::from_secs(600));
        assert_eq!(
            setting_of(load(&[("HELD_DELIVERY_MAX", "0s")]).unwrap_err()),
            "HELD_DELIVERY_MAX"
        );
    }

    #[test]
    fn mimecast_is_configured_from_the_environment() {
        let s = load(&[
            ("MIMECAST_BASE_URL", "http://127.0.0.1:18080"),
            ("MIMECAST_ACCESS_KEY", "a"),
            ("MIMECAST_SECRET_KEY", "c2VjcmV0"),
            ("MIMECAST_APP_ID", "id"),
            ("MIMECAST_APP_KEY", "k"),
            ("MIMECAST_RATE_LIMIT", "20/s"),
        ])
        .unwrap();
        let mimecast = s.mimecast.unwrap();
        use secrecy::ExposeSecret;
        assert_eq!(mimecast.secret_key.expose_secret(), b"secret");
        assert_eq!(mimecast.rate_limit.unwrap().per_second(), 20.0);
    }

    #[test]
    fn bad_values_name_their_setting() {
        assert_eq!(
            setting_of(load(&[("AMQP_URL", "not a url")]).unwrap_err()),
            "AMQP_URL"
        );
        assert_eq!(
            setting_of(load(&[("AMQP_URL", "http://x/")]).unwrap_err()),
            "AMQP_URL"
        );
        assert_eq!(
            setting_of(load(&[("MIMECAST_RATE_LIMIT", "20/parsec")]).unwrap_err()),
            "MIMECAST_RATE_LIMIT"
        );
        assert_eq!(
            setting_of(load(&[("WORKER_CONCURRENCY", "0")]).unwrap_err()),
            "WORKER_CONCURRENCY"
        );
        assert_eq!(
            setting_of(load(&[("WORKER_CONCURRENCY", "many")]).unwrap_err()),
            "WORKER_CONCURRENCY"
        );
        assert_eq!(
            setting_of(load(&[("RETRY_INITIAL_DELAY", "soon")]).unwrap_err()),
            "RETRY_INITIAL_DELAY"
        );
        assert_eq!(
            setting_of(load(&[("LEDGER_URL", "postgres://x")]).unwrap_err()),
            "LEDGER_URL"
        );
        let not_base64 = load(&[
            ("MIMECAST_BASE_URL", "http://127.0.0.1:18080"),
            ("MIMECAST_ACCESS_KEY", "a"),
            ("MIMECAST_SECRET_KEY", "%%% not base64 %%%"),
            ("MIMECAST_APP_ID", "id"),
            ("MIMECAST_APP_KEY", "k"),
        ])
        .unwrap_err();
        let message = not_base64.to_string();
        assert!(message.contains("MIMECAST_SECRET_KEY"), "{message}");
        assert!(!message.contains("%%%"), "the secret leaked: {message}");
        assert_eq!(
            setting_of(load(&[("MIMECAST_BASE_URL", "http://127.0.0.1:1")]).unwrap_err()),
            "MIMECAST_SECRET_KEY"
        );
    }

    #[test]
    fn a_redis_password_never_shows_in_the_printed_settings() {
        let location = LedgerLocation::Redis("redis://:hunter2@redis:6379/0".into());
        let printed = format!("{location:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("redis:6379"), "{printed}");
    }

    #[test]
    fn amqp_password_is_redacted_in_errors() {
        assert_eq!(
            redact_url("amqp://user:hunter2@host:5672/%2f"),
            "amqp://user:***@host:5672/%2f"
        );
    }

    #[test]
    fn a_vendor_base_urls_credentials_are_dropped_and_never_echoed() {
        let settings = load(&[
            ("PNCP_BASE_URL", "http://puser:hunter2@127.0.0.1:8080/pncp"),
            ("PNCP_APPLICATION_KEY", "k"),
            ("PNCP_SHARED_SECRET", "s"),
        ])
        .unwrap();
        let url = &settings.pncp.unwrap().base_url;
        assert_eq!(url.as_str(), "http://127.0.0.1:8080/pncp");
        let error = load(&[
            (
                "PNCP_BASE_URL",
                "http://puser:hunter2@127.0.0.1:notaport/pncp",
            ),
            ("PNCP_APPLICATION_KEY", "k"),
            ("PNCP_SHARED_SECRET", "s"),
        ])
        .unwrap_err()
        .to_string();
        assert!(error.contains("PNCP_BASE_URL"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[test]
    fn rates_parse_in_three_units() {
        assert_eq!(
            RateLimit::parse("20/s").unwrap().per,
            Duration::from_secs(1)
        );
        assert_eq!(RateLimit::parse("120/min").unwrap().per_second(), 2.0);
        assert_eq!(RateLimit::parse("3600/h").unwrap().per_second(), 1.0);
        assert!(RateLimit::parse("0/s").is_none());
        assert!(RateLimit::parse("20/parsec").is_none());
        assert!(RateLimit::parse("20").is_none());
    }
}
