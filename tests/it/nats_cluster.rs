//! wagate on a 3-node NATS JetStream cluster (real nats-server processes routed to each other,
//! no containers): streams get `WAGATE_NATS_REPLICAS` replicas, a changed count is applied at
//! start, and with 2 ingress, 2 worker and 2 sender processes under steady traffic, killing
//! (SIGKILL) the leader of the inbound stream, then of the outbound stream, and bringing each
//! back loses, repeats and reorders nothing. Also: the ways to authenticate to NATS (URL user
//! and password, a token, TLS with a private CA).

use crate::support;

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use async_nats::jetstream;
use rand::RngExt;
use support::{
    fake_twilio::FakeTwilio,
    harness::{
        ACCOUNT_SID, AUTH_TOKEN, Servers, Wagate, deliver_last_messages, deliver_like_twilio,
        echoed_lines, eventually, inbound_form, run_wagate, sid,
    },
    nats_cluster::{NatsCluster, single_server},
};

const USERS: u64 = 100;
const MESSAGES: u64 = 20;

fn user(u: u64) -> String {
    format!("+1415557{u:04}")
}

async fn start(role: &str, servers: &Servers, base: &str, env: &[(String, String)]) -> Wagate {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Wagate::start_role(role, servers, base, &env).await
}

async fn replicas_of(js: &jetstream::Context, stream: &str) -> usize {
    let mut s = js.get_stream(stream).await.unwrap();
    s.info().await.unwrap().config.num_replicas
}

