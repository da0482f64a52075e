//! [`Conversations`] on Redis: a conversation's keys share its `{<session>}` hash tag, an
//! agent's leads its `{<agent>}` one, so each script below runs in one slot.

use std::{sync::LazyLock, time::Duration};

use async_trait::async_trait;
use redis::{AsyncCommands, Script};
use time::OffsetDateTime;

use wagate_core::domain::{AgentId, MessageSid, SessionId};

use super::{RedisStore, err, evalsha, from_json, from_ms, ms, to_json};
use crate::{
    CompletedTurn, Conversations, GUARD_TTL, Lead, LeadSighting, Pause, SimulatedMessage,
    StoreError, Turn, TurnStart,
};

/// The lead step, as a Lua function of its keys (`K` from `K[ko + 1]`) and arguments (`A`
/// from `A[ao + 1]`), so that one server can run it in the same script as the turn's begin
/// ([`BEGIN_TURN_AND_LEAD`]) and a cluster, where its keys are in another slot, in a script of
/// its own ([`RECORD_LEAD`]). Keys: lead hash, leads by first contact, then one "seen" mark per
/// message; arguments: user, ttl (s), then per message its profile name and time (ms). Returns
/// the messages counted, plus 1,000,000 when this call made the lead. Each `redis.call` costs
/// Redis a few µs whatever it does, so fields are read and written together; and each Lua
/// table built costs about as much, so none is (offsets instead of copies of KEYS and ARGV).
macro_rules! record_lead_fn {
    () => {
        r#"
local function record_lead(K, ko, A, ao)
  local lead = K[ko + 1]
  local user = A[ao + 1]
  local counted = 0
  local created = 0
  for i = 3, #K - ko do
    local profile = A[ao + 2 * i - 3]
    local at_text = A[ao + 2 * i - 2]
    if redis.call('SET', K[ko + i], '1', 'NX', 'EX', A[ao + 2]) then
      local at = tonumber(at_text)
      local seen = redis.call('HMGET', lead, 'first_seen', 'last_seen', 'message_count')
      local count = tonumber(seen[3] or '0') + 1
      -- The fields to write, as one HSET: a later time moves last_seen, a name replaces it.
      local last = at_text
      if seen[1] then
        if at < tonumber(seen[1]) then
          redis.call('ZADD', K[ko + 2], at, user)
          redis.call('HSET', lead, 'first_seen', at_text)
        end
        if at <= tonumber(seen[2] or '0') then last = seen[2] end
      else
        created = 1000000
        redis.call('ZADD', K[ko + 2], at, user)
        redis.call('HSET', lead, 'phone', user, 'first_seen', at_text)
      end
      if profile ~= '' then
        redis.call('HSET', lead, 'last_seen', last, 'message_count', count, 'profile_name', profile)
      else
        redis.call('HSET', lead, 'last_seen', last, 'message_count', count)
      end
      counted = counted + 1
    end
  end
  return counted + created
end
"#
    };
}

/// The begin step, as a Lua function (see [`record_lead_fn`]). Keys: window clock, session
/// list, pause, then the turn records of the messages; arguments: latest message time (ms),
/// turns of history wanted, as digits (a Lua number would lose digits, and LRANGE takes no
/// exponent). The clock, the pause and the records are read in one `MGET` (which answers nil
/// for the list). Returns the records (false for none), the history and the pause (false for
/// none), which reach the client as nil. The history goes back as one JSON array, its turns
/// joined in Lua, rather than a bulk string per turn: each element of an answer costs Redis
/// (turned into Lua and back) and the client (the redis crate parses byte by byte) far more
/// than its share of one string that serde_json reads at once.
macro_rules! begin_turn_fn {
    () => {
        r#"
local function begin_turn(K, n, A, ao)
  local got = redis.call('MGET', unpack(K, 1, n))
  if tonumber(A[ao + 1]) > tonumber(got[1] or '0') then redis.call('SET', K[1], A[ao + 1]) end
  local done = {}
  local fresh = false
  for i = 4, n do
    done[i - 3] = got[i]
    if not got[i] then fresh = true end
  end
  local history = '[]'
  if fresh and A[ao + 2] ~= '0' then
    history = '[' .. table.concat(redis.call('LRANGE', K[2], '-' .. A[ao + 2], -1), ',') .. ']'
  end
  return done, history, got[3]
end
"#
    };
}

