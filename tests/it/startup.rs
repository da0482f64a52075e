//! Start-up: `--help` for every command, and a process that cannot start exits non-zero at once
//! with a message saying what to fix.

use crate::support;

use std::time::Duration;

use support::harness::{
    Servers, Wagate, World, eventually, free_port, run_wagate as wagate, test_master_key,
};

#[test]
fn every_command_has_help() {
    let (ok, text) = wagate(&["--help"], &[]);
    assert!(ok, "{text}");
    for cmd in ["serve", "ingress", "worker", "sender", "keygen"] {
        assert!(text.contains(cmd), "--help lists {cmd}: {text}");
        let (ok, help) = wagate(&[cmd, "--help"], &[]);
        assert!(ok, "{cmd} --help: {help}");
    }
    let (_, serve) = wagate(&["serve", "--help"], &[]);
    for var in [
        "WAGATE_NATS_URL",
        "WAGATE_REDIS_URL",
        "WAGATE_MASTER_KEY",
        "WAGATE_ADMIN_TOKEN",
        "WAGATE_PUBLIC_URL",
        "WAGATE_LISTEN",
        "WAGATE_ADMIN_LISTEN",
        "WAGATE_TWILIO_API_BASE",
        "WAGATE_DATA_DIR",
    ] {
        assert!(serve.contains(var), "serve --help names {var}");
    }
}

#[test]
fn keygen_prints_a_usable_key() {
    let (ok, key) = wagate(&["keygen"], &[]);
    assert!(ok);
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(key.trim())
        .unwrap();
    assert_eq!(bytes.len(), 64);
}

#[test]
fn only_one_of_nats_and_redis_is_an_error_naming_the_other() {
    let (ok, text) = wagate(&["serve"], &[("WAGATE_NATS_URL", "nats://127.0.0.1:1")]);
    assert!(!ok);
    assert!(text.contains("WAGATE_REDIS_URL"), "{text}");
    let (ok, text) = wagate(&["worker"], &[("WAGATE_REDIS_URL", "redis://127.0.0.1:1")]);
    assert!(!ok);
    assert!(text.contains("WAGATE_NATS_URL"), "{text}");
}

/// No configuration may turn admin authentication off: an empty admin token would match a
/// request without `Authorization`, so it and any token under 16 characters stop the start,
/// from the environment or the flag, in either mode, and from the data folder's file.
#[test]
fn an_empty_or_short_admin_token_is_a_start_up_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let nats = [
        ("WAGATE_NATS_URL", "nats://127.0.0.1:1"),
        ("WAGATE_REDIS_URL", "redis://127.0.0.1:1"),
        ("WAGATE_MASTER_KEY", "unused"),
    ];
    for token in ["", "fifteen-chars-x"] {
        let chars = token.chars().count();
        let embedded = [("WAGATE_DATA_DIR", data), ("WAGATE_ADMIN_TOKEN", token)];
        let mut remote = nats.to_vec();
        remote.push(("WAGATE_ADMIN_TOKEN", token));
        for (what, env) in [("embedded", &embedded[..]), ("NATS + Redis", &remote[..])] {
            let (ok, text) = wagate(&["serve"], env);
            assert!(!ok, "{what}, a {chars}-character token started: {text}");
            assert!(
                text.contains("WAGATE_ADMIN_TOKEN") && text.contains("at least 16 characters"),
                "{what}: {text}"
            );
        }
        let (ok, text) = wagate(
            &["serve", "--admin-token", token],
            &[("WAGATE_DATA_DIR", data)],
        );
        assert!(
            !ok && text.contains("at least 16 characters"),
            "flag: {text}"
        );
    }
    // Checked before anything is created or connected.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    std::fs::write(dir.path().join("admin.token"), "0123456789\n").unwrap();
    let (ok, text) = wagate(
        &["serve"],
        &[
            ("WAGATE_DATA_DIR", data),
            ("WAGATE_LISTEN", &format!("127.0.0.1:{}", free_port())),
            ("WAGATE_ADMIN_LISTEN", &format!("127.0.0.1:{}", free_port())),
        ],
    );
    assert!(!ok, "a 10-character admin.token started: {text}");
    assert!(
        text.contains("admin.token") && text.contains("at least 16 characters"),
        "{text}"
    );
}

