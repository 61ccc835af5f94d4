//! Embedded ledger in a `redb` file: one worker process, no server to run.
//!
//! Every change is durable (fsync) before its caller goes on, but changes are
//! committed in groups: one writer thread takes every change queued while the
//! previous commit ran and commits them together. A worker with 64 jobs in
//! flight then pays one fsync for many ledger writes instead of one each.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{now_ms, Entry, LedgerError, Stored};
use crate::job::JobId;

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");

/// What one row holds: the entry and when it may be swept.
#[derive(Clone, Serialize, Deserialize)]
struct Row {
    expires_at_ms: u64,
    entry: Entry,
}

/// Only a row's expiry, for the sweep: a row whose entry no longer decodes
/// still has a readable expiry, and is kept all the same when it does not.
#[derive(Deserialize)]
struct ExpiresAt {
    expires_at_ms: u64,
}

/// redb's own page cache. Small on purpose: pages it misses are read from the
/// kernel's page cache, which does not count against the worker's memory, and
/// measured in `account-worker bench` 2 MiB runs as fast as 8 MiB did while the
/// peak RSS under a 100,000-job backlog drops by 8 MB.
const CACHE_BYTES: usize = 2 * 1024 * 1024;
/// Most changes committed in one transaction.
const MAX_GROUP: usize = 512;
/// How often expired entries are swept while the worker runs.
const SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// Runs after the group's commit with its outcome, to answer the caller.
type Reply = Box<dyn FnOnce(Result<(), LedgerError>) + Send>;
/// A read-modify-write of one entry: returns what to store and how to answer.
type Change = Box<dyn FnOnce(Result<Stored, LedgerError>) -> (Option<Entry>, Reply) + Send>;

struct Op {
    key: String,
    change: Change,
}

/// A ledger file; cheap to clone.
#[derive(Debug, Clone)]
pub struct FileLedger {
    committer: Arc<Committer>,
    writer: Arc<Writer>,
}

/// The channel to the writer thread; dropping the last handle stops the thread
/// and waits for it, so the file is closed when the ledger is.
#[derive(Debug)]
struct Writer {
    sender: Option<mpsc::Sender<Op>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.sender.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Op")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
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
        let db = open_database(path).map_err(|e| {
            error(format!(
                "cannot open ({e}); a file ledger serves one worker process: give each worker its own LEDGER_URL=file:PATH, or share a redis:// ledger across a fleet"
            ))
        })?;
        let committer = Arc::new(Committer {
            db: Mutex::new(Some(Arc::new(db))),
            path: path.to_owned(),
            retention,
        });
        committer.sweep(now_ms())?;
        committer.free_dead_leases(now_ms())?;
        let (sender, ops) = mpsc::channel();
        let thread_committer = committer.clone();
        let thread = std::thread::Builder::new()
            .name("ledger-writer".to_owned())
            .spawn(move || thread_committer.write_groups(&ops))
            .map_err(|e| error(format!("cannot start its writer thread ({e})")))?;
        Ok(Self {
            committer,
            writer: Arc::new(Writer {
                sender: Some(sender),
                thread: Some(thread),
            }),
        })
    }

    fn error(&self, reason: impl std::fmt::Display) -> LedgerError {
        self.committer.error(reason)
    }

    /// Queues one read-modify-write for the next group commit and waits until it
    /// is durable.
    pub(super) async fn update<T: Send + 'static>(
        &self,
        job: &JobId,
        change: impl FnOnce(Stored) -> (T, Option<Entry>) + Send + 'static,
    ) -> Result<T, LedgerError> {
        let (answer_tx, answer_rx) = tokio::sync::oneshot::channel::<Result<T, LedgerError>>();
        let change: Change = Box::new(move |current| match current.map(change) {
            Ok((answer, write)) => (
                write,
                Box::new(move |committed: Result<(), LedgerError>| {
                    let _ = answer_tx.send(committed.map(|()| answer));
                }) as Reply,
            ),
            Err(error) => (
                None,
                Box::new(move |_| {
                    let _ = answer_tx.send(Err(error));
                }) as Reply,
            ),
        });
        self.writer
            .sender
            .as_ref()
            .ok_or_else(|| self.error("the ledger is closing"))?
            .send(Op {
                key: job.as_str().to_owned(),
                change,
            })
            .map_err(|_| self.error("the writer thread stopped"))?;
        answer_rx
            .await
            .map_err(|_| self.error("the writer thread stopped before answering"))?
    }

    /// Deletes entries whose retention ended before `now` (Unix ms).
    #[cfg(test)]
    fn sweep_before(&self, now: u64) -> Result<usize, LedgerError> {
        self.committer.sweep(now)
    }

    /// Entries stored now (for tests and reports).
    pub fn len(&self) -> Result<u64, LedgerError> {
        let db = self
            .committer
            .database()
            .map_err(|reason| self.error(reason))?;
        let tx = db.begin_read().map_err(|e| self.error(e))?;
        let table = tx.open_table(JOBS).map_err(|e| self.error(e))?;
        table.len().map_err(|e| self.error(e))
    }

    /// Whether the ledger holds no entry.
    pub fn is_empty(&self) -> Result<bool, LedgerError> {
        self.len().map(|n| n == 0)
    }
}

