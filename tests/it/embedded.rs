//! Embedded mode keeps the pipeline's promises in one process: a webhook answered 200 survives
//! `kill -9`, and after a restart every accepted message is answered exactly once, in order.

use crate::support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use rand::RngExt;
use support::harness::{
    Mode, World, deliver_last_messages, deliver_like_twilio, echoed_lines, inbound_form, sid,
};

const USERS: u64 = 8;
const MESSAGES: u64 = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_traffic_loses_and_repeats_nothing() {
    // A reply part whose sender is killed mid-post waits out its send guard's lease: short here,
    // so that kills about every second do not stack up to more than the wait below.
    let env = [
        ("WAGATE_TWILIO_TIMEOUT_MS", "1000"),
        ("WAGATE_SEND_LEASE_MS", "3000"),
    ];
    let mut w = World::start_in(Mode::Embedded, &env).await;
    w.wagate.echo_agent("demo").await;
    let url = format!("{}/webhooks/twilio/whatsapp/demo", w.wagate.public_url);
    let done = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (done, url) = (done.clone(), url.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let users = (0..USERS).map(|u| {
                let (http, url) = (http.clone(), url.clone());
                async move {
                    let user = format!("+1415557{u:04}");
                    for m in 0..MESSAGES {
                        let fields =
                            inbound_form(&sid(u * 1000 + m), &user, &format!("{user} #{m}"));
                        deliver_like_twilio(&http, &url, &fields).await;
                        let pause = rand::rng().random_range(300..900);
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                    }
                }
            });
            futures::future::join_all(users).await;
            done.store(true, Ordering::SeqCst);
        })
    };
    let mut kills = 0;
    while !done.load(Ordering::SeqCst) {
        let pause = rand::rng().random_range(700..1300);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        w.wagate.restart().await;
        kills += 1;
    }
    traffic.await.unwrap();
    assert!(
        kills >= 3,
        "the process must actually be killed ({kills} kills)"
    );
    eprintln!("embedded: killed with SIGKILL and restarted {kills} times");

    let total = (USERS * MESSAGES) as usize;
    let answered = || {
        echoed_lines(&w.twilio.sent())
            .values()
            .map(Vec::len)
            .sum::<usize>()
    };
    w.wagate
        .wait_until(
            Duration::from_secs(60),
            "every accepted message to be answered",
            || answered() >= total,
        )
        .await;
    let last: Vec<(String, String)> = (0..USERS)
        .map(|u| (format!("+1415557{u:04}"), sid(u * 1000 + MESSAGES)))
        .collect();
    deliver_last_messages(&url, &last).await;
    let total = total + USERS as usize;
    w.wagate
        .wait_until(
            Duration::from_secs(60),
            "each user's last message to be answered",
            || answered() >= total,
        )
        .await;
    let lines = echoed_lines(&w.twilio.sent());
    for u in 0..USERS {
        let user = format!("+1415557{u:04}");
        let expected: Vec<String> = (0..MESSAGES)
            .map(|m| format!("{user} #{m}"))
            .chain([format!("{user} last")])
            .collect();
        assert_eq!(
            lines[&format!("whatsapp:{user}")],
            expected,
            "{user}: each message answered once, in order"
        );
    }
    assert_eq!(answered(), total);
}

#[tokio::test]
async fn first_start_creates_its_secrets_privately_and_a_second_process_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fresh");
    let port = support::harness::free_port();
    let admin_port = support::harness::free_port();
    let spawn = |port: u16, admin: u16| {
        std::process::Command::new(env!("CARGO_BIN_EXE_wagate"))
            .arg("serve")
            .env_clear()
            .env("WAGATE_DATA_DIR", &data)
            .env("WAGATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("WAGATE_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut first = support::harness::Proc(spawn(port, admin_port));
    let token_path = data.join("admin.token");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ready = reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
            .await
            .is_ok_and(|r| r.status() == 200);
        if ready && token_path.exists() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "embedded wagate did not start"
        );
        assert!(
            first.0.try_wait().unwrap().is_none(),
            "embedded wagate exited"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for name in ["master.key", "admin.token"] {
        let mode = std::fs::metadata(data.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{name} is readable by its owner only");
    }
    assert!(data.join("wagate.redb").exists(), "one data file");
    // The generated token opens the admin API.
    let token = std::fs::read_to_string(&token_path).unwrap();
    let r = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{admin_port}/v1/agents"))
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A second process on the same data folder fails at once, saying why.
    let second = spawn(support::harness::free_port(), support::harness::free_port())
        .wait_with_output()
        .unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("another wagate process is using") && err.contains("wagate.redb"),
        "{err}"
    );
    // The first start said where its secrets are.
    let _ = first.0.kill();
    let out = first
        .0
        .stderr
        .take()
        .map(|mut e| {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut e, &mut s).unwrap();
            s
        })
        .unwrap_or_default();
    assert!(
        out.contains(&format!(
            "created the admin token in {}",
            token_path.display()
        )),
        "{out}"
    );
    assert!(
        !out.contains(token.trim()),
        "the token itself is never printed"
    );
}
