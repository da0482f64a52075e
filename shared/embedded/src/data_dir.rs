//! The data folder and its files: the embedded store's database, the ingress spool, and in
//! embedded mode the master key and the admin token. They hold messages, phone numbers and the
//! key to every stored secret, so the folder is made readable by its owner only (0700) and
//! every file in it 0600.
//!
//! A folder or file that already exists with looser modes (made by an older wagate, by hand, or
//! under a permissive umask) is tightened, with a warning naming it, rather than refused: the
//! operator asked wagate to keep its data there, nothing but wagate should read it, and a refusal
//! would only turn an upgrade into an outage while the fix is the same `chmod`. The one
//! exception is a shared folder with the sticky bit, such as `/tmp`: making that private would
//! break every other user of it, so it is refused instead.
//!
//! A redb database is opened with an integrity check of every page's checksum, so that a file
//! that was cut short, overwritten or had a bit flipped is a start-up error naming the file
//! rather than a panic on some later read, and an empty (0-byte) file is refused rather than
//! silently made into a new, empty database, which would hide that every message, lead and
//! agent was lost.

use std::{
    io::ErrorKind,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use redb::{Database, DatabaseError, StorageError, backends::FileBackend};

/// Why a file or the folder of the data folder cannot be used; each names the path.
#[derive(Debug, thiserror::Error)]
pub enum DataFileError {
    /// The operating system refused an operation.
    #[error("cannot use {}: {reason}", .path.display())]
    Access {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's reason.
        reason: String,
    },
    /// The folder is shared with other users: it cannot be made private without breaking them.
    #[error(
        "{} is a shared folder (sticky bit, like /tmp): give WAGATE_DATA_DIR a folder of wagate's own",
        .0.display()
    )]
    SharedFolder(PathBuf),
    /// Another process (or another handle in this one) has the database open.
    #[error("another process has {} open", .0.display())]
    InUse(PathBuf),
    /// The database file exists but is empty.
    #[error(
        "{} is empty (0 bytes), so it holds no database: restore it from a backup, or delete it \
         if wagate's first start was stopped before it wrote the file",
        .0.display()
    )]
    Empty(PathBuf),
    /// The database file is not a database, or failed its integrity check.
    #[error(
        "{} is damaged and wagate will not run on it ({reason}): restore it from a backup, or \
         move it aside to start with an empty one",
        .path.display()
    )]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What redb found.
        reason: String,
    },
}

fn access(path: &Path) -> impl Fn(std::io::Error) -> DataFileError + '_ {
    move |e| DataFileError::Access {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

pub use modes::{create_private, private_dir, private_file};

/// File modes, on Unix. Elsewhere files get the folder's default access control (wagate is
/// deployed on Linux; the other builds are for development).
#[cfg(unix)]
mod modes {
    use std::{
        fs::{File, OpenOptions},
        os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
        path::Path,
    };

    use super::{DataFileError, access};

    /// The bits of a mode that let anyone but the owner in.
    const GROUP_AND_OTHER: u32 = 0o077;
    /// The sticky bit: a folder shared by several users, each deleting only their own files.
    const STICKY: u32 = 0o1000;

    /// Creates `dir` (and its missing parents) readable by its owner only, or makes an
    /// existing one so (the module's doc says why it is tightened, not refused).
    pub fn private_dir(dir: &Path) -> Result<(), DataFileError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(access(dir))?;
        let mode = std::fs::metadata(dir)
            .map_err(access(dir))?
            .permissions()
            .mode();
        if mode & STICKY != 0 {
            return Err(DataFileError::SharedFolder(dir.to_owned()));
        }
        tighten(dir, mode)
    }

    /// Makes an existing file of the data folder readable by its owner only, if it is not.
    pub fn private_file(path: &Path) -> Result<(), DataFileError> {
        let mode = std::fs::metadata(path)
            .map_err(access(path))?
            .permissions()
            .mode();
        tighten(path, mode)
    }

    /// Takes the group's and others' bits off `mode` (what `path` has now), if any are set.
    /// The owner's bits stay as they are: a file made read-only on purpose stays so.
    fn tighten(path: &Path, mode: u32) -> Result<(), DataFileError> {
        if mode & GROUP_AND_OTHER == 0 {
            return Ok(());
        }
        let private = mode & !GROUP_AND_OTHER & 0o7777;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(private))
            .map_err(access(path))?;
        tracing::warn!(
            path = %path.display(),
            was = format!("{:o}", mode & 0o7777),
            now = format!("{private:o}"),
            "made a path of the data folder private: others could read it"
        );
        Ok(())
    }

    /// Creates a new file readable and writable by its owner only; fails if it exists.
    pub fn create_private(path: &Path) -> std::io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
    }
}