#[test]
fn zero_threads_is_refused() {
    let (ok, text) = wagate(&["serve"], &[("WAGATE_THREADS", "0")]);
    assert!(!ok);
    assert!(text.contains("--threads"), "{text}");
}

#[test]
fn an_unknown_log_format_or_otlp_protocol_is_refused_naming_the_setting() {
    let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
    for (env, var) in [
        (vec![("WAGATE_LOG_FORMAT", "xml")], "WAGATE_LOG_FORMAT"),
        (
            vec![endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")],
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
    ] {
        let (ok, text) = wagate(&["serve"], &env);
        assert!(!ok, "{env:?} is refused");
        assert!(text.contains(var), "{env:?}: {text}");
    }
}

#[test]
fn zero_or_huge_http_limits_are_refused_naming_the_setting() {
    for (var, value) in [
        ("WAGATE_HTTP_HEADER_TIMEOUT_MS", "0"),
        ("WAGATE_HTTP_BODY_TIMEOUT_MS", "0"),
        ("WAGATE_HTTP_IDLE_TIMEOUT_MS", "0"),
        ("WAGATE_HTTP_MAX_CONNECTIONS", "0"),
        ("WAGATE_HTTP_IDLE_TIMEOUT_MS", "18446744073709551615"),
        ("WAGATE_HTTP_MAX_CONNECTIONS", "18446744073709551615"),
    ] {
        let (ok, text) = wagate(&["serve"], &[(var, value)]);
        assert!(!ok, "{var}={value} is refused");
        assert!(text.contains(var), "{var}={value}: {text}");
    }
}

#[tokio::test]
async fn unreachable_nats_or_bad_key_or_taken_port_exit_with_a_reason() {
    let servers = Servers::start().await;
    let base = |nats: &str| {
        vec![
            ("WAGATE_NATS_URL".to_string(), nats.to_string()),
            ("WAGATE_REDIS_URL".to_string(), servers.redis_url.clone()),
            ("WAGATE_MASTER_KEY".to_string(), test_master_key()),
            (
                "WAGATE_LISTEN".to_string(),
                format!("127.0.0.1:{}", free_port()),
            ),
            (
                "WAGATE_ADMIN_LISTEN".to_string(),
                format!("127.0.0.1:{}", free_port()),
            ),
        ]
    };
    let run = |env: Vec<(String, String)>| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        wagate(&["serve"], &env)
    };
    let started = std::time::Instant::now();
    let (ok, text) = run(base(&format!("nats://127.0.0.1:{}", free_port())));
    assert!(!ok);
    assert!(text.contains("NATS"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(20));

    let mut env = base(&servers.nats_url);
    env[2].1 = "not-a-key".into();
    let (ok, text) = run(env);
    assert!(!ok);
    assert!(text.contains("master key"), "{text}");

    let mut env = base(&servers.nats_url);
    env.retain(|(k, _)| k != "WAGATE_MASTER_KEY");
    let (ok, text) = run(env);
    assert!(!ok);
    assert!(text.contains("WAGATE_MASTER_KEY"), "{text}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut env = base(&servers.nats_url);
    env[3].1 = taken.local_addr().unwrap().to_string();
    let (ok, text) = run(env);
    assert!(!ok);
    assert!(
        text.contains("cannot listen") && text.contains("WAGATE_LISTEN"),
        "{text}"
    );
}

/// A wagate started with a low soft limit of open files (systemd's 1024) raises it to the hard
/// limit, as Go's runtime does: every held connection takes a descriptor.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_running_wagate_raises_its_open_files_limit_to_the_hard_limit() {
    use rustix::process::{Resource, getrlimit};
    let ours = getrlimit(Resource::Nofile);
    let low = ours.maximum.map_or(1024, |hard| hard.min(1024));
    if Some(low) == ours.maximum {
        eprintln!("skipped: the hard limit of open files is already 1024 or lower");
        return;
    }
    // Only the child starts low: this process's limit is every test's of the binary.
    let world = World::start_with_open_files(low, &[]).await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", world.wagate.pid()))
        .expect("read the process limits");
    let open_files: Vec<&str> = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .expect("the kernel reports Max open files")
        .split_whitespace()
        .collect();
    assert!(
        open_files.len() >= 2 && open_files[0] == open_files[1],
        "the soft limit is the hard one: {limits}"
    );
}

/// A running wagate has transparent huge pages off: with them, memory is zeroed and counted in
/// 2 MiB pages wherever the allocator touches a few bytes (docs/benchmarks.md, change 13).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_running_wagate_has_transparent_huge_pages_off() {
    let world = World::start().await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", world.wagate.pid()))
        .expect("read the process status");
    let thp = status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .expect("the kernel reports THP_enabled (Linux 5.0 and later)");
    assert_eq!(thp.trim(), "0", "{status}");
}

/// Worker and sender processes serve the probes and `/metrics` on `WAGATE_METRICS_LISTEN`, a
/// listener of their own.
#[tokio::test]
async fn worker_and_sender_serve_probes_and_metrics_on_their_own_listener() {
    let servers = Servers::start().await;
    for role in ["worker", "sender"] {
        let addr = format!("127.0.0.1:{}", free_port());
        let wagate = Wagate::start_role(
            role,
            &servers,
            "http://127.0.0.1:1",
            &[("WAGATE_METRICS_LISTEN", &addr)],
        )
        .await;
        for path in ["/healthz", "/readyz", "/metrics"] {
            let r = wagate
                .http
                .get(format!("http://{addr}{path}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{role} {path}");
        }
    }
}

/// `WAGATE_NATS_URL` may list several servers, as a NATS cluster is given: a process whose list
/// starts with a server that is down connects to one that is up.
#[tokio::test]
async fn a_list_of_nats_servers_is_taken() {
    let servers = Servers::start().await;
    let list = format!("nats://127.0.0.1:{},{}", free_port(), servers.nats_url);
    let wagate = Wagate::start_role(
        "ingress",
        &servers,
        "http://127.0.0.1:1",
        &[("WAGATE_NATS_URL", &list)],
    )
    .await;
    let r = wagate
        .http
        .get(format!("{}/readyz", wagate.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// `/readyz` answers 503 at once when NATS is gone, and 200 again once it is back: a probe that
/// waited out the client's request timeout instead would be counted as failed by Kubernetes
/// (one second by default) while holding a connection per probe.
#[tokio::test]
async fn readiness_says_503_promptly_while_nats_is_down() {
    let mut servers = Servers::start().await;
    let addr = format!("127.0.0.1:{}", free_port());
    let wagate = Wagate::start_role(
        "worker",
        &servers,
        "http://127.0.0.1:1",
        &[("WAGATE_METRICS_LISTEN", &addr)],
    )
    .await;
    let probe = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let readyz = format!("http://{addr}/readyz");
    servers.kill_nats();
    let ask = || {
        let r = probe.get(&readyz).send();
        async move { r.await.expect("an answer within 2s").status() }
    };
    eventually(Duration::from_secs(10), "/readyz says 503", || async {
        (ask().await == 503).then_some(())
    })
    .await;
    for _ in 0..3 {
        assert_eq!(ask().await, 503);
    }
    servers.restart_nats().await;
    eventually(
        Duration::from_secs(15),
        "/readyz says 200 again",
        || async { (ask().await == 200).then_some(()) },
    )
    .await;
    drop(wagate);
}

/// The public listener's `/readyz` names the backend that is down and nothing of its error
/// (hosts, ports, server messages); the admin listener's tells the operator why.
#[tokio::test]
async fn public_readiness_names_the_backend_and_keeps_its_error_inside() {
    let mut servers = Servers::start().await;
    let wagate = Wagate::start_role("ingress", &servers, "http://127.0.0.1:1", &[]).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    servers.kill_nats();
    let ask = |base: String| {
        let r = http.get(format!("{base}/readyz")).send();
        async move {
            let r = r.await.expect("an answer within 2s");
            (r.status(), r.text().await.unwrap_or_default())
        }
    };
    let public = eventually(
        Duration::from_secs(10),
        "public /readyz says 503",
        || async {
            let (status, body) = ask(wagate.public_url.clone()).await;
            (status == 503).then_some(body)
        },
    )
    .await;
    assert_eq!(public, "not ready: the bus");
    let (status, inside) = ask(wagate.admin_url.clone()).await;
    assert_eq!(status, 503);
    assert!(
        inside.starts_with("the bus: ") && inside.len() > public.len(),
        "{inside}"
    );
    servers.restart_nats().await;
}
