//! Nothing accepted is lost when NATS goes away: ingress spools what it accepted (answering
//! 200), and publishes it in order once NATS is back; the pipeline then answers every message.

mod support;

use std::time::Duration;

use support::harness::{World, echoed_lines, sid};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_accepted_while_nats_is_down_are_answered_once_it_is_back() {
    let mut w = World::start_with(&[("WAGATE_SPOOL_AFTER_MS", "300")]).await;
    w.wagate.echo_agent("demo").await;
    assert_eq!(
        w.wagate
            .inbound("demo", &sid(1), "+14155550100", "before")
            .await
            .status(),
        200
    );
    w.twilio.wait_for_sent(1, Duration::from_secs(15)).await;

    w.servers.kill_nats();
    let users = ["+14155550101", "+14155550102", "+14155550103"];
    let mut n = 10;
    for round in 0..4 {
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
    w.servers.restart_nats().await;

    // Spooled messages drain in a rush and may be answered together (burst coalescing):
    // compare echoed lines.
    let answered = || {
        echoed_lines(&w.twilio.sent())
            .values()
            .map(Vec::len)
            .sum::<usize>()
    };
    w.wagate
        .wait_until(Duration::from_secs(60), "the spooled messages", || {
            answered() >= 13
        })
        .await;
    let lines = echoed_lines(&w.twilio.sent());
    for user in users {
        let expected: Vec<String> = (0..4)
            .map(|round| format!("{user} during {round}"))
            .collect();
        assert_eq!(
            lines[&format!("whatsapp:{user}")],
            expected,
            "every spooled message answered once, in order"
        );
    }
    // A message after the outage takes the normal path again.
    assert_eq!(
        w.wagate
            .inbound("demo", &sid(99), "+14155550100", "after")
            .await
            .status(),
        200
    );
    w.wagate
        .wait_until(
            Duration::from_secs(15),
            "the message after the outage",
            || answered() >= 14,
        )
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(answered(), 14);
    assert_eq!(
        echoed_lines(&w.twilio.sent())["whatsapp:+14155550100"],
        ["before", "after"]
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
