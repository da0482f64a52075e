//! The store on the embedded database, for one process. Every method that can race is one
//! write transaction, committed through the database's single writer (see
//! [`wagate_embedded`]), so the methods are atomic as the Redis store's Lua scripts are, with the
//! same results. Records that Redis keeps with a TTL are stored with their expiry time, read as
//! absent once it has passed, and purged a few at a time by later writes.
//!
//! Tables: `store_agents` and `store_channels` (id → JSON), `store_turns` ((session, n) → JSON
//! turn), `store_leads` ((agent, user) → JSON), `store_pauses` (session → JSON),
//! `store_clocks` ((`window`|`optout`|`optin`, session) → ms), `store_expiring` ((kind, scope,
//! key) → (expires at, bytes)) for turn records, seen message sids, send guards, sent parts
//! (and each session's index of them, `sentto`), statuses, failure counts, cached Content API
//! sids and each agent's latest signature failure (`sigfail`), with its expiry index
//! `store_expiries`, and `store_meta` (name → text) for the master key check
//! (`shared::key_check`). The senders' paces are kept in memory, not in the file
//! ([`super::pacing`]): a restart forgets at most one burst.

use std::time::Duration;

use async_trait::async_trait;
use futures::{StreamExt, stream::BoxStream};
use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::broadcast;

use super::{
    Change, CompletedTurn, GUARD_TTL, GuardState, Hold, Lead, LeadSighting, Pace, Pause,
    SentMessage, SignatureFailure, SimulatedMessage, Slot, Store, StoreError, Turn, TurnStart,
    pacing::LocalPaces,
};
use twilio::status::{MessageStatus, StatusUpdate};
use wagate_core::{
    agent::{Agent, WhatsAppChannel},
    crypto::SealedSecret,
    domain::{AgentId, MessageSid, SessionId},
    envelope::OutboundReply,
    window::WindowClocks,
};
use wagate_embedded::{Db, DbError, now_ms};

const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("store_agents");
const CHANNELS: TableDefinition<&str, &[u8]> = TableDefinition::new("store_channels");
const TURNS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("store_turns");
/// Simulated sends per session, by index from 1: `{"body", "at"}` as the Redis store keeps them.
const OUTBOX: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("store_outbox");
const LEADS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("store_leads");
/// Paused conversations: session → JSON [`Pause`].
const PAUSES: TableDefinition<&str, &[u8]> = TableDefinition::new("store_pauses");
const CLOCKS: TableDefinition<(&str, &str), i64> = TableDefinition::new("store_clocks");
const EXPIRING: TableDefinition<(&str, &str, &str), (u64, &[u8])> =
    TableDefinition::new("store_expiring");
const EXPIRIES: TableDefinition<(u64, &str, &str, &str), ()> =
    TableDefinition::new("store_expiries");
/// Facts about the data itself rather than the pipeline's state: the master key check.
const META: TableDefinition<&str, &str> = TableDefinition::new("store_meta");
/// The name of the master key check in [`META`].
const KEY_CHECK: &str = "key-check";

/// Expired records removed per write: enough to keep up with the rate they are written.
const PURGE_PER_WRITE: usize = 32;
/// Change notifications buffered per subscriber; one that falls further behind is told to drop
/// everything it cached ([`Change::All`]).
const CHANGES_BUFFER: usize = 1024;

/// A key of `store_expiring`: what the record is, whose, and which.
type Key<'a> = (&'a str, &'a str, &'a str);

/// A lead as stored: times in milliseconds, as the Redis store keeps them, so both backends
/// return the same values.
#[derive(Serialize, Deserialize)]
struct LeadRecord {
    first_seen: i64,
    last_seen: i64,
    profile_name: Option<String>,
    message_count: u64,
    /// The latest opt-out and opt-in (ms), as the conversation's clocks have them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    optout: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    optin: Option<i64>,
}

#[derive(Serialize, Deserialize)]
struct StatusRecord {
    status: MessageStatus,
    error_code: Option<u32>,
}

fn ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn from_ms(v: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(v) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(StoreError::json("encode"))
}

fn decode<T: serde::de::DeserializeOwned>(raw: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(raw).map_err(StoreError::json("decode"))
}

/// The value of `key` unless it has expired.
fn live(
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
struct Expiring<'t> {
    values: Table<'t, (&'static str, &'static str, &'static str), (u64, &'static [u8])>,
    index: Table<'t, (u64, &'static str, &'static str, &'static str), ()>,
    now: u64,
}

