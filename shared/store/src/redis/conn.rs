//! The connection under the Redis store: one server, a Redis Cluster, or the master that Redis
//! Sentinel names. [`Conn`] is a [`ConnectionLike`], so the store's commands, pipelines and
//! scripts run unchanged on each; what differs is how a request finds its server.
//!
//! - One server: the redis crate's `ConnectionManager`, which reconnects on its own.
//! - Cluster: the crate's `cluster_async::ClusterConnection`, which routes each command by its
//!   key's slot and follows `MOVED`/`ASK` and a failover (a replica promoted) by refreshing its
//!   slot map. Every script and pipeline of the store touches one slot (see the key layout in
//!   the parent module), as the cluster demands.
//! - Sentinel: [`SentinelConn`], a multiplexed connection to the master Sentinel names, asked
//!   again after an error that says the server went away or is no longer the master (a
//!   `READONLY` reply from a demoted master), so the store follows a failover.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use redis::{
    Client, Cmd, ErrorKind, IntoConnectionInfo, Pipeline, RedisError, RedisFuture, RedisResult,
    ServerErrorKind, Value,
    aio::{ConnectionLike, ConnectionManager, MultiplexedConnection, PubSub},
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
    cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr},
    sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType},
};

use super::RedisTopology;

/// Time to open a TCP connection to a Redis server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a Redis server has to answer one request.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time the Sentinels have to name the master. The Sentinel client sets no time limit of its
/// own, and every request that finds no master connection waits for this question (one at a
/// time), so a Sentinel that does not answer would hold the whole store; past this, the
/// request fails and the next one asks again.
const SENTINEL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a write whose loss matters waits for a replica to have it ([`Redis::replicate`]).
pub(super) const REPLICA_WAIT: Duration = Duration::from_millis(200);

/// A connection to the store's Redis, whichever way it is deployed.
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(SentinelConn),
}

/// The store's Redis: its connection, and what the store needs besides commands.
#[derive(Clone)]
pub(super) struct Redis {
    pub(super) conn: Conn,
    /// Where change notifications are subscribed.
    subscribe: Subscribe,
}

#[derive(Clone)]
enum Subscribe {
    /// Any of these servers: one, or every node of a cluster (a `PUBLISH` on a cluster reaches
    /// every node).
    Nodes(Arc<Vec<Client>>),
    /// The master Sentinel names at the time.
    Sentinel(SentinelConn),
}

impl Redis {
    /// Connects to the Redis of `url` deployed as `topology`.
    pub(super) async fn connect(url: &str, topology: &RedisTopology) -> RedisResult<Redis> {
        match topology {
            RedisTopology::Single => {
                let client = Client::open(url)?;
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_number_of_retries(3);
                let conn = client.get_connection_manager_with_config(config).await?;
                Ok(Redis {
                    conn: Conn::Single(conn),
                    subscribe: Subscribe::Nodes(Arc::new(vec![client])),
                })
            }
            RedisTopology::Cluster => {
                let nodes: Vec<&str> = url
                    .split(',')
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                    .collect();
                if nodes.is_empty() {
                    return Err(invalid("WAGATE_REDIS_URL names no cluster node"));
                }
                let clients = nodes
                    .iter()
                    .map(|n| Client::open(*n))
                    .collect::<RedisResult<Vec<_>>>()?;
                let conn = ClusterClientBuilder::new(nodes)
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(RESPONSE_TIMEOUT)
                    .retries(6)
                    .build()?
                    .get_async_connection()
                    .await?;
                Ok(Redis {
                    conn: Conn::Cluster(conn),
                    subscribe: Subscribe::Nodes(Arc::new(clients)),
                })
            }
            RedisTopology::Sentinel { sentinels, master } => {
                let conn = SentinelConn::new(url, sentinels, master)?;
                // Fails now, not at the first command, when no Sentinel knows the master.
                conn.connection().await?;
                Ok(Redis {
                    conn: Conn::Sentinel(conn.clone()),
                    subscribe: Subscribe::Sentinel(conn),
                })
            }
        }
    }

    /// Whether writes are copied to replicas wagate should wait for ([`Self::replicate`]):
    /// on a cluster and under Sentinel, where a failover promotes a replica.
    pub(super) fn replicated(&self) -> bool {
        !matches!(self.conn, Conn::Single(_))
    }

    /// Whether every key is on one server (one server, or Sentinel's master): then writes to
    /// keys of different slots can go in one pipeline, which Redis runs in the order sent, so
    /// an operation that a cluster needs in ordered steps costs one round trip here.
    pub(super) fn one_server(&self) -> bool {
        !matches!(self.conn, Conn::Cluster(_))
    }

