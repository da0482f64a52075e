//! The store on Redis: one server, a Redis Cluster or a Sentinel-watched master ([`conn`]).
//! Keys start with the deployment prefix; keys that one script touches together share a
//! `{hash tag}` (a conversation's keys `{<session>}`, an agent's leads `{<agent>}`), so every
//! script, transaction and pipeline touches one slot and runs on Redis Cluster as on one
//! server. An operation that needs keys of two slots is done in single-slot steps, ordered so
//! that a crash between them is safe (each says why). Atomic steps are Lua scripts, so any
//! number of workers and senders can race safely. The same key names serve every deployment,
//! hash tags being harmless on one server. Writes whose loss in a failover matters wait for a
//! replica ([`RedisStore::replicated`]); docs/operations.md says what a failover can lose.
//!
//! Layout (`P` = prefix): `P:agent:<id>` and `P:channel:<id>` (JSON), `P:agents` (set),
//! `P:changes` (pub/sub), `P:session:{<session>}` (list of JSON turns),
//! `P:turn:{<session>}:<key>` (record of a completed turn), `P:lead:{<agent>}:<user>` (hash),
//! `P:leads:{<agent>}` (sorted set by first contact), `P:leadseen:{<agent>}:<sid>`,
//! `P:pause:{<session>}` (JSON), `P:window:{<session>}` (ms), `P:optout:{<session>}` (ms),
//! `P:optin:{<session>}` (ms),
//! `P:guard:<key>`, `P:sent:<twilio sid>` (the part sent), `P:status:<sid>` (hash),
//! `P:failures:<key>`, `P:outbox:{<session>}` (list: simulated sends), `P:content:<hash>`
//! (a cached Content API sid), `P:sigfail:<agent>` (the latest webhook refused for its
//! signature), `P:pace:{<sender>}` (a sender number's pace, [`super::pacing`]), `P:meta:key-check` (the master key check, `shared::key_check`); and two indexes that let a user be erased without
//! a SCAN: `P:turns:{<session>}` (set of the session's turn record keys) and
//! `P:sentto:{<session>}` (set of the Twilio sids of parts sent to the user), each kept as long
//! as the records it names.

use std::{sync::LazyLock, time::Duration};

use async_trait::async_trait;
use futures::{StreamExt, stream::BoxStream};
use redis::{AsyncCommands, Script};
use time::OffsetDateTime;
use tokio::sync::mpsc;

use super::{
    Change, CompletedTurn, GUARD_TTL, GuardState, Hold, Lead, LeadSighting, Pace, Pause,
    SentMessage, SignatureFailure, SimulatedMessage, Slot, Store, StoreError, Turn, TurnStart,
};
use twilio::status::{MessageStatus, StatusUpdate};
use wagate_core::{
    agent::{Agent, WhatsAppChannel},
    crypto::SealedSecret,
    domain::{AgentId, MessageSid, SessionId},
    envelope::OutboundReply,
    redact,
    window::WindowClocks,
};

mod conn;

use conn::{Conn, Redis};

/// How the Redis of `WAGATE_REDIS_URL` is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTopology {
    /// One server (its replicas, if any, are not wagate's business).
    Single,
    /// A Redis Cluster: `WAGATE_REDIS_URL` lists some of its nodes, comma-separated.
    Cluster,
    /// The master that these Sentinels (`host:port`) know as `master`.
    Sentinel {
        /// `host:port` of each Sentinel.
        sentinels: Vec<String>,
        /// The name the Sentinels monitor the master under.
        master: String,
    },
}

/// The key `$fmt` under `$store`'s prefix, built in one formatting pass and one allocation
/// (a `format!` of the rest and then of the prefix took two of each, about 1,000 instructions
/// apiece, a dozen times per message). The `let` ends the format arguments' borrow before any
/// await, so the futures stay `Send`.
macro_rules! key {
    ($store:expr, $($fmt:tt)+) => {{
        let key = $store.key(format_args!($($fmt)+));
        key
    }};
}

