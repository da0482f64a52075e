//! Embedded mode keeps the pipeline's promises in one process: a webhook answered 200 survives
//! `kill -9`, and after a restart every accepted message is answered exactly once, in order.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use rand::RngExt;
use support::harness::{Mode, World, deliver_like_twilio, inbound_form, sid};

const USERS: u64 = 8;
const MESSAGES: u64 = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_traffic_loses_and_repeats_nothing() {
    let mut w = World::start_in(Mode::Embedded, &[("WAGATE_TWILIO_TIMEOUT_MS", "1000")]).await;
    w.wagate.echo_agent("demo").await;
    let url = format!("{}/webhooks/twilio/whatsapp/demo", w.wagate.public_url);
    let done = Arc::new(AtomicBool::new(false));
    let traffic = {
        let done = done.clone();
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
    w.wagate
        .wait_until(
            Duration::from_secs(60),
            "every accepted message to be answered",
            || w.twilio.sent().len() >= total,
        )
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent = w.twilio.sent();
    for u in 0..USERS {
        let user = format!("+1415557{u:04}");
        let bodies: Vec<String> = sent
            .iter()
            .filter(|m| m.to == format!("whatsapp:{user}"))
            .map(|m| m.body.clone().unwrap_or_default())
            .collect();
        let expected: Vec<String> = (0..MESSAGES).map(|m| format!("{user} #{m}")).collect();
        assert_eq!(
            bodies, expected,
            "{user}: each message answered once, in order"
        );
    }
    assert_eq!(sent.len(), total);
}
