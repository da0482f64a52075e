//! Redis failover under traffic: wagate on a Redis Cluster (3 masters, 3 replicas) loses a
//! master to SIGKILL and its replica is promoted; wagate through Sentinel (1 master, 1 replica,
//! 3 Sentinels) loses the master and Sentinel promotes the replica. A steady stream of messages
//! over 30 conversations flows throughout; once it ends, every message must be answered exactly
//! once and in order per conversation. Each test prints what it saw: lost, duplicated, out of
//! order, and the time to recover (the killed shard's writes answering again, and the slowest
//! message's time from acceptance to its answer). And both backends at once: a NATS stream
//! leader and the Redis master killed together, under 2+2+2 processes.

use crate::support;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use rand::RngExt;
use support::{
    fake_twilio::FakeTwilio,
    harness::{
        ACCOUNT_SID, AUTH_TOKEN, Servers, Wagate, deliver_last_messages, deliver_like_twilio,
        echoed_lines, inbound_form, sid,
    },
    nats_cluster::NatsCluster,
    redis_cluster::{RedisCluster, RedisSentinel, SENTINEL_MASTER},
};

const USERS: u64 = 30;
const MESSAGES: u64 = 12;

/// Retries as in the chaos test: a store that is failing over answers errors for a few seconds.
const RETRIES: [(&str, &str); 4] = [
    ("WAGATE_SEND_RETRY", "100ms,200ms,500ms,1s,2s,2s,2s,2s"),
    ("WAGATE_AGENT_RETRY", "100ms,200ms,500ms,1s,2s,2s,2s,2s"),
    ("WAGATE_SEND_LEASE_MS", "3000"),
    ("WAGATE_TWILIO_TIMEOUT_MS", "2000"),
];

fn user(u: u64) -> String {
    format!("+1415557{u:04}")
}

/// What one run saw.
#[derive(Debug)]
struct Outcome {
    lost: usize,
    duplicated: usize,
    out_of_order: usize,
    /// From the kill until the failed-over Redis took a write again.
    recovery: Duration,
    /// The longest time from a message's acceptance to its answer.
    worst_latency: Duration,
}

