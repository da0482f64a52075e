//! NATS and Redis as users who outgrow one box run them, for the scaling benchmark: a 3-node
//! JetStream cluster (wagate's streams with 3 replicas) and a Redis Cluster of 3 masters with a
//! replica each, every server a process of its own on free ports, as the tests' clusters are.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::procs::{Proc, Servers, free_port, nats_binary, redis_server};

/// nats-servers in the JetStream cluster, and so the replicas of every stream.
const NATS_NODES: usize = 3;
/// Redis Cluster nodes: 3 masters and their replicas.
const REDIS_NODES: usize = 6;

/// Starts both clusters in `dir` and waits until each can take writes.
pub async fn start(dir: &Path) -> Result<Servers> {
    std::fs::create_dir_all(dir)?;
    let (nats, nats_url) = nats_cluster(dir).await?;
    let (redis, redis_url) = redis_cluster(dir).await?;
    let mut data: Vec<_> = (1..=NATS_NODES)
        .map(|i| dir.join(format!("nats-n{i}")))
        .collect();
    data.extend((1..=REDIS_NODES).map(|i| dir.join(format!("redis-{i}"))));
    Ok(Servers {
        nats_url,
        redis_url,
        nats,
        redis,
        env: vec![
            ("WAGATE_NATS_REPLICAS".into(), NATS_NODES.to_string()),
            ("WAGATE_REDIS_CLUSTER".into(), "true".into()),
        ],
        data,
    })
}

async fn nats_cluster(dir: &Path) -> Result<(Vec<Proc>, String)> {
    let ports: Vec<(u16, u16)> = (0..NATS_NODES)
        .map(|_| Ok((free_port()?, free_port()?)))
        .collect::<Result<_>>()?;
    let routes = ports
        .iter()
        .map(|(_, route)| format!("nats://127.0.0.1:{route}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut procs = Vec::new();
    for (i, (client, route)) in ports.iter().enumerate() {
        let name = format!("n{}", i + 1);
        let mut cmd = Command::new(nats_binary());
        cmd.args(["-a", "127.0.0.1", "-p", &client.to_string(), "-js"])
            .args(["--server_name", &name, "--cluster_name", "bench"])
            .args(["--cluster", &format!("nats://127.0.0.1:{route}")])
            .args(["--routes", &routes, "-sd"])
            .arg(dir.join(format!("nats-{name}")));
        let log = dir.join(format!("nats-{name}.log"));
        procs.push(Proc::spawn("nats-server", cmd, &log)?);
    }
    for (p, (client, _)) in procs.iter_mut().zip(&ports) {
        p.wait_port(*client).await?;
    }
    let url = ports
        .iter()
        .map(|(client, _)| format!("nats://127.0.0.1:{client}"))
        .collect::<Vec<_>>()
        .join(",");
    wait_meta_leader(&url).await?;
    Ok((procs, url))
}

/// Until the servers have elected a JetStream meta leader, creating a stream fails.
async fn wait_meta_leader(url: &str) -> Result<()> {
    let servers = url
        .split(',')
        .map(str::parse::<async_nats::ServerAddr>)
        .collect::<Result<Vec<_>, _>>()?;
    let client = async_nats::connect(servers).await?;
    let js = async_nats::jetstream::new(client);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(
        tokio::time::timeout(Duration::from_secs(2), js.query_account()).await,
        Ok(Ok(_))
    ) {
        if Instant::now() > deadline {
            bail!("the NATS cluster elected no JetStream meta leader within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn redis_cluster(dir: &Path) -> Result<(Vec<Proc>, String)> {
    let cluster_args = |node: usize| -> Vec<String> {
        [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            &format!("nodes-{node}.conf"),
            "--cluster-node-timeout",
            "1000",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let mut nodes = Vec::new();
    for i in 1..=REDIS_NODES {
        let port = free_port()?;
        let proc = redis_server(dir, port, &format!("redis-{i}"), &cluster_args(i), &[])?;
        nodes.push((proc, port));
    }
    for (p, port) in &mut nodes {
        p.wait_port(*port).await?;
    }
    let addrs: Vec<String> = nodes
        .iter()
        .map(|(_, port)| format!("127.0.0.1:{port}"))
        .collect();
    let out = Command::new("redis-cli")
        .arg("--cluster")
        .arg("create")
        .args(&addrs)
        .args(["--cluster-replicas", "1", "--cluster-yes"])
        .output()
        .context("cannot run redis-cli (scripts/test-deps installs redis-tools)")?;
    if !out.status.success() {
        bail!(
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let ports: Vec<u16> = nodes.iter().map(|(_, port)| *port).collect();
    wait_formed(&ports).await?;
    let url = ports
        .iter()
        .map(|port| format!("redis://127.0.0.1:{port}"))
        .collect::<Vec<_>>()
        .join(",");
    Ok((nodes.into_iter().map(|(p, _)| p).collect(), url))
}

/// Waits until every node sees the whole cluster and every master has its replica attached.
async fn wait_formed(ports: &[u16]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut formed = true;
        let mut replicas = 0;
        for port in ports {
            let info = cli(*port, &["CLUSTER", "INFO"])?;
            formed &= info.contains("cluster_state:ok")
                && info.contains(&format!("cluster_known_nodes:{}", ports.len()));
            let replication = cli(*port, &["INFO", "replication"])?;
            if replication.contains("role:slave") && replication.contains("master_link_status:up") {
                replicas += 1;
            }
        }
        if formed && replicas == ports.len() / 2 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the Redis Cluster was not formed within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn cli(port: u16, args: &[&str]) -> Result<String> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .context("cannot run redis-cli")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