#[cfg(not(unix))]
mod modes {
    use std::{fs::File, path::Path};

    use super::{DataFileError, access};

    /// Creates `dir` and its missing parents.
    pub fn private_dir(dir: &Path) -> Result<(), DataFileError> {
        std::fs::create_dir_all(dir).map_err(access(dir))
    }

    /// Nothing to do without Unix modes.
    pub fn private_file(_path: &Path) -> Result<(), DataFileError> {
        Ok(())
    }

    /// Creates a new file; fails if it exists.
    pub fn create_private(path: &Path) -> std::io::Result<File> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
    }
}

/// Opens the redb database at `path`, creating it (mode 0600) if there is no file. An existing
/// file is made private, refused if empty, and opened only if every page passes redb's
/// integrity check, which reads the whole file once.
pub fn open_database(path: &Path) -> Result<Database, DataFileError> {
    let fell_back = Arc::new(AtomicBool::new(false));
    let mut builder = Database::builder();
    builder.set_check_integrity_on_open(true);
    let saw = fell_back.clone();
    builder.set_repair_callback(move |session| {
        // redb reports this first step of progress only when the newest commit does not verify
        // and it falls back to the one before.
        if session.progress() > 0.0 && session.progress() < 0.5 {
            saw.store(true, Ordering::Relaxed);
        }
    });
    let opened = match std::fs::metadata(path) {
        Ok(meta) if meta.len() == 0 => return Err(DataFileError::Empty(path.to_owned())),
        Ok(_) => {
            private_file(path)?;
            builder.open(path)
        }
        Err(e) if e.kind() == ErrorKind::NotFound => match create_private(path) {
            Ok(file) => {
                FileBackend::new(file).and_then(|backend| builder.create_with_backend(backend))
            }
            // Another process made it between the two calls: open theirs, which is in use.
            Err(e) if e.kind() == ErrorKind::AlreadyExists => builder.open(path),
            Err(e) => return Err(access(path)(e)),
        },
        Err(e) => return Err(access(path)(e)),
    };
    let database = opened.map_err(|e| classify(path, e))?;
    if fell_back.load(Ordering::Relaxed) {
        // After a crash in the middle of a commit this is redb's recovery, and that commit was
        // never acknowledged, so nothing is lost: refusing would turn every power cut into an
        // outage. The same step also hides damage to pages only the newest commit wrote, which
        // cannot be told apart, so it is said loudly.
        tracing::warn!(
            path = %path.display(),
            "the newest commit of the database did not verify and was rolled back to the one before: expected after a crash or power cut during a write, otherwise the file was damaged"
        );
    }
    Ok(database)
}

/// What a failed open means for the operator.
fn classify(path: &Path, e: DatabaseError) -> DataFileError {
    let damaged = |reason: String| DataFileError::Damaged {
        path: path.to_owned(),
        reason,
    };
    match e {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => {
            DataFileError::InUse(path.to_owned())
        }
        // Not a redb file at all (redb reports that as invalid data), cut short, or a page
        // whose checksum does not match.
        DatabaseError::Storage(StorageError::Io(io))
            if matches!(io.kind(), ErrorKind::InvalidData | ErrorKind::UnexpectedEof) =>
        {
            damaged(io.to_string())
        }
        DatabaseError::Storage(StorageError::Corrupted(reason)) => damaged(reason),
        DatabaseError::Storage(StorageError::Io(io)) => access(path)(io),
        other => damaged(other.to_string()),
    }
}
