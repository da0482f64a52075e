//! The one data file of embedded mode: opening `<data dir>/wagate.redb` (one process at a time,
//! refused at once otherwise), and the writer thread through which every change of the embedded
//! bus and store is committed. The writer takes all changes queued while the previous commit
//! was being synced and commits them in one transaction (group commit), so a burst of publishes
//! costs a few fsyncs instead of one each, while every caller still returns only once its own
//! change is durable.
//!
//! redb frees the pages of deleted records without overwriting them, and leaves the old bytes in
//! the unused tail of the pages it reuses, so a deleted record can be read back from the file
//! long after (even after `Database::compact`). An erasure therefore ends with
//! [`Db::rewrite`]: every live record is copied into a fresh file, which replaces the old one
//! (see [`rewrite`]).

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
};

use redb::{Database, ReadTransaction, ReadableDatabase, WriteTransaction};
use tokio::sync::oneshot;

use crate::data_dir::DataFileError;

pub mod data_dir;
pub mod rewrite;

pub use rewrite::{CopyTable, copy_table};

/// The name of the database file inside the data folder.
pub const FILE_NAME: &str = "wagate.redb";

/// Most changes committed in one transaction: bounds the work a failed change makes the writer
/// redo (see [`commit_batch`]).
const MAX_BATCH: usize = 1024;

/// Why embedded mode could not start; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// The data folder or the file could not be made private, or the file is empty or damaged.
    #[error(transparent)]
    File(DataFileError),
    /// Another process (or another handle in this one) has the file open: two writers would
    /// each think they own every queue.
    #[error(
        "another wagate process is using {}: stop it, or give this one its own WAGATE_DATA_DIR",
        .0.display()
    )]
    InUse(PathBuf),
    /// The file could not be opened or prepared.
    #[error("cannot open {}: {source}", .path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: DbError,
    },
}