// KEYS[1] = lead hash, KEYS[2] = leads by first contact, KEYS[3..] = one "seen" mark per
// message; ARGV[1] = user, ARGV[2] = ttl (s), then per message its profile name and time (ms).
// Returns the messages counted, plus 1,000,000 when this call made the lead.
const RECORD_LEAD: &str = r#"
local counted = 0
local created = 0
for i = 3, #KEYS do
  local profile = ARGV[2 * i - 3]
  local at_text = ARGV[2 * i - 2]
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ARGV[2]) then
    local at = tonumber(at_text)
    if redis.call('HSETNX', KEYS[1], 'first_seen', at_text) == 1 then
      created = 1000000
      redis.call('HSET', KEYS[1], 'phone', ARGV[1], 'last_seen', at_text)
      redis.call('ZADD', KEYS[2], at, ARGV[1])
    else
      local first = tonumber(redis.call('HGET', KEYS[1], 'first_seen'))
      if at < first then
        redis.call('HSET', KEYS[1], 'first_seen', at_text)
        redis.call('ZADD', KEYS[2], at, ARGV[1])
      end
      local last = tonumber(redis.call('HGET', KEYS[1], 'last_seen') or '0')
      if at > last then redis.call('HSET', KEYS[1], 'last_seen', at_text) end
    end
    if profile ~= '' then redis.call('HSET', KEYS[1], 'profile_name', profile) end
    redis.call('HINCRBY', KEYS[1], 'message_count', 1)
    counted = counted + 1
  end
end
return counted + created
"#;

// KEYS[1] = window clock, KEYS[2] = session list, KEYS[3] = pause, KEYS[4..] = turn records of
// the messages; ARGV[1] = latest message time (ms), ARGV[2] = turns of history wanted, as
// digits (a Lua number would lose digits, and LRANGE takes no exponent). A missing pause is
// Lua's false, which reaches the client as nil.
const BEGIN_TURN: &str = r#"
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > cur then redis.call('SET', KEYS[1], ARGV[1]) end
local done = {}
local fresh = false
for i = 4, #KEYS do
  local record = redis.call('GET', KEYS[i])
  done[i - 3] = record
  if not record then fresh = true end
end
local history = {}
if fresh and ARGV[2] ~= '0' then history = redis.call('LRANGE', KEYS[2], '-' .. ARGV[2], -1) end
return {done, history, redis.call('GET', KEYS[3])}
"#;

// KEYS[1] = session list, KEYS[2] = the session's set of turn record keys (so that erasing the
// user finds them without a SCAN), KEYS[3..] = turn records; ARGV[1] = record, ARGV[2] = ttl,
// ARGV[3] = number of turns n, ARGV[4..3+n] = turns, ARGV[4+n] = how long history is kept (s),
// ARGV[5+n] = the retention cutoff (`retention_cutoff`), ARGV[6+n] = turns to drop at most.
// Returns the earlier record, or nil when this one was stored.
const COMPLETE_TURN: &str = r#"
local prev = redis.call('GET', KEYS[3])
if prev then return prev end
local n = tonumber(ARGV[3])
for i = 4, 3 + n do redis.call('RPUSH', KEYS[1], ARGV[i]) end
for i = 3, #KEYS do
  redis.call('SET', KEYS[i], ARGV[1], 'EX', ARGV[2])
  redis.call('SADD', KEYS[2], KEYS[i])
end
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

const STAMP_MAX: &str = r#"
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > cur then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
"#;

// The guard is `pending:<deadline ms>` while a sender holds it, `sent:<sid>` once posted.
// ARGV[1] = now (ms), ARGV[2] = lease (ms), ARGV[3] = ttl (s). A claim answers with the
// deadline it wrote, the holder's token for renewing ([`RENEW_SEND`]).
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

// KEYS[1] = the key check; ARGV[1] = a fresh check, stored unless one is. Returns the one that
// stands.
const KEY_CHECK: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur then return cur end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"#;

