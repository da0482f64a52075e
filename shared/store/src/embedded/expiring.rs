//! The records kept with an expiry, as Redis keeps keys with a TTL: stored with their expiry
//! time, read as absent once it has passed, and purged a few at a time by later writes.

use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};

use wagate_embedded::{DbError, now_ms};

use super::conversations::{TURNS, remove_numbered};

pub(super) const EXPIRING: TableDefinition<(&str, &str, &str), (u64, &[u8])> =
    TableDefinition::new("store_expiring");

pub(super) const EXPIRIES: TableDefinition<(u64, &str, &str, &str), ()> =
    TableDefinition::new("store_expiries");

/// Expired records removed per write: enough to keep up with the rate they are written.
const PURGE_PER_WRITE: usize = 32;

/// A key of `store_expiring`: what the record is, whose, and which.
pub(super) type Key<'a> = (&'a str, &'a str, &'a str);

/// The value of `key` unless it has expired.
pub(super) fn live(
    table: &impl ReadableTable<(&'static str, &'static str, &'static str), (u64, &'static [u8])>,
    key: Key<'_>,
    now: u64,
) -> Result<Option<Vec<u8>>, DbError> {
    Ok(table.get(key)?.and_then(|v| {
        let (expires, value) = v.value();
        (expires > now).then(|| value.to_vec())
    }))
}

/// The records with an expiry, inside one write transaction. A `history` record stands for a
/// conversation's turns, kept while the conversation is: when it expires, they go with it.
pub(super) struct Expiring<'t> {
    pub(super) values: Table<'t, (&'static str, &'static str, &'static str), (u64, &'static [u8])>,
    index: Table<'t, (u64, &'static str, &'static str, &'static str), ()>,
    pub(super) now: u64,
}

impl<'t> Expiring<'t> {
    /// Opens the tables and purges a few expired records (with the turns of expired
    /// conversations: no caller has the turns table open yet).
    pub(super) fn open(txn: &'t WriteTransaction) -> Result<Self, DbError> {
        let mut this = Self {
            values: txn.open_table(EXPIRING)?,
            index: txn.open_table(EXPIRIES)?,
            now: now_ms(),
        };
        for session in this.purge()? {
            remove_numbered(&mut txn.open_table(TURNS)?, &session)?;
        }
        Ok(this)
    }

    /// Removes a few expired records; returns the conversations whose history expired.
    fn purge(&mut self) -> Result<Vec<String>, DbError> {
        let mut expired = Vec::new();
        for row in self
            .index
            .range::<(u64, &str, &str, &str)>(..(self.now.saturating_add(1), "", "", ""))?
        {
            let (key, _) = row?;
            let (at, kind, scope, name) = key.value();
            expired.push((at, kind.to_owned(), scope.to_owned(), name.to_owned()));
            if expired.len() == PURGE_PER_WRITE {
                break;
            }
        }
        let mut histories = Vec::new();
        for (at, kind, scope, name) in expired {
            self.index
                .remove((at, kind.as_str(), scope.as_str(), name.as_str()))?;
            self.values
                .remove((kind.as_str(), scope.as_str(), name.as_str()))?;
            if kind == "history" {
                histories.push(scope);
            }
        }
        Ok(histories)
    }

    pub(super) fn get(&self, key: Key<'_>) -> Result<Option<Vec<u8>>, DbError> {
        live(&self.values, key, self.now)
    }

    /// Stores `value` under `key` for `ttl_ms`, replacing what was there.
    pub(super) fn put(&mut self, key: Key<'_>, value: &[u8], ttl_ms: u64) -> Result<(), DbError> {
        self.remove(key)?;
        let expires = self.now.saturating_add(ttl_ms);
        self.values.insert(key, (expires, value))?;
        self.index.insert((expires, key.0, key.1, key.2), ())?;
        Ok(())
    }

    pub(super) fn remove(&mut self, key: Key<'_>) -> Result<(), DbError> {
        let old = self.values.remove(key)?.map(|v| v.value().0);
        if let Some(expires) = old {
            self.index.remove((expires, key.0, key.1, key.2))?;
        }
        Ok(())
    }
}
