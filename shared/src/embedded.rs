//! Embedded mode's bus and store, opened together on their one data file
//! ([`wagate_embedded`]).

use std::{path::Path, time::Duration};

use bus::embedded::EmbeddedBus;
use store::embedded::EmbeddedStore;
use wagate_embedded::{
    Db, DbError, EmbeddedError, FILE_NAME,
    data_dir::{self, DataFileError},
};

/// Tuning of embedded mode.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// How long the bus remembers a dedupe id to drop duplicates, as JetStream's duplicate
    /// window: Twilio's own retries come within seconds, later repeats are caught by the store.
    pub duplicate_window: Duration,
}

/// The bus and the store of embedded mode. They share one file, and so one lock and one
/// writer: a single process owns everything, and there is no server to install.
pub struct Embedded {
    /// The bus.
    pub bus: EmbeddedBus,
    /// The store.
    pub store: EmbeddedStore,
}

impl Embedded {
    /// Opens (creating the folder and file if missing, both private) `<data_dir>/wagate.redb`,
    /// checks the integrity of every page ([`data_dir::open_database`]), and recovers the
    /// queues: every message not acknowledged before the process stopped is ready again.
    /// Blocks while it reads the file, so call it at startup (or from a blocking task). Fails at
    /// once with [`EmbeddedError::InUse`] if another process has the file open.
    pub fn open(data_dir: &Path, options: EmbeddedOptions) -> Result<Self, EmbeddedError> {
        data_dir::private_dir(data_dir).map_err(EmbeddedError::File)?;
        let path = data_dir.join(FILE_NAME);
        let database = data_dir::open_database(&path).map_err(|e| match e {
            DataFileError::InUse(path) => EmbeddedError::InUse(path),
            other => EmbeddedError::File(other),
        })?;
        let failed = |source: DbError| EmbeddedError::Open {
            path: path.clone(),
            source,
        };
        let txn = database
            .begin_write()
            .map_err(DbError::from)
            .map_err(failed)?;
        EmbeddedBus::create_tables(&txn).map_err(failed)?;
        EmbeddedStore::create_tables(&txn).map_err(failed)?;
        txn.commit().map_err(DbError::from).map_err(failed)?;
        let recovered = EmbeddedBus::recover(&database).map_err(failed)?;
        let tables = [EmbeddedBus::TABLES, EmbeddedStore::TABLES].concat();
        let db = Db::start(database, &path, tables).map_err(failed)?;
        Ok(Self {
            bus: EmbeddedBus::new(db.clone(), recovered, options.duplicate_window),
            store: EmbeddedStore::new(db),
        })
    }
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use store::Conversations;

    use super::*;

    /// Every table the bus and the store make is registered for the rewrite that ends an
    /// erasure: one that is not fails it (every erasure would answer 503).
    #[tokio::test]
    async fn an_erasure_rewrites_the_file_with_every_table_of_the_bus_and_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let options = EmbeddedOptions {
            duplicate_window: Duration::from_secs(60),
        };
        let embedded = Embedded::open(dir.path(), options).unwrap();
        let file = dir.path().join(FILE_NAME);
        let inode = || std::fs::metadata(&file).unwrap().ino();
        let before = inode();
        embedded.store.purge_erased().await.unwrap();
        assert_ne!(inode(), before, "the file was rewritten");
    }
}