// KEYS[1] = a cached content sid; ARGV[1] = a fresh sid, stored for ARGV[2] seconds unless one
// is. Returns the one that stands.
const CACHE_CONTENT: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur then return cur end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return ARGV[1]
"#;

// KEYS[1] = the key check; replaced by ARGV[2] only while it is still ARGV[1].
const REPLACE_KEY_CHECK: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"#;

/// The scripts, hashed once: `EVALSHA` needs the SHA-1 of the script's text.
static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    record_lead: Script::new(RECORD_LEAD),
    begin_turn: Script::new(BEGIN_TURN),
    complete_turn: Script::new(COMPLETE_TURN),
    stamp_max: Script::new(STAMP_MAX),
    stamp_lead: Script::new(STAMP_LEAD),
    claim_send: Script::new(CLAIM_SEND),
    renew_send: Script::new(RENEW_SEND),
    settle_sent: Script::new(SETTLE_SENT),
    release_send: Script::new(RELEASE_SEND),
    record_status: Script::new(RECORD_STATUS),
    key_check: Script::new(KEY_CHECK),
    replace_key_check: Script::new(REPLACE_KEY_CHECK),
    cache_content: Script::new(CACHE_CONTENT),
    take_slot: Script::new(super::pacing::TAKE_SLOT),
});

struct Scripts {
    record_lead: Script,
    begin_turn: Script,
    complete_turn: Script,
    stamp_max: Script,
    stamp_lead: Script,
    claim_send: Script,
    renew_send: Script,
    settle_sent: Script,
    release_send: Script,
    record_status: Script,
    key_check: Script,
    replace_key_check: Script,
    cache_content: Script,
    take_slot: Script,
}

impl Scripts {
    /// The scripts that run in pipelines ([`RedisStore::scripted`]).
    fn pipelined(&self) -> [&Script; 3] {
        [&self.begin_turn, &self.record_lead, &self.claim_send]
    }
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

/// `EVALSHA` of `script` as a command of its own, for pipelines, which `Script` cannot join.
fn evalsha(script: &Script, keys: &[String]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys.len()).arg(keys);
    cmd
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

/// The store on Redis.
#[derive(Clone)]
pub struct RedisStore {
    redis: Redis,
    prefix: String,
}

impl RedisStore {
    /// Connects to one Redis server; fails with a clear message when Redis does not answer.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        Self::connect_to(url, &RedisTopology::Single, prefix).await
    }

    /// Connects to the Redis of `url` deployed as `topology`: `url` is one server's URL, a
    /// comma-separated list of cluster nodes, or (under Sentinel) gives only password and db.
    pub async fn connect_to(
        url: &str,
        topology: &RedisTopology,
        prefix: &str,
    ) -> Result<Self, StoreError> {
        let failed = |reason: String| StoreError::Connect {
            url: url
                .split(',')
                .map(redact::url)
                .collect::<Vec<_>>()
                .join(","),
            reason: redact::text(&reason),
        };
        let redis = tokio::time::timeout(Duration::from_secs(10), Redis::connect(url, topology))
            .await
            .map_err(|_| failed("no answer within 10s".into()))?
            .map_err(|e| failed(e.to_string()))?;
        Ok(Self {
            redis,
            prefix: prefix.to_owned(),
        })
    }

    /// Makes a write whose loss in a failover matters (`what`, to `key`) wait until a replica
    /// has it, when the deployment has failover (cluster, Sentinel). Redis replicates
    /// asynchronously, so an acknowledged write can die with its master; after this it dies
    /// only if the replica that has it is not the one promoted (with one replica per master,
    /// it is). A replica that does not answer within [`conn::REPLICA_WAIT`] is logged, not an
    /// error: the write did happen, and failing it would only repeat it.
    async fn replicated(&self, key: &str, what: &'static str) {
        if !self.redis.replicated() {
            return;
        }
        match self.redis.replicate(key).await {
            Ok(n) if n >= 1 => {}
            Ok(_) => tracing::warn!(
                write = what,
                "no Redis replica acknowledged the write in time: a failover now could lose it"
            ),
            Err(e) => tracing::warn!(
                write = what,
                error = %e,
                "could not wait for a Redis replica: a failover now could lose the write"
            ),
        }
    }

