//! [`Conversations`] on the embedded database: turns and the simulated outbox numbered per
//! session, leads by agent and user, pauses, and the clocks; the records of completed turns and
//! the "seen" marks of lead capture are kept with an expiry ([`super::expiring`]).

use std::time::Duration;

use async_trait::async_trait;
use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use wagate_core::{
    domain::{AgentId, SessionId},
    envelope::OutboundReply,
};
use wagate_embedded::DbError;

use super::{EmbeddedStore, Expiring, decode, duration_ms, encode, from_ms, ms};
use crate::{
    CompletedTurn, Conversations, GUARD_TTL, Lead, LeadSighting, Pause, SimulatedMessage,
    StoreError, Turn, TurnStart,
};

pub(super) const TURNS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("store_turns");

/// Simulated sends per session, by index from 1: `{"body", "at"}` as the Redis store keeps them.
pub(super) const OUTBOX: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("store_outbox");

pub(super) const LEADS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("store_leads");

/// Paused conversations: session → JSON [`Pause`].
pub(super) const PAUSES: TableDefinition<&str, &[u8]> = TableDefinition::new("store_pauses");

pub(super) const CLOCKS: TableDefinition<(&str, &str), i64> = TableDefinition::new("store_clocks");

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

/// Drops the turns at the start of `session` that are older than `cutoff`, a few at most.
fn drop_expired_turns(
    table: &mut Table<'_, (&'static str, u64), &'static [u8]>,
    session: &str,
    cutoff: &str,
) -> Result<(), DbError> {
    let mut doomed = Vec::new();
    for row in table.range((session, 0)..=(session, u64::MAX))? {
        let (key, value) = row?;
        if doomed.len() == crate::conversations::TRIM_PER_COMPLETION
            || !crate::conversations::expired_turn(value.value(), cutoff)
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
pub(super) fn remove_numbered(
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
/// contact; a message already counted (its "seen" mark is live) changes nothing. True when this
/// made the lead.
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

impl EmbeddedStore {
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

    /// Moves the opt-out or opt-in clock (`kind`) of `session` to `at` (never back), and copies
    /// it onto the user's lead, if they are one, in the same transaction, so the leads list
    /// shows it.
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
impl Conversations for EmbeddedStore {
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

    async fn purge_erased(&self) -> Result<(), StoreError> {
        Ok(self.db.rewrite().await?)
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
        let Some(latest) = crate::conversations::latest_sighting(session, sightings)?.map(ms)
        else {
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
        let cutoff = crate::conversations::retention_cutoff(keep);
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
}
