//! [`SendLedger`] on Redis: a reply part's guard, the part sent as each Twilio message, the
//! message's status, failure counts and cached content sids, each its own key (and slot on a
//! cluster); a sender's pace is one key per sender number ([`crate::pacing`]).

use std::{sync::LazyLock, time::Duration};

use async_trait::async_trait;
use redis::{AsyncCommands, Script};
use time::OffsetDateTime;

use twilio::status::{MessageStatus, StatusUpdate};
use wagate_core::{
    domain::{MessageSid, SessionId},
    envelope::OutboundReply,
    window::WindowClocks,
};

use super::{RedisStore, err, evalsha, lease_ms, ms, to_json};
use crate::{
    GUARD_TTL, GuardState, Hold, Pace, SendLedger, SentMessage, Slot, StoreError, clocks_from_ms,
};

// The claim of a guard that is there already (see [`RedisStore::claim`]). The guard is
// `pending:<deadline ms>` while a sender holds it, `sent:<sid>` once posted. ARGV[1] = now (ms),
// ARGV[2] = lease (ms), ARGV[3] = ttl (s). A claim answers with the deadline it wrote, the
// holder's token for renewing ([`RENEW_SEND`]).
const CLAIM_SEND: &str = r#"
local cur = redis.call('GET', KEYS[1])
local deadline = tonumber(ARGV[1]) + tonumber(ARGV[2])
local state = 'claimed:'
if cur then
  if string.sub(cur, 1, 5) == 'sent:' then return cur end
  local held_until = tonumber(string.sub(cur, 9))
  if held_until and held_until > tonumber(ARGV[1]) then return 'busy' end
  state = 'reclaimed:'
end
redis.call('SET', KEYS[1], 'pending:' .. deadline, 'EX', ARGV[3])
return state .. deadline
"#;

// Extends the guard only while it still holds the deadline its holder wrote.
// ARGV[1] = that deadline, ARGV[2] = now (ms), ARGV[3] = lease (ms), ARGV[4] = ttl (s).
const RENEW_SEND: &str = r#"
if redis.call('GET', KEYS[1]) ~= 'pending:' .. ARGV[1] then return false end
local deadline = tonumber(ARGV[2]) + tonumber(ARGV[3])
redis.call('SET', KEYS[1], 'pending:' .. deadline, 'EX', ARGV[4])
return tostring(deadline)
"#;

// Records the part (JSON, ARGV[1]) as the one sent as this message unless another part (a
// different id, ARGV[2]) already is. ARGV[3] = ttl (s). 1 when the message is this part's.
const SETTLE_SENT: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, part = pcall(cjson.decode, cur)
  if ok and type(part) == 'table' and part['id'] == ARGV[2] then return 1 end
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
return 1
"#;

// Deletes the guard only while it still holds the deadline its holder wrote (ARGV[1]).
const RELEASE_SEND: &str = r#"
if redis.call('GET', KEYS[1]) == 'pending:' .. ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"#;

const RECORD_STATUS: &str = r#"
local cur = tonumber(redis.call('HGET', KEYS[1], 'rank') or '-1')
if tonumber(ARGV[2]) <= cur then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'rank', ARGV[2], 'error_code', ARGV[3], 'updated_at', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"#;

// KEYS[1] = a cached content sid; ARGV[1] = a fresh sid, stored for ARGV[2] seconds unless one
// is. Returns the one that stands.
const CACHE_CONTENT: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur then return cur end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return ARGV[1]
"#;

/// This module's scripts, hashed once: `EVALSHA` needs the SHA-1 of the script's text.
static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    claim_send: Script::new(CLAIM_SEND),
    renew_send: Script::new(RENEW_SEND),
    settle_sent: Script::new(SETTLE_SENT),
    release_send: Script::new(RELEASE_SEND),
    record_status: Script::new(RECORD_STATUS),
    cache_content: Script::new(CACHE_CONTENT),
    take_slot: Script::new(crate::pacing::TAKE_SLOT),
});

struct Scripts {
    claim_send: Script,
    renew_send: Script,
    settle_sent: Script,
    release_send: Script,
    record_status: Script,
    cache_content: Script,
    take_slot: Script,
}

