//! [`SendLedger`] on the embedded database: every record of the ledger is kept with an expiry
//! ([`super::expiring`]), as the Redis store keeps it with a TTL; the senders' paces are kept
//! in memory ([`crate::pacing::LocalPaces`]).

use std::time::Duration;

use async_trait::async_trait;
use redb::{ReadableTable, WriteTransaction};
use serde::{Deserialize, Serialize};

use twilio::status::{MessageStatus, StatusUpdate};
use wagate_core::{
    domain::{MessageSid, SessionId},
    envelope::OutboundReply,
    window::WindowClocks,
};
use wagate_embedded::{DbError, now_ms};

use super::{
    EmbeddedStore, Expiring, conversations::CLOCKS, decode, duration_ms, encode,
    expiring::EXPIRING, live,
};
use crate::{
    GUARD_TTL, GuardState, Hold, Pace, SendLedger, SentMessage, Slot, StoreError, clocks_from_ms,
};

#[derive(Serialize, Deserialize)]
struct StatusRecord {
    status: MessageStatus,
    error_code: Option<u32>,
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

#[async_trait]
impl SendLedger for EmbeddedStore {
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
            clocks_from_ms(last_inbound, opted_out_at, opted_in_at),
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

    async fn content_sid(&self, key: &str) -> Result<Option<String>, StoreError> {
        let raw = self.get_expiring(("content", "", key)).await?;
        Ok(raw.map(|r| String::from_utf8_lossy(&r).into_owned()))
    }

    async fn cache_content_sid(&self, key: &str, sid: &str) -> Result<String, StoreError> {
        let (key, sid) = (key.to_owned(), sid.to_owned());
        let ttl = duration_ms(crate::CONTENT_TTL);
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

    async fn take_send_slot(
        &self,
        sender: &str,
        pace: Pace,
        want: u32,
    ) -> Result<Slot, StoreError> {
        Ok(self.paces.take(sender, pace, want))
    }
}
