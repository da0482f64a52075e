//! Guarantees 1–3 under fire: ingress, worker and sender processes are killed with SIGKILL and
//! restarted about every second while a few hundred messages over dozens of conversations flow.
//! Every message that got a 200 is answered exactly once, and each conversation's replies are
//! in order.

use crate::support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use rand::RngExt;
use support::{
    fake_twilio::FakeTwilio,
    harness::{
        ACCOUNT_SID, AUTH_TOKEN, Servers, Wagate, deliver_last_messages, deliver_like_twilio,
        echoed_lines, inbound_form, sid,
    },
};

const USERS: u64 = 24;
const MESSAGES: u64 = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_processes_under_traffic_loses_nothing_and_repeats_nothing() {
    let servers = Servers::start().await;
    let twilio = FakeTwilio::start().await;
    twilio.add_account(ACCOUNT_SID, AUTH_TOKEN);
    let env = [
        ("WAGATE_TWILIO_TIMEOUT_MS", "1000"),
        // A part whose sender was killed mid-post waits out its guard's lease: kept short.
        ("WAGATE_SEND_LEASE_MS", "3000"),
        ("WAGATE_SEND_RETRY", "100ms,200ms,500ms,1s,2s,2s,2s,2s"),
        ("WAGATE_AGENT_RETRY", "100ms,200ms,500ms,1s,2s,2s,2s,2s"),
        ("WAGATE_SPOOL_AFTER_MS", "500"),
    ];
    let mut ingress = Wagate::start_role("ingress", &servers, &twilio.base_url, &env).await;
    ingress.echo_agent("demo").await;
    let mut with_public = env.to_vec();
    with_public.push(("WAGATE_PUBLIC_URL", &ingress.public_url));
    let mut procs = vec![];
    for role in ["worker", "worker", "sender", "sender"] {
        procs.push(Wagate::start_role(role, &servers, &twilio.base_url, &with_public).await);
    }
    let url = format!("{}/webhooks/twilio/whatsapp/demo", ingress.public_url);

    let done = Arc::new(AtomicBool::new(false));
    let traffic = {
        let done = done.clone();
        let url = url.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let users = (0..USERS).map(|u| {
                let (http, url) = (http.clone(), url.clone());
                async move {
                    let user = format!("+1415556{u:04}");
                    for m in 0..MESSAGES {
                        let fields =
                            inbound_form(&sid(u * 1000 + m), &user, &format!("{user} #{m}"));
                        deliver_like_twilio(&http, &url, &fields).await;
                        let pause = rand::rng().random_range(600..1400);
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
        let pause = rand::rng().random_range(600..1200);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let victim = rand::rng().random_range(0..=procs.len());
        if victim == procs.len() {
            ingress.restart().await;
        } else {
            procs[victim].restart().await;
        }
        kills += 1;
    }
    traffic.await.unwrap();
    assert!(kills >= 5, "the chaos must actually happen ({kills} kills)");
    eprintln!("chaos: {kills} processes killed and restarted");

    let total = (USERS * MESSAGES) as usize;
    let answered = || {
        echoed_lines(&twilio.sent())
            .values()
            .map(Vec::len)
            .sum::<usize>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while answered() < total && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // With the killing over, one more message per user is a barrier: a conversation's replies
    // go out in order, so once each user's last one is answered, a late duplicate of an
    // earlier one would have shown (a part whose sender died waits out its lease first).
    let last: Vec<(String, String)> = (0..USERS)
        .map(|u| (format!("+1415556{u:04}"), sid(u * 1000 + MESSAGES)))
        .collect();
    deliver_last_messages(&url, &last).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while answered() < total + USERS as usize && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lines = echoed_lines(&twilio.sent());
    let mut problems = Vec::new();
    for u in 0..USERS {
        let user = format!("+1415556{u:04}");
        let got = lines
            .get(&format!("whatsapp:{user}"))
            .cloned()
            .unwrap_or_default();
        let expected: Vec<String> = (0..MESSAGES)
            .map(|m| format!("{user} #{m}"))
            .chain([format!("{user} last")])
            .collect();
        if got != expected {
            problems.push(format!("{user}: got {got:?}"));
        }
    }
    if !problems.is_empty() {
        // What Twilio got for each user in trouble, with times, and the processes' logs kept
        // beside the test's temporary folder: a duplicate's two posts and who made them.
        for m in twilio.sent() {
            if problems
                .iter()
                .any(|p| p.starts_with(m.to.trim_start_matches("whatsapp:")))
            {
                eprintln!("{} {:?} {} {:?}", m.to, m.received_at, m.sid, m.body);
            }
        }
        let kept = std::env::temp_dir().join(format!("wagate-chaos-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&kept);
        for entry in std::fs::read_dir(servers.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry.file_name().to_string_lossy().ends_with(".log") {
                let _ = std::fs::copy(entry.path(), kept.join(entry.file_name()));
            }
        }
        eprintln!("the processes' logs are kept in {}", kept.display());
    }
    assert!(
        problems.is_empty() && answered() == total + USERS as usize,
        "after {kills} kills, {} of {total} messages (and {USERS} last ones) answered:\n{}",
        answered(),
        problems.join("\n")
    );
    assert!(twilio.violations().is_empty(), "{:?}", twilio.violations());
}
