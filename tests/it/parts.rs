//! Ordered parts: WhatsApp may deliver messages posted in quick succession out of order, so on
//! a channel with `ordered_parts` (the default) a long reply's part n+1 is posted only once
//! Twilio reports part n `sent` (or a later status), or after `WAGATE_PART_SENT_TIMEOUT_MS`
//! without a report. The fake Twilio reports statuses to the `StatusCallback` as Twilio does.

use std::time::{Duration, SystemTime};

use reqwest::Method;

use crate::support::{
    fake_twilio::{SentMessage, StatusReport},
    harness::{ACCOUNT_SID, SANDBOX, World, sid},
};

const FROM: &str = "+15005550006";
const WAIT: Duration = Duration::from_secs(30);

/// A text of about 4,000 characters in words: three parts of at most 1,600.
fn long_text() -> String {
    (0..800)
        .map(|i| format!("w{:03}", i % 1000))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Opens the user's 24-hour window (the echo's reply is the first message), then sends
/// `long_text()` through the admin API and waits for its parts; returns them.
async fn send_long_reply(w: &World) -> Vec<SentMessage> {
    w.wagate.inbound("demo", &sid(1), FROM, "hi").await;
    w.twilio.wait_for_sent(1, WAIT).await;
    let r = w
        .wagate
        .admin(Method::POST, "/v1/agents/demo/messages")
        .json(&serde_json::json!({"to": FROM, "body": long_text()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    let sent = w.twilio.wait_for_sent(4, WAIT).await;
    assert_eq!(sent.len(), 4, "the reply is three parts");
    let joined: Vec<&str> = sent[1..].iter().filter_map(|m| m.body.as_deref()).collect();
    assert_eq!(joined.join(" "), long_text(), "in order, nothing lost");
    sent[1..].to_vec()
}

/// When the fake reported `message` `sent` (wagate having taken the report).
fn reported_sent(reports: &[StatusReport], message: &SentMessage) -> SystemTime {
    let report = reports
        .iter()
        .find(|r| r.sid == message.sid && r.status == "sent")
        .unwrap_or_else(|| panic!("no sent report for {}: {reports:?}", message.sid));
    assert!(
        matches!(report.answer, Ok(200..=299)),
        "wagate takes the report: {report:?}"
    );
    report.at
}

fn after(later: SystemTime, earlier: SystemTime) -> Duration {
    later.duration_since(earlier).unwrap_or_else(|e| {
        panic!("{:?} too early", e.duration());
    })
}

#[tokio::test]
async fn each_part_of_a_long_reply_waits_until_twilio_reports_the_one_before_sent() {
    let w = World::start().await;
    w.wagate.echo_agent("demo").await;
    let view = w.wagate.channel("demo", true).await;
    assert_eq!(view["ordered_parts"], true, "on by default: {view}");
    w.twilio.set_status_delay(Duration::from_millis(800));
    let parts = send_long_reply(&w).await;
    // Each part's `sent` report (and so its wait) is over before the next part is posted:
    // wagate answered it first.
    let reports = w.twilio.status_reports();
    for pair in parts.windows(2) {
        let sent = reported_sent(&reports, &pair[0]);
        assert!(
            pair[1].received_at >= sent,
            "part {} posted {:?} before {} was reported sent",
            pair[1].sid,
            after(sent, pair[1].received_at),
            pair[0].sid
        );
        assert!(after(pair[1].received_at, pair[0].received_at) >= Duration::from_millis(800));
    }
    let waited = w
        .wagate
        .metric("wagate_part_order_wait_seconds_count{outcome=\"reported\"}")
        .await;
    assert_eq!(waited, 2.0, "two parts waited for a report");
    assert!(
        w.twilio.violations().is_empty(),
        "{:?}",
        w.twilio.violations()
    );
}

#[tokio::test]
async fn with_ordered_parts_off_the_parts_go_as_fast_as_twilio_takes_them() {
    let w = World::start().await;
    w.wagate.echo_agent("demo").await;
    let r = w
        .wagate
        .admin(Method::PUT, "/v1/agents/demo/whatsapp")
        .json(&serde_json::json!({
            "account_sid": ACCOUNT_SID, "phone_number": SANDBOX, "ordered_parts": false
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let view: serde_json::Value = r.json().await.unwrap();
    assert_eq!(view["ordered_parts"], false, "{view}");
    assert_eq!(
        w.wagate.admin_json("/v1/agents/demo/whatsapp").await["ordered_parts"],
        false
    );
    w.twilio.set_status_delay(Duration::from_secs(3));
    let parts = send_long_reply(&w).await;
    assert!(
        w.twilio
            .status_reports()
            .iter()
            .all(|r| r.sid != parts[0].sid),
        "all three parts were posted before Twilio reported the first"
    );
    assert!(after(parts[2].received_at, parts[0].received_at) < Duration::from_secs(3));
}

#[tokio::test]
async fn a_part_whose_predecessor_is_never_reported_goes_after_the_timeout() {
    let w = World::start_with(&[("WAGATE_PART_SENT_TIMEOUT_MS", "1500")]).await;
    w.wagate.echo_agent("demo").await;
    w.twilio.withhold_status_callbacks();
    let parts = send_long_reply(&w).await;
    for pair in parts.windows(2) {
        let gap = after(pair[1].received_at, pair[0].received_at);
        assert!(gap >= Duration::from_millis(1500), "{gap:?}");
    }
    let timed_out = w
        .wagate
        .metric("wagate_part_order_wait_seconds_count{outcome=\"timeout\"}")
        .await;
    assert_eq!(timed_out, 2.0);
}
