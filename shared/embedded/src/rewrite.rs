//! Rewriting the data file, so that nothing deleted from it can be read back. redb frees the
//! pages of deleted records without overwriting them, and a page it reuses keeps the old bytes
//! after the part it fills, so pieces of a deleted record (a phone number) stay in the file,
//! even after `Database::compact`. A file written from scratch holds only what was copied into
//! it, and the new pages redb makes start zeroed: after a rewrite, only live records are in the
//! file.
//!
//! The writer thread runs it between two groups, so no change is made meanwhile: every live
//! record is copied into `<file>.rewrite` (made private, 0600) in one write transaction, which
//! is committed durably; the copy is renamed over the file and the folder synced, and the writer
//! and later reads use the new file. Reads begun before finish on the old one, whose space the
//! system frees when the last of them ends. A crash before the rename leaves the old file whole
//! and the copy beside it, removed at the next start ([`crate::Db::start`]); after it, the file is
//! the new one. The new file is opened (and locked) by this process before the rename, so the
//! file's name always belongs to the one process that has it open.
//!
//! redb's tables are typed, so each user of the file registers how its tables are copied
//! ([`CopyTable`], made with [`copy_table`]). A table found in the file that no one registered
//! fails the rewrite, which leaves the old file as it was, rather than being dropped.