    /// Waits (at most [`REPLICA_WAIT`]) until a replica has every write this connection made to
    /// `key`'s server so far: `WAIT 1 <ms>`. Returns how many replicas acknowledged; 0 means the
    /// write stands on the master alone and a failover now could lose it (docs/operations.md).
    /// A no-op on a single server, which has no failover to survive.
    pub(super) async fn replicate(&self, key: &str) -> RedisResult<i64> {
        let mut wait = redis::cmd("WAIT");
        wait.arg(1).arg(REPLICA_WAIT.as_millis() as u64);
        match &self.conn {
            Conn::Single(_) => Ok(0),
            Conn::Cluster(cluster) => {
                // WAIT has no key; it must go to the master of `key`'s slot, where the write
                // went (the crate would otherwise send it to every node).
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::with_key(key, SlotAddr::Master),
                ));
                let answer = cluster.clone().route_command(wait, route).await?;
                redis::from_redis_value(answer).map_err(Into::into)
            }
            Conn::Sentinel(conn) => wait.query_async(&mut conn.clone()).await,
        }
    }

    /// A pub/sub connection for change notifications: to the first node that answers, or to
    /// the master Sentinel names.
    pub(super) async fn pubsub(&self) -> RedisResult<PubSub> {
        match &self.subscribe {
            Subscribe::Nodes(clients) => {
                let mut last = invalid("no Redis node to subscribe on");
                for client in clients.iter() {
                    match client.get_async_pubsub().await {
                        Ok(pubsub) => return Ok(pubsub),
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
            Subscribe::Sentinel(conn) => conn.master().await?.get_async_pubsub().await,
        }
    }
}

fn invalid(what: &'static str) -> RedisError {
    RedisError::from((ErrorKind::InvalidClientConfig, what))
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Sentinel(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Sentinel(c) => c.db,
        }
    }
}

/// A connection to the master that Sentinel names, asked for again after a failure that
/// suggests a failover: the connection dropped or timed out, the server refused it, or it
/// answered `READONLY` (a master demoted to replica) or `MASTERDOWN`. The request that met the
/// failure fails (the store's callers retry; a write may or may not have been applied, as on
/// any connection loss), and the next one connects to whichever master Sentinel names then.
#[derive(Clone)]
pub(super) struct SentinelConn {
    inner: Arc<SentinelInner>,
    db: i64,
}

struct SentinelInner {
    /// Asks the Sentinels; one question at a time (the client caches its Sentinel connections).
    sentinel: tokio::sync::Mutex<SentinelClient>,
    /// The master's connection with its generation, while it is believed to be the master.
    current: Mutex<Option<(u64, MultiplexedConnection)>>,
    generation: AtomicU64,
}

/// The master's client, as the Sentinels name it within [`SENTINEL_TIMEOUT`].
async fn ask_sentinels(sentinel: &mut SentinelClient) -> RedisResult<Client> {
    tokio::time::timeout(SENTINEL_TIMEOUT, sentinel.async_get_client())
        .await
        .unwrap_or_else(|_| {
            Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the Sentinels did not name the master in time",
            )))
        })
}

impl SentinelConn {
    fn new(url: &str, sentinels: &[String], master: &str) -> RedisResult<SentinelConn> {
        // The URL gives the password and db of the master (its host is not used).
        let info = url.into_connection_info()?;
        let redis = info.redis_settings().clone();
        let db = redis.db();
        let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(redis);
        let addrs: Vec<String> = sentinels.iter().map(|s| format!("redis://{s}")).collect();
        let client = SentinelClient::build(
            addrs,
            master.to_owned(),
            Some(node),
            SentinelServerType::Master,
        )?;
        Ok(SentinelConn {
            inner: Arc::new(SentinelInner {
                sentinel: tokio::sync::Mutex::new(client),
                current: Mutex::new(None),
                generation: AtomicU64::new(0),
            }),
            db,
        })
    }

    /// A client of the master Sentinel names now (checked to call itself master).
    async fn master(&self) -> RedisResult<Client> {
        let mut sentinel = self.inner.sentinel.lock().await;
        ask_sentinels(&mut sentinel).await
    }

    fn current(&self) -> Option<(u64, MultiplexedConnection)> {
        self.inner
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The master's connection, asking Sentinel for the master first if there is none.
    async fn connection(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(current) = self.current() {
            return Ok(current);
        }
        let mut sentinel = self.inner.sentinel.lock().await;
        // Another request may have connected while this one waited for the lock.
        if let Some(current) = self.current() {
            return Ok(current);
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let conn = ask_sentinels(&mut sentinel)
            .await?
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let generation = self.inner.generation.fetch_add(1, Ordering::Relaxed) + 1;
        *self.inner.current.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((generation, conn.clone()));
        Ok((generation, conn))
    }

    /// Drops the connection of `generation` after `error`, if the error says the master may
    /// have moved (and the connection was not replaced already).
    fn after_error(&self, generation: u64, error: &RedisError) {
        let moved = error.is_io_error()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
            || error.is_timeout()
            || error.is_unrecoverable_error()
            || matches!(
                error.kind(),
                ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
            );
        if moved {
            self.forget(generation);
        }
    }

    /// Drops the connection of `generation`, unless it was replaced already: the next request
    /// asks Sentinel where the master is.
    fn forget(&self, generation: u64) {
        let mut current = self.inner.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.as_ref().is_some_and(|(g, _)| *g == generation) {
            tracing::warn!(
                "the Redis master's connection failed or it is no longer master; asking Sentinel for the master again"
            );
            *current = None;
        }
    }
}

/// Whether a reply says its server is not (or no longer) a master that takes writes: a
/// `READONLY` or `MASTERDOWN` error, alone or inside a transaction's replies.
fn demoted(value: &Value) -> bool {
    match value {
        Value::ServerError(e) => matches!(
            e.kind(),
            Some(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
        ),
        Value::Array(values) => values
            .iter()
            .any(|v| matches!(v, Value::ServerError(_)) && demoted(v)),
        _ => false,
    }
}

impl ConnectionLike for SentinelConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let (generation, mut conn) = self.connection().await?;
            let answer = conn.req_packed_command(cmd).await;
            match &answer {
                Err(e) => self.after_error(generation, e),
                Ok(v) if demoted(v) => self.forget(generation),
                Ok(_) => {}
            }
            answer
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (generation, mut conn) = self.connection().await?;
            let answer = conn.req_packed_commands(pipeline, offset, count).await;
            match &answer {
                Err(e) => self.after_error(generation, e),
                Ok(values) if values.iter().any(demoted) => self.forget(generation),
                Ok(_) => {}
            }
            answer
        })
    }

    fn get_db(&self) -> i64 {
        self.db
    }
}
