//! The store on the embedded database, for one process. Every method that can race is one
//! write transaction, committed through the database's single writer (see
//! [`wagate_embedded`]), so the methods are atomic as the Redis store's Lua scripts are, with the
//! same results. Records that Redis keeps with a TTL are stored with their expiry time, read as
//! absent once it has passed, and purged a few at a time by later writes (`expiring.rs`).
//!
//! Tables, by concern:
//!
//! - `agents.rs`: `store_agents` and `store_channels` (id → JSON), `store_meta` (name → text)
//!   for the master key check (`shared::key_check`).
//! - `conversations.rs`: `store_turns` ((session, n) → JSON turn), `store_outbox` ((session, n)
//!   → simulated send), `store_leads` ((agent, user) → JSON), `store_pauses` (session → JSON),
//!   `store_clocks` ((`window`|`optout`|`optin`, session) → ms).
//! - `expiring.rs`: `store_expiring` ((kind, scope, key) → (expires at, bytes)) with its expiry
//!   index `store_expiries`, for turn records and seen message sids (conversations), send
//!   guards, sent parts (and each session's index of them, `sentto`), statuses, failure counts
//!   and cached Content API sids (`ledger.rs`), and each agent's latest signature failure
//!   (`sigfail`).
//!
//! The senders' paces are kept in memory, not in the file ([`crate::pacing`]): a restart
//! forgets at most one burst.

use std::time::Duration;

use async_trait::async_trait;
use redb::{TableDefinition, WriteTransaction};
use serde::Serialize;
use tokio::sync::broadcast;

use wagate_core::domain::AgentId;
use wagate_embedded::{CopyTable, Db, DbError, copy_table, now_ms};

use crate::{Store, StoreError, from_ms, ms, pacing::LocalPaces};

mod agents;
mod conversations;
mod expiring;
mod ledger;

use expiring::{Expiring, Key, live};

/// Change notifications buffered per subscriber; one that falls further behind is told to drop
/// everything it cached ([`Change::All`]).
const CHANGES_BUFFER: usize = 1024;

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(StoreError::json("encode"))
}

fn decode<T: serde::de::DeserializeOwned>(raw: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(raw).map_err(StoreError::json("decode"))
}

/// The store of embedded mode (one process, no Redis), from
/// `shared::embedded::Embedded::open`. Clones share the change notifications.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Db,
    changes: broadcast::Sender<AgentId>,
    /// The senders' paces, in memory: the process is the only sender.
    paces: std::sync::Arc<LocalPaces>,
}

impl EmbeddedStore {
    /// How a rewrite of the file copies each table of the store ([`wagate_embedded::rewrite`]):
    /// every table [`Self::create_tables`] makes.
    pub const TABLES: &[CopyTable] = &[
        |from, to| copy_table(agents::AGENTS, from, to),
        |from, to| copy_table(agents::CHANNELS, from, to),
        |from, to| copy_table(agents::META, from, to),
        |from, to| copy_table(conversations::TURNS, from, to),
        |from, to| copy_table(conversations::OUTBOX, from, to),
        |from, to| copy_table(conversations::LEADS, from, to),
        |from, to| copy_table(conversations::PAUSES, from, to),
        |from, to| copy_table(conversations::CLOCKS, from, to),
        |from, to| copy_table(expiring::EXPIRING, from, to),
        |from, to| copy_table(expiring::EXPIRIES, from, to),
    ];

    pub fn create_tables(txn: &WriteTransaction) -> Result<(), DbError> {
        txn.open_table(agents::AGENTS)?;
        txn.open_table(agents::CHANNELS)?;
        txn.open_table(agents::META)?;
        txn.open_table(conversations::TURNS)?;
        txn.open_table(conversations::OUTBOX)?;
        txn.open_table(conversations::LEADS)?;
        txn.open_table(conversations::PAUSES)?;
        txn.open_table(conversations::CLOCKS)?;
        txn.open_table(expiring::EXPIRING)?;
        txn.open_table(expiring::EXPIRIES)?;
        Ok(())
    }

    pub fn new(db: Db) -> Self {
        Self {
            db,
            changes: broadcast::channel(CHANGES_BUFFER).0,
            paces: std::sync::Arc::default(),
        }
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        id: &str,
    ) -> Result<Option<T>, StoreError> {
        let id = id.to_owned();
        let raw = self
            .db
            .read(move |txn| {
                let table = txn.open_table(table)?;
                let row = table.get(id.as_str())?;
                Ok(row.map(|v| v.value().to_vec()))
            })
            .await?;
        raw.map(|r| decode(&r)).transpose()
    }

    async fn put_json(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        id: &AgentId,
        json: Vec<u8>,
    ) -> Result<(), StoreError> {
        let key = id.as_str().to_owned();
        self.db
            .write(move |txn| {
                txn.open_table(table)?
                    .insert(key.as_str(), json.as_slice())?;
                Ok(())
            })
            .await?;
        // No subscriber is not an error.
        let _ = self.changes.send(id.clone());
        Ok(())
    }

    /// A live record with an expiry.
    async fn get_expiring(&self, key: Key<'_>) -> Result<Option<Vec<u8>>, StoreError> {
        let (kind, scope, name) = (key.0.to_owned(), key.1.to_owned(), key.2.to_owned());
        Ok(self
            .db
            .read(move |txn| {
                let table = txn.open_table(expiring::EXPIRING)?;
                live(&table, (&kind, &scope, &name), now_ms())
            })
            .await?)
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn ready(&self) -> Result<(), StoreError> {
        Ok(self.db.ready().await?)
    }
}