/// Kills the leader of `stream`, waits for another to be elected, brings the old one back and
/// waits until it has caught up. Returns the killed server and the time until a new leader
/// answered.
async fn fail_over(
    cluster: &mut NatsCluster,
    js: &jetstream::Context,
    stream: &str,
) -> (String, Duration) {
    let leader = NatsCluster::wait_stream_leader(js, stream, None, Duration::from_secs(10)).await;
    cluster.kill(&leader);
    let killed = Instant::now();
    let new =
        NatsCluster::wait_stream_leader(js, stream, Some(&leader), Duration::from_secs(30)).await;
    let election = killed.elapsed();
    eprintln!("{stream}: leader {leader} killed; {new} leads after {election:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.restart(&leader).await;
    NatsCluster::wait_stream_current(js, stream, 3, Duration::from_secs(30)).await;
    eprintln!(
        "{stream}: {leader} back and current {:?} after the kill",
        killed.elapsed()
    );
    (leader, election)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_failover_of_both_streams_loses_repeats_and_reorders_nothing() {
    let started = Instant::now();
    let mut cluster = NatsCluster::start(3).await;
    let mut servers = Servers::start().await;
    servers.nats_url = cluster.url();
    let twilio = FakeTwilio::start().await;
    twilio.add_account(ACCOUNT_SID, AUTH_TOKEN);
    let js = jetstream::new(cluster.client().await);

    // Streams are created with the configured replicas, and a changed count is applied to the
    // existing streams at the next start.
    let data = |name: &str| servers.dir.path().join(name).display().to_string();
    {
        let first = data("first");
        let one = Wagate::start_role(
            "ingress",
            &servers,
            &twilio.base_url,
            &[
                ("WAGATE_NATS_REPLICAS", "1"),
                ("WAGATE_DATA_DIR", first.as_str()),
            ],
        )
        .await;
        assert_eq!(replicas_of(&js, "WAGATE_INBOUND").await, 1);
        drop(one);
    }
    let env = [
        ("WAGATE_NATS_REPLICAS", "3"),
        (
            "WAGATE_SEND_RETRY",
            "100ms,200ms,500ms,1s,2s,2s,2s,2s,2s,2s",
        ),
        (
            "WAGATE_AGENT_RETRY",
            "100ms,200ms,500ms,1s,2s,2s,2s,2s,2s,2s",
        ),
        // An election after a SIGKILL takes JetStream several seconds. Spooling after 10 s, past
        // the webhook's own 5 s deadline, means never: during an election webhooks answer 503
        // and are delivered again, instead of being spooled by one ingress and overtaken
        // through the other (docs/operations.md, "NATS: a JetStream cluster").
        ("WAGATE_SPOOL_AFTER_MS", "10000"),
        // A publish that fails at once (not a timeout) is spooled whatever the wait above, and
        // then every later message of that ingress queues behind the spool: seen here, 373
        // replies out of order across the two ingress processes. No spool at all (a spool of
        // 0 MiB refuses everything: 503, delivered again).
        ("WAGATE_SPOOL_MAX_MB", "0"),
    ];
    let (d1, d2) = (data("ingress-1"), data("ingress-2"));
    let with = |extra: &[(&str, &str)]| -> Vec<(String, String)> {
        env.iter()
            .chain(extra)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let base = twilio.base_url.clone();
    let ingress = [
        start(
            "ingress",
            &servers,
            &base,
            &with(&[("WAGATE_DATA_DIR", d1.as_str())]),
        )
        .await,
        start(
            "ingress",
            &servers,
            &base,
            &with(&[("WAGATE_DATA_DIR", d2.as_str())]),
        )
        .await,
    ];
    for stream in ["WAGATE_INBOUND", "WAGATE_OUTBOUND", "WAGATE_DLQ"] {
        assert_eq!(replicas_of(&js, stream).await, 3, "{stream}");
    }
    ingress[0].echo_agent("demo").await;
    let mut procs = vec![];
    for role in ["worker", "worker", "sender", "sender"] {
        let public = ingress[0].public_url.clone();
        let env = with(&[("WAGATE_PUBLIC_URL", public.as_str())]);
        procs.push(start(role, &servers, &base, &env).await);
    }
    let urls: Vec<String> = ingress
        .iter()
        .map(|i| format!("{}/webhooks/twilio/whatsapp/demo", i.public_url))
        .collect();
    eprintln!(
        "cluster and 6 processes ready after {:?}",
        started.elapsed()
    );

    // Steady traffic: each user writes a message about every 0.55 s (plus the webhook's time), each once the previous one
    // was answered 200, through the ingress processes in turn; every 7th is delivered again
    // through the other ingress (a retry that went elsewhere).
    let done = Arc::new(AtomicBool::new(false));
    let retried = Arc::new(AtomicU64::new(0));
    let traffic_started = Instant::now();
    let traffic = {
        let (done, retried, urls) = (done.clone(), retried.clone(), urls.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let users = (0..USERS).map(|u| {
                let (http, urls, retried) = (http.clone(), urls.clone(), retried.clone());
                async move {
                    tokio::time::sleep(Duration::from_millis(u * 12)).await;
                    for m in 0..MESSAGES {
                        let fields = inbound_form(
                            &sid(u * 1000 + m),
                            &user(u),
                            &format!("{} #{m}", user(u)),
                        );
                        let via = ((u + m) % 2) as usize;
                        deliver_like_twilio(&http, &urls[via], &fields).await;
                        if m % 7 == 3 {
                            deliver_like_twilio(&http, &urls[1 - via], &fields).await;
                            retried.fetch_add(1, Ordering::SeqCst);
                        }
                        let pause = rand::rng().random_range(400..700);
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                    }
                }
            });
            futures::future::join_all(users).await;
            done.store(true, Ordering::SeqCst);
        })
    };

    tokio::time::sleep(Duration::from_secs(4)).await;
    let (inbound_leader, inbound_election) = fail_over(&mut cluster, &js, "WAGATE_INBOUND").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (outbound_leader, outbound_election) =
        fail_over(&mut cluster, &js, "WAGATE_OUTBOUND").await;
    traffic.await.unwrap();
    assert!(done.load(Ordering::SeqCst));
    let traffic_time = traffic_started.elapsed();

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
    let drained = traffic_started.elapsed();
    // A last message per user: a conversation's replies go out in order, so once it is
    // answered, a late duplicate of an earlier one would have shown.
    let last: Vec<(String, String)> = (0..USERS)
        .map(|u| (user(u), sid(u * 1000 + MESSAGES)))
        .collect();
    deliver_last_messages(&urls[0], &last).await;
    let deadline = Instant::now() + Duration::from_secs(40);
    while answered() < total + USERS as usize && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let sent = twilio.sent();
    let lines = echoed_lines(&sent);
    let (mut lost, mut duplicated, mut out_of_order) = (0, 0, 0);
    let mut problems = Vec::new();
    for u in 0..USERS {
        let who = user(u);
        let got = lines
            .get(&format!("whatsapp:{who}"))
            .cloned()
            .unwrap_or_default();
        let expected: Vec<String> = (0..MESSAGES)
            .map(|m| format!("{who} #{m}"))
            .chain([format!("{who} last")])
            .collect();
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for line in &got {
            *seen.entry(line.as_str()).or_default() += 1;
        }
        lost += expected
            .iter()
            .filter(|e| !seen.contains_key(e.as_str()))
            .count();
        duplicated += seen.values().map(|n| n - 1).sum::<usize>();
        let position: HashMap<&str, usize> = expected
            .iter()
            .enumerate()
            .map(|(i, e)| (e.as_str(), i))
            .collect();
        let order: Vec<usize> = got
            .iter()
            .filter_map(|l| position.get(l.as_str()).copied())
            .collect();
        out_of_order += order.windows(2).filter(|w| w[1] < w[0]).count();
        if got != expected {
            problems.push(format!("{who}: got {got:?}"));
        }
    }
    // The longest time no reply reached Twilio while traffic flowed: what the failovers cost.
    let mut times: Vec<SystemTime> = sent.iter().map(|m| m.received_at).collect();
    times.sort();
    let longest_gap = times
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).unwrap_or_default())
        .max()
        .unwrap_or_default();
    eprintln!(
        "nats cluster failover: {total} messages (+{USERS} last) over {USERS} conversations, {} retried through the other ingress, traffic {traffic_time:?}, all answered after {drained:?}; \
         inbound leader {inbound_leader} killed, new leader after {inbound_election:?}; outbound leader {outbound_leader} killed, new leader after {outbound_election:?}; \
         longest pause in replies {longest_gap:?}; lost {lost}, duplicated {duplicated}, out of order {out_of_order}; test took {:?}",
        retried.load(Ordering::SeqCst),
        started.elapsed()
    );
    if !problems.is_empty() {
        for p in ingress.iter().chain(&procs) {
            let logs = p.logs();
            let notable: Vec<&str> = logs
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .take(30)
                .collect();
            eprintln!("--- {}:\n{}", p.log_path.display(), notable.join("\n"));
        }
    }
    assert!(
        problems.is_empty() && lost == 0 && duplicated == 0 && out_of_order == 0,
        "{} of {} answered; lost {lost}, duplicated {duplicated}, out of order {out_of_order}:\n{}",
        answered(),
        total + USERS as usize,
        problems.join("\n")
    );
    assert!(twilio.violations().is_empty(), "{:?}", twilio.violations());
    drop(procs);

    // What the order check's request costs on R3: a direct get (answered by a replica, the
    // one next to the client when it has one) against the leader-only STREAM.MSG.GET.
    let stream = js.get_stream("WAGATE_INBOUND").await.unwrap();
    let probe = "wagate.inbound.demo.probe";
    const GETS: u32 = 300;
    let timed = Instant::now();
    for _ in 0..GETS {
        let _ = stream.direct_get_first_for_subject(probe).await;
    }
    let direct = timed.elapsed() / GETS;
    let timed = Instant::now();
    for _ in 0..GETS {
        let _ = stream.get_next_raw_message_by_subject(probe).await;
    }
    let leader = timed.elapsed() / GETS;
    eprintln!(
        "order check on R3: direct get {direct:?}, leader STREAM.MSG.GET {leader:?} (mean of {GETS})"
    );
}