const RECORD_LEAD: &str = concat!(record_lead_fn!(), "return record_lead(KEYS, 0, ARGV, 0)");

const BEGIN_TURN: &str = concat!(
    begin_turn_fn!(),
    r#"
local done, history, pause = begin_turn(KEYS, #KEYS, ARGV, 0)
return {done, history, pause}
"#
);

// Both steps in one script, for one server (or Sentinel's master), where keys of any slots may
// go together. ARGV[1] = how many of the keys are the begin's; then the begin's two arguments,
// then the lead's; the keys are the begin's, then the lead's. Returns the begin's answer with
// the lead's appended.
const BEGIN_TURN_AND_LEAD: &str = concat!(
    begin_turn_fn!(),
    record_lead_fn!(),
    r#"
local n = tonumber(ARGV[1])
local done, history, pause = begin_turn(KEYS, n, ARGV, 1)
return {done, history, pause, record_lead(KEYS, n, ARGV, 3)}
"#
);

// KEYS[1] = session list, KEYS[2] = the session's set of turn record keys (so that erasing the
// user finds them without a SCAN), KEYS[3..] = turn records; ARGV[1] = record, ARGV[2] = ttl,
// ARGV[3] = number of turns n, ARGV[4..3+n] = turns, ARGV[4+n] = how long history is kept (s),
// ARGV[5+n] = the retention cutoff (`retention_cutoff`), ARGV[6+n] = turns to drop at most.
// Returns the earlier record, or nil when this one was stored.
const COMPLETE_TURN: &str = r#"
local prev = redis.call('GET', KEYS[3])
if prev then return prev end
local n = tonumber(ARGV[3])
if n > 0 then redis.call('RPUSH', KEYS[1], unpack(ARGV, 4, 3 + n)) end
for i = 3, #KEYS do redis.call('SET', KEYS[i], ARGV[1], 'EX', ARGV[2]) end
redis.call('SADD', KEYS[2], unpack(KEYS, 3, #KEYS))
redis.call('EXPIRE', KEYS[2], ARGV[2])
local cutoff = ARGV[5 + n]
for _ = 1, tonumber(ARGV[6 + n]) do
  local head = redis.call('LINDEX', KEYS[1], 0)
  if not head then break end
  local ok, turn = pcall(cjson.decode, head)
  if not ok or type(turn) ~= 'table' or type(turn['at']) ~= 'string' then break end
  if string.sub(turn['at'], 1, 19) >= cutoff then break end
  redis.call('LPOP', KEYS[1])
end
redis.call('EXPIRE', KEYS[1], ARGV[4 + n])
return false
"#;

// KEYS[1] = a lead hash; ARGV[1] = field, ARGV[2] = time (ms): the field moves forward to it,
// on a lead that exists only.
const STAMP_LEAD: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > cur then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"#;

// KEYS[1] = a clock (ms); ARGV[1] = a time (ms): the clock moves forward to it, never back.
const STAMP_MAX: &str = r#"
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > cur then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
"#;

/// This module's scripts, hashed once: `EVALSHA` needs the SHA-1 of the script's text.
static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    record_lead: Script::new(RECORD_LEAD),
    begin_turn: Script::new(BEGIN_TURN),
    begin_turn_and_lead: Script::new(BEGIN_TURN_AND_LEAD),
    complete_turn: Script::new(COMPLETE_TURN),
    stamp_lead: Script::new(STAMP_LEAD),
    stamp_max: Script::new(STAMP_MAX),
});

struct Scripts {
    record_lead: Script,
    begin_turn: Script,
    begin_turn_and_lead: Script,
    complete_turn: Script,
    stamp_lead: Script,
    stamp_max: Script,
}

/// The keys of the lead of `session`'s user and of the "seen" marks of `sids`, in the order
/// [`RECORD_LEAD`] takes them.
fn lead_keys<'a>(
    store: &RedisStore,
    session: &SessionId,
    sids: impl Iterator<Item = &'a MessageSid>,
) -> Vec<String> {
    let agent = session.agent();
    let user = session.user();
    let mut keys = vec![
        key!(store, "lead:{{{agent}}}:{user}"),
        key!(store, "leads:{{{agent}}}"),
    ];
    keys.extend(sids.map(|sid| key!(store, "leadseen:{{{agent}}}:{sid}")));
    keys
}