/// What [`CLAIM_SEND`] answered.
fn guard_state(answer: &str) -> Result<GuardState, StoreError> {
    let hold = |deadline: &str| {
        deadline.parse().map(Hold).map_err(|_| {
            StoreError::Invalid(format!(
                "claim send: a guard deadline that is not a number: {deadline:?}"
            ))
        })
    };
    Ok(if answer == "busy" {
        GuardState::Busy
    } else if let Some(deadline) = answer.strip_prefix("claimed:") {
        GuardState::Claimed(hold(deadline)?)
    } else if let Some(deadline) = answer.strip_prefix("reclaimed:") {
        GuardState::Reclaimed(hold(deadline)?)
    } else {
        GuardState::Sent(answer.trim_start_matches("sent:").to_owned())
    })
}

impl RedisStore {
    /// Claims the guard of `key` for `lease`. A part nobody claimed yet, nearly every one,
    /// costs one `SET NX GET`: a script costs Redis several times a plain command (about 35,000
    /// instructions to run at all, and 6,000 more per command it calls, against 5,000 for a
    /// `SET`). A guard that is there already is answered from its value; only one whose holder's
    /// lease ran out needs [`CLAIM_SEND`]'s compare-and-set, so that of two senders taking it
    /// over, one does.
    async fn claim(&self, key: &str, lease: Duration) -> Result<GuardState, StoreError> {
        let guard = key!(self, "guard:{key}");
        let now = ms(OffsetDateTime::now_utc());
        let deadline = u64::try_from(now)
            .unwrap_or(0)
            .saturating_add(lease_ms(lease));
        let held: Option<String> = redis::cmd("SET")
            .arg(&guard)
            .arg(format!("pending:{deadline}"))
            .arg("NX")
            .arg("GET")
            .arg("EX")
            .arg(GUARD_TTL.as_secs())
            .query_async(&mut self.conn())
            .await
            .map_err(err("claim send"))?;
        let Some(held) = held else {
            return Ok(GuardState::Claimed(Hold(deadline)));
        };
        if let Some(sid) = held.strip_prefix("sent:") {
            return Ok(GuardState::Sent(sid.to_owned()));
        }
        let held_until = held
            .strip_prefix("pending:")
            .and_then(|d| d.parse::<i64>().ok());
        if held_until.is_some_and(|until| until > now) {
            return Ok(GuardState::Busy);
        }
        let mut cmd = evalsha(&SCRIPTS.claim_send, &[guard]);
        cmd.arg(now).arg(lease_ms(lease)).arg(GUARD_TTL.as_secs());
        let (answer,): (String,) = self
            .scripted(redis::pipe().add_command(cmd), &SCRIPTS.claim_send)
            .await
            .map_err(err("claim send"))?;
        guard_state(&answer)
    }

    /// Adds to `pipe` the guard's mark that its part went out as `message_sid`.
    fn mark_guard(pipe: &mut redis::Pipeline, guard: &str, message_sid: &str) {
        pipe.set_ex(guard, format!("sent:{message_sid}"), GUARD_TTL.as_secs())
            .ignore();
    }

    /// Adds to `pipe` `message_sid` to the sids of parts sent to `part`'s user, so that erasing
    /// the user finds the sent parts and statuses, which are keyed by the sid alone. It comes
    /// after the part: a crash between leaves one record unindexed, which lapses after
    /// [`GUARD_TTL`].
    fn index_sent(&self, pipe: &mut redis::Pipeline, part: &OutboundReply, message_sid: &str) {
        let session = part.session_id();
        let index = key!(self, "sentto:{{{session}}}");
        pipe.sadd(&index, message_sid)
            .ignore()
            .expire(
                &index,
                i64::try_from(GUARD_TTL.as_secs()).unwrap_or(i64::MAX),
            )
            .ignore();
    }

    /// Writes `record` (the part sent as `message_sid`, unless already written), marks the
    /// guard and indexes the part, in that order. A guard that says `sent:` must always have
    /// its part recorded, and the guard is waited on by a replica (lost in a failover, the part
    /// would be sent again). On one server the steps go in one transaction (`MULTI`/`EXEC`:
    /// all of them or none). On a cluster each is in a slot of its own, so each is a round
    /// trip, the index's two commands in a transaction of their own (an index is never left
    /// without its expiry).
    async fn record_guard_index(
        &self,
        record: Option<(String, Vec<u8>)>,
        guard: &str,
        part: &OutboundReply,
        message_sid: &str,
        what: &'static str,
    ) -> Result<(), StoreError> {
        let run = |pipe: redis::Pipeline| async move {
            let _: () = pipe
                .query_async(&mut self.conn())
                .await
                .map_err(err(what))?;
            Ok::<_, StoreError>(())
        };
        let mut pipe = redis::pipe();
        pipe.atomic();
        if let Some((key, value)) = record {
            pipe.set_ex(key, value, GUARD_TTL.as_secs()).ignore();
        }
        if self.redis.one_server() {
            Self::mark_guard(&mut pipe, guard, message_sid);
            self.index_sent(&mut pipe, part, message_sid);
            run(pipe).await?;
            self.replicated(guard, what).await;
            return Ok(());
        }
        if pipe.cmd_iter().next().is_some() {
            run(pipe).await?;
        }
        let mut mark = redis::pipe();
        Self::mark_guard(&mut mark, guard, message_sid);
        run(mark).await?;
        self.replicated(guard, what).await;
        let mut index = redis::pipe();
        index.atomic();
        self.index_sent(&mut index, part, message_sid);
        run(index).await
    }