use std::{
    collections::HashSet,
    io::ErrorKind,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use redb::{
    Database, Key, MultimapTableHandle, ReadTransaction, ReadableDatabase, ReadableTable,
    TableDefinition, TableError, TableHandle, Value, WriteTransaction, backends::FileBackend,
};

use crate::{DbError, data_dir};

/// Copies one table from the file being rewritten (`from`) into the new one (`to`), creating it
/// there even when empty. Made with [`copy_table`] for each table:
/// `|from, to| copy_table(MESSAGES, from, to)`.
pub type CopyTable = fn(&ReadTransaction, &WriteTransaction) -> Result<(), DbError>;

/// What is appended to the file's name to name the copy a rewrite writes.
pub const COPY_SUFFIX: &str = ".rewrite";

/// Copies every record of `table` from `from` into `to`: the work of a [`CopyTable`]. A table
/// `from` does not have is created empty in `to`; one of other key or value types fails.
pub fn copy_table<K: Key + 'static, V: Value + 'static>(
    table: TableDefinition<K, V>,
    from: &ReadTransaction,
    to: &WriteTransaction,
) -> Result<(), DbError> {
    let mut target = to.open_table(table)?;
    let source = match from.open_table(table) {
        Ok(source) => source,
        Err(TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for row in source.iter()? {
        let (key, value) = row?;
        target.insert(key.value(), value.value())?;
    }
    Ok(())
}

/// The copy a rewrite of the file at `path` writes, beside it.
pub fn copy_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(COPY_SUFFIX);
    PathBuf::from(name)
}

/// Removes the copy of a rewrite of `path` that did not finish, if there is one. Only the
/// process that has `path` open may call it: the copy could otherwise be another's, in the
/// making.
pub(crate) fn remove_leftover(path: &Path) -> Result<(), DbError> {
    let copy = copy_path(path);
    match std::fs::remove_file(&copy) {
        Ok(()) => {
            tracing::warn!(
                path = %copy.display(),
                "removed the copy left by a rewrite of the data file that did not finish; the data file itself is whole"
            );
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("remove the leftover copy", &copy)(e)),
    }
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl Fn(std::io::Error) -> DbError + 'a {
    move |e| DbError::Rewrite {
        action,
        path: path.to_owned(),
        source: Arc::new(e),
    }
}

/// What a rewrite needs besides the database: where the file is, and how to copy its tables.
pub(crate) struct Rewriter {
    pub(crate) path: PathBuf,
    pub(crate) tables: Vec<CopyTable>,
}

impl Rewriter {
    /// Rewrites the file that `current` has open. Returns the new database once the file's name
    /// is its (also when syncing the folder then failed, reported in the result: the name is
    /// the new file's whatever the disk says, so it is the one to write to), or none if the old
    /// file is still the one, with why.
    pub(crate) fn run(&self, current: &Database) -> (Option<Database>, Result<(), DbError>) {
        let started = Instant::now();
        let copy = copy_path(&self.path);
        let fresh = match self.fill(current, &copy) {
            Ok(fresh) => fresh,
            Err(e) => {
                discard(&copy);
                return (None, Err(e));
            }
        };
        if let Err(e) = std::fs::rename(&copy, &self.path) {
            drop(fresh);
            discard(&copy);
            return (None, Err(io_error("rename the copy over", &self.path)(e)));
        }
        let synced = sync_folder(&self.path);
        let bytes = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        match &synced {
            Ok(()) => tracing::info!(
                ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                bytes,
                "rewrote the data file: nothing deleted is left in it"
            ),
            Err(e) => tracing::error!(
                error = %e,
                "rewrote the data file, but its folder did not sync: after a crash the old file may come back, with what was deleted and without what was written since"
            ),
        }
        (Some(fresh), synced)
    }

    /// Makes the copy at `copy` holding every live record of `current`, committed durably.
    fn fill(&self, current: &Database, copy: &Path) -> Result<Database, DbError> {
        remove_leftover(&self.path)?;
        let file = data_dir::create_private(copy).map_err(io_error("create", copy))?;
        let fresh = Database::builder().create_with_backend(FileBackend::new(file)?)?;
        let from = current.begin_read()?;
        // A new transaction commits with `Durability::Immediate`: durable once `commit` returns.
        let to = fresh.begin_write()?;
        for copy_one in &self.tables {
            copy_one(&from, &to)?;
        }
        all_copied(&from, &to)?;
        to.commit()?;
        Ok(fresh)
    }
}

/// Fails with the first table of `from` that is not in `to`: one nobody registered.
fn all_copied(from: &ReadTransaction, to: &WriteTransaction) -> Result<(), DbError> {
    let copied: HashSet<String> = to.list_tables()?.map(|t| t.name().to_owned()).collect();
    if let Some(missed) = from.list_tables()?.find(|t| !copied.contains(t.name())) {
        return Err(DbError::Unregistered(missed.name().to_owned()));
    }
    // No user keeps a multimap table, so no copy makes one.
    if let Some(missed) = from.list_multimap_tables()?.next() {
        return Err(DbError::Unregistered(missed.name().to_owned()));
    }
    Ok(())
}

/// Removes the copy of a failed rewrite: it is of no use, and it holds records.
fn discard(copy: &Path) {
    if let Err(e) = std::fs::remove_file(copy)
        && e.kind() != ErrorKind::NotFound
    {
        tracing::warn!(
            path = %copy.display(),
            error = %e,
            "could not remove the copy of a failed rewrite; the next rewrite or start removes it"
        );
    }
}

/// Makes the rename of the file durable: a rename is a change of its folder, which the file's
/// own sync does not cover.
#[cfg(unix)]
fn sync_folder(path: &Path) -> Result<(), DbError> {
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(folder)
        .and_then(|f| f.sync_all())
        .map_err(io_error("sync the folder", folder))
}

/// Folders cannot be opened to be synced here; the rename is as durable as the system makes it.
#[cfg(not(unix))]
fn sync_folder(_path: &Path) -> Result<(), DbError> {
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use std::{
        os::unix::fs::{MetadataExt, PermissionsExt},
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    use redb::{ReadableTableMetadata, TableDefinition};

    use super::*;
    use crate::{Db, FILE_NAME};

    const NOTES: TableDefinition<&str, &[u8]> = TableDefinition::new("notes");
    const COUNTS: TableDefinition<(u64, &str), u64> = TableDefinition::new("counts");
    const STRAY: TableDefinition<u64, u64> = TableDefinition::new("stray");
    /// What a deleted record holds, to look for in the file's bytes.
    const SECRET: &[u8] = b"+14155550123-deleted";

    fn tables() -> Vec<CopyTable> {
        vec![|from, to| copy_table(NOTES, from, to), |from, to| {
            copy_table(COUNTS, from, to)
        }]
    }

    /// A folder of its own under the system's temporary folder, removed when dropped.
    struct Folder(PathBuf);

    impl Folder {
        fn new() -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "wagate-embedded-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }

        fn file(&self) -> PathBuf {
            self.0.join(FILE_NAME)
        }
    }

    impl Drop for Folder {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn open(path: &Path, tables: Vec<CopyTable>) -> Db {
        Db::start(data_dir::open_database(path).unwrap(), path, tables).unwrap()
    }

    fn holds(path: &Path, needle: &[u8]) -> bool {
        std::fs::read(path)
            .unwrap()
            .windows(needle.len())
            .any(|w| w == needle)
    }

    fn inode(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().ino()
    }

    async fn fill(db: &Db) {
        db.write(|txn| {
            let mut notes = txn.open_table(NOTES)?;
            let mut counts = txn.open_table(COUNTS)?;
            for i in 0..500u64 {
                let name = format!("note-{i:04}");
                notes.insert(name.as_str(), format!("body {i}").repeat(8).as_bytes())?;
                counts.insert((i, name.as_str()), i * 3)?;
            }
            notes.insert("doomed", SECRET)?;
            Ok(())
        })
        .await
        .unwrap();
        db.write(|txn| {
            txn.open_table(NOTES)?.remove("doomed")?;
            Ok(())
        })
        .await
        .unwrap();
    }

    async fn records(db: &Db) -> (Vec<(String, Vec<u8>)>, Vec<((u64, String), u64)>) {
        db.read(|txn| {
            let notes = txn
                .open_table(NOTES)?
                .iter()?
                .map(|row| {
                    let (k, v) = row?;
                    Ok((k.value().to_owned(), v.value().to_vec()))
                })
                .collect::<Result<Vec<_>, DbError>>()?;
            let counts = txn
                .open_table(COUNTS)?
                .iter()?
                .map(|row| {
                    let (k, v) = row?;
                    let (n, name) = k.value();
                    Ok(((n, name.to_owned()), v.value()))
                })
                .collect::<Result<Vec<_>, DbError>>()?;
            Ok((notes, counts))
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_rewrite_keeps_every_record_drops_deleted_bytes_and_later_work_uses_the_new_file() {
        let folder = Folder::new();
        let path = folder.file();
        let db = open(&path, tables());
        fill(&db).await;
        let before = records(&db).await;
        assert_eq!((before.0.len(), before.1.len()), (500, 500));
        assert!(
            holds(&path, SECRET),
            "redb leaves a deleted record's bytes in the file (what the rewrite is for)"
        );
        let old = inode(&path);

        db.rewrite().await.unwrap();

        assert_ne!(inode(&path), old, "a new file");
        assert!(
            !holds(&path, SECRET),
            "the deleted record is not in the new file"
        );
        assert!(!copy_path(&path).exists());
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(records(&db).await, before, "every record of every table");

        db.write(|txn| {
            txn.open_table(NOTES)?
                .insert("after", b"written after".as_slice())?;
            Ok(())
        })
        .await
        .unwrap();
        let read = db
            .read(|txn| {
                Ok(txn
                    .open_table(NOTES)?
                    .get("after")?
                    .map(|v| v.value().to_vec()))
            })
            .await
            .unwrap();
        assert_eq!(read.as_deref(), Some(b"written after".as_slice()));
        drop(db);

        // What was written after is in the file on disk under the name.
        let reopened = data_dir::open_database(&path).unwrap();
        let txn = reopened.begin_read().unwrap();
        let notes = txn.open_table(NOTES).unwrap();
        assert!(notes.get("after").unwrap().is_some());
        assert_eq!(notes.len().unwrap(), 501);
        assert_eq!(txn.open_table(COUNTS).unwrap().len().unwrap(), 500);
    }

    #[tokio::test]
    async fn a_table_nobody_registered_fails_the_rewrite_and_the_old_file_stays() {
        let folder = Folder::new();
        let path = folder.file();
        let db = open(&path, tables());
        fill(&db).await;
        db.write(|txn| {
            txn.open_table(STRAY)?.insert(1, 2)?;
            Ok(())
        })
        .await
        .unwrap();
        let old = inode(&path);

        let err = db.rewrite().await.unwrap_err();
        assert!(
            matches!(&err, DbError::Unregistered(name) if name == "stray"),
            "{err:?}"
        );
        assert_eq!(inode(&path), old, "the old file stays");
        assert!(!copy_path(&path).exists(), "the copy is removed");
        let (notes, counts) = records(&db).await;
        assert_eq!((notes.len(), counts.len()), (500, 500));
        db.write(|txn| {
            txn.open_table(STRAY)?.insert(3, 4)?;
            Ok(())
        })
        .await
        .unwrap();
        let stray = db
            .read(|txn| Ok(txn.open_table(STRAY)?.len()?))
            .await
            .unwrap();
        assert_eq!(stray, 2, "the file is still written and read");
    }

    #[tokio::test]
    async fn a_leftover_copy_is_removed_at_start() {
        let folder = Folder::new();
        let path = folder.file();
        let copy = copy_path(&path);
        std::fs::write(&copy, SECRET).unwrap();
        let db = open(&path, tables());
        assert!(!copy.exists());
        db.ready().await.unwrap();
    }

    #[tokio::test]
    async fn rewrites_asked_for_together_share_one() {
        static COPIES: AtomicUsize = AtomicUsize::new(0);
        let folder = Folder::new();
        let path = folder.file();
        let counted: Vec<CopyTable> = vec![|from, to| {
            COPIES.fetch_add(1, Ordering::SeqCst);
            copy_table(NOTES, from, to)
        }];
        let db = open(&path, counted);
        // Holds the writer while the requests queue up behind it.
        let busy = tokio::spawn({
            let db = db.clone();
            async move {
                db.write(|_| {
                    std::thread::sleep(Duration::from_millis(300));
                    Ok(())
                })
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let asked = futures_join(&db, 5).await;
        busy.await.unwrap().unwrap();
        assert!(asked.iter().all(Result::is_ok), "{asked:?}");
        assert_eq!(
            COPIES.load(Ordering::SeqCst),
            1,
            "one rewrite for five requests"
        );

        db.rewrite().await.unwrap();
        assert_eq!(
            COPIES.load(Ordering::SeqCst),
            2,
            "a later request, a new rewrite"
        );
    }

    /// How long a rewrite takes, for docs/operations.md: fills a file to about
    /// `WAGATE_REWRITE_MB` MB (default 100) with records of a few hundred bytes and times
    /// [`Db::rewrite`]. Run it with
    /// `cargo test --release -p wagate-embedded -- --ignored --nocapture rewrite_time`.
    #[tokio::test]
    #[ignore = "a measurement, not a check"]
    async fn rewrite_time() {
        let mb: u64 = std::env::var("WAGATE_REWRITE_MB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100);
        let folder = Folder::new();
        let path = folder.file();
        let db = open(&path, tables());
        let value = "x".repeat(400);
        let mut next = 0u64;
        while std::fs::metadata(&path).unwrap().len() < mb << 20 {
            let (from, value) = (next, value.clone());
            db.write(move |txn| {
                let mut notes = txn.open_table(NOTES)?;
                let mut counts = txn.open_table(COUNTS)?;
                for i in from..from + 10_000 {
                    let key = format!("agent:whatsapp:+1415555{i:07}");
                    notes.insert(key.as_str(), format!("{value}{i}").as_bytes())?;
                    counts.insert((i, key.as_str()), i)?;
                }
                Ok(())
            })
            .await
            .unwrap();
            next += 10_000;
        }
        let size = std::fs::metadata(&path).unwrap().len();
        let started = std::time::Instant::now();
        db.rewrite().await.unwrap();
        let took = started.elapsed();
        println!(
            "rewrote {next} records ({:.1} MB, {:.1} MB after) in {:.2} s",
            size as f64 / f64::from(1 << 20),
            std::fs::metadata(&path).unwrap().len() as f64 / f64::from(1 << 20),
            took.as_secs_f64()
        );
    }

    /// `n` rewrites asked for at once.
    async fn futures_join(db: &Db, n: usize) -> Vec<Result<(), DbError>> {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..n {
            let db = db.clone();
            tasks.spawn(async move { db.rewrite().await });
        }
        let mut out = Vec::new();
        while let Some(done) = tasks.join_next().await {
            out.push(done.unwrap());
        }
        out
    }
}