/// A failure of the embedded database; the text is safe to log. It is `Clone` because one
/// failed group commit fails every change of the group, each told the same error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DbError {
    /// redb failed: storage, a table, a transaction or a commit.
    #[error("database: {0}")]
    Redb(#[source] Arc<redb::Error>),
    /// A stored record is not the JSON it should be.
    #[error("stored record: {0}")]
    Record(#[source] Arc<serde_json::Error>),
    /// The writer thread could not be started.
    #[error("cannot start the database writer: {0}")]
    Writer(#[source] Arc<std::io::Error>),
    /// The writer thread has stopped (it panicked or the process is ending).
    #[error("the database writer has stopped; restart wagate")]
    Stopped,
    /// A change was dropped without being made (its group failed before it ran).
    #[error("the change was not made")]
    NotMade,
    /// Work handed to the blocking pool (the ingress spool's append) did not finish.
    #[error("a database task did not finish: {0}")]
    Blocking(#[source] Arc<tokio::task::JoinError>),
    /// A stored value is not what it should be.
    #[error("{0} is malformed")]
    Malformed(&'static str),
    /// A file operation of a rewrite failed (making, renaming or syncing the copy, or removing
    /// a copy left over); [`Db::rewrite`] says which file then holds the data.
    #[error("cannot {action} {}: {source}", .path.display())]
    Rewrite {
        /// What was being done.
        action: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The file holds a table that no user of it registered to be copied by a rewrite: copying
    /// the others would drop it, so the rewrite was refused and the file left as it was. A bug
    /// of wagate (a table without its [`CopyTable`]), or a table of another version.
    #[error(
        "the data file has the table {0:?}, which no part of wagate registered to be copied; \
         it was not rewritten"
    )]
    Unregistered(String),
}

macro_rules! db_error_from {
    ($($t:ty),* $(,)?) => {
        $(impl From<$t> for DbError {
            fn from(e: $t) -> Self {
                Self::Redb(Arc::new(e.into()))
            }
        })*
    };
}

db_error_from!(
    redb::Error,
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::DatabaseError,
);

impl From<serde_json::Error> for DbError {
    fn from(e: serde_json::Error) -> Self {
        Self::Record(Arc::new(e))
    }
}

/// A change submitted to the writer: run inside the group's transaction, then told the outcome.
trait Job: Send {
    /// Makes the change in `txn`. May run more than once (in a fresh transaction) if another
    /// change of the group failed; an error aborts the transaction.
    fn run(&mut self, txn: &WriteTransaction) -> Result<(), DbError>;
    /// Called once, after the commit (or its failure), on the writer thread, in submit order.
    fn finish(self: Box<Self>, outcome: Result<(), DbError>);
}

struct Call<R, S, C> {
    step: S,
    on_commit: C,
    result: Option<R>,
    reply: oneshot::Sender<Result<R, DbError>>,
}

impl<R, S, C> Job for Call<R, S, C>
where
    R: Send,
    S: Fn(&WriteTransaction) -> Result<R, DbError> + Send,
    C: FnOnce(&R) + Send,
{
    fn run(&mut self, txn: &WriteTransaction) -> Result<(), DbError> {
        self.result = Some((self.step)(txn)?);
        Ok(())
    }

    fn finish(self: Box<Self>, outcome: Result<(), DbError>) {
        let Call {
            on_commit,
            result,
            reply,
            ..
        } = *self;
        let answer = match (outcome, result) {
            (Ok(()), Some(r)) => {
                on_commit(&r);
                Ok(r)
            }
            (Ok(()), None) => Err(DbError::NotMade),
            (Err(e), _) => Err(e),
        };
        // The caller may have gone away; the change stands either way.
        let _ = reply.send(answer);
    }
}

/// What the writer is given: a change, or a request to rewrite the file.
enum Work {
    /// A change, committed in the next group.
    Change(Box<dyn Job>),
    /// A rewrite of the file ([`Db::rewrite`]), answered once the new file is in place.
    Rewrite(oneshot::Sender<Result<(), DbError>>),
}

/// A handle on the open database: reads on the caller's thread, writes through the writer thread.
#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

struct Inner {
    /// The database in use. A rewrite replaces it (on the writer thread, between two groups);
    /// a read takes its own clone, so one begun on the old file finishes there.
    database: Arc<RwLock<Arc<Database>>>,
    /// Always set until dropped: taking it closes the queue, which stops the writer.
    jobs: Option<mpsc::Sender<Work>>,
    writer: Option<std::thread::JoinHandle<()>>,
    writer_alive: Arc<AtomicBool>,
}

impl Drop for Inner {
    /// Stops the writer once it has committed what was queued, and waits for it (at most one
    /// commit): when the last handle is gone the file is closed and free for the next opener,
    /// not some time later.
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(writer) = self.writer.take()
            && writer.thread().id() != std::thread::current().id()
        {
            let _ = writer.join();
        }
    }
}

/// The database a lock holds. Nothing panics while holding it (it is only cloned or replaced),
/// so a poisoned lock still holds a whole value.
fn current(database: &RwLock<Arc<Database>>) -> Arc<Database> {
    database
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

impl Db {
    /// Starts the writer on `database`, the file at `path`. `tables` are the copies of every
    /// table its users keep ([`CopyTable`]), which a rewrite runs. A copy left over from a
    /// rewrite that was cut short (`<path>.rewrite`) is removed: the old file is whole, and
    /// `database` being open means this process holds the file's lock, so no other process
    /// can be writing that copy.
    pub fn start(database: Database, path: &Path, tables: Vec<CopyTable>) -> Result<Self, DbError> {
        rewrite::remove_leftover(path)?;
        let database = Arc::new(RwLock::new(Arc::new(database)));
        let (jobs, queue) = mpsc::channel();
        let writer_alive = Arc::new(AtomicBool::new(true));
        let alive = writer_alive.clone();
        let shared = database.clone();
        let file = rewrite::Rewriter {
            path: path.to_owned(),
            tables,
        };
        let writer = std::thread::Builder::new()
            .name("wagate-db-writer".into())
            .spawn(move || write_loop(&shared, &file, &queue, &alive))
            .map_err(|e| DbError::Writer(Arc::new(e)))?;
        Ok(Self {
            inner: Arc::new(Inner {
                database,
                jobs: Some(jobs),
                writer: Some(writer),
                writer_alive,
            }),
        })
    }

    /// Runs `step` in the next group transaction and returns its result once that is durable.
    pub async fn write<R, S>(&self, step: S) -> Result<R, DbError>
    where
        R: Send + 'static,
        S: Fn(&WriteTransaction) -> Result<R, DbError> + Send + 'static,
    {
        self.write_then(step, |_| {}).await
    }

    /// As [`Self::write`], and runs `on_commit` on the writer thread right after the commit,
    /// before any later change is answered: in-memory state that must follow the commit order
    /// (the bus's queues) is updated there.
    pub async fn write_then<R, S, C>(&self, step: S, on_commit: C) -> Result<R, DbError>
    where
        R: Send + 'static,
        S: Fn(&WriteTransaction) -> Result<R, DbError> + Send + 'static,
        C: FnOnce(&R) + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        self.submit(Work::Change(Box::new(Call {
            step,
            on_commit,
            result: None,
            reply,
        })))?;
        answer.await.map_err(|_| writer_stopped())?
    }

    /// Rewrites the file so that nothing deleted from it can be read back: every live record
    /// is copied into a new file, which then replaces the old one, and returns once that is
    /// durable. Writes wait meanwhile (the writer runs the copy), for a time that grows with the
    /// file's size. Requests that arrive while other work is queued share one rewrite, which
    /// starts after all of them were made. On an error the data is where it was: in the old file
    /// if the rewrite failed before the replacement, else in the new one.
    pub async fn rewrite(&self) -> Result<(), DbError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Work::Rewrite(reply))?;
        answer.await.map_err(|_| writer_stopped())?
    }

    fn submit(&self, work: Work) -> Result<(), DbError> {
        self.inner
            .jobs
            .as_ref()
            .ok_or_else(writer_stopped)?
            .send(work)
            .map_err(|_| writer_stopped())
    }

    /// Runs `read` on a consistent snapshot, on the calling thread. A read is a few B-tree
    /// lookups in pages that redb caches (or the kernel's page cache holds): microseconds.
    /// Handing it to the blocking pool cost a switch to a pool thread and one back, more CPU
    /// than the read: with reads inline, P2 on the embedded store went from 2,867-2,880 to
    /// 3,064-3,414 replies/s (docs/benchmarks.md, "Before and after", item 8).
    pub async fn read<R, F>(&self, read: F) -> Result<R, DbError>
    where
        F: FnOnce(&ReadTransaction) -> Result<R, DbError>,
    {
        let database = current(&self.inner.database);
        read(&database.begin_read()?)
    }

    /// Whether the file can be read and the writer is running.
    pub async fn ready(&self) -> Result<(), DbError> {
        if !self.inner.writer_alive.load(Ordering::Acquire) {
            return Err(writer_stopped());
        }
        self.read(|_| Ok(())).await
    }
}