    async fn status_of(
        &self,
        sid: &str,
    ) -> Result<Option<(MessageStatus, Option<u32>)>, StoreError> {
        let h: std::collections::HashMap<String, String> = self
            .conn()
            .hgetall(key!(self, "status:{sid}"))
            .await
            .map_err(err("status"))?;
        Ok(h.get("status")
            .map(|s| MessageStatus::parse(s))
            .map(|s| (s, h.get("error_code").and_then(|c| c.parse().ok()))))
    }
}

#[async_trait]
impl SendLedger for RedisStore {
    async fn claim_send(&self, key: &str, lease: Duration) -> Result<GuardState, StoreError> {
        self.claim(key, lease).await
    }

    async fn claim_send_with_clocks(
        &self,
        session: &SessionId,
        key: &str,
        lease: Duration,
    ) -> Result<(GuardState, WindowClocks), StoreError> {
        // The clocks are the conversation's keys, the guard the part's: two slots on a cluster,
        // so two requests, sent together (on one connection, in one write).
        let clocks = redis::cmd("MGET")
            .arg(key!(self, "window:{{{session}}}"))
            .arg(key!(self, "optout:{{{session}}}"))
            .arg(key!(self, "optin:{{{session}}}"))
            .clone();
        type Clocks = (Option<i64>, Option<i64>, Option<i64>);
        let mut conn = self.conn();
        let (clocks, claimed) = tokio::join!(
            clocks.query_async::<Clocks>(&mut conn),
            self.claim(key, lease)
        );
        let state = claimed?;
        let (last_inbound, opted_out_at, opted_in_at) = match clocks {
            Ok(clocks) => clocks,
            Err(e) => {
                // The claim went through without its clocks (the connection broke between the
                // two, as in a Redis restart): give the part back, or its retry would wait out
                // the lease behind its own claim. A reclaimed guard stays, so that whoever takes
                // the part next still looks in Twilio's list first.
                if let GuardState::Claimed(hold) = state {
                    let _ = self.release_send(key, hold).await;
                }
                return Err(err("claim send")(e));
            }
        };
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
        // The part sent as the message, then the guard: keys of two slots on a cluster. A guard
        // that says `sent:` always has its message's part recorded; a sender that dies between
        // the steps leaves the guard pending, to lapse, and whoever takes the part next finds
        // the message in Twilio's list and settles on it ([`Self::settle_sent`]) as this part's.
        let guard = key!(self, "guard:{key}");
        let record = (key!(self, "sent:{message_sid}"), to_json(part)?);
        self.record_guard_index(Some(record), &guard, part, message_sid, "mark sent")
            .await
    }

    async fn settle_sent(
        &self,
        key: &str,
        message_sid: &str,
        part: &OutboundReply,
    ) -> Result<bool, StoreError> {
        // The claim of the message and the guard are keys of different slots on a cluster, so
        // they are written in two steps: a sender that dies between them leaves the guard to
        // lapse, and whoever takes the part next finds the message already this part's.
        let ours: i64 = SCRIPTS
            .settle_sent
            .key(key!(self, "sent:{message_sid}"))
            .arg(to_json(part)?)
            .arg(&part.id)
            .arg(GUARD_TTL.as_secs())
            .invoke_async(&mut self.conn())
            .await
            .map_err(err("settle sent"))?;
        if ours != 1 {
            return Ok(false);
        }
        let guard = key!(self, "guard:{key}");
        self.record_guard_index(None, &guard, part, message_sid, "settle sent")
            .await?;
        Ok(true)
    }

    async fn sent_part(&self, message_sid: &str) -> Result<Option<OutboundReply>, StoreError> {
        self.get_json(key!(self, "sent:{message_sid}")).await
    }

