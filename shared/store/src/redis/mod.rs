//! The store on Redis: one server, a Redis Cluster or a Sentinel-watched master ([`conn`]).
//! Keys start with the deployment prefix; keys that one script touches together share a
//! `{hash tag}` (a conversation's keys `{<session>}`, an agent's leads `{<agent>}`), so every
//! script, transaction and pipeline touches one slot and runs on Redis Cluster as on one
//! server. An operation that needs keys of two slots is done in single-slot steps, ordered so
//! that a crash between them is safe (each says why). Atomic steps are Lua scripts, kept with
//! the code that runs them, so any number of workers and senders can race safely. The same key
//! names serve every deployment, hash tags being harmless on one server. Writes whose loss in a
//! failover matters wait for a replica ([`RedisStore::replicated`]); docs/operations.md says
//! what a failover can lose.
//!
//! Layout (`P` = prefix), by concern:
//!
//! - `agents.rs`: `P:agent:<id>` and `P:channel:<id>` (JSON), `P:agents` (set), `P:changes`
//!   (pub/sub), `P:sigfail:<agent>` (the latest webhook refused for its signature),
//!   `P:meta:key-check` (the master key check, `shared::key_check`).
//! - `conversations.rs`: `P:session:{<session>}` (list of JSON turns), `P:turn:{<session>}:<key>`
//!   (record of a completed turn), `P:lead:{<agent>}:<user>` (hash), `P:leads:{<agent>}`
//!   (sorted set by first contact), `P:leadseen:{<agent>}:<sid>`, `P:pause:{<session>}`
//!   (JSON), `P:window:{<session>}`, `P:optout:{<session>}` and `P:optin:{<session>}` (ms),
//!   `P:outbox:{<session>}` (list: simulated sends).
//! - `ledger.rs`: `P:guard:<key>`, `P:sent:<twilio sid>` (the part sent), `P:status:<sid>`
//!   (hash), `P:failures:<key>`, `P:content:<hash>` (a cached Content API sid),
//!   `P:pace:{<sender>}` (a sender number's pace, [`crate::pacing`]).
//!
//! And two indexes that let a user be erased without a SCAN: `P:turns:{<session>}` (set of the
//! session's turn record keys) and `P:sentto:{<session>}` (set of the Twilio sids of parts sent
//! to the user), each kept as long as the records it names.

use std::time::Duration;

use async_trait::async_trait;
use redis::{AsyncCommands, Script};

use wagate_core::redact;

use crate::{Store, StoreError, from_ms, ms};

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

mod agents;
mod conn;
mod conversations;
mod ledger;

use conn::{Conn, Redis};

/// `EVALSHA` of `script` as a command of its own, for pipelines, which `Script` cannot join.
fn evalsha(script: &Script, keys: &[String]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys.len()).arg(keys);
    cmd
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

    /// Runs a pipeline of `EVALSHA`s of `script` in one round trip. A Redis that lost its
    /// scripts (a restart, `SCRIPT FLUSH`) answers `NOSCRIPT`: the script is loaded and the
    /// pipeline sent once more, which is safe because the steps that did run are idempotent.
    async fn scripted<T: redis::FromRedisValue>(
        &self,
        pipeline: &redis::Pipeline,
        script: &Script,
    ) -> redis::RedisResult<T> {
        match pipeline.query_async(&mut self.conn()).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                script.load_async(&mut self.conn()).await?;
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

/// A lease in ms, at least 1: a lease of 0 would be taken over at once.
fn lease_ms(lease: Duration) -> u64 {
    u64::try_from(lease.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[async_trait]
impl Store for RedisStore {
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