#[test]
fn a_replica_count_jetstream_cannot_have_is_refused_at_start() {
    for count in ["0", "6", "three"] {
        let (ok, text) = run_wagate(
            &["worker"],
            &[
                ("WAGATE_NATS_URL", "nats://127.0.0.1:1"),
                ("WAGATE_REDIS_URL", "redis://127.0.0.1:1"),
                ("WAGATE_NATS_REPLICAS", count),
            ],
        );
        assert!(!ok, "{count}: {text}");
        assert!(
            text.contains("replicas") || text.contains("WAGATE_NATS_REPLICAS"),
            "{count}: {text}"
        );
    }
}

// ---- Authenticating to NATS ----

const PHONE: &str = "+14155550100";

/// Redis and fake Twilio for a wagate whose NATS server the test starts itself.
async fn backing() -> (Servers, FakeTwilio) {
    let servers = Servers::start().await;
    let twilio = FakeTwilio::start().await;
    twilio.add_account(ACCOUNT_SID, AUTH_TOKEN);
    (servers, twilio)
}

/// Starts `wagate serve` with `env` and shows that a message goes through NATS and back.
async fn answers(servers: &Servers, twilio: &FakeTwilio, env: &[(&str, &str)]) -> Wagate {
    let w = Wagate::start(servers, &twilio.base_url, env).await;
    w.echo_agent("demo").await;
    let r = w.inbound("demo", &sid(1), PHONE, "through NATS").await;
    assert_eq!(r.status(), 200);
    eventually(Duration::from_secs(15), "the reply", || async {
        twilio
            .sent()
            .iter()
            .any(|m| m.body.as_deref() == Some("through NATS"))
            .then_some(())
    })
    .await;
    w
}

