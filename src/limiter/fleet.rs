//! The fleet scope: a vendor's quota belongs to its API user, so with
//! `RATE_LIMIT_SCOPE=fleet` the ceiling, the 429 pause and the slowdown live in
//! Redis and every worker process takes its turns from there.
//!
//! The ceiling is a GCRA with no burst, run as one atomic script on Redis' own
//! clock (`TIME`), so workers on different machines agree on what "now" is.
//! When Redis does not answer, a call falls back to the process-local limiter:
//! the vendor is never called unlimited and the worker never stops for it.
//!
//! The rate learned from 429s is shared too: a worker that learns something
//! writes its curve (level, start, hold, and its age on Redis' clock) to one key
//! per vendor and endpoint; every worker reads that key at most every
//! `LEARNED_REFRESH` and paces its fleet-wide turns at the curve's rate, passed
//! to the turn script with the ceiling's interval. So pacing costs no extra
//! round trip per call: one read per worker every 500 ms, one write per 429.

use std::sync::Mutex;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Script;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::learned::Curve;
use super::local::LocalLimiter;
use crate::job::VendorKind;

/// Key prefix, beside the ledger's `account-worker:job:` in the same Redis database.
const PREFIX: &str = "account-worker:rate:";

/// Longest wait for Redis before a call falls back to the local limiter.
const REDIS_TIMEOUT: Duration = Duration::from_millis(500);

/// After Redis failed, how long calls use the local limiter before asking again
/// (so an outage does not cost every call a timeout).
const RETRY_REDIS_AFTER: Duration = Duration::from_secs(1);

/// How often a worker reads the fleet's learned rate.
const LEARNED_REFRESH: Duration = Duration::from_millis(500);

/// How long the fleet remembers a learned rate nobody refreshes.
const LEARNED_TTL_MS: u64 = 3_600_000;

/// KEYS[1]: the learned curve. ARGV: level and start (calls/s), hold (ms), and
/// how long ago (ms) the curve began. Stores them with the Redis time it began.
const SHARE_LEARNED: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('HSET', KEYS[1], 'peak', ARGV[1], 'start', ARGV[2], 'hold', ARGV[3],
  'at', string.format('%.0f', now - tonumber(ARGV[4])))
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 0
";

/// KEYS[1]: the learned curve. Returns level, start, hold, when it began
/// (Redis ms) and how long ago that is, or nil.
const READ_LEARNED: &str = r"
local curve = redis.call('HMGET', KEYS[1], 'peak', 'start', 'hold', 'at')
if not curve[1] or not curve[4] then return nil end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local at = tonumber(curve[4]) or now
return {curve[1], curve[2], curve[3], curve[4], string.format('%.0f', math.max(0, now - at))}
";

/// KEYS: turn (GCRA theoretical arrival time, µs), pause, slow (spacing, µs).
/// ARGV[1]: the ceiling's interval in µs, 0 for none.
/// Returns 0 when the caller may send now (its turn is taken), else the µs to
/// wait before asking again.
const TAKE_TURN: &str = r"
local paused = redis.call('PTTL', KEYS[2])
if paused > 0 then return paused * 1000 end
local interval = tonumber(ARGV[1]) or 0
local slow = tonumber(redis.call('GET', KEYS[3]) or '0') or 0
if slow > interval then interval = slow end
if interval <= 0 then return 0 end
if redis.replicate_commands then redis.replicate_commands() end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local turn = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if turn > now then return turn - now end
redis.call('SET', KEYS[1], string.format('%.0f', now + interval),
  'PX', math.floor(interval / 1000) + 1000)
return 0
";

/// Sets KEYS[1] with a PX of ARGV[1] unless it already lives longer, so a
/// shorter pause never cuts a longer one short.
const EXTEND: &str = r"
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
end
return 0
";

/// One vendor's shared limiter.
pub(super) struct FleetLimiter {
    vendor: VendorKind,
    connection: ConnectionManager,
    turn_key: String,
    pause_key: String,
    slow_key: String,
    learned_key: String,
    interval_us: u64,
    take_turn: Script,
    extend: Script,
    share_learned: Script,
    read_learned: Script,
    /// When this worker last read the fleet's learned rate, and the curve's
    /// start (Redis ms) it took from there, so it adopts each curve once.
    learned_read_at: Mutex<Option<Instant>>,
    learned_adopted: Mutex<Option<String>>,
    /// Set while Redis is failing: until then, calls use the local limiter.
    degraded_until: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for FleetLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetLimiter")
            .field("vendor", &self.vendor)
            .field("turn_key", &self.turn_key)
            .field("interval_us", &self.interval_us)
            .finish_non_exhaustive()
    }
}