/// The arguments of [`RECORD_LEAD`] after the keys.
fn lead_args(cmd: &mut redis::Cmd, session: &SessionId, sightings: &[LeadSighting<'_>]) {
    cmd.arg(session.user()).arg(GUARD_TTL.as_secs());
    for s in sightings {
        cmd.arg(s.profile_name.unwrap_or("")).arg(ms(s.at));
    }
}

impl RedisStore {
    /// Copies an opt-out or opt-in time (`field`) onto the user's lead, if they are one, so
    /// that the leads list shows it without reading every conversation's clocks (another slot
    /// on a cluster). The conversation's clock, written first, is what sends obey.
    async fn stamp_lead(
        &self,
        session: &SessionId,
        field: &str,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let agent = session.agent();
        let user = session.user();
        let _: i64 = SCRIPTS
            .stamp_lead
            .key(key!(self, "lead:{{{agent}}}:{user}"))
            .arg(field)
            .arg(ms(at))
            .invoke_async(&mut self.conn())
            .await
            .map_err(err("stamp lead"))?;
        Ok(())
    }
}

#[async_trait]
impl Conversations for RedisStore {
    async fn forget_session(&self, session: &SessionId) -> Result<(), StoreError> {
        // The keys carry the session's hash tag: one DEL, one slot.
        let _: i64 = self
            .conn()
            .del(&[
                key!(self, "session:{{{session}}}"),
                key!(self, "pause:{{{session}}}"),
                key!(self, "outbox:{{{session}}}"),
            ])
            .await
            .map_err(err("forget session"))?;
        Ok(())
    }

    async fn purge_erased(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn erase_user(&self, session: &SessionId) -> Result<(), StoreError> {
        // The sent parts and statuses first (each its own slot), while the index that names
        // them is still there: a crash part way leaves the index, and erasing again finishes.
        let sent_index = key!(self, "sentto:{{{session}}}");
        let sids: Vec<String> = self
            .conn()
            .smembers(&sent_index)
            .await
            .map_err(err("erase user"))?;
        for sid in &sids {
            let _: i64 = self
                .conn()
                .del(key!(self, "sent:{sid}"))
                .await
                .map_err(err("erase user"))?;
            let _: i64 = self
                .conn()
                .del(key!(self, "status:{sid}"))
                .await
                .map_err(err("erase user"))?;
        }
        // The conversation's keys, all in its slot: the turn records named by their index
        // (only keys of this session, whatever the index holds), then everything else.
        let turn_index = key!(self, "turns:{{{session}}}");
        let own_turns = key!(self, "turn:{{{session}}}:");
        let turn_keys: Vec<String> = self
            .conn()
            .smembers(&turn_index)
            .await
            .map_err(err("erase user"))?;
        let mut keys: Vec<String> = turn_keys
            .into_iter()
            .filter(|k| k.starts_with(&own_turns))
            .collect();
        let history = key!(self, "session:{{{session}}}");
        keys.extend([
            turn_index,
            sent_index,
            history.clone(),
            key!(self, "pause:{{{session}}}"),
            key!(self, "outbox:{{{session}}}"),
            key!(self, "window:{{{session}}}"),
            key!(self, "optout:{{{session}}}"),
            key!(self, "optin:{{{session}}}"),
        ]);
        let _: i64 = self.conn().del(&keys).await.map_err(err("erase user"))?;
        // An erasure undone by a failover would bring back what the person asked to erase.
        self.replicated(&history, "erase user").await;
        // The lead, in the agent's slot.
        let agent = session.agent();
        let user = session.user();
        let lead = key!(self, "lead:{{{agent}}}:{user}");
        let _: () = redis::pipe()
            .atomic()
            .del(&lead)
            .ignore()
            .zrem(key!(self, "leads:{{{agent}}}"), user)
            .ignore()
            .query_async(&mut self.conn())
            .await
            .map_err(err("erase user"))?;
        self.replicated(&lead, "erase user").await;
        Ok(())
    }

    async fn begin_turn(
        &self,
        session: &SessionId,
        sightings: &[LeadSighting<'_>],
        history: usize,
    ) -> Result<TurnStart, StoreError> {
        let Some(latest) = crate::conversations::latest_sighting(session, sightings)? else {
            return Ok(TurnStart::default());
        };
        let mut keys = vec![
            key!(self, "window:{{{session}}}"),
            key!(self, "session:{{{session}}}"),
            key!(self, "pause:{{{session}}}"),
        ];
        keys.extend(
            sightings
                .iter()
                .map(|s| key!(self, "turn:{{{session}}}:{}", s.message_sid)),
        );
        let lead_keys = lead_keys(self, session, sightings.iter().map(|s| s.message_sid));
        let history = history.min(i64::MAX as usize);
        type Begun = (Vec<Option<Vec<u8>>>, Vec<u8>, Option<Vec<u8>>, i64);
        let (completed, turns, pause, counted) = if self.redis.one_server() {
            // One script for both steps: the keys of two slots may go together here.
            let mut both = evalsha(&SCRIPTS.begin_turn_and_lead, &[keys, lead_keys].concat());
            both.arg(3 + sightings.len()).arg(ms(latest)).arg(history);
            lead_args(&mut both, session, sightings);
            let (begun,): (Begun,) = self
                .scripted(
                    redis::pipe().add_command(both),
                    &SCRIPTS.begin_turn_and_lead,
                )
                .await
                .map_err(err("begin turn"))?;
            begun
        } else {
            let mut begin = evalsha(&SCRIPTS.begin_turn, &keys);
            begin.arg(ms(latest)).arg(history);
            let mut lead = evalsha(&SCRIPTS.record_lead, &lead_keys);
            lead_args(&mut lead, session, sightings);
            // The conversation's keys and the agent's leads are two slots on a cluster: two
            // scripts, sent together. Both are idempotent (the lead counts each message once
            // by its "seen" mark), so when either fails the whole begin is simply done again.
            let begin = redis::pipe().add_command(begin).clone();
            let lead = redis::pipe().add_command(lead).clone();
            type Started = ((Vec<Option<Vec<u8>>>, Vec<u8>, Option<Vec<u8>>),);
            let (begun, counted) = tokio::join!(
                self.scripted::<Started>(&begin, &SCRIPTS.begin_turn),
                self.scripted::<(i64,)>(&lead, &SCRIPTS.record_lead)
            );
            let ((completed, turns, pause),) = begun.map_err(err("begin turn"))?;
            let (counted,) = counted.map_err(err("begin turn"))?;
            (completed, turns, pause, counted)
        };
        Ok(TurnStart {
            completed: completed
                .iter()
                .map(|r| {
                    r.as_deref()
                        .map(|r| from_json(r, "decode turn record"))
                        .transpose()
                })
                .collect::<Result<_, _>>()?,
            history: from_json(&turns, "decode turns")?,
            pause: pause.map(|p| from_json(&p, "decode pause")).transpose()?,
            new_lead: counted >= 1_000_000,
        })
    }

    async fn history(&self, session: &SessionId, last: usize) -> Result<Vec<Turn>, StoreError> {
        // LRANGE from -0 would be the whole list.
        if last == 0 {
            return Ok(Vec::new());
        }
        let start = -(isize::try_from(last).unwrap_or(isize::MAX));
        let raw: Vec<Vec<u8>> = self
            .conn()
            .lrange(key!(self, "session:{{{session}}}"), start, -1)
            .await
            .map_err(err("history"))?;
        raw.iter().map(|r| from_json(r, "decode turn")).collect()
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
        let mut inv = SCRIPTS
            .complete_turn
            .key(key!(self, "session:{{{session}}}"));
        inv.key(key!(self, "turns:{{{session}}}"));
        for k in turn_keys {
            inv.key(key!(self, "turn:{{{session}}}:{k}"));
        }
        inv.arg(to_json(completed)?)
            .arg(GUARD_TTL.as_secs())
            .arg(turns.len());
        for t in turns {
            inv.arg(to_json(t)?);
        }
        // A century at most: Redis refuses an expiry past its clock's range.
        inv.arg(keep.as_secs().clamp(1, 100 * 366 * 86_400))
            .arg(crate::conversations::retention_cutoff(keep))
            .arg(crate::conversations::TRIM_PER_COMPLETION);
        let earlier: Option<Vec<u8>> = inv
            .invoke_async(&mut self.conn())
            .await
            .map_err(err("complete turn"))?;
        if earlier.is_none() {
            // The turn record is what keeps a redelivered message from running the agent
            // again, and the turns are the conversation's history.
            self.replicated(&key!(self, "session:{{{session}}}"), "complete turn")
                .await;
        }
        match earlier {
            Some(earlier) => from_json(&earlier, "decode turn record"),
            None => Ok(completed.clone()),
        }
    }

    async fn set_pause(
        &self,
        session: &SessionId,
        pause: Option<&Pause>,
    ) -> Result<(), StoreError> {
        let key = key!(self, "pause:{{{session}}}");
        match pause {
            Some(p) => {
                let raw = serde_json::to_vec(p).map_err(StoreError::json("encode pause"))?;
                let _: () = self.conn().set(&key, raw).await.map_err(err("pause"))?;
            }
            None => {
                let _: i64 = self.conn().del(&key).await.map_err(err("resume"))?;
            }
        }
        // Lost in a failover, the agent would answer over the person, or stay silent.
        self.replicated(&key, "pause").await;
        Ok(())
    }

    async fn pause(&self, session: &SessionId) -> Result<Option<Pause>, StoreError> {
        self.get_json(key!(self, "pause:{{{session}}}")).await
    }

    async fn leads(&self, agent: &AgentId) -> Result<Vec<Lead>, StoreError> {
        let users: Vec<String> = self
            .conn()
            .zrange(key!(self, "leads:{{{agent}}}"), 0, -1)
            .await
            .map_err(err("leads"))?;
        let mut out = Vec::with_capacity(users.len());
        // The agent's leads share its slot: a pipeline of reads per chunk, not a round trip
        // per lead.
        for chunk in users.chunks(500) {
            let mut pipe = redis::pipe();
            for user in chunk {
                pipe.hgetall(key!(self, "lead:{{{agent}}}:{user}"));
            }
            let hashes: Vec<std::collections::HashMap<String, String>> = pipe
                .query_async(&mut self.conn())
                .await
                .map_err(err("leads"))?;
            for (user, h) in chunk.iter().zip(hashes) {
                let num = |f: &str| h.get(f).and_then(|v| v.parse::<i64>().ok());
                let mut lead = Lead {
                    phone: user.clone(),
                    platform: "whatsapp".into(),
                    profile_name: h.get("profile_name").cloned(),
                    first_seen: from_ms(num("first_seen").unwrap_or(0)),
                    last_seen: from_ms(num("last_seen").unwrap_or(0)),
                    message_count: u64::try_from(num("message_count").unwrap_or(0)).unwrap_or(0),
                    opted_out: false,
                    opted_out_at: None,
                };
                lead.consent(num("optout"), num("optin"));
                out.push(lead);
            }
        }
        Ok(out)
    }

    async fn last_inbound(
        &self,
        session: &SessionId,
    ) -> Result<Option<OffsetDateTime>, StoreError> {
        let v: Option<i64> = self
            .conn()
            .get(key!(self, "window:{{{session}}}"))
            .await
            .map_err(err("window"))?;
        Ok(v.map(from_ms))
    }

    async fn opt_out(&self, session: &SessionId, at: OffsetDateTime) -> Result<(), StoreError> {
        let _: i64 = SCRIPTS
            .stamp_max
            .key(key!(self, "optout:{{{session}}}"))
            .arg(ms(at))
            .invoke_async(&mut self.conn())
            .await
            .map_err(err("opt out"))?;
        // Losing it would send to a user who said STOP (or refuse one who said START).
        self.replicated(&key!(self, "optout:{{{session}}}"), "opt out")
            .await;
        self.stamp_lead(session, "optout", at).await
    }

    async fn opted_out_at(
        &self,
        session: &SessionId,
    ) -> Result<Option<OffsetDateTime>, StoreError> {
        let v: Option<i64> = self
            .conn()
            .get(key!(self, "optout:{{{session}}}"))
            .await
            .map_err(err("opt-out"))?;
        Ok(v.map(from_ms))
    }

    async fn opt_in(&self, session: &SessionId, at: OffsetDateTime) -> Result<(), StoreError> {
        let _: i64 = SCRIPTS
            .stamp_max
            .key(key!(self, "optin:{{{session}}}"))
            .arg(ms(at))
            .invoke_async(&mut self.conn())
            .await
            .map_err(err("opt in"))?;
        // Losing it would send to a user who said STOP (or refuse one who said START).
        self.replicated(&key!(self, "optin:{{{session}}}"), "opt in")
            .await;
        self.stamp_lead(session, "optin", at).await
    }

    async fn opted_in_at(&self, session: &SessionId) -> Result<Option<OffsetDateTime>, StoreError> {
        let v: Option<i64> = self
            .conn()
            .get(key!(self, "optin:{{{session}}}"))
            .await
            .map_err(err("opt-in"))?;
        Ok(v.map(from_ms))
    }

    async fn record_simulated(
        &self,
        session: &SessionId,
        body: &str,
        at: OffsetDateTime,
    ) -> Result<u64, StoreError> {
        let entry = serde_json::json!({"body": body, "at": ms(at)});
        self.conn()
            .rpush(key!(self, "outbox:{{{session}}}"), entry.to_string())
            .await
            .map_err(err("record simulated"))
    }

    async fn simulated(
        &self,
        session: &SessionId,
        after: u64,
    ) -> Result<Vec<SimulatedMessage>, StoreError> {
        let start = isize::try_from(after).unwrap_or(isize::MAX);
        let raw: Vec<String> = self
            .conn()
            .lrange(key!(self, "outbox:{{{session}}}"), start, -1)
            .await
            .map_err(err("simulated"))?;
        raw.iter()
            .zip(after.saturating_add(1)..)
            .map(|(r, index)| {
                let v: serde_json::Value =
                    serde_json::from_str(r).map_err(StoreError::json("decode outbox"))?;
                Ok(SimulatedMessage {
                    index,
                    body: v["body"].as_str().unwrap_or_default().to_owned(),
                    at: from_ms(v["at"].as_i64().unwrap_or(0)),
                })
            })
            .collect()
    }
}
