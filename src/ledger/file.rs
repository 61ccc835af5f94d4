//! Embedded ledger in a `redb` file: one worker process, no server to run.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{decide_claim, now_ms, Claim, Entry, Finished, LedgerError, Progress};
use crate::job::JobId;

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");

/// What one row holds: the entry and when it may be swept.
#[derive(Serialize, Deserialize)]
struct Row {
    expires_at_ms: u64,
    entry: Entry,
}

/// A ledger file; cheap to clone.
#[derive(Debug, Clone)]
pub struct FileLedger {
    db: Arc<Database>,
    path: PathBuf,
    retention: Duration,
}

impl FileLedger {
    /// Opens (or creates) the file and sweeps expired entries.
    pub fn open(path: &Path, retention: Duration) -> Result<Self, LedgerError> {
        let error = |reason: String| LedgerError::File {
            path: path.display().to_string(),
            reason,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| error(format!("cannot create its directory ({e})")))?;
        }
        let db = Database::create(path).map_err(|e| {
            error(format!(
                "cannot open ({e}); a file ledger serves one worker process: give each worker its own LEDGER_URL=file:PATH, or share a redis:// ledger across a fleet"
            ))
        })?;
        let ledger = Self {
            db: Arc::new(db),
            path: path.to_owned(),
            retention,
        };
        ledger.sweep_now()?;
        Ok(ledger)
    }

    fn error(&self, reason: impl std::fmt::Display) -> LedgerError {
        LedgerError::File {
            path: self.path.display().to_string(),
            reason: reason.to_string(),
        }
    }

    /// Runs one read-modify-write transaction off the async runtime.
    async fn update<T: Send + 'static>(
        &self,
        job: &JobId,
        change: impl FnOnce(Option<Entry>) -> Result<(T, Option<Entry>), LedgerError> + Send + 'static,
    ) -> Result<T, LedgerError> {
        let ledger = self.clone();
        let key = job.as_str().to_owned();
        tokio::task::spawn_blocking(move || {
            let tx = ledger.db.begin_write().map_err(|e| ledger.error(e))?;
            let answer = {
                let mut table = tx.open_table(JOBS).map_err(|e| ledger.error(e))?;
                let current = match table.get(key.as_str()).map_err(|e| ledger.error(e))? {
                    Some(bytes) => Some(
                        serde_json::from_slice::<Row>(bytes.value())
                            .map_err(|e| LedgerError::Corrupt {
                                job_id: key.clone(),
                                reason: e.to_string(),
                            })?
                            .entry,
                    ),
                    None => None,
                };
                let (answer, write) = change(current)?;
                if let Some(entry) = write {
                    let row = Row {
                        expires_at_ms: now_ms() + ledger.retention.as_millis() as u64,
                        entry,
                    };
                    let bytes = serde_json::to_vec(&row).map_err(|e| ledger.error(e))?;
                    table
                        .insert(key.as_str(), bytes.as_slice())
                        .map_err(|e| ledger.error(e))?;
                }
                answer
            };
            tx.commit().map_err(|e| ledger.error(e))?;
            Ok(answer)
        })
        .await
        .map_err(|e| self.error(format!("ledger task failed: {e}")))?
    }

    /// See [`super::Ledger::claim`].
    pub async fn claim(
        &self,
        job: &JobId,
        owner: &str,
        lease: Duration,
    ) -> Result<Claim, LedgerError> {
        let owner = owner.to_owned();
        self.update(job, move |current| {
            Ok(decide_claim(current, &owner, now_ms(), lease))
        })
        .await
    }

    /// See [`super::Ledger::renew`].
    pub async fn renew(
        &self,
        job: &JobId,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, LedgerError> {
        let owner = owner.to_owned();
        self.update(job, move |current| match current {
            Some(mut entry) if entry.owner == owner && entry.finished.is_none() => {
                entry.lease_until_ms = now_ms() + lease.as_millis() as u64;
                Ok((true, Some(entry)))
            }
            _ => Ok((false, None)),
        })
        .await
    }

    /// See [`super::Ledger::checkpoint`].
    pub async fn checkpoint(
        &self,
        job: &JobId,
        owner: &str,
        progress: &Progress,
    ) -> Result<(), LedgerError> {
        let owner = owner.to_owned();
        let progress = progress.clone();
        self.update(job, move |current| match current {
            Some(mut entry) if entry.finished.is_none() => {
                entry.owner = owner;
                entry.progress = progress;
                Ok(((), Some(entry)))
            }
            _ => Ok(((), None)),
        })
        .await
    }

    /// See [`super::Ledger::finish`].
    pub async fn finish(&self, job: &JobId, finished: &Finished) -> Result<(), LedgerError> {
        let finished = finished.clone();
        self.update(job, move |current| {
            let mut entry = current.unwrap_or(Entry {
                owner: String::new(),
                lease_until_ms: 0,
                deliveries: 1,
                progress: Progress::default(),
                finished: None,
            });
            entry.finished = Some(finished);
            Ok(((), Some(entry)))
        })
        .await
    }

    fn sweep_now(&self) -> Result<usize, LedgerError> {
        self.sweep_before(now_ms())
    }

    /// Deletes entries whose retention ended before `now` (Unix ms).
    fn sweep_before(&self, now: u64) -> Result<usize, LedgerError> {
        let tx = self.db.begin_write().map_err(|e| self.error(e))?;
        let removed = {
            let mut table = tx.open_table(JOBS).map_err(|e| self.error(e))?;
            let expired: Vec<String> = table
                .iter()
                .map_err(|e| self.error(e))?
                .filter_map(Result::ok)
                .filter(|(_, value)| {
                    serde_json::from_slice::<Row>(value.value())
                        .map(|row| row.expires_at_ms < now)
                        .unwrap_or(true)
                })
                .map(|(key, _)| key.value().to_owned())
                .collect();
            for key in &expired {
                table.remove(key.as_str()).map_err(|e| self.error(e))?;
            }
            expired.len()
        };
        tx.commit().map_err(|e| self.error(e))?;
        Ok(removed)
    }

    /// Entries stored now (for tests and reports).
    pub fn len(&self) -> Result<u64, LedgerError> {
        let tx = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = tx.open_table(JOBS).map_err(|e| self.error(e))?;
        table.len().map_err(|e| self.error(e))
    }

    /// Whether the ledger holds no entry.
    pub fn is_empty(&self) -> Result<bool, LedgerError> {
        self.len().map(|n| n == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{JobResult, JobStatus, ResultMeta};

    fn result(id: &str) -> Finished {
        Finished {
            result: JobResult {
                job_id: id.to_owned(),
                vendor: "mimecast".to_owned(),
                status: JobStatus::Succeeded,
                meta: ResultMeta { status: 200 },
                data: vec![],
                fail: vec![],
                attempts: 1,
            },
            dead_letter: None,
        }
    }

    #[tokio::test]
    async fn a_finished_job_is_done_for_every_later_delivery_even_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger");
        let job = JobId::parse("j-1").unwrap();
        {
            let ledger = FileLedger::open(&path, Duration::from_secs(3600)).unwrap();
            let claim = ledger
                .claim(&job, "a", Duration::from_secs(30))
                .await
                .unwrap();
            assert!(matches!(claim, Claim::Owned { deliveries: 1, .. }));
            assert_eq!(
                ledger
                    .claim(&job, "b", Duration::from_secs(30))
                    .await
                    .unwrap(),
                Claim::Busy
            );
            ledger.finish(&job, &result("j-1")).await.unwrap();
        }
        let ledger = FileLedger::open(&path, Duration::from_secs(3600)).unwrap();
        let claim = ledger
            .claim(&job, "c", Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(claim, Claim::Done(Box::new(result("j-1"))));
    }

    #[tokio::test]
    async fn entries_past_retention_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger");
        let ledger = FileLedger::open(&path, Duration::from_secs(60)).unwrap();
        ledger
            .finish(&JobId::parse("old").unwrap(), &result("old"))
            .await
            .unwrap();
        assert_eq!(ledger.sweep_before(now_ms()).unwrap(), 0);
        assert_eq!(ledger.sweep_before(now_ms() + 61_000).unwrap(), 1);
        assert!(ledger.is_empty().unwrap());
    }
}