impl<'t> Expiring<'t> {
    /// Opens the tables and purges a few expired records (with the turns of expired
    /// conversations: no caller has the turns table open yet).
    fn open(txn: &'t WriteTransaction) -> Result<Self, DbError> {
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

    fn get(&self, key: Key<'_>) -> Result<Option<Vec<u8>>, DbError> {
        live(&self.values, key, self.now)
    }

    /// Stores `value` under `key` for `ttl_ms`, replacing what was there.
    fn put(&mut self, key: Key<'_>, value: &[u8], ttl_ms: u64) -> Result<(), DbError> {
        self.remove(key)?;
        let expires = self.now.saturating_add(ttl_ms);
        self.values.insert(key, (expires, value))?;
        self.index.insert((expires, key.0, key.1, key.2), ())?;
        Ok(())
    }

    fn remove(&mut self, key: Key<'_>) -> Result<(), DbError> {
        let old = self.values.remove(key)?.map(|v| v.value().0);
        if let Some(expires) = old {
            self.index.remove((expires, key.0, key.1, key.2))?;
        }
        Ok(())
    }
}

/// Drops the turns at the start of `session` that are older than `cutoff`, a few at most.
fn drop_expired_turns(
    table: &mut Table<'_, (&'static str, u64), &'static [u8]>,
    session: &str,
    cutoff: &str,
) -> Result<(), DbError> {
    let mut doomed = Vec::new();
    for row in table.range((session, 0)..=(session, u64::MAX))? {
        let (key, value) = row?;
        if doomed.len() == super::TRIM_PER_COMPLETION || !super::expired_turn(value.value(), cutoff)
        {
            break;
        }
        doomed.push(key.value().1);
    }
    for n in doomed {
        table.remove((session, n))?;
    }
    Ok(())
}

/// A send guard as stored, in the Redis store's format: `pending:<lease deadline, ms>` while
/// a sender holds the part, `sent:<twilio sid>` once posted. Kept for [`GUARD_TTL`] either way,
/// so a holder whose lease ran out is told apart from one that never was.
enum Guard {
    Pending(u64),
    Sent(String),
}

impl Guard {
    fn parse(raw: &[u8]) -> Self {
        match raw.strip_prefix(b"sent:") {
            Some(sid) => Self::Sent(String::from_utf8_lossy(sid).into_owned()),
            // A malformed deadline counts as passed, so the part can be taken again.
            None => Self::Pending(
                raw.strip_prefix(b"pending:")
                    .and_then(|d| std::str::from_utf8(d).ok())
                    .and_then(|d| d.parse().ok())
                    .unwrap_or(0),
            ),
        }
    }

    fn pending(deadline: u64) -> Vec<u8> {
        format!("pending:{deadline}").into_bytes()
    }
}

/// The last turn number of `session`, if it has turns.
fn last_turn(
    table: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    session: &str,
) -> Result<Option<u64>, DbError> {
    let mut range = table.range((session, 0)..=(session, u64::MAX))?;
    Ok(match range.next_back() {
        Some(row) => Some(row?.0.value().1),
        None => None,
    })
}

/// The last `n` turns of `session` as stored, oldest first.
fn last_turns(
    table: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    session: &str,
    n: usize,
) -> Result<Vec<Vec<u8>>, DbError> {
    let mut rows = Vec::new();
    for row in table
        .range((session, 0)..=(session, u64::MAX))?
        .rev()
        .take(n)
    {
        rows.push(row?.1.value().to_vec());
    }
    rows.reverse();
    Ok(rows)
}

/// Removes every row of `session` from a table numbered per session (turns, outbox).
fn remove_numbered(
    table: &mut Table<'_, (&'static str, u64), &'static [u8]>,
    session: &str,
) -> Result<(), DbError> {
    table.retain_in((session, 0)..=(session, u64::MAX), |_, _| false)?;
    Ok(())
}

/// Moves a clock to `at` unless it already shows a later time; an absent clock counts as the
/// epoch, as the Redis store's script does.
fn stamp_max(txn: &WriteTransaction, kind: &str, session: &str, at: i64) -> Result<(), DbError> {
    let mut clocks = txn.open_table(CLOCKS)?;
    let current = clocks.get((kind, session))?.map_or(0, |v| v.value());
    if at > current {
        clocks.insert((kind, session), at)?;
    }
    Ok(())
}

/// Takes the send guard `key` for `lease` unless the part was sent or is held by a live lease.
fn claim(txn: &WriteTransaction, key: &str, lease: Duration) -> Result<GuardState, DbError> {
    let mut guards = Expiring::open(txn)?;
    let now = guards.now;
    let taken_over = match guards.get(("guard", "", key))? {
        None => false,
        Some(held) => match Guard::parse(&held) {
            Guard::Sent(sid) => return Ok(GuardState::Sent(sid)),
            Guard::Pending(deadline) if deadline > now => return Ok(GuardState::Busy),
            Guard::Pending(_) => true,
        },
    };
    let hold = hold_until(&mut guards, key, lease)?;
    Ok(if taken_over {
        GuardState::Reclaimed(hold)
    } else {
        GuardState::Claimed(hold)
    })
}

