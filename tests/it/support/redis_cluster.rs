//! Redis deployed with failover, as real processes on free ports (no containers): a Redis
//! Cluster of 3 masters and 3 replicas, and a Sentinel setup of 1 master, 1 replica and 3
//! Sentinels. Each server is a child killed on drop, and also watched by a tiny shell loop that
//! kills it once the test process is gone, so a setup kept in a `static` (shared by the tests
//! of one binary) does not outlive the binary.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use super::harness::{Proc, free_port};

/// One redis-server (or Sentinel) process.
pub struct Node {
    pub port: u16,
    proc: Option<Proc>,
}

impl Node {
    /// `redis-server` with `args`, listening on loopback at `port`.
    fn start(port: u16, args: &[String]) -> Node {
        let child = Command::new("redis-server")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start redis-server (scripts/test-deps)");
        watch(&child);
        Node {
            port,
            proc: Some(Proc(child)),
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        self.proc = None;
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        let client = redis::Client::open(self.url())?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        cmd.query_async(&mut conn).await
    }

    async fn info(&self, section: &str) -> String {
        self.query(redis::cmd("INFO").arg(section))
            .await
            .unwrap_or_default()
    }

    /// Whether this server is a master (its `ROLE`).
    pub async fn is_master(&self) -> bool {
        self.info("replication").await.contains("role:master")
    }
}

/// Kills `child` when this test process exits (a process in a `static` is never dropped).
fn watch(child: &Child) {
    let script = format!(
        "while kill -0 {me} 2>/dev/null && kill -0 {it} 2>/dev/null; do sleep 0.5; done; kill -9 {it} 2>/dev/null",
        me = std::process::id(),
        it = child.id()
    );
    let _ = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}

fn data_server_args(port: u16, dir: &Path) -> Vec<String> {
    [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        &dir.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

async fn wait_tcp(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("redis-server did not listen on port {port} within 15s");
}

async fn until(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Redis Cluster of 3 masters with a replica each, made by `redis-cli --cluster create`. A
/// node is failed after 1 s of silence (`cluster-node-timeout`), and the other masters' slots
/// keep answering meanwhile (`cluster-require-full-coverage no`).
pub struct RedisCluster {
    pub nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    pub async fn start() -> RedisCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let port = free_port();
            let node_dir = dir.path().join(port.to_string());
            std::fs::create_dir_all(&node_dir).unwrap();
            let mut args = data_server_args(port, &node_dir);
            args.extend(
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "1000",
                    "--cluster-replica-validity-factor",
                    "0",
                    "--cluster-require-full-coverage",
                    "no",
                ]
                .map(str::to_owned),
            );
            nodes.push(Node::start(port, &args));
        }
        for node in &nodes {
            wait_tcp(node.port).await;
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("cannot run redis-cli (scripts/test-deps installs redis-tools)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes, _dir: dir };
        until(
            "the cluster to be formed",
            Duration::from_secs(30),
            async || {
                for node in &cluster.nodes {
                    let info = node
                        .query::<String>(redis::cmd("CLUSTER").arg("INFO"))
                        .await;
                    let ok = info.is_ok_and(|i| {
                        i.contains("cluster_state:ok") && i.contains("cluster_known_nodes:6")
                    });
                    if !ok {
                        return false;
                    }
                }
                // Every master has its replica attached.
                let mut replicas = 0;
                for node in &cluster.nodes {
                    let info = node.info("replication").await;
                    if info.contains("role:slave") && info.contains("master_link_status:up") {
                        replicas += 1;
                    }
                }
                replicas == 3
            },
        )
        .await;
        cluster
    }

    /// `WAGATE_REDIS_URL`: every node, comma-separated.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(Node::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node that is master of `slot` now.
    pub async fn master_of_slot(&self, slot: u16) -> usize {
        for node in &self.nodes {
            let Ok(slots) = node
                .query::<redis::Value>(redis::cmd("CLUSTER").arg("SLOTS"))
                .await
            else {
                continue;
            };
            let redis::Value::Array(ranges) = slots else {
                continue;
            };
            for range in ranges {
                let redis::Value::Array(r) = range else {
                    continue;
                };
                let (Some(redis::Value::Int(lo)), Some(redis::Value::Int(hi))) =
                    (r.first(), r.get(1))
                else {
                    continue;
                };
                if !(*lo..=*hi).contains(&i64::from(slot)) {
                    continue;
                }
                if let Some(redis::Value::Array(master)) = r.get(2)
                    && let Some(redis::Value::Int(port)) = master.get(1)
                {
                    let port = u16::try_from(*port).unwrap();
                    return self.nodes.iter().position(|n| n.port == port).unwrap();
                }
            }
        }
        panic!("no node is master of slot {slot}");
    }

    /// A cluster connection of the redis crate (the test's own, not wagate's).
    pub async fn client(&self) -> redis::cluster_async::ClusterConnection {
        redis::cluster::ClusterClientBuilder::new(self.nodes.iter().map(Node::url))
            .connection_timeout(Duration::from_secs(1))
            .response_timeout(Duration::from_secs(2))
            .retries(2)
            .build()
            .unwrap()
            .get_async_connection()
            .await
            .unwrap()
    }

    /// The cluster of the tests of this binary that do not kill nodes (each test keeps to a key
    /// prefix of its own).
    pub async fn shared() -> &'static RedisCluster {
        static SHARED: OnceLock<RedisCluster> = OnceLock::new();
        static STARTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _one_at_a_time = STARTING.lock().await;
        if let Some(c) = SHARED.get() {
            return c;
        }
        let c = RedisCluster::start().await;
        SHARED.get_or_init(|| c)
    }
}

/// A master with one replica, watched by three Sentinels (quorum 2) as `mymaster`; a master
/// silent for 1 s is failed over.
pub struct RedisSentinel {
    /// The master as started, then its replica.
    pub data: Vec<Node>,
    pub sentinels: Vec<Node>,
    _dir: tempfile::TempDir,
}

pub const SENTINEL_MASTER: &str = "mymaster";

impl RedisSentinel {
    pub async fn start() -> RedisSentinel {
        let dir = tempfile::tempdir().expect("tempdir");
        let master_port = free_port();
        let replica_port = free_port();
        let mut data = Vec::new();
        for (port, replica_of) in [(master_port, None), (replica_port, Some(master_port))] {
            let node_dir = dir.path().join(port.to_string());
            std::fs::create_dir_all(&node_dir).unwrap();
            let mut args = data_server_args(port, &node_dir);
            if let Some(master) = replica_of {
                args.extend(["--replicaof".into(), "127.0.0.1".into(), master.to_string()]);
            }
            data.push(Node::start(port, &args));
        }
        for node in &data {
            wait_tcp(node.port).await;
        }
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let conf = dir.path().join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                     sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                     sentinel failover-timeout {SENTINEL_MASTER} 5000\n\
                     sentinel parallel-syncs {SENTINEL_MASTER} 1\n",
                    dir = dir.path().display()
                ),
            )
            .unwrap();
            sentinels.push(Node::start(
                port,
                &[conf.display().to_string(), "--sentinel".into()],
            ));
        }
        for node in &sentinels {
            wait_tcp(node.port).await;
        }
        let setup = RedisSentinel {
            data,
            sentinels,
            _dir: dir,
        };
        until(
            "the Sentinels to know the replica and each other",
            Duration::from_secs(30),
            async || {
                for s in &setup.sentinels {
                    let quorum = s
                        .query::<String>(
                            redis::cmd("SENTINEL").arg("CKQUORUM").arg(SENTINEL_MASTER),
                        )
                        .await;
                    if !quorum.is_ok_and(|q| q.contains("3 usable")) {
                        return false;
                    }
                    let replicas = s
                        .query::<Vec<redis::Value>>(
                            redis::cmd("SENTINEL").arg("REPLICAS").arg(SENTINEL_MASTER),
                        )
                        .await;
                    if replicas.map(|r| r.len()).unwrap_or(0) < 1 {
                        return false;
                    }
                }
                setup.data[1]
                    .info("replication")
                    .await
                    .contains("master_link_status:up")
            },
        )
        .await;
        setup
    }

    /// `WAGATE_REDIS_SENTINELS`.
    pub fn sentinels(&self) -> String {
        self.sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `WAGATE_REDIS_URL`: a host Sentinel mode ignores (nothing listens there), and db 0.
    pub fn url(&self) -> String {
        "redis://127.0.0.1:1/0".into()
    }

    /// The index in `data` of the node that is master now.
    pub async fn master(&self) -> Option<usize> {
        for (i, node) in self.data.iter().enumerate() {
            if node.proc.is_some() && node.is_master().await {
                return Some(i);
            }
        }
        None
    }

    /// The setup of the tests of this binary that do not kill servers.
    pub async fn shared() -> &'static RedisSentinel {
        static SHARED: OnceLock<RedisSentinel> = OnceLock::new();
        static STARTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _one_at_a_time = STARTING.lock().await;
        if let Some(s) = SHARED.get() {
            return s;
        }
        let s = RedisSentinel::start().await;
        SHARED.get_or_init(|| s)
    }
}