impl FleetLimiter {
    /// A limiter for `vendor`'s quota at `endpoint` (host:port of its API, so
    /// one Redis can serve several quotas), spacing calls `interval` apart.
    pub(super) fn new(
        vendor: VendorKind,
        endpoint: &str,
        interval: Option<Duration>,
        connection: ConnectionManager,
    ) -> Self {
        let base = format!("{PREFIX}{}:{endpoint}", vendor.as_str());
        Self {
            vendor,
            connection,
            turn_key: base.clone(),
            pause_key: format!("{base}:pause"),
            slow_key: format!("{base}:slow"),
            learned_key: format!("{base}:learned"),
            interval_us: interval.map_or(0, |i| i.as_micros().try_into().unwrap_or(u64::MAX)),
            take_turn: Script::new(TAKE_TURN),
            extend: Script::new(EXTEND),
            share_learned: Script::new(SHARE_LEARNED),
            read_learned: Script::new(READ_LEARNED),
            learned_read_at: Mutex::new(None),
            learned_adopted: Mutex::new(None),
            degraded_until: Mutex::new(None),
        }
    }

    /// Waits for a fleet-wide turn (pause, slowdown and ceiling), or for a local
    /// one while Redis is unreachable.
    pub(super) async fn acquire(&self, local: &LocalLimiter) {
        loop {
            // This process's own pause is known without asking Redis.
            local.wait_out_pause().await;
            if self.degraded() {
                local.acquire().await;
                return;
            }
            self.refresh_learned(local).await;
            let learned_us = local
                .learned
                .interval()
                .map_or(0, |i| u64::try_from(i.as_micros()).unwrap_or(u64::MAX));
            match self.ask(self.interval_us.max(learned_us)).await {
                Ok(wait) => {
                    self.recovered();
                    if wait.is_zero() {
                        if local.pause_deadline().is_none() {
                            return;
                        }
                    } else {
                        if learned_us > self.interval_us {
                            // The learned rate holds calls back: it may grow.
                            local.learned.saturated();
                        }
                        tokio::time::sleep(wait).await;
                    }
                }
                Err(reason) => {
                    self.degrade(&reason);
                    local.acquire().await;
                    return;
                }
            }
        }
    }

    /// Holds every worker's calls for `duration` (best effort, in the background).
    pub(super) fn share_pause(&self, duration: Duration) {
        let ms = millis(duration);
        if ms == 0 {
            return;
        }
        let (script, key, mut connection) = (
            self.extend.clone(),
            self.pause_key.clone(),
            self.connection.clone(),
        );
        self.in_background("pause", async move {
            script
                .key(key)
                .arg(ms)
                .invoke_async::<i64>(&mut connection)
                .await
        });
    }

    /// Spaces every worker's calls `interval` apart for `for_` (best effort).
    pub(super) fn share_spacing(&self, interval: Duration, for_: Duration) {
        let ms = millis(for_);
        let us = u64::try_from(interval.as_micros()).unwrap_or(u64::MAX);
        if ms == 0 || us == 0 {
            return;
        }
        let (key, mut connection) = (self.slow_key.clone(), self.connection.clone());
        self.in_background("slowdown", async move {
            redis::cmd("SET")
                .arg(key)
                .arg(us)
                .arg("PX")
                .arg(ms)
                .query_async::<()>(&mut connection)
                .await
                .map(|()| 0)
        });
    }

    /// Shares a curve this worker learned (best effort, in the background).
    pub(super) fn share_learned(&self, curve: Curve) {
        let age_ms = millis(Instant::now().saturating_duration_since(curve.epoch));
        let (script, key, mut connection) = (
            self.share_learned.clone(),
            self.learned_key.clone(),
            self.connection.clone(),
        );
        self.in_background("learned rate", async move {
            script
                .key(key)
                .arg(format!("{:.4}", curve.peak))
                .arg(format!("{:.4}", curve.start))
                .arg(millis(curve.hold))
                .arg(age_ms)
                .arg(LEARNED_TTL_MS)
                .invoke_async::<i64>(&mut connection)
                .await
        });
    }