/// Writes the guard `key` as held for `lease` from now; the deadline is the holder's token.
fn hold_until(guards: &mut Expiring<'_>, key: &str, lease: Duration) -> Result<Hold, DbError> {
    let deadline = guards.now.saturating_add(duration_ms(lease).max(1));
    guards.put(
        ("guard", "", key),
        &Guard::pending(deadline),
        duration_ms(GUARD_TTL),
    )?;
    Ok(Hold(deadline))
}

/// One message as lead capture counts it, owned so it can go to the database's writer.
struct Sighting {
    sid: String,
    profile_name: Option<String>,
    at: i64,
}

impl Sighting {
    fn of(s: &LeadSighting<'_>) -> Self {
        Self {
            sid: s.message_sid.as_str().to_owned(),
            profile_name: s.profile_name.filter(|p| !p.is_empty()).map(str::to_owned),
            at: ms(s.at),
        }
    }
}

/// Counts one message toward the lead of `user` of `agent`, creating the lead on first
/// contact; a message already counted (its "seen" mark is live) changes nothing.
/// Counts one message toward its user's lead; true when this made the lead.
fn count_lead(
    txn: &WriteTransaction,
    seen: &mut Expiring<'_>,
    agent: &str,
    user: &str,
    sighting: &Sighting,
) -> Result<bool, DbError> {
    if seen.get(("leadseen", agent, &sighting.sid))?.is_some() {
        return Ok(false);
    }
    seen.put(
        ("leadseen", agent, &sighting.sid),
        &[],
        duration_ms(GUARD_TTL),
    )?;
    let mut leads = txn.open_table(LEADS)?;
    let stored = leads
        .get((agent, user))?
        .map(|v| serde_json::from_slice::<LeadRecord>(v.value()))
        .transpose()?;
    let at = sighting.at;
    let created = stored.is_none();
    let mut lead = match stored {
        None => LeadRecord {
            first_seen: at,
            last_seen: at,
            profile_name: None,
            message_count: 0,
            optout: None,
            optin: None,
        },
        Some(mut lead) => {
            lead.first_seen = lead.first_seen.min(at);
            lead.last_seen = lead.last_seen.max(at);
            lead
        }
    };
    if sighting.profile_name.is_some() {
        lead.profile_name.clone_from(&sighting.profile_name);
    }
    lead.message_count += 1;
    leads.insert((agent, user), serde_json::to_vec(&lead)?.as_slice())?;
    Ok(created)
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
    pub fn create_tables(txn: &WriteTransaction) -> Result<(), DbError> {
        txn.open_table(AGENTS)?;
        txn.open_table(CHANNELS)?;
        txn.open_table(TURNS)?;
        txn.open_table(OUTBOX)?;
        txn.open_table(LEADS)?;
        txn.open_table(PAUSES)?;
        txn.open_table(CLOCKS)?;
        txn.open_table(EXPIRING)?;
        txn.open_table(EXPIRIES)?;
        txn.open_table(META)?;
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
                let table = txn.open_table(EXPIRING)?;
                live(&table, (&kind, &scope, &name), now_ms())
            })
            .await?)
    }

    async fn clock(
        &self,
        kind: &'static str,
        session: &SessionId,
    ) -> Result<Option<i64>, StoreError> {
        let session = session.to_string();
        Ok(self
            .db
            .read(move |txn| {
                let clocks = txn.open_table(CLOCKS)?;
                let row = clocks.get((kind, session.as_str()))?;
                Ok(row.map(|v| v.value()))
            })
            .await?)
    }

    /// Moves the clock `kind` of `session` to `at` (never back); an opt-out or opt-in is
    /// copied onto the user's lead, if they are one, in the same transaction, so the leads
    /// list shows it.
    async fn stamp(
        &self,
        kind: &'static str,
        session: &SessionId,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let agent = session.agent().as_str().to_owned();
        let user = session.user().to_owned();
        let session = session.to_string();
        let at = ms(at);
        Ok(self
            .db
            .write(move |txn| {
                stamp_max(txn, kind, &session, at)?;
                if kind == "window" {
                    return Ok(());
                }
                let mut leads = txn.open_table(LEADS)?;
                let stored = leads
                    .get((agent.as_str(), user.as_str()))?
                    .map(|v| serde_json::from_slice::<LeadRecord>(v.value()))
                    .transpose()?;
                if let Some(mut lead) = stored {
                    let field = if kind == "optout" {
                        &mut lead.optout
                    } else {
                        &mut lead.optin
                    };
                    *field = Some(field.map_or(at, |cur| cur.max(at)));
                    leads.insert(
                        (agent.as_str(), user.as_str()),
                        serde_json::to_vec(&lead)?.as_slice(),
                    )?;
                }
                Ok(())
            })
            .await?)
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn put_agent(&self, agent: &Agent) -> Result<(), StoreError> {
        self.put_json(AGENTS, &agent.id, encode(agent)?).await
    }

    async fn agent(&self, id: &AgentId) -> Result<Option<Agent>, StoreError> {
        self.get_json(AGENTS, id.as_str()).await
    }

    async fn agents(&self) -> Result<Vec<Agent>, StoreError> {
        let rows = self
            .db
            .read(|txn| {
                let table = txn.open_table(AGENTS)?;
                let mut rows = Vec::new();
                for row in table.iter()? {
                    rows.push(row?.1.value().to_vec());
                }
                Ok(rows)
            })
            .await?;
        rows.iter().map(|r| decode(r)).collect()
    }

    async fn put_channel(&self, id: &AgentId, channel: &WhatsAppChannel) -> Result<(), StoreError> {
        self.put_json(CHANNELS, id, encode(channel)?).await
    }

    async fn channel(&self, id: &AgentId) -> Result<Option<WhatsAppChannel>, StoreError> {
        self.get_json(CHANNELS, id.as_str()).await
    }

    async fn changes(&self) -> Result<BoxStream<'static, Change>, StoreError> {
        let receiver = self.changes.subscribe();
        // As from Redis: first "drop everything", since what changed before is unknown.
        let later = futures::stream::unfold(receiver, |mut receiver| async move {
            match receiver.recv().await {
                Ok(id) => Some((Change::Agent(id), receiver)),
                Err(broadcast::error::RecvError::Lagged(_)) => Some((Change::All, receiver)),
                Err(broadcast::error::RecvError::Closed) => None,
            }
        });
        Ok(futures::stream::once(async { Change::All })
            .chain(later)
            .boxed())
    }

    async fn delete_agent(&self, id: &AgentId) -> Result<bool, StoreError> {
        let key = id.as_str().to_owned();
        let existed = self
            .db
            .write(move |txn| {
                txn.open_table(CHANNELS)?.remove(key.as_str())?;
                let existed = txn.open_table(AGENTS)?.remove(key.as_str())?.is_some();
                Expiring::open(txn)?.remove(("sigfail", "", key.as_str()))?;
                Ok(existed)
            })
            .await?;
        // No subscriber is not an error.
        let _ = self.changes.send(id.clone());
        Ok(existed)
    }

    async fn forget_session(&self, session: &SessionId) -> Result<(), StoreError> {
        let session = session.to_string();
        Ok(self
            .db
            .write(move |txn| {
                remove_numbered(&mut txn.open_table(TURNS)?, &session)?;
                txn.open_table(PAUSES)?.remove(session.as_str())?;
                remove_numbered(&mut txn.open_table(OUTBOX)?, &session)
            })
            .await?)
    }

    async fn erase_user(&self, session: &SessionId) -> Result<(), StoreError> {
        let agent = session.agent().clone();
        let user = session.user().to_owned();
        let session = session.to_string();
        Ok(self
            .db
            .write(move |txn| {
                remove_numbered(&mut txn.open_table(TURNS)?, &session)?;
                remove_numbered(&mut txn.open_table(OUTBOX)?, &session)?;
                txn.open_table(PAUSES)?.remove(session.as_str())?;
                let mut clocks = txn.open_table(CLOCKS)?;
                for kind in ["window", "optout", "optin"] {
                    clocks.remove((kind, session.as_str()))?;
                }
                txn.open_table(LEADS)?
                    .remove((agent.as_str(), user.as_str()))?;
                let mut records = Expiring::open(txn)?;
                records.remove(("history", session.as_str(), ""))?;
                let mut doomed = Vec::new();
                for kind in ["turn", "sentto"] {
                    for row in records.values.range(
                        (kind, session.as_str(), "")..=(kind, session.as_str(), "\u{10ffff}"),
                    )? {
                        let (key, _) = row?;
                        doomed.push((kind, key.value().2.to_owned()));
                    }
                }
                // Sent parts are keyed by Twilio's sid alone, and the session's index of them
                // ("sentto") is younger than some data files: every part is read, so that parts
                // sent before the index was kept are erased too.
                for row in records
                    .values
                    .range(("sent", "", "")..=("sent", "", "\u{10ffff}"))?
                {
                    let (key, value) = row?;
                    let ours = serde_json::from_slice::<OutboundReply>(value.value().1)
                        .is_ok_and(|part| part.agent_id == agent && part.to.user() == user);
                    if ours {
                        let sid = key.value().2.to_owned();
                        doomed.push(("status", sid.clone()));
                        doomed.push(("sent", sid));
                    }
                }
                for (kind, name) in &doomed {
                    let scope = if matches!(*kind, "turn" | "sentto") {
                        session.as_str()
                    } else {
                        ""
                    };
                    records.remove((kind, scope, name))?;
                }
                Ok(())
            })
            .await?)
    }

    async fn begin_turn(
        &self,
        session: &SessionId,
        sightings: &[LeadSighting<'_>],
        history: usize,
    ) -> Result<TurnStart, StoreError> {
        let Some(latest) = super::latest_sighting(session, sightings)?.map(ms) else {
            return Ok(TurnStart::default());
        };
        let sightings: Vec<Sighting> = sightings.iter().map(Sighting::of).collect();
        let agent = session.agent().as_str().to_owned();
        let user = session.user().to_owned();
        let session = session.to_string();
        let (completed, turns, pause, new_lead) = self
            .db
            .write(move |txn| {
                stamp_max(txn, "window", &session, latest)?;
                let pause = txn
                    .open_table(PAUSES)?
                    .get(session.as_str())?
                    .map(|v| v.value().to_vec());
                let mut records = Expiring::open(txn)?;
                let mut completed = Vec::with_capacity(sightings.len());
                let mut new_lead = false;
                for sighting in &sightings {
                    new_lead |= count_lead(txn, &mut records, &agent, &user, sighting)?;
                    completed.push(records.get(("turn", &session, &sighting.sid))?);
                }
                let turns = if completed.iter().any(Option::is_none) {
                    last_turns(&txn.open_table(TURNS)?, &session, history)?
                } else {
                    Vec::new()
                };
                Ok((completed, turns, pause, new_lead))
            })
            .await?;
        Ok(TurnStart {
            completed: completed
                .iter()
                .map(|r| r.as_deref().map(decode).transpose())
                .collect::<Result<_, _>>()?,
            history: turns.iter().map(|r| decode(r)).collect::<Result<_, _>>()?,
            pause: pause.map(|p| decode(&p)).transpose()?,
            new_lead,
        })
    }

    async fn set_pause(
        &self,
        session: &SessionId,
        pause: Option<&Pause>,
    ) -> Result<(), StoreError> {
        let session = session.to_string();
        let raw = pause.map(encode).transpose()?;
        Ok(self
            .db
            .write(move |txn| {
                let mut pauses = txn.open_table(PAUSES)?;
                match &raw {
                    Some(raw) => pauses.insert(session.as_str(), raw.as_slice())?,
                    None => pauses.remove(session.as_str())?,
                };
                Ok(())
            })
            .await?)
    }

    async fn pause(&self, session: &SessionId) -> Result<Option<Pause>, StoreError> {
        self.get_json(PAUSES, &session.to_string()).await
    }

    async fn history(&self, session: &SessionId, last: usize) -> Result<Vec<Turn>, StoreError> {
        if last == 0 {
            return Ok(Vec::new());
        }
        let session = session.to_string();
        let rows = self
            .db
            .read(move |txn| last_turns(&txn.open_table(TURNS)?, &session, last))
            .await?;
        rows.iter().map(|r| decode(r)).collect()
    }

    async fn completed_turn(
        &self,
        session: &SessionId,
        turn_key: &str,
    ) -> Result<Option<CompletedTurn>, StoreError> {
        let session = session.to_string();
        self.get_expiring(("turn", &session, turn_key))
            .await?
            .map(|r| decode(&r))
            .transpose()
    }

    async fn complete_turn(
        &self,
        session: &SessionId,
        turn_keys: &[String],
        turns: &[Turn],
        completed: &CompletedTurn,
        keep: Duration,
    ) -> Result<CompletedTurn, StoreError> {
        if turn_keys.is_empty() {
            return Err(StoreError::Invalid(
                "complete_turn needs at least one turn key".into(),
            ));
        }
        let session = session.to_string();
        let keys = turn_keys.to_vec();
        let turns = turns.iter().map(encode).collect::<Result<Vec<_>, _>>()?;
        let record = encode(completed)?;
        let ttl = duration_ms(GUARD_TTL);
        let cutoff = super::retention_cutoff(keep);
        let standing = self
            .db
            .write(move |txn| {
                let mut records = Expiring::open(txn)?;
                if let Some(earlier) = records.get(("turn", &session, &keys[0]))? {
                    return Ok(earlier);
                }
                for key in &keys {
                    records.put(("turn", &session, key), &record, ttl)?;
                }
                records.put(("history", &session, ""), b"", duration_ms(keep))?;
                drop(records);
                let mut table = txn.open_table(TURNS)?;
                let first = last_turn(&table, &session)?.map_or(0, |n| n + 1);
                for (n, turn) in (first..).zip(&turns) {
                    table.insert((session.as_str(), n), turn.as_slice())?;
                }
                drop_expired_turns(&mut table, &session, &cutoff)?;
                Ok(record.clone())
            })
            .await?;
        decode(&standing)
    }

    async fn record_lead(&self, s: &LeadSighting<'_>) -> Result<(), StoreError> {
        let sighting = Sighting::of(s);
        let agent = s.session.agent().as_str().to_owned();
        let user = s.session.user().to_owned();
        Ok(self
            .db
            .write(move |txn| {
                let mut seen = Expiring::open(txn)?;
                count_lead(txn, &mut seen, &agent, &user, &sighting).map(|_| ())
            })
            .await?)
    }

    async fn leads(&self, agent: &AgentId) -> Result<Vec<Lead>, StoreError> {
        let agent = agent.as_str().to_owned();
        let rows = self
            .db
            .read(move |txn| {
                let table = txn.open_table(LEADS)?;
                let mut rows = Vec::new();
                for row in table.range((agent.as_str(), "")..)? {
                    let (key, value) = row?;
                    let (of, user) = key.value();
                    if of != agent {
                        break;
                    }
                    rows.push((user.to_owned(), value.value().to_vec()));
                }
                Ok(rows)
            })
            .await?;
        let mut leads = rows
            .into_iter()
            .map(|(user, raw)| {
                let r: LeadRecord = decode(&raw)?;
                Ok((r.first_seen, user, r))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        // By first contact, ties by number: the order of the Redis store's sorted set.
        leads.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        Ok(leads
            .into_iter()
            .map(|(_, phone, r)| {
                let mut lead = Lead {
                    phone,
                    platform: "whatsapp".into(),
                    profile_name: r.profile_name,
                    first_seen: from_ms(r.first_seen),
                    last_seen: from_ms(r.last_seen),
                    message_count: r.message_count,
                    opted_out: false,
                    opted_out_at: None,
                };
                lead.consent(r.optout, r.optin);
                lead
            })
            .collect())
    }

    async fn stamp_inbound(
        &self,
        session: &SessionId,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.stamp("window", session, at).await
    }

    async fn last_inbound(
        &self,
        session: &SessionId,
    ) -> Result<Option<OffsetDateTime>, StoreError> {
        Ok(self.clock("window", session).await?.map(from_ms))
    }

    async fn opt_out(&self, session: &SessionId, at: OffsetDateTime) -> Result<(), StoreError> {
        self.stamp("optout", session, at).await
    }

    async fn opted_out_at(
        &self,
        session: &SessionId,
    ) -> Result<Option<OffsetDateTime>, StoreError> {
        Ok(self.clock("optout", session).await?.map(from_ms))
    }

    async fn opt_in(&self, session: &SessionId, at: OffsetDateTime) -> Result<(), StoreError> {
        self.stamp("optin", session, at).await
    }

    async fn opted_in_at(&self, session: &SessionId) -> Result<Option<OffsetDateTime>, StoreError> {
        Ok(self.clock("optin", session).await?.map(from_ms))
    }

    async fn claim_send(&self, key: &str, lease: Duration) -> Result<GuardState, StoreError> {
        let key = key.to_owned();
        Ok(self.db.write(move |txn| claim(txn, &key, lease)).await?)
    }

    async fn claim_send_with_clocks(
        &self,
        session: &SessionId,
        key: &str,
        lease: Duration,
    ) -> Result<(GuardState, WindowClocks), StoreError> {
        let key = key.to_owned();
        let session = session.to_string();
        let (state, last_inbound, opted_out_at, opted_in_at) = self
            .db
            .write(move |txn| {
                let state = claim(txn, &key, lease)?;
                let clocks = txn.open_table(CLOCKS)?;
                let read = |kind: &str| -> Result<Option<i64>, DbError> {
                    Ok(clocks.get((kind, session.as_str()))?.map(|v| v.value()))
                };
                Ok((state, read("window")?, read("optout")?, read("optin")?))
            })
            .await?;
        Ok((
            state,
            WindowClocks {
                last_inbound: last_inbound.map(from_ms),
                opted_out_at: opted_out_at.map(from_ms),
                opted_in_at: opted_in_at.map(from_ms),
            },
        ))
    }

    async fn mark_sent(
        &self,
        key: &str,
        message_sid: &str,
        part: &OutboundReply,
    ) -> Result<(), StoreError> {
        let key = key.to_owned();
        let sid = message_sid.to_owned();
        let session = part.session_id().to_string();
        let part = encode(part)?;
        let ttl = duration_ms(GUARD_TTL);
        Ok(self
            .db
            .write(move |txn| {
                let mut records = Expiring::open(txn)?;
                records.put(("guard", "", &key), format!("sent:{sid}").as_bytes(), ttl)?;
                records.put(("sent", "", &sid), &part, ttl)?;
                records.put(("sentto", &session, &sid), &[], ttl)
            })
            .await?)
    }

    async fn settle_sent(
        &self,
        key: &str,
        message_sid: &str,
        part: &OutboundReply,
    ) -> Result<bool, StoreError> {
        let key = key.to_owned();
        let sid = message_sid.to_owned();
        let id = part.id.clone();
        let session = part.session_id().to_string();
        let part = encode(part)?;
        let ttl = duration_ms(GUARD_TTL);
        Ok(self
            .db
            .write(move |txn| {
                let mut records = Expiring::open(txn)?;
                match records.get(("sent", "", &sid))? {
                    // As the Redis store: a record that cannot be read is another part's.
                    Some(recorded) => {
                        let ours = serde_json::from_slice::<OutboundReply>(&recorded)
                            .is_ok_and(|r| r.id == id);
                        if !ours {
                            return Ok(false);
                        }
                    }
                    None => records.put(("sent", "", &sid), &part, ttl)?,
                }
                records.put(("sentto", &session, &sid), &[], ttl)?;
                records.put(("guard", "", &key), format!("sent:{sid}").as_bytes(), ttl)?;
                Ok(true)
            })
            .await?)
    }

    async fn sent_part(&self, message_sid: &str) -> Result<Option<OutboundReply>, StoreError> {
        self.get_expiring(("sent", "", message_sid))
            .await?
            .map(|r| decode(&r))
            .transpose()
    }

    async fn renew_send(
        &self,
        key: &str,
        hold: Hold,
        lease: Duration,
    ) -> Result<Option<Hold>, StoreError> {
        let key = key.to_owned();
        Ok(self
            .db
            .write(move |txn| {
                let mut guards = Expiring::open(txn)?;
                let held = guards.get(("guard", "", &key))?;
                // Only the exact bytes this holder wrote: a malformed guard is nobody's.
                if held.as_deref() != Some(Guard::pending(hold.0).as_slice()) {
                    return Ok(None);
                }
                hold_until(&mut guards, &key, lease).map(Some)
            })
            .await?)
    }

    async fn release_send(&self, key: &str, hold: Hold) -> Result<(), StoreError> {
        let key = key.to_owned();
        Ok(self
            .db
            .write(move |txn| {
                let mut guards = Expiring::open(txn)?;
                let held = guards.get(("guard", "", &key))?;
                if held.as_deref() == Some(Guard::pending(hold.0).as_slice()) {
                    guards.remove(("guard", "", &key))?;
                }
                Ok(())
            })
            .await?)
    }

    async fn record_status(&self, u: &StatusUpdate) -> Result<bool, StoreError> {
        let sid = u.message_sid.as_str().to_owned();
        let status = u.status;
        let record = encode(&StatusRecord {
            status,
            error_code: u.error_code,
        })?;
        let ttl = duration_ms(GUARD_TTL);
        Ok(self
            .db
            .write(move |txn| {
                let mut statuses = Expiring::open(txn)?;
                let current = statuses
                    .get(("status", "", &sid))?
                    .map(|raw| serde_json::from_slice::<StatusRecord>(&raw))
                    .transpose()?
                    .map(|r| r.status.rank());
                if current.is_some_and(|rank| status.rank() <= rank) {
                    return Ok(false);
                }
                statuses.put(("status", "", &sid), &record, ttl)?;
                Ok(true)
            })
            .await?)
    }

    async fn status(
        &self,
        message_sid: &MessageSid,
    ) -> Result<Option<(MessageStatus, Option<u32>)>, StoreError> {
        let raw = self
            .get_expiring(("status", "", message_sid.as_str()))
            .await?;
        Ok(raw
            .map(|r| decode::<StatusRecord>(&r))
            .transpose()?
            .map(|r| (r.status, r.error_code)))
    }

    async fn sent_messages(&self, session: &SessionId) -> Result<Vec<SentMessage>, StoreError> {
        let session = session.to_string();
        let rows = self
            .db
            .read(move |txn| {
                let table = txn.open_table(EXPIRING)?;
                let now = now_ms();
                let mut sids = Vec::new();
                for row in table.range(
                    ("sentto", session.as_str(), "")..=("sentto", session.as_str(), "\u{10ffff}"),
                )? {
                    let (key, value) = row?;
                    if value.value().0 > now {
                        sids.push(key.value().2.to_owned());
                    }
                }
                let mut rows = Vec::with_capacity(sids.len());
                for sid in sids {
                    let part = live(&table, ("sent", "", &sid), now)?;
                    let status = live(&table, ("status", "", &sid), now)?;
                    rows.push((sid, part, status));
                }
                Ok(rows)
            })
            .await?;
        let mut sent = Vec::with_capacity(rows.len());
        for (sid, part, status) in rows {
            // A part whose record lapsed before the index is no longer known.
            let Some(part) = part else { continue };
            let status = status
                .map(|raw| decode::<StatusRecord>(&raw))
                .transpose()?
                .map(|r| (r.status, r.error_code));
            sent.push(SentMessage {
                sid,
                part: decode(&part)?,
                status,
            });
        }
        Ok(sent)
    }

    async fn record_simulated(
        &self,
        session: &SessionId,
        body: &str,
        at: OffsetDateTime,
    ) -> Result<u64, StoreError> {
        let session = session.to_string();
        let entry = serde_json::json!({"body": body, "at": ms(at)}).to_string();
        Ok(self
            .db
            .write(move |txn| {
                let mut table = txn.open_table(OUTBOX)?;
                let index = last_turn(&table, &session)?.map_or(1, |n| n + 1);
                table.insert((session.as_str(), index), entry.as_bytes())?;
                Ok(index)
            })
            .await?)
    }

    async fn simulated(
        &self,
        session: &SessionId,
        after: u64,
    ) -> Result<Vec<SimulatedMessage>, StoreError> {
        let session = session.to_string();
        let rows = self
            .db
            .read(move |txn| {
                let table = txn.open_table(OUTBOX)?;
                let mut rows = Vec::new();
                for row in table.range(
                    (session.as_str(), after.saturating_add(1))..=(session.as_str(), u64::MAX),
                )? {
                    let (k, v) = row?;
                    rows.push((k.value().1, v.value().to_vec()));
                }
                Ok(rows)
            })
            .await?;
        rows.into_iter()
            .map(|(index, raw)| {
                let v: serde_json::Value = decode(&raw)?;
                Ok(SimulatedMessage {
                    index,
                    body: v["body"].as_str().unwrap_or_default().to_owned(),
                    at: from_ms(v["at"].as_i64().unwrap_or(0)),
                })
            })
            .collect()
    }

    async fn count_failure(&self, key: &str) -> Result<u64, StoreError> {
        let key = key.to_owned();
        let ttl = duration_ms(GUARD_TTL);
        Ok(self
            .db
            .write(move |txn| {
                let mut counts = Expiring::open(txn)?;
                let so_far = match counts.get(("failures", "", &key))? {
                    Some(raw) => <[u8; 8]>::try_from(raw.as_slice())
                        .map(u64::from_be_bytes)
                        .map_err(|_| DbError::Malformed("a stored failure count"))?,
                    None => 0,
                };
                let now = so_far + 1;
                counts.put(("failures", "", &key), &now.to_be_bytes(), ttl)?;
                Ok(now)
            })
            .await?)
    }

    async fn clear_failures(&self, key: &str) -> Result<(), StoreError> {
        let key = key.to_owned();
        Ok(self
            .db
            .write(move |txn| Expiring::open(txn)?.remove(("failures", "", &key)))
            .await?)
    }

    async fn key_check(&self, fresh: &SealedSecret) -> Result<SealedSecret, StoreError> {
        let fresh = fresh.as_str().to_owned();
        let stands = self
            .db
            .write(move |txn| {
                let mut meta = txn.open_table(META)?;
                let stored = meta.get(KEY_CHECK)?.map(|v| v.value().to_owned());
                match stored {
                    Some(check) => Ok(check),
                    None => {
                        meta.insert(KEY_CHECK, fresh.as_str())?;
                        Ok(fresh.clone())
                    }
                }
            })
            .await?;
        Ok(SealedSecret::from_stored(stands))
    }

    async fn replace_key_check(
        &self,
        old: &SealedSecret,
        new: &SealedSecret,
    ) -> Result<bool, StoreError> {
        let (old, new) = (old.as_str().to_owned(), new.as_str().to_owned());
        Ok(self
            .db
            .write(move |txn| {
                let mut meta = txn.open_table(META)?;
                let current = meta.get(KEY_CHECK)?.map(|v| v.value() == old);
                if current != Some(true) {
                    return Ok(false);
                }
                meta.insert(KEY_CHECK, new.as_str())?;
                Ok(true)
            })
            .await?)
    }

    async fn note_signature_failure(
        &self,
        agent: &AgentId,
        failure: &SignatureFailure,
    ) -> Result<(), StoreError> {
        let agent = agent.as_str().to_owned();
        let record = encode(failure)?;
        let ttl = duration_ms(GUARD_TTL);
        Ok(self
            .db
            .write(move |txn| Expiring::open(txn)?.put(("sigfail", "", &agent), &record, ttl))
            .await?)
    }

    async fn signature_failure(
        &self,
        agent: &AgentId,
    ) -> Result<Option<SignatureFailure>, StoreError> {
        self.get_expiring(("sigfail", "", agent.as_str()))
            .await?
            .map(|r| decode(&r))
            .transpose()
    }

    async fn content_sid(&self, key: &str) -> Result<Option<String>, StoreError> {
        let raw = self.get_expiring(("content", "", key)).await?;
        Ok(raw.map(|r| String::from_utf8_lossy(&r).into_owned()))
    }

    async fn cache_content_sid(&self, key: &str, sid: &str) -> Result<String, StoreError> {
        let (key, sid) = (key.to_owned(), sid.to_owned());
        let ttl = duration_ms(super::CONTENT_TTL);
        let stands = self
            .db
            .write(move |txn| {
                let mut expiring = Expiring::open(txn)?;
                if let Some(cached) = expiring.get(("content", "", &key))? {
                    return Ok(cached);
                }
                expiring.put(("content", "", &key), sid.as_bytes(), ttl)?;
                Ok(sid.clone().into_bytes())
            })
            .await?;
        Ok(String::from_utf8_lossy(&stands).into_owned())
    }

    async fn take_send_slot(&self, sender: &str, pace: Pace) -> Result<Slot, StoreError> {
        Ok(self.paces.take(sender, pace))
    }

    async fn ready(&self) -> Result<(), StoreError> {
        Ok(self.db.ready().await?)
    }
}