    /// The key `rest` under this store's prefix, in a buffer sized for the longest keys (a
    /// session's with a MessageSid) so that writing it never grows the buffer.
    fn key(&self, rest: impl std::fmt::Display) -> String {
        use std::fmt::Write;
        let mut key = String::with_capacity(self.prefix.len() + 128);
        key.push_str(&self.prefix);
        key.push(':');
        // Writing into a String cannot fail.
        let _ = write!(key, "{rest}");
        key
    }

    fn conn(&self) -> Conn {
        self.redis.conn.clone()
    }

    /// [`CLAIM_SEND`] of the guard `key` for `lease`, for [`Self::scripted`].
    fn claim_cmd(&self, key: &str, lease: Duration) -> redis::Cmd {
        let mut cmd = evalsha(&SCRIPTS.claim_send, &[key!(self, "guard:{key}")]);
        cmd.arg(ms(OffsetDateTime::now_utc()))
            .arg(lease_ms(lease))
            .arg(GUARD_TTL.as_secs());
        cmd
    }

    /// Runs a pipeline of `EVALSHA`s in one round trip. A Redis that lost its scripts (a
    /// restart, `SCRIPT FLUSH`) answers `NOSCRIPT`: they are loaded and the pipeline sent once
    /// more, which is safe because the scripts that were found ran idempotent steps.
    async fn scripted<T: redis::FromRedisValue>(
        &self,
        pipeline: &redis::Pipeline,
    ) -> redis::RedisResult<T> {
        match pipeline.query_async(&mut self.conn()).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                for script in SCRIPTS.pipelined() {
                    script.load_async(&mut self.conn()).await?;
                }
                pipeline.query_async(&mut self.conn()).await
            }
            other => other,
        }
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        key: String,
    ) -> Result<Option<T>, StoreError> {
        let raw: Option<Vec<u8>> = self.conn().get(key).await.map_err(err("get"))?;
        raw.map(|r| from_json(&r, "decode")).transpose()
    }

    /// Adds `message_sid` to the sids of parts sent to `part`'s user, so that erasing the user
    /// finds the sent parts and statuses, which are keyed by the sid alone. Written after the
    /// part: a crash between leaves one record unindexed, which lapses after [`GUARD_TTL`].
    async fn index_sent(&self, part: &OutboundReply, message_sid: &str) -> Result<(), StoreError> {
        let session = part.session_id();
        let index = key!(self, "sentto:{{{session}}}");
        let _: () = redis::pipe()
            .atomic()
            .sadd(&index, message_sid)
            .ignore()
            .expire(
                &index,
                i64::try_from(GUARD_TTL.as_secs()).unwrap_or(i64::MAX),
            )
            .ignore()
            .query_async(&mut self.conn())
            .await
            .map_err(err("index sent part"))?;
        Ok(())
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

    async fn notify(&self, id: &AgentId) -> Result<(), StoreError> {
        let _: i64 = self
            .conn()
            .publish(self.key("changes"), id.as_str())
            .await
            .map_err(err("publish change"))?;
        Ok(())
    }
}

fn err(context: &'static str) -> impl Fn(redis::RedisError) -> StoreError {
    move |source| StoreError::Redis { context, source }
}

fn from_json<T: serde::de::DeserializeOwned>(
    raw: &[u8],
    context: &'static str,
) -> Result<T, StoreError> {
    serde_json::from_slice(raw).map_err(StoreError::json(context))
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(StoreError::json("encode"))
}