/// Opens the file with a bounded page cache: the ledger's working set is the
/// jobs in flight, not the whole retention period, and memory must not grow
/// with it.
fn open_database(path: &Path) -> Result<Database, redb::DatabaseError> {
    Database::builder().set_cache_size(CACHE_BYTES).create(path)
}

/// The database and the commit logic, shared with the writer thread.
#[derive(Debug)]
struct Committer {
    /// `None` after a failed write, until the file is opened again.
    db: Mutex<Option<Arc<Database>>>,
    path: PathBuf,
    retention: Duration,
}

impl Committer {
    /// The open database, opening the file again after a failed write.
    /// The error is the reason, for [`Committer::error`] to name the file.
    fn database(&self) -> Result<Arc<Database>, String> {
        let mut db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(db) = db.as_ref() {
            return Ok(db.clone());
        }
        let reopened = Arc::new(open_database(&self.path).map_err(|e| {
            format!(
                "cannot open it again after a failed write ({e}); check the disk (space, permissions, errors in the kernel log)"
            )
        })?);
        tracing::info!(path = %self.path.display(), "ledger file opened again after a failed write");
        *db = Some(reopened.clone());
        Ok(reopened)
    }

    /// After a failed write redb refuses every later one until the file is
    /// opened again (a full disk, an I/O error): without this a disk that
    /// recovers would still leave every job waiting for the ledger for good.
    fn forget_database(&self) {
        self.db.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    fn error(&self, reason: impl std::fmt::Display) -> LedgerError {
        LedgerError::File {
            path: self.path.display().to_string(),
            reason: reason.to_string(),
        }
    }

    /// Commits queued changes in groups until every sender is gone.
    fn write_groups(&self, ops: &mpsc::Receiver<Op>) {
        let mut last_sweep = Instant::now();
        while let Ok(first) = ops.recv() {
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match ops.try_recv() {
                    Ok(op) => group.push(op),
                    Err(_) => break,
                }
            }
            let (replies, committed) = self.commit(group);
            for reply in replies {
                reply(committed.as_ref().map(|_| ()).map_err(|e| self.error(e)));
            }
            if last_sweep.elapsed() >= SWEEP_EVERY {
                last_sweep = Instant::now();
                if let Err(e) = self.sweep(now_ms()) {
                    tracing::warn!(error = %e, "cannot sweep expired ledger entries");
                }
            }
        }
    }

