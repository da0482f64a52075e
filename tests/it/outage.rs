//! Nothing accepted is lost when NATS goes away: turns in flight are finished once it is back,
//! ingress spools what it accepts meanwhile (answering 200) and publishes it in order, and the
//! pipeline then answers every message once.

use crate::support;

use std::time::Duration;

use support::{
    fake_agent_webhook::FakeAgentWebhook,
    harness::{World, sid},
};

const SECRET: &str = "whsec-0123456789abcdef";
const WAIT: Duration = Duration::from_secs(25);

/// NATS dies while messages are in flight: stored in JetStream (answered 200) and in the hands
/// of a worker whose agent is still thinking, not yet replied. More arrive during the outage
/// (spooled by ingress). Once NATS is back every one of them is answered exactly once, in
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_in_flight_or_accepted_while_nats_is_down_are_answered_once_it_is_back() {
    let hook = FakeAgentWebhook::start(SECRET).await;
    // One message per turn, so each reply names the message it answers.
    let mut w = World::start_with(&[
        ("WAGATE_SPOOL_AFTER_MS", "300"),
        ("WAGATE_COALESCE_MAX", "1"),
    ])
    .await;
    w.wagate
        .agent(
            "demo",
            serde_json::json!({"kind": "webhook", "url": hook.url, "secret": SECRET}),
        )
        .await;
    w.wagate.channel("demo", true).await;
    let before = "+14155550100";
    assert_eq!(
        w.wagate
            .inbound("demo", &sid(1), before, "before")
            .await
            .status(),
        200
    );
    w.twilio.wait_for_sent(1, WAIT).await;

    // The agent now takes a while, and a message of each user goes in.
    hook.set_delay(Duration::from_millis(1500));
    let users = ["+14155550101", "+14155550102", "+14155550103"];
    let mut n = 10;
    for user in users {
        n += 1;
        let r = w
            .wagate
            .inbound("demo", &sid(n), user, &format!("{user} in flight"))
            .await;
        assert_eq!(r.status(), 200, "stored in JetStream");
    }
    hook.wait_for_requests(1 + users.len(), WAIT).await;
    assert_eq!(
        w.twilio.sent().len(),
        1,
        "the turns are in flight, none answered yet"
    );
    w.servers.kill_nats();
    for round in 0..2 {
        for user in users {
            n += 1;
            let r = w
                .wagate
                .inbound("demo", &sid(n), user, &format!("{user} during {round}"))
                .await;
            assert_eq!(r.status(), 200, "accepted while NATS is down");
        }
    }
    assert!(
        w.wagate.logs().contains("spooling the message"),
        "{}",
        w.wagate.logs()
    );
    // NATS stays away until the turns in flight have failed to queue their replies (the
    // publish times out): they were recorded but not acknowledged, and must be finished after.
    w.wagate
        .wait_until(WAIT, "the turns in flight to fail", || {
            w.wagate.logs().matches("turn failed, will retry").count() >= users.len()
        })
        .await;
    assert_eq!(
        w.twilio.sent().len(),
        1,
        "nothing answered while NATS was down"
    );
    w.servers.restart_nats().await;

    let replies = |to: &str| -> Vec<String> {
        w.twilio
            .sent()
            .iter()
            .filter(|m| m.to == format!("whatsapp:{to}"))
            .map(|m| m.body.clone().unwrap_or_default())
            .collect()
    };
    let expected = |user: &str| -> Vec<String> {
        ["in flight", "during 0", "during 1"]
            .iter()
            .map(|m| format!("webhook says: {user} {m}"))
            .collect()
    };
    w.wagate
        .wait_until(Duration::from_secs(60), "every message answered", || {
            users.iter().all(|u| replies(u).len() >= 3)
        })
        .await;
    // A message after the outage takes the normal path again; it is a barrier, as the last
    // of its conversation: when it is answered, each user's messages have been handled.
    hook.set_delay(Duration::ZERO);
    for user in users {
        n += 1;
        let r = w.wagate.inbound("demo", &sid(n), user, "after").await;
        assert_eq!(r.status(), 200);
    }
    w.wagate
        .wait_until(WAIT, "the messages after the outage", || {
            users.iter().all(|u| replies(u).len() >= 4)
        })
        .await;
    for user in users {
        let mut want = expected(user);
        want.push("webhook says: after".into());
        assert_eq!(replies(user), want, "every message answered once, in order");
    }
    assert_eq!(replies(before), ["webhook says: before"]);
    // The turns cut off by the outage were recorded with their replies before they failed:
    // their redeliveries sent what was recorded, and the agent ran once per message.
    assert_eq!(
        hook.requests().len(),
        1 + users.len() * 4,
        "the agent ran once per message"
    );
    assert!(
        w.twilio.violations().is_empty(),
        "{:?}",
        w.twilio.violations()
    );
}

#[tokio::test]
async fn a_full_spool_answers_503_so_twilio_retries() {
    let mut w = World::start_with(&[
        ("WAGATE_SPOOL_AFTER_MS", "300"),
        ("WAGATE_SPOOL_MAX_MB", "0"),
    ])
    .await;
    w.wagate.echo_agent("demo").await;
    w.servers.kill_nats();
    let r = w
        .wagate
        .inbound("demo", &sid(1), "+14155550100", "no room")
        .await;
    assert_eq!(r.status(), 503);
    // Twilio retries; once NATS is back the retry is accepted and answered.
    w.servers.restart_nats().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = w
            .wagate
            .inbound("demo", &sid(1), "+14155550100", "no room")
            .await;
        if r.status() == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never accepted after NATS came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sent = w.twilio.wait_for_sent(1, Duration::from_secs(20)).await;
    assert_eq!(sent[0].body.as_deref(), Some("no room"));
}