/// `wagate serve` with `env` must refuse to start; its output.
async fn refused(servers: &Servers, twilio: &FakeTwilio, env: &[(&str, &str)]) -> String {
    match Wagate::try_start_role("serve", servers, &twilio.base_url, env).await {
        Ok(_) => panic!("wagate started with {env:?}"),
        Err(refused) => refused.logs,
    }
}

#[tokio::test]
async fn a_token_in_the_url_authenticates_and_is_never_shown() {
    const TOKEN: &str = "s3cret-nats-token-4711";
    let (mut servers, twilio) = backing().await;
    let (_nats, port) = single_server(servers.dir.path(), &["--auth".into(), TOKEN.into()]).await;
    servers.nats_url = format!("nats://{TOKEN}@127.0.0.1:{port}");
    let w = answers(&servers, &twilio, &[]).await;
    assert!(!w.logs().contains(TOKEN), "{}", w.logs());
    drop(w);

    let wrong = format!("nats://wrong-{TOKEN}@127.0.0.1:{port}");
    let text = refused(&servers, &twilio, &[("WAGATE_NATS_URL", wrong.as_str())]).await;
    assert!(text.contains("could not connect to NATS"), "{text}");
    assert!(!text.contains(TOKEN), "the token is shown: {text}");
}

/// A private CA: its certificate (PEM), and a server certificate and key for 127.0.0.1 signed
/// by it, written into `dir`; returns (ca, cert, key) paths.
fn private_ca(dir: &std::path::Path) -> (String, String, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let path = |name: &str| dir.join(name).display().to_string();
    std::fs::write(path("ca.pem"), ca.pem()).unwrap();
    std::fs::write(path("server.pem"), cert.pem()).unwrap();
    std::fs::write(path("server-key.pem"), key.serialize_pem()).unwrap();
    (path("ca.pem"), path("server.pem"), path("server-key.pem"))
}

#[tokio::test]
async fn tls_to_nats_is_checked_against_the_configured_ca() {
    let (mut servers, twilio) = backing().await;
    let (ca, cert, key) = private_ca(servers.dir.path());
    let (_nats, port) = single_server(
        servers.dir.path(),
        &[
            "--tls".into(),
            "--tlscert".into(),
            cert,
            "--tlskey".into(),
            key,
        ],
    )
    .await;
    servers.nats_url = format!("tls://127.0.0.1:{port}");
    answers(&servers, &twilio, &[("WAGATE_NATS_TLS_CA", ca.as_str())]).await;

    // Without the CA the server's certificate is not trusted; a missing CA file is named.
    let text = refused(&servers, &twilio, &[]).await;
    assert!(text.contains("could not connect to NATS"), "{text}");
    let missing = servers.dir.path().join("nope.pem").display().to_string();
    let text = refused(
        &servers,
        &twilio,
        &[("WAGATE_NATS_TLS_CA", missing.as_str())],
    )
    .await;
    assert!(
        text.contains("WAGATE_NATS_TLS_CA") && text.contains("nope.pem"),
        "{text}"
    );
}