    /// Reads the fleet's learned curve when `LEARNED_REFRESH` has passed, and
    /// adopts it if another worker (or this one) wrote a new one since.
    async fn refresh_learned(&self, local: &LocalLimiter) {
        {
            let mut read_at = self
                .learned_read_at
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if read_at.is_some_and(|at| at.elapsed() < LEARNED_REFRESH) {
                return;
            }
            *read_at = Some(Instant::now());
        }
        let mut connection = self.connection.clone();
        let mut invocation = self.read_learned.prepare_invoke();
        invocation.key(&self.learned_key);
        let read = tokio::time::timeout(
            REDIS_TIMEOUT,
            invocation.invoke_async::<Option<Vec<String>>>(&mut connection),
        )
        .await;
        let fields = match read {
            Ok(Ok(Some(fields))) => fields,
            Ok(Ok(None)) => return,
            Ok(Err(error)) => {
                debug!(vendor = %self.vendor, %error, "could not read the fleet's learned rate");
                return;
            }
            Err(_) => return,
        };
        let Some(shared) = SharedCurve::parse(&fields) else {
            debug!(vendor = %self.vendor, "the fleet's learned rate is unreadable; ignored");
            return;
        };
        let mut adopted = self
            .learned_adopted
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if adopted.as_deref() == Some(shared.began.as_str()) {
            return;
        }
        *adopted = Some(shared.began.clone());
        drop(adopted);
        let epoch = Instant::now()
            .checked_sub(shared.age)
            .unwrap_or_else(Instant::now);
        let mut curve = Curve::new(shared.peak, shared.start, epoch);
        curve.hold = shared.hold;
        local.learned.adopt(curve);
    }

    /// One round trip: 0 when the turn is taken, else how long to wait.
    async fn ask(&self, interval_us: u64) -> Result<Duration, String> {
        let mut connection = self.connection.clone();
        let mut invocation = self.take_turn.prepare_invoke();
        invocation
            .key(&self.turn_key)
            .key(&self.pause_key)
            .key(&self.slow_key)
            .arg(interval_us);
        match tokio::time::timeout(
            REDIS_TIMEOUT,
            invocation.invoke_async::<i64>(&mut connection),
        )
        .await
        {
            Ok(Ok(us)) => Ok(Duration::from_micros(u64::try_from(us).unwrap_or(0))),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("no answer within {} ms", REDIS_TIMEOUT.as_millis())),
        }
    }

    fn degraded(&self) -> bool {
        let until = *self
            .degraded_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        until.is_some_and(|until| Instant::now() < until)
    }

    /// Falls back for a while; warns once per outage, not once per call.
    fn degrade(&self, reason: &str) {
        let mut until = self
            .degraded_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let first = until.is_none();
        *until = Some(Instant::now() + RETRY_REDIS_AFTER);
        drop(until);
        if first {
            warn!(vendor = %self.vendor, error = reason, "fleet rate limiter: Redis does not answer; this process keeps to its own limit until it does (check LEDGER_URL and Redis)");
        }
    }

    fn recovered(&self) {
        let was = self
            .degraded_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if was.is_some() {
            info!(vendor = %self.vendor, "fleet rate limiter: Redis answers again; sharing the limit with the fleet");
        }
    }

    fn in_background(
        &self,
        what: &'static str,
        write: impl std::future::Future<Output = redis::RedisResult<i64>> + Send + 'static,
    ) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let vendor = self.vendor;
        runtime.spawn(async move {
            match tokio::time::timeout(REDIS_TIMEOUT, write).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => debug!(%vendor, %error, what, "could not share with the fleet"),
                Err(_) => debug!(%vendor, what, "could not share with the fleet: Redis timed out"),
            }
        });
    }
}

/// A learned curve as the fleet's key holds it.
#[derive(Debug)]
struct SharedCurve {
    peak: f64,
    start: f64,
    hold: Duration,
    /// When it began, in Redis ms: names the curve.
    began: String,
    age: Duration,
}

impl SharedCurve {
    /// Parses what `READ_LEARNED` returns; `None` for anything another
    /// program (or version) could have written that is not a usable curve.
    fn parse(fields: &[String]) -> Option<Self> {
        let [peak, start, hold, began, age] = fields else {
            return None;
        };
        let rate = |text: &String| {
            text.parse::<f64>()
                .ok()
                .filter(|rate| rate.is_finite() && *rate > 0.0)
        };
        Some(Self {
            peak: rate(peak)?,
            start: rate(start)?,
            hold: Duration::from_millis(hold.parse().ok()?),
            began: began.clone(),
            age: Duration::from_millis(age.parse().ok()?),
        })
    }
}

/// Whole milliseconds, at least 1 for any non-zero duration.
fn millis(duration: Duration) -> u64 {
    let ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 && !duration.is_zero() {
        1
    } else {
        ms
    }
}