    async fn renew_send(
        &self,
        key: &str,
        hold: Hold,
        lease: Duration,
    ) -> Result<Option<Hold>, StoreError> {
        let renewed: Option<String> = SCRIPTS
            .renew_send
            .key(key!(self, "guard:{key}"))
            .arg(hold.0)
            .arg(ms(OffsetDateTime::now_utc()))
            .arg(lease_ms(lease))
            .arg(GUARD_TTL.as_secs())
            .invoke_async(&mut self.conn())
            .await
            .map_err(err("renew send"))?;
        renewed
            .map(|deadline| {
                deadline.parse().map(Hold).map_err(|_| {
                    StoreError::Invalid(format!(
                        "renew send: a guard deadline that is not a number: {deadline:?}"
                    ))
                })
            })
            .transpose()
    }

    async fn release_send(&self, key: &str, hold: Hold) -> Result<(), StoreError> {
        let _: i64 = SCRIPTS
            .release_send
            .key(key!(self, "guard:{key}"))
            .arg(hold.0)
            .invoke_async(&mut self.conn())
            .await
            .map_err(err("release send"))?;
        Ok(())
    }

    async fn record_status(&self, u: &StatusUpdate) -> Result<bool, StoreError> {
        let applied: i64 = SCRIPTS
            .record_status
            .key(key!(self, "status:{}", u.message_sid))
            .arg(u.status.as_str())
            .arg(u.status.rank())
            .arg(u.error_code.map(|c| c.to_string()).unwrap_or_default())
            .arg(ms(OffsetDateTime::now_utc()))
            .arg(GUARD_TTL.as_secs())
            .invoke_async(&mut self.conn())
            .await
            .map_err(err("record status"))?;
        Ok(applied == 1)
    }

    async fn status(
        &self,
        sid: &MessageSid,
    ) -> Result<Option<(MessageStatus, Option<u32>)>, StoreError> {
        self.status_of(sid.as_str()).await
    }

    async fn sent_messages(&self, session: &SessionId) -> Result<Vec<SentMessage>, StoreError> {
        let sids: Vec<String> = self
            .conn()
            .smembers(key!(self, "sentto:{{{session}}}"))
            .await
            .map_err(err("sent messages"))?;
        // Each part's records are keys of their own slots: the reads go out together over the
        // multiplexed connection, one round trip in all rather than one per part.
        let reads = sids.into_iter().map(|sid| async move {
            let (part, status) = tokio::try_join!(
                self.get_json::<OutboundReply>(key!(self, "sent:{sid}")),
                self.status_of(&sid)
            )?;
            Ok::<_, StoreError>(part.map(|part| SentMessage { sid, part, status }))
        });
        let found = futures::future::try_join_all(reads).await?;
        // A part whose record lapsed before the index is no longer known.
        Ok(found.into_iter().flatten().collect())
    }

    async fn count_failure(&self, key: &str) -> Result<u64, StoreError> {
        let k = key!(self, "failures:{key}");
        let (n,): (u64,) = redis::pipe()
            .atomic()
            .incr(&k, 1)
            .expire(&k, i64::try_from(GUARD_TTL.as_secs()).unwrap_or(i64::MAX))
            .ignore()
            .query_async(&mut self.conn())
            .await
            .map_err(err("count failure"))?;
        Ok(n)
    }

    async fn clear_failures(&self, key: &str) -> Result<(), StoreError> {
        let _: i64 = self
            .conn()
            .del(key!(self, "failures:{key}"))
            .await
            .map_err(err("clear failures"))?;
        Ok(())
    }

    async fn content_sid(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.conn()
            .get(key!(self, "content:{key}"))
            .await
            .map_err(err("read content sid"))
    }

    async fn cache_content_sid(&self, key: &str, sid: &str) -> Result<String, StoreError> {
        SCRIPTS
            .cache_content
            .key(key!(self, "content:{key}"))
            .arg(sid)
            .arg(crate::CONTENT_TTL.as_secs())
            .invoke_async(&mut self.conn())
            .await
            .map_err(err("cache content sid"))
    }

    async fn take_send_slot(
        &self,
        sender: &str,
        pace: Pace,
        want: u32,
    ) -> Result<Slot, StoreError> {
        let (granted, wait): (u32, u64) = SCRIPTS
            .take_slot
            .key(key!(self, "pace:{{{sender}}}"))
            .arg(crate::pacing::micros(pace.interval))
            .arg(crate::pacing::micros(pace.tolerance))
            .arg(crate::pacing::micros(pace.grace))
            .arg(want)
            .invoke_async(&mut self.conn())
            .await
            .map_err(err("take send slot"))?;
        Ok(match granted {
            0 => Slot::Wait(Duration::from_micros(wait)),
            granted => Slot::Go(granted),
        })
    }
}