/// A signed NATS JWT (header, claims, ed25519 signature by `issuer`), as `nsc` writes them.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use base64::Engine;
    use sha2::Digest;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let iat = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut claims = serde_json::json!({
        "iat": iat, "iss": issuer.public_key(), "name": name, "sub": subject, "nats": nats,
    });
    let jti = hex::encode_upper(sha2::Sha256::digest(claims.to_string().as_bytes()));
    claims["jti"] = jti.into();
    let signed = format!(
        "{}.{}",
        b64.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#),
        b64.encode(claims.to_string())
    );
    let signature = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", b64.encode(signature))
}

#[tokio::test]
async fn a_creds_file_authenticates_to_a_server_in_operator_mode() {
    let (mut servers, twilio) = backing().await;
    let dir = servers.dir.path().to_owned();
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let system = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        "test-operator",
        serde_json::json!({"type": "operator", "version": 2}),
    );
    let account_limits = |jetstream: bool| {
        let storage = if jetstream { -1 } else { 0 };
        serde_json::json!({
            "limits": {
                "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                "wildcards": true, "conn": -1, "leaf": -1,
                "mem_storage": storage, "disk_storage": storage, "streams": -1, "consumer": -1
            },
            "default_permissions": {"pub": {}, "sub": {}},
            "type": "account", "version": 2
        })
    };
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        "wagate",
        account_limits(true),
    );
    let system_jwt = jwt(
        &operator,
        &system.public_key(),
        "SYS",
        account_limits(false),
    );
    let user_jwt = jwt(
        &account,
        &user.public_key(),
        "wagate-user",
        serde_json::json!({
            "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
            "type": "user", "version": 2
        }),
    );
    let config = format!(
        "operator: {operator_jwt}\nsystem_account: {sys}\nresolver: MEMORY\nresolver_preload: {{\n  {sys}: {system_jwt}\n  {acc}: {account_jwt}\n}}\n",
        sys = system.public_key(),
        acc = account.public_key(),
    );
    std::fs::write(dir.join("operator.conf"), config).unwrap();
    let seed = user.seed().unwrap();
    let creds = format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    );
    let creds_path = dir.join("wagate.creds");
    std::fs::write(&creds_path, creds).unwrap();
    let (_nats, port) = single_server(
        &dir,
        &["-c".into(), dir.join("operator.conf").display().to_string()],
    )
    .await;
    servers.nats_url = format!("nats://127.0.0.1:{port}");
    let creds_path = creds_path.display().to_string();
    let w = answers(
        &servers,
        &twilio,
        &[("WAGATE_NATS_CREDS", creds_path.as_str())],
    )
    .await;
    assert!(!w.logs().contains(&seed));
    drop(w);

    // Without credentials the server refuses; a missing file is named, its content never.
    let text = refused(&servers, &twilio, &[]).await;
    assert!(text.contains("could not connect to NATS"), "{text}");
    let missing = dir.join("missing.creds").display().to_string();
    let text = refused(
        &servers,
        &twilio,
        &[("WAGATE_NATS_CREDS", missing.as_str())],
    )
    .await;
    assert!(
        text.contains("WAGATE_NATS_CREDS") && text.contains("missing.creds"),
        "{text}"
    );
    let garbled = dir.join("garbled.creds");
    std::fs::write(&garbled, "not a creds file").unwrap();
    let garbled = garbled.display().to_string();
    let text = refused(
        &servers,
        &twilio,
        &[("WAGATE_NATS_CREDS", garbled.as_str())],
    )
    .await;
    assert!(text.contains("WAGATE_NATS_CREDS"), "{text}");
}
