//! The one data file of embedded mode: opening `<data dir>/wagate.redb` (one process at a time,
//! refused at once otherwise), and the writer thread through which every change of the embedded
//! bus and store is committed. The writer takes all changes queued while the previous commit
//! was being synced and commits them in one transaction (group commit), so a burst of publishes
//! costs a few fsyncs instead of one each, while every caller still returns only once its own
//! change is durable.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
};

use redb::{Database, ReadTransaction, ReadableDatabase, WriteTransaction};
use tokio::sync::oneshot;

use crate::data_dir::DataFileError;

pub mod data_dir;

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
    /// A read on the blocking pool did not finish.
    #[error("a database read did not finish: {0}")]
    Read(#[source] Arc<tokio::task::JoinError>),
    /// A stored value is not what it should be.
    #[error("{0} is malformed")]
    Malformed(&'static str),
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

/// A handle on the open database: reads on blocking threads, writes through the writer thread.
#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

struct Inner {
    database: Arc<Database>,
    /// Always set until dropped: taking it closes the queue, which stops the writer.
    jobs: Option<mpsc::Sender<Box<dyn Job>>>,
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

impl Db {
    pub fn start(database: Database) -> Result<Self, DbError> {
        let database = Arc::new(database);
        let (jobs, queue) = mpsc::channel();
        let writer_alive = Arc::new(AtomicBool::new(true));
        let alive = writer_alive.clone();
        let db = database.clone();
        let writer = std::thread::Builder::new()
            .name("wagate-db-writer".into())
            .spawn(move || write_loop(&db, &queue, &alive))
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
        self.inner
            .jobs
            .as_ref()
            .ok_or_else(writer_stopped)?
            .send(Box::new(Call {
                step,
                on_commit,
                result: None,
                reply,
            }))
            .map_err(|_| writer_stopped())?;
        answer.await.map_err(|_| writer_stopped())?
    }

    /// Runs `read` on a consistent snapshot, on a blocking thread.
    pub async fn read<R, F>(&self, read: F) -> Result<R, DbError>
    where
        R: Send + 'static,
        F: FnOnce(&ReadTransaction) -> Result<R, DbError> + Send + 'static,
    {
        let database = self.inner.database.clone();
        tokio::task::spawn_blocking(move || read(&database.begin_read()?))
            .await
            .map_err(|e| DbError::Read(Arc::new(e)))?
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

/// Commits queued changes in groups until every handle is gone.
fn write_loop(database: &Database, queue: &mpsc::Receiver<Box<dyn Job>>, alive: &AtomicBool) {
    struct Alive<'a>(&'a AtomicBool);
    impl Drop for Alive<'_> {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Release);
        }
    }
    let _alive = Alive(alive);
    while let Ok(first) = queue.recv() {
        let mut batch = Vec::with_capacity(64);
        batch.push(first);
        batch.extend(queue.try_iter().take(MAX_BATCH - 1));
        commit_batch(database, batch);
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