fn ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// A lease in ms, at least 1: a lease of 0 would be taken over at once.
fn lease_ms(lease: Duration) -> u64 {
    u64::try_from(lease.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn from_ms(v: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(v) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

#[async_trait]
impl Store for RedisStore {
    async fn put_agent(&self, agent: &Agent) -> Result<(), StoreError> {
        let json = serde_json::to_vec(agent).map_err(StoreError::json("encode agent"))?;
        // The agent and the set of agents are keys of two slots on a cluster: the agent is
        // written first, so the set never names an agent that is missing ([`Self::agents`]
        // skips one anyway); a crash between the steps leaves an agent that is not listed
        // until it is put again, which the caller that saw the error does.
        let _: () = self
            .conn()
            .set(key!(self, "agent:{}", agent.id), json)
            .await
            .map_err(err("put agent"))?;
        let _: i64 = self
            .conn()
            .sadd(self.key("agents"), agent.id.as_str())
            .await
            .map_err(err("put agent"))?;
        self.notify(&agent.id).await
    }

    async fn agent(&self, id: &AgentId) -> Result<Option<Agent>, StoreError> {
        self.get_json(key!(self, "agent:{id}")).await
    }

    async fn agents(&self) -> Result<Vec<Agent>, StoreError> {
        let mut ids: Vec<String> = self
            .conn()
            .smembers(self.key("agents"))
            .await
            .map_err(err("list agents"))?;
        ids.sort();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(a) = self.get_json(key!(self, "agent:{id}")).await? {
                out.push(a);
            }
        }
        Ok(out)
    }

    async fn put_channel(&self, id: &AgentId, channel: &WhatsAppChannel) -> Result<(), StoreError> {
        let json = serde_json::to_vec(channel).map_err(StoreError::json("encode channel"))?;
        let _: () = self
            .conn()
            .set(key!(self, "channel:{id}"), json)
            .await
            .map_err(err("put channel"))?;
        self.notify(id).await
    }

    async fn channel(&self, id: &AgentId) -> Result<Option<WhatsAppChannel>, StoreError> {
        self.get_json(key!(self, "channel:{id}")).await
    }

    async fn changes(&self) -> Result<BoxStream<'static, Change>, StoreError> {
        let (tx, rx) = mpsc::channel(1024);
        let redis = self.redis.clone();
        let channel = self.key("changes");
        tokio::spawn(async move {
            loop {
                if let Ok(mut pubsub) = redis.pubsub().await
                    && pubsub.subscribe(&channel).await.is_ok()
                {
                    // Whatever changed while we were not subscribed is unknown.
                    if tx.send(Change::All).await.is_err() {
                        return;
                    }
                    let mut messages = pubsub.into_on_message();
                    while let Some(msg) = messages.next().await {
                        let Ok(raw) = msg.get_payload::<String>() else {
                            continue;
                        };
                        let Ok(id) = AgentId::parse(&raw) else {
                            continue;
                        };
                        if tx.send(Change::Agent(id)).await.is_err() {
                            return;
                        }
                    }
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Ok(tokio_stream_from(rx))
    }

    async fn delete_agent(&self, id: &AgentId) -> Result<bool, StoreError> {
        // Three slots on a cluster (agent, channel, the set): the channel goes first, so that
        // from then on no webhook is accepted; a crash before the rest leaves the agent listed
        // without a channel, and deleting it again finishes.
        let channel = key!(self, "channel:{id}");
        let _: i64 = self
            .conn()
            .del(&channel)
            .await
            .map_err(err("delete agent"))?;
        // A channel back after a failover would take the deleted agent's webhooks again.
        self.replicated(&channel, "delete agent").await;
        let existed: i64 = self
            .conn()
            .del(key!(self, "agent:{id}"))
            .await
            .map_err(err("delete agent"))?;
        let _: i64 = self
            .conn()
            .srem(self.key("agents"), id.as_str())
            .await
            .map_err(err("delete agent"))?;
        let _: i64 = self
            .conn()
            .del(key!(self, "sigfail:{id}"))
            .await
            .map_err(err("delete agent"))?;
        self.notify(id).await?;
        Ok(existed == 1)
    }

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
        let Some(latest) = super::latest_sighting(session, sightings)? else {
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
        let mut begin = evalsha(&SCRIPTS.begin_turn, &keys);
        begin.arg(ms(latest)).arg(history.min(i64::MAX as usize));
        let mut lead = evalsha(
            &SCRIPTS.record_lead,
            &lead_keys(self, session, sightings.iter().map(|s| s.message_sid)),
        );
        lead_args(&mut lead, session, sightings);
        // The conversation's keys and the agent's leads are two slots on a cluster: two
        // scripts, sent together. Both are idempotent (the lead counts each message once by its
        // "seen" mark), so when either fails the whole begin is simply done again.
        let begin = redis::pipe().add_command(begin).clone();
        let lead = redis::pipe().add_command(lead).clone();
        type Begun = ((Vec<Option<Vec<u8>>>, Vec<Vec<u8>>, Option<Vec<u8>>),);
        let (begun, counted) = tokio::join!(
            self.scripted::<Begun>(&begin),
            self.scripted::<(i64,)>(&lead)
        );
        let ((completed, turns, pause),) = begun.map_err(err("begin turn"))?;
        let (counted,) = counted.map_err(err("begin turn"))?;
        Ok(TurnStart {
            completed: completed
                .iter()
                .map(|r| {
                    r.as_deref()
                        .map(|r| from_json(r, "decode turn record"))
                        .transpose()
                })
                .collect::<Result<_, _>>()?,
            history: turns
                .iter()
                .map(|r| from_json(r, "decode turn"))
                .collect::<Result<_, _>>()?,
            pause: pause.map(|p| from_json(&p, "decode pause")).transpose()?,
            new_lead: counted >= 1_000_000,
        })
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

    async fn completed_turn(
        &self,
        session: &SessionId,
        turn_key: &str,
    ) -> Result<Option<CompletedTurn>, StoreError> {
        self.get_json(key!(self, "turn:{{{session}}}:{turn_key}"))
            .await
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
            .arg(super::retention_cutoff(keep))
            .arg(super::TRIM_PER_COMPLETION);
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

    async fn record_lead(&self, s: &LeadSighting<'_>) -> Result<(), StoreError> {
        let mut cmd = evalsha(
            &SCRIPTS.record_lead,
            &lead_keys(self, s.session, std::iter::once(s.message_sid)),
        );
        lead_args(&mut cmd, s.session, std::slice::from_ref(s));
        let _: (i64,) = self
            .scripted(redis::pipe().add_command(cmd))
            .await
            .map_err(err("record lead"))?;
        Ok(())
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

    async fn stamp_inbound(
        &self,
        session: &SessionId,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let _: i64 = SCRIPTS
            .stamp_max
            .key(key!(self, "window:{{{session}}}"))
            .arg(ms(at))
            .invoke_async(&mut self.conn())
            .await
            .map_err(err("stamp window"))?;
        Ok(())
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

    async fn claim_send(&self, key: &str, lease: Duration) -> Result<GuardState, StoreError> {
        let (answer,): (String,) = self
            .scripted(redis::pipe().add_command(self.claim_cmd(key, lease)))
            .await
            .map_err(err("claim send"))?;
        guard_state(&answer)
    }

    async fn claim_send_with_clocks(
        &self,
        session: &SessionId,
        key: &str,
        lease: Duration,
    ) -> Result<(GuardState, WindowClocks), StoreError> {
        let clocks = redis::cmd("MGET")
            .arg(key!(self, "window:{{{session}}}"))
            .arg(key!(self, "optout:{{{session}}}"))
            .arg(key!(self, "optin:{{{session}}}"))
            .clone();
        // The clocks are the conversation's keys, the guard the part's: two slots on a cluster,
        // so two requests sent together (the pipeline they were is not atomic either).
        type Clocks = (Option<i64>, Option<i64>, Option<i64>);
        let claim = redis::pipe()
            .add_command(self.claim_cmd(key, lease))
            .clone();
        let mut conn = self.conn();
        let (clocks, claimed) = tokio::join!(
            clocks.query_async::<Clocks>(&mut conn),
            self.scripted::<(String,)>(&claim)
        );
        let (last_inbound, opted_out_at, opted_in_at) = clocks.map_err(err("claim send"))?;
        let (answer,) = claimed.map_err(err("claim send"))?;
        Ok((
            guard_state(&answer)?,
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
        // The part sent as the message, then the guard: keys of two slots on a cluster. A guard
        // that says `sent:` always has its message's part recorded; a sender that dies between
        // the steps leaves the guard pending, to lapse, and whoever takes the part next finds
        // the message in Twilio's list and settles on it ([`Self::settle_sent`]) as this part's.
        let guard = key!(self, "guard:{key}");
        let _: () = self
            .conn()
            .set_ex(
                key!(self, "sent:{message_sid}"),
                to_json(part)?,
                GUARD_TTL.as_secs(),
            )
            .await
            .map_err(err("mark sent"))?;
        let _: () = self
            .conn()
            .set_ex(&guard, format!("sent:{message_sid}"), GUARD_TTL.as_secs())
            .await
            .map_err(err("mark sent"))?;
        // The send ledger: a guard lost in a failover would send the part again.
        self.replicated(&guard, "mark sent").await;
        self.index_sent(part, message_sid).await
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
        let _: () = self
            .conn()
            .set_ex(&guard, format!("sent:{message_sid}"), GUARD_TTL.as_secs())
            .await
            .map_err(err("settle sent"))?;
        self.replicated(&guard, "settle sent").await;
        self.index_sent(part, message_sid).await?;
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

    async fn key_check(&self, fresh: &SealedSecret) -> Result<SealedSecret, StoreError> {
        let stands: String = SCRIPTS
            .key_check
            .key(self.key("meta:key-check"))
            .arg(fresh.as_str())
            .invoke_async(&mut self.conn())
            .await
            .map_err(err("key check"))?;
        Ok(SealedSecret::from_stored(stands))
    }

    async fn replace_key_check(
        &self,
        old: &SealedSecret,
        new: &SealedSecret,
    ) -> Result<bool, StoreError> {
        let replaced: i64 = SCRIPTS
            .replace_key_check
            .key(self.key("meta:key-check"))
            .arg(old.as_str())
            .arg(new.as_str())
            .invoke_async(&mut self.conn())
            .await
            .map_err(err("replace key check"))?;
        Ok(replaced == 1)
    }

    async fn note_signature_failure(
        &self,
        agent: &AgentId,
        failure: &SignatureFailure,
    ) -> Result<(), StoreError> {
        let _: () = self
            .conn()
            .set_ex(
                key!(self, "sigfail:{agent}"),
                to_json(failure)?,
                GUARD_TTL.as_secs(),
            )
            .await
            .map_err(err("note signature failure"))?;
        Ok(())
    }

    async fn signature_failure(
        &self,
        agent: &AgentId,
    ) -> Result<Option<SignatureFailure>, StoreError> {
        self.get_json(key!(self, "sigfail:{agent}")).await
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
            .arg(super::CONTENT_TTL.as_secs())
            .invoke_async(&mut self.conn())
            .await
            .map_err(err("cache content sid"))
    }

    async fn take_send_slot(&self, sender: &str, pace: Pace) -> Result<Slot, StoreError> {
        let wait: u64 = SCRIPTS
            .take_slot
            .key(key!(self, "pace:{{{sender}}}"))
            .arg(super::pacing::micros(pace.interval))
            .arg(super::pacing::micros(pace.tolerance))
            .arg(super::pacing::micros(pace.grace))
            .invoke_async(&mut self.conn())
            .await
            .map_err(err("take send slot"))?;
        Ok(match wait {
            0 => Slot::Go,
            micros => Slot::Wait(Duration::from_micros(micros)),
        })
    }

    async fn ready(&self) -> Result<(), StoreError> {
        let pong: String = redis::cmd("PING")
            .query_async(&mut self.conn())
            .await
            .map_err(err("Redis not answering"))?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(StoreError::Invalid(format!(
                "Redis answered PING with {pong}"
            )))
        }
    }
}

fn tokio_stream_from<T: Send + 'static>(mut rx: mpsc::Receiver<T>) -> BoxStream<'static, T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}
