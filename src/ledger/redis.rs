//! Redis ledger, shared by every worker of a fleet.
//!
//! Each job is one key holding its JSON entry. Every change is a compare-and-set:
//! read the entry, decide in Rust (the same [`decide_claim`] as the file backend),
//! and write only if the entry is still what was read, so two workers racing for
//! one job cannot both win.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};

use super::{Entry, LedgerError, Stored};
use crate::job::JobId;

/// Key prefix, so the ledger can share a Redis database with other data.
const PREFIX: &str = "account-worker:job:";

/// Writes ARGV[2] with a PX of ARGV[3] only if the key still holds ARGV[1]
/// (an empty ARGV[1] meaning "absent").
const COMPARE_AND_SET: &str = r"
local current = redis.call('GET', KEYS[1])
if (current == false and ARGV[1] == '') or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

/// A Redis ledger; cheap to clone (the connection reconnects by itself).
#[derive(Clone)]
pub struct RedisLedger {
    connection: ConnectionManager,
    retention: Duration,
    cas: Script,
}

impl std::fmt::Debug for RedisLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLedger")
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

fn redis_error(error: redis::RedisError) -> LedgerError {
    LedgerError::Redis(error.to_string())
}

/// Warns at start-up when the server's settings can lose or evict entries: the
/// never-twice guarantee needs every write kept (AOF with `appendfsync always`,
/// or a `WAIT`ed replica) and no eviction. A server that refuses `CONFIG`
/// (managed Redis often does) is said once, not treated as a failure.
async fn check_durability(connection: &ConnectionManager) {
    let setting = |name: &'static str| {
        let mut connection = connection.clone();
        async move {
            let reply: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
                .arg("GET")
                .arg(name)
                .query_async(&mut connection)
                .await;
            reply.map(|pair| pair.get(1).cloned().unwrap_or_default())
        }
    };
    let (appendonly, appendfsync, policy) = match (
        setting("appendonly").await,
        setting("appendfsync").await,
        setting("maxmemory-policy").await,
    ) {
        (Ok(a), Ok(f), Ok(p)) => (a, f, p),
        (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => {
            tracing::warn!(error = %e, "the Redis ledger cannot check its server's persistence and eviction settings (CONFIG refused); make sure it keeps every write (appendonly yes, appendfsync always) and evicts nothing (maxmemory-policy noeviction), or an entry lost there can apply a change twice");
            return;
        }
    };
    for warning in durability_warnings(&appendonly, &appendfsync, &policy) {
        tracing::warn!("{warning}");
    }
}

/// What is unsafe in the server's settings, one sentence each.
fn durability_warnings(appendonly: &str, appendfsync: &str, policy: &str) -> Vec<String> {
    let mut warnings = Vec::new();
    if appendonly != "yes" {
        warnings.push(format!("the Redis ledger's server has appendonly {appendonly}: a restart loses recent entries, and a job whose entry is lost may be applied twice; set appendonly yes with appendfsync always (or WAIT on a replica)"));
    } else if appendfsync != "always" {
        warnings.push(format!("the Redis ledger's server has appendfsync {appendfsync}: a crash of the server can lose the last second of entries; set appendfsync always (or WAIT on a replica)"));
    }
    if policy != "noeviction" {
        warnings.push(format!("the Redis ledger's server has maxmemory-policy {policy}: under memory pressure it can evict ledger entries (every entry has a TTL); set maxmemory-policy noeviction"));
    }
    warnings
}

impl RedisLedger {
    /// Connects to the Redis at `url`.
    pub async fn open(url: &str, retention: Duration) -> Result<Self, LedgerError> {
        let client = redis::Client::open(url).map_err(redis_error)?;
        let connection = ConnectionManager::new(client).await.map_err(redis_error)?;
        check_durability(&connection).await;
        Ok(Self {
            connection,
            retention,
            cas: Script::new(COMPARE_AND_SET),
        })
    }

    /// A clone of the shared connection (for the fleet rate limiter).
    pub fn connection(&self) -> ConnectionManager {
        self.connection.clone()
    }

    /// Reads, decides, and compare-and-sets until no other writer interfered.
    pub(super) async fn update<T>(
        &self,
        job: &JobId,
        mut change: impl FnMut(Stored) -> (T, Option<Entry>),
    ) -> Result<T, LedgerError> {
        let key = format!("{PREFIX}{}", job.as_str());
        let mut connection = self.connection.clone();
        loop {
            let raw: Option<String> = connection.get(&key).await.map_err(redis_error)?;
            // An entry that cannot be decoded is ledger loss, for the decision
            // to treat as such; the compare-and-set still compares its text.
            let current = match &raw {
                Some(text) => serde_json::from_str::<Entry>(text)
                    .map_or_else(|e| Stored::Unreadable(e.to_string()), Stored::Present),
                None => Stored::Absent,
            };
            let (answer, write) = change(current);
            let Some(entry) = write else {
                return Ok(answer);
            };
            let text =
                serde_json::to_string(&entry).map_err(|e| LedgerError::Redis(e.to_string()))?;
            let written: i64 = self
                .cas
                .key(&key)
                .arg(raw.as_deref().unwrap_or(""))
                .arg(text)
                .arg(self.retention.as_millis() as u64)
                .invoke_async(&mut connection)
                .await
                .map_err(redis_error)?;
            if written == 1 {
                return Ok(answer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::durability_warnings;

    #[test]
    fn settings_that_can_lose_or_evict_entries_are_named() {
        assert!(durability_warnings("yes", "always", "noeviction").is_empty());
        let warnings = durability_warnings("no", "everysec", "volatile-lru");
        assert_eq!(warnings.len(), 2);
        assert!(warnings[0].contains("appendonly no"));
        assert!(warnings[1].contains("volatile-lru"));
        let warnings = durability_warnings("yes", "everysec", "noeviction");
        assert!(warnings[0].contains("appendfsync everysec"));
    }
}