    /// Applies a group of changes in one transaction; returns the replies and
    /// whether the commit made them durable.
    fn commit(&self, group: Vec<Op>) -> (Vec<Reply>, Result<(), String>) {
        let mut replies = Vec::with_capacity(group.len());
        let began = self
            .database()
            .and_then(|db| db.begin_write().map_err(|e| e.to_string()));
        let tx = match began {
            Ok(tx) => tx,
            Err(reason) => {
                self.forget_database();
                for op in group {
                    let (_, reply) = (op.change)(Err(self.error(&reason)));
                    replies.push(reply);
                }
                return (replies, Err(reason));
            }
        };
        let applied = (|| -> Result<(), String> {
            let mut table = tx.open_table(JOBS).map_err(|e| e.to_string())?;
            for op in group {
                // A row that cannot be decoded is ledger loss, for the decision
                // to treat as such; it is never taken as "not started".
                let current = match table.get(op.key.as_str()) {
                    Ok(Some(bytes)) => Ok(serde_json::from_slice::<Row>(bytes.value())
                        .map_or_else(
                            |e| Stored::Unreadable(e.to_string()),
                            |row| Stored::Present(row.entry),
                        )),
                    Ok(None) => Ok(Stored::Absent),
                    Err(e) => Err(self.error(e)),
                };
                let (write, reply) = (op.change)(current);
                replies.push(reply);
                if let Some(entry) = write {
                    let row = Row {
                        expires_at_ms: now_ms() + self.retention.as_millis() as u64,
                        entry,
                    };
                    let bytes = serde_json::to_vec(&row).map_err(|e| e.to_string())?;
                    table
                        .insert(op.key.as_str(), bytes.as_slice())
                        .map_err(|e| e.to_string())?;
                }
            }
            Ok(())
        })();
        let committed = applied.and_then(|()| tx.commit().map_err(|e| e.to_string()));
        if committed.is_err() {
            self.forget_database();
        }
        (replies, committed)
    }

    /// Ends every lease still running at open. The file is locked to one
    /// process, so such a lease belongs to a process that died (a crash, a
    /// SIGKILL): its jobs resume as soon as they are redelivered, instead of
    /// every one of them waiting out `LEDGER_LEASE` while the new process holds
    /// their deliveries. Their progress, in-flight markers included, is kept:
    /// what may have been sent is still never resent.
    fn free_dead_leases(&self, now: u64) -> Result<usize, LedgerError> {
        let tx = self
            .database()
            .map_err(|reason| self.error(reason))?
            .begin_write()
            .map_err(|e| self.error(e))?;
        let freed = {
            let mut table = tx.open_table(JOBS).map_err(|e| self.error(e))?;
            let held: Vec<(String, Row)> = table
                .iter()
                .map_err(|e| self.error(e))?
                .filter_map(Result::ok)
                .filter_map(|(key, value)| {
                    let row = serde_json::from_slice::<Row>(value.value()).ok()?;
                    let live = row.entry.finished.is_none() && row.entry.lease_until_ms > now;
                    live.then(|| (key.value().to_owned(), row))
                })
                .collect();
            for (key, mut row) in held.iter().cloned() {
                row.entry.owner = String::new();
                row.entry.lease_until_ms = 0;
                row.entry.granted = None;
                let bytes = serde_json::to_vec(&row).map_err(|e| self.error(e))?;
                table
                    .insert(key.as_str(), bytes.as_slice())
                    .map_err(|e| self.error(e))?;
            }
            held.len()
        };
        tx.commit().map_err(|e| self.error(e))?;
        if freed > 0 {
            tracing::warn!(
                jobs = freed,
                "the last process using this ledger stopped with jobs in flight; they resume when redelivered"
            );
        }
        Ok(freed)
    }