/// Runs the traffic against `ingress` (each user's messages through them in turn; the agent is
/// made through the first), calls `kill` about 2 s in, and `recovered` right after it (it
/// returns once the store takes writes again); then checks the answers.
async fn under_traffic(
    name: &str,
    ingress: &[&Wagate],
    twilio: &FakeTwilio,
    kill: impl AsyncFnOnce(),
    recovered: impl AsyncFnOnce(),
) -> Outcome {
    ingress[0].echo_agent("demo").await;
    let urls: Vec<String> = ingress
        .iter()
        .map(|w| format!("{}/webhooks/twilio/whatsapp/demo", w.public_url))
        .collect();
    let url = urls[0].clone();
    let accepted: Arc<Mutex<HashMap<String, SystemTime>>> = Arc::default();
    let traffic = {
        let (urls, accepted) = (urls.clone(), accepted.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let users = (0..USERS).map(|u| {
                let (http, urls, accepted) = (http.clone(), urls.clone(), accepted.clone());
                async move {
                    let user = user(u);
                    let start = rand::rng().random_range(0..300);
                    tokio::time::sleep(Duration::from_millis(start)).await;
                    for m in 0..MESSAGES {
                        let text = format!("{user} #{m}");
                        let fields = inbound_form(&sid(u * 1000 + m), &user, &text);
                        let url = &urls[((u + m) % urls.len() as u64) as usize];
                        deliver_like_twilio(&http, url, &fields).await;
                        accepted.lock().unwrap().insert(text, SystemTime::now());
                        let pause = rand::rng().random_range(300..600);
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                    }
                }
            });
            futures::future::join_all(users).await;
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed = Instant::now();
    kill().await;
    recovered().await;
    let recovery = killed.elapsed();
    traffic.await.unwrap();

    let total = (USERS * MESSAGES) as usize;
    let answered = || {
        echoed_lines(&twilio.sent())
            .values()
            .map(Vec::len)
            .sum::<usize>()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while answered() < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // One more message per user is a barrier: replies go out in order per conversation, so
    // once each last one is answered, a late duplicate of an earlier one would have shown.
    let last: Vec<(String, String)> = (0..USERS)
        .map(|u| (user(u), sid(u * 1000 + MESSAGES)))
        .collect();
    deliver_last_messages(&url, &last).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while answered() < total + USERS as usize && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let sent = twilio.sent();
    let mut answered_at: HashMap<String, SystemTime> = HashMap::new();
    for m in &sent {
        for line in m.body.as_deref().unwrap_or_default().lines() {
            answered_at.entry(line.to_owned()).or_insert(m.received_at);
        }
    }
    let accepted = accepted.lock().unwrap();
    let worst_latency = accepted
        .iter()
        .filter_map(|(text, at)| answered_at.get(text)?.duration_since(*at).ok())
        .max()
        .unwrap_or_default();
    let lines = echoed_lines(&sent);
    let (mut lost, mut duplicated, mut out_of_order) = (0, 0, 0);
    let mut problems = Vec::new();
    for u in 0..USERS {
        let user = user(u);
        let got = lines
            .get(&format!("whatsapp:{user}"))
            .cloned()
            .unwrap_or_default();
        let expected: Vec<String> = (0..MESSAGES)
            .map(|m| format!("{user} #{m}"))
            .chain([format!("{user} last")])
            .collect();
        let mut seen = HashSet::new();
        let firsts: Vec<&String> = got.iter().filter(|l| seen.insert(*l)).collect();
        duplicated += got.len() - firsts.len();
        lost += expected.iter().filter(|e| !seen.contains(e)).count();
        let order: Vec<usize> = firsts
            .iter()
            .filter_map(|l| expected.iter().position(|e| e == *l))
            .collect();
        out_of_order += order.windows(2).filter(|w| w[0] > w[1]).count();
        if got != expected {
            problems.push(format!("{user}: got {got:?}"));
        }
    }
    let outcome = Outcome {
        lost,
        duplicated,
        out_of_order,
        recovery,
        worst_latency,
    };
    eprintln!(
        "{name}: {total} messages over {USERS} conversations (+{USERS} last): {} lost, {} duplicated, {} out of order; Redis took writes again {:.1} s after the kill; slowest answer {:.1} s after acceptance",
        outcome.lost,
        outcome.duplicated,
        outcome.out_of_order,
        outcome.recovery.as_secs_f64(),
        outcome.worst_latency.as_secs_f64()
    );
    if !problems.is_empty() {
        // What wagate said is the only account of a stall: the last of each process's log.
        for (n, w) in ingress.iter().enumerate() {
            let logs = w.logs();
            let lines: Vec<&str> = logs.lines().collect();
            let tail = lines[lines.len().saturating_sub(120)..].join("\n");
            eprintln!("--- wagate process {n}, last lines of its log:\n{tail}");
        }
    }
    assert!(
        problems.is_empty(),
        "{name}: {outcome:?}\n{}",
        problems.join("\n")
    );
    assert!(twilio.violations().is_empty(), "{:?}", twilio.violations());
    outcome
}

/// Whether the Redis at `url` takes a write (a promoted replica does).
async fn takes_a_write(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return false;
    };
    redis::cmd("SET")
        .arg("probe")
        .arg("x")
        .query_async::<()>(&mut conn)
        .await
        .is_ok()
}

/// Polls `write` until it succeeds, for at most 30 s.
async fn until_writable(what: &str, mut write: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !write().await {
        assert!(Instant::now() < deadline, "{what} never took a write again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_master_killed_under_traffic_loses_and_repeats_nothing() {
    let mut cluster = RedisCluster::start().await;
    let servers = Servers::start().await;
    let twilio = FakeTwilio::start().await;
    twilio.add_account(ACCOUNT_SID, AUTH_TOKEN);
    let url = cluster.url();
    let mut env = vec![
        ("WAGATE_REDIS_URL", url.as_str()),
        ("WAGATE_REDIS_CLUSTER", "true"),
    ];
    env.extend(RETRIES);
    let wagate = Wagate::start(&servers, &twilio.base_url, &env).await;

    // The master of the agent's slot (its leads), which every message's turn writes to.
    let probe = cluster.client().await;
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg("{demo}")
        .query_async(&mut probe.clone())
        .await
        .unwrap();
    let victim = cluster.master_of_slot(slot).await;
    let victim_port = cluster.nodes[victim].port;
    let cluster_ref = &mut cluster;
    under_traffic(
        "redis cluster, master killed",
        &[&wagate],
        &twilio,
        async || cluster_ref.nodes[victim].kill(),
        async || {
            let mut probe = probe.clone();
            until_writable("the killed master's slots", async || {
                redis::cmd("SET")
                    .arg("probe:{demo}")
                    .arg("x")
                    .query_async::<()>(&mut probe)
                    .await
                    .is_ok()
            })
            .await;
        },
    )
    .await;
    let promoted = cluster.master_of_slot(slot).await;
    assert_ne!(
        cluster.nodes[promoted].port, victim_port,
        "the replica was promoted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sentinel_master_killed_under_traffic_loses_and_repeats_nothing() {
    let mut setup = RedisSentinel::start().await;
    let servers = Servers::start().await;
    let twilio = FakeTwilio::start().await;
    twilio.add_account(ACCOUNT_SID, AUTH_TOKEN);
    let (url, sentinels) = (setup.url(), setup.sentinels());
    let mut env = vec![
        ("WAGATE_REDIS_URL", url.as_str()),
        ("WAGATE_REDIS_SENTINELS", sentinels.as_str()),
        ("WAGATE_REDIS_SENTINEL_MASTER", SENTINEL_MASTER),
    ];
    env.extend(RETRIES);
    let wagate = Wagate::start(&servers, &twilio.base_url, &env).await;
    assert_eq!(setup.master().await, Some(0), "the master as started");

    let replica = setup.data[1].url();
    let setup_ref = &mut setup;
    under_traffic(
        "redis sentinel, master killed",
        &[&wagate],
        &twilio,
        async || setup_ref.data[0].kill(),
        async || {
            until_writable("the promoted replica", async || {
                takes_a_write(&replica).await
            })
            .await;
        },
    )
    .await;
    assert_eq!(setup.master().await, Some(1), "the replica was promoted");
}

/// NATS and Redis fail together: on a 3-node JetStream cluster and a Sentinel-watched Redis,
/// with 2 ingress, 2 worker and 2 sender processes, the inbound stream's leader and the Redis
/// master are killed at the same moment under traffic; the old NATS node comes back. Nothing
/// is lost, repeated or reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nats_leader_and_the_redis_master_killed_together_lose_and_repeat_nothing() {
    let mut nats = NatsCluster::start(3).await;
    let mut redis = RedisSentinel::start().await;
    let mut servers = Servers::start().await;
    servers.nats_url = nats.url();
    let twilio = FakeTwilio::start().await;
    twilio.add_account(ACCOUNT_SID, AUTH_TOKEN);
    let js = async_nats::jetstream::new(nats.client().await);
    let (url, sentinels) = (redis.url(), redis.sentinels());
    let data = |name: &str| servers.dir.path().join(name).display().to_string();
    let (d1, d2) = (data("ingress-1"), data("ingress-2"));
    let mut env = vec![
        ("WAGATE_REDIS_URL", url.as_str()),
        ("WAGATE_REDIS_SENTINELS", sentinels.as_str()),
        ("WAGATE_REDIS_SENTINEL_MASTER", SENTINEL_MASTER),
        ("WAGATE_NATS_REPLICAS", "3"),
        // As in the NATS failover test: no spool with several ingress processes.
        ("WAGATE_SPOOL_AFTER_MS", "10000"),
        ("WAGATE_SPOOL_MAX_MB", "0"),
    ];
    env.extend(RETRIES);
    let with = |extra: &[(&'static str, &str)]| -> Vec<(String, String)> {
        env.iter()
            .chain(extra)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let start = async |role: &str, env: Vec<(String, String)>| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Wagate::start_role(role, &servers, &twilio.base_url, &env).await
    };
    let first = start("ingress", with(&[("WAGATE_DATA_DIR", d1.as_str())])).await;
    let second = start("ingress", with(&[("WAGATE_DATA_DIR", d2.as_str())])).await;
    let public = first.public_url.clone();
    let mut roles = Vec::new();
    for role in ["worker", "worker", "sender", "sender"] {
        roles.push(start(role, with(&[("WAGATE_PUBLIC_URL", public.as_str())])).await);
    }
    let replica = redis.data[1].url();
    let leader =
        NatsCluster::wait_stream_leader(&js, "WAGATE_INBOUND", None, Duration::from_secs(10)).await;
    // Both steps below need the cluster; they run one after the other.
    let nats_ref = tokio::sync::Mutex::new(&mut nats);
    let redis_ref = &mut redis;
    let killed_leader = leader.clone();
    under_traffic(
        "nats leader and redis master killed together",
        &[&first, &second],
        &twilio,
        async || {
            nats_ref.lock().await.kill(&killed_leader);
            redis_ref.data[0].kill();
        },
        async || {
            until_writable("the promoted replica", async || {
                takes_a_write(&replica).await
            })
            .await;
            NatsCluster::wait_stream_leader(
                &js,
                "WAGATE_INBOUND",
                Some(&killed_leader),
                Duration::from_secs(30),
            )
            .await;
            nats_ref.lock().await.restart(&killed_leader).await;
        },
    )
    .await;
    assert_eq!(redis.master().await, Some(1), "the replica was promoted");
    drop(roles);
}
