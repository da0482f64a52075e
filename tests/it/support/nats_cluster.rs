//! A nats-server cluster with JetStream for one test: real processes on free ports, routes
//! between them, each with its own store in a temp folder, named `n1`, `n2`, … (`--server_name`),
//! so that the leader JetStream reports for a stream maps to a process this harness can kill
//! (SIGKILL) and start again on the same ports and store.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use super::harness::{Proc, free_port, nats_binary};

/// One server of the cluster.
pub struct NatsNode {
    /// Its `--server_name`, as JetStream reports leaders and replicas.
    pub name: String,
    /// Where clients connect.
    pub client_port: u16,
    cluster_port: u16,
    proc: Option<Proc>,
}

/// A running cluster; every server is killed when it drops.
pub struct NatsCluster {
    pub nodes: Vec<NatsNode>,
    routes: String,
    pub dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts `size` servers routed to each other and waits until JetStream has a meta leader
    /// (before that, creating a stream fails).
    pub async fn start(size: usize) -> NatsCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let nodes: Vec<NatsNode> = (1..=size)
            .map(|i| NatsNode {
                name: format!("n{i}"),
                client_port: free_port(),
                cluster_port: free_port(),
                proc: None,
            })
            .collect();
        let routes = nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.cluster_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = NatsCluster { nodes, routes, dir };
        for i in 0..size {
            cluster.spawn(i);
        }
        for i in 0..size {
            cluster.wait_listening(i).await;
        }
        cluster.wait_meta_leader().await;
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let node = &self.nodes[i];
        let store = self.dir.path().join(&node.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", node.name)))
            .expect("log file");
        let child = Command::new(nats_binary())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &node.client_port.to_string(),
                "-js",
            ])
            .args(["--server_name", &node.name, "--cluster_name", "wagate"])
            .args([
                "--cluster",
                &format!("nats://127.0.0.1:{}", node.cluster_port),
                "--routes",
                &self.routes,
                "-sd",
            ])
            .arg(store)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect(
                "cannot start nats-server: run scripts/test-deps, or set WAGATE_TEST_NATS_SERVER",
            );
        self.nodes[i].proc = Some(Proc(child));
    }

    async fn wait_listening(&mut self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(15);
        let port = self.nodes[i].client_port;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if let Some(Proc(child)) = self.nodes[i].proc.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "nats-server {} exited early with {status}:\n{}",
                    self.nodes[i].name,
                    self.log(&self.nodes[i].name)
                );
            }
            assert!(
                Instant::now() < deadline,
                "nats-server {} did not listen",
                self.nodes[i].name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What a server logged.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Every server, as `WAGATE_NATS_URL` takes them.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A client of the whole cluster (it reconnects to another server when one dies).
    pub async fn client(&self) -> async_nats::Client {
        let servers: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client_port))
            .collect();
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(servers)
            .await
            .expect("connect to the cluster")
    }

    fn index(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .unwrap_or_else(|| panic!("no server {name}"))
    }

    /// Kills the server `name` with SIGKILL; its store stays.
    pub fn kill(&mut self, name: &str) {
        let i = self.index(name);
        self.nodes[i].proc = None;
    }

    /// Starts the server `name` again on its ports and store.
    pub async fn restart(&mut self, name: &str) {
        let i = self.index(name);
        self.spawn(i);
        self.wait_listening(i).await;
    }

    /// Waits until JetStream answers account requests, which it does once the servers have
    /// elected a meta leader.
    pub async fn wait_meta_leader(&self) {
        let js = async_nats::jetstream::new(self.client().await);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(2), js.query_account()).await
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "JetStream elected no meta leader within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The stream's cluster information as its leader reports it, `None` while it has no
    /// leader (or does not answer within a second).
    pub async fn stream_cluster(
        js: &async_nats::jetstream::Context,
        stream: &str,
    ) -> Option<async_nats::jetstream::stream::ClusterInfo> {
        let info = async {
            let mut s = js.get_stream(stream).await.ok()?;
            s.info().await.ok()?.cluster.clone()
        };
        tokio::time::timeout(Duration::from_secs(1), info)
            .await
            .ok()
            .flatten()
            .filter(|c| c.leader.is_some())
    }

    /// Waits until `stream` has a leader other than `not` (any, with `None`); returns its name.
    pub async fn wait_stream_leader(
        js: &async_nats::jetstream::Context,
        stream: &str,
        not: Option<&str>,
        timeout: Duration,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(leader) = Self::stream_cluster(js, stream)
                .await
                .and_then(|c| c.leader)
                && Some(leader.as_str()) != not
            {
                return leader;
            }
            assert!(
                Instant::now() < deadline,
                "stream {stream} had no new leader within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every replica of `stream` is current (a restarted server caught up).
    pub async fn wait_stream_current(
        js: &async_nats::jetstream::Context,
        stream: &str,
        replicas: usize,
        timeout: Duration,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = Self::stream_cluster(js, stream).await
                && c.replicas.len() + 1 == replicas
                && c.replicas.iter().all(|p| p.current && !p.offline)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "stream {stream}: replicas not current within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One nats-server with JetStream on a free port, with `args` added (authentication, TLS, a
/// configuration file); its store and log in `dir`. Killed when the `Proc` drops.
pub async fn single_server(dir: &std::path::Path, args: &[String]) -> (Proc, u16) {
    let port = free_port();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("nats.log"))
        .expect("log file");
    let mut child = Command::new(nats_binary())
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir.join("nats-store"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("cannot start nats-server: run scripts/test-deps, or set WAGATE_TEST_NATS_SERVER");
    let deadline = Instant::now() + Duration::from_secs(15);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "nats-server exited early with {status}:\n{}",
                std::fs::read_to_string(dir.join("nats.log")).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "nats-server did not listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (Proc(child), port)
}