fn writer_stopped() -> DbError {
    DbError::Stopped
}

/// Commits queued changes in groups, and rewrites the file when asked, until every handle is
/// gone.
fn write_loop(
    shared: &RwLock<Arc<Database>>,
    file: &rewrite::Rewriter,
    queue: &mpsc::Receiver<Work>,
    alive: &AtomicBool,
) {
    struct Alive<'a>(&'a AtomicBool);
    impl Drop for Alive<'_> {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Release);
        }
    }
    let _alive = Alive(alive);
    let mut database = current(shared);
    while let Ok(first) = queue.recv() {
        let mut batch = Vec::with_capacity(64);
        let mut rewrites = Vec::new();
        let mut taken = 0;
        let mut next = Some(first);
        while let Some(work) = next {
            match work {
                Work::Change(job) => batch.push(job),
                Work::Rewrite(reply) => rewrites.push(reply),
            }
            taken += 1;
            next = if taken < MAX_BATCH {
                queue.try_recv().ok()
            } else {
                None
            };
        }
        if !batch.is_empty() {
            commit_batch(&database, batch);
        }
        if rewrites.is_empty() {
            continue;
        }
        // Every request taken was made before this rewrite starts, so it serves them all.
        let (fresh, outcome) = file.run(&database);
        if let Some(fresh) = fresh {
            let fresh = Arc::new(fresh);
            *shared.write().unwrap_or_else(PoisonError::into_inner) = fresh.clone();
            database = fresh;
        }
        for reply in rewrites {
            // The caller may have gone away; the rewrite stands either way.
            let _ = reply.send(outcome.clone());
        }
    }
}

enum BatchFailure {
    /// One change failed: the transaction was aborted and nothing of the group is stored.
    Job(usize, DbError),
    /// The transaction could not start or commit: every change of the group failed.
    All(DbError),
}

/// Commits `batch` in one transaction. A change that fails is answered with its error and the
/// others are committed without it, so each change stays all-or-nothing on its own.
fn commit_batch(database: &Database, mut batch: Vec<Box<dyn Job>>) {
    loop {
        match run_batch(database, &mut batch) {
            Ok(()) => {
                for job in batch {
                    job.finish(Ok(()));
                }
                return;
            }
            Err(BatchFailure::All(e)) => {
                for job in batch {
                    job.finish(Err(e.clone()));
                }
                return;
            }
            Err(BatchFailure::Job(i, e)) => {
                batch.remove(i).finish(Err(e));
                if batch.is_empty() {
                    return;
                }
            }
        }
    }
}

fn run_batch(database: &Database, batch: &mut [Box<dyn Job>]) -> Result<(), BatchFailure> {
    let txn = database
        .begin_write()
        .map_err(|e| BatchFailure::All(e.into()))?;
    for (i, job) in batch.iter_mut().enumerate() {
        if let Err(e) = job.run(&txn) {
            // Dropping an aborted transaction discards its changes whatever abort reports.
            let _ = txn.abort();
            return Err(BatchFailure::Job(i, e));
        }
    }
    txn.commit().map_err(|e| BatchFailure::All(e.into()))
}

/// Milliseconds since the Unix epoch by the wall clock: stored times (dedupe windows, expiries)
/// must survive a restart, which an `Instant` does not.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