    /// Deletes entries whose retention ended before `now` (Unix ms).
    fn sweep(&self, now: u64) -> Result<usize, LedgerError> {
        let tx = self
            .database()
            .map_err(|reason| self.error(reason))?
            .begin_write()
            .map_err(|e| self.error(e))?;
        let removed = {
            let mut table = tx.open_table(JOBS).map_err(|e| self.error(e))?;
            let mut unreadable = 0usize;
            let expired: Vec<String> = table
                .iter()
                .map_err(|e| self.error(e))?
                .filter_map(Result::ok)
                .filter(|(_, value)| {
                    // A row that cannot be read is kept: deleting it would turn
                    // the next copy of its job into a new job, applied again.
                    match serde_json::from_slice::<ExpiresAt>(value.value()) {
                        Ok(row) => row.expires_at_ms < now,
                        Err(_) => {
                            unreadable += 1;
                            false
                        }
                    }
                })
                .map(|(key, _)| key.value().to_owned())
                .collect();
            if unreadable > 0 {
                tracing::error!(
                    unreadable,
                    path = %self.path.display(),
                    "ledger rows that cannot be read are kept, not swept: their jobs are treated as ledger loss; inspect the file"
                );
            }
            for key in &expired {
                table.remove(key.as_str()).map_err(|e| self.error(e))?;
            }
            expired.len()
        };
        tx.commit().map_err(|e| self.error(e))?;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{JobResult, JobStatus, ResultMeta};
    use crate::ledger::{Claim, Finished, Ledger, Progress};

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
            let ledger = Ledger::File(FileLedger::open(&path, Duration::from_secs(3600)).unwrap());
            let claim = ledger
                .claim(&job, "a", Duration::from_secs(30), None)
                .await
                .unwrap();
            assert!(matches!(claim, Claim::Owned { deliveries: 1, .. }));
            assert_eq!(
                ledger
                    .claim(&job, "b", Duration::from_secs(30), None)
                    .await
                    .unwrap(),
                Claim::Busy
            );
            ledger
                .finish(&job, "a", None, &result("j-1"))
                .await
                .unwrap();
        }
        let ledger = Ledger::File(FileLedger::open(&path, Duration::from_secs(3600)).unwrap());
        let claim = ledger
            .claim(&job, "c", Duration::from_secs(30), None)
            .await
            .unwrap();
        assert_eq!(claim, Claim::Done(Box::new(result("j-1"))));
    }

    #[tokio::test]
    async fn a_lease_left_by_a_dead_process_ends_when_the_file_is_opened_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger");
        let job = JobId::parse("j-1").unwrap();
        let marker = Progress {
            in_flight: vec![0],
            ..Progress::default()
        };
        {
            let ledger = Ledger::File(FileLedger::open(&path, Duration::from_secs(3600)).unwrap());
            let claim = ledger
                .claim(&job, "dead", Duration::from_secs(600), Some(&marker))
                .await
                .unwrap();
            assert!(matches!(claim, Claim::Owned { marked: true, .. }));
            // The process dies here, its lease running for ten more minutes.
        }
        let ledger = Ledger::File(FileLedger::open(&path, Duration::from_secs(3600)).unwrap());
        let claim = ledger
            .claim(&job, "next", Duration::from_secs(30), None)
            .await
            .unwrap();
        match claim {
            Claim::Owned {
                progress,
                deliveries,
                ..
            } => {
                assert_eq!(progress.in_flight, [0], "the in-flight marker is kept");
                assert_eq!(deliveries, 2);
            }
            other => panic!("the next delivery resumes at once, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn after_a_failed_write_the_file_is_opened_again_once_it_can_be() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger");
        let file = FileLedger::open(&path, Duration::from_secs(3600)).unwrap();
        let ledger = Ledger::File(file.clone());
        let lease = Duration::from_secs(30);
        let first = JobId::parse("before").unwrap();
        ledger.claim(&first, "a", lease, None).await.unwrap();

        // As a failed write does; and the file cannot be opened yet (here
        // because something else holds it, as a full or failing disk would).
        file.committer.forget_database();
        let blocker = open_database(&path).unwrap();
        let second = JobId::parse("during").unwrap();
        let refused = ledger.claim(&second, "a", lease, None).await.unwrap_err();
        assert!(
            refused.to_string().contains("cannot open it again"),
            "{refused}"
        );

        drop(blocker);
        assert!(matches!(
            ledger.claim(&second, "a", lease, None).await.unwrap(),
            Claim::Owned { .. }
        ));
        assert_eq!(
            ledger.claim(&first, "b", lease, None).await.unwrap(),
            Claim::Busy,
            "what was stored before the failure is still there"
        );
    }

    #[tokio::test]
    async fn entries_past_retention_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger");
        let file = FileLedger::open(&path, Duration::from_secs(60)).unwrap();
        let ledger = Ledger::File(file.clone());
        let old = JobId::parse("old").unwrap();
        ledger
            .claim(&old, "a", Duration::from_secs(30), None)
            .await
            .unwrap();
        ledger
            .finish(&old, "a", None, &result("old"))
            .await
            .unwrap();
        assert_eq!(file.sweep_before(now_ms()).unwrap(), 0);
        assert_eq!(file.sweep_before(now_ms() + 61_000).unwrap(), 1);
        assert!(file.is_empty().unwrap());
    }
}
