//! Pacing end to end: a sender number posts at its channel's `mps` (measured at the fake
//! Twilio, which records when each post arrived), with a burst of one message at most, and a
//! live reply goes before bulk sends queued ahead of it. The harness runs every other suite
//! with `WAGATE_SANDBOX_MPS=1000`; these tests set their channels' own rates.

use crate::support;

use std::time::{Duration, SystemTime};

use reqwest::Method;
use support::harness::{ACCOUNT_SID, AUTH_TOKEN, SANDBOX, World, eventually, sid};

const WAIT: Duration = Duration::from_secs(30);

/// `PUT /v1/agents/demo/whatsapp` on the test account with `extra` fields: status and answer.
async fn put_channel(w: &World, extra: serde_json::Value) -> (u16, serde_json::Value) {
    let mut body = serde_json::json!({
        "account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN,
        "phone_number": SANDBOX, "enabled": true,
    });
    for (k, v) in extra.as_object().expect("an object") {
        body[k] = v.clone();
    }
    let r = w
        .wagate
        .admin(Method::PUT, "/v1/agents/demo/whatsapp")
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn user(n: u64) -> String {
    format!("+1415555{n:04}")
}

fn since(t: SystemTime, start: SystemTime) -> Duration {
    t.duration_since(start).unwrap_or_default()
}

/// Eight users write at once to a channel of 4 messages a second: their replies reach Twilio
/// two at once (the rate's one and the burst of one), then a quarter second apart, and no
/// faster at any point. The channel's answer shows the rate in effect.
#[tokio::test]
async fn a_senders_posts_are_spaced_by_its_mps_with_one_message_of_burst() {
    let w = World::start().await;
    w.wagate
        .agent("demo", serde_json::json!({"kind": "echo"}))
        .await;
    let (status, answer) = put_channel(&w, serde_json::json!({})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["mps"], 1000.0,
        "a Sandbox channel without mps: WAGATE_SANDBOX_MPS"
    );
    for bad in [
        serde_json::json!(0),
        serde_json::json!(-1),
        serde_json::json!(20_000),
        serde_json::json!("fast"),
    ] {
        let (status, answer) = put_channel(&w, serde_json::json!({"mps": bad})).await;
        assert!(
            status == 400 || status == 422,
            "mps {bad}: {status} {answer}"
        );
    }
    let (status, answer) = put_channel(&w, serde_json::json!({"mps": 4})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["mps"], 4.0, "{answer}");
    let (_, answer) = put_channel(&w, serde_json::json!({})).await;
    assert_eq!(answer["mps"], 4.0, "left out keeps it: {answer}");

    let n = 8;
    for i in 0..n {
        let r = w
            .wagate
            .inbound("demo", &sid(i + 1), &user(i), &format!("hello {i}"))
            .await;
        assert_eq!(r.status(), 200);
    }
    let sent = w.twilio.wait_for_sent(n as usize, WAIT).await;
    let mut at: Vec<SystemTime> = sent.iter().map(|m| m.received_at).collect();
    at.sort();
    let start = at[0];
    let interval = Duration::from_millis(250);
    // Post k (from 0) is allowed from (k - 1) intervals after the first, the burst of one
    // aside; a post may reach the fake a little earlier than its slot's order says (HTTP
    // timing), hence the slack.
    let slack = Duration::from_millis(60);
    for (k, t) in at.iter().enumerate().skip(2) {
        let earliest = interval * (k as u32 - 1);
        assert!(
            since(*t, start) + slack >= earliest,
            "post {k} came {:?} after the first, before its slot at {earliest:?}: {:?}",
            since(*t, start),
            at.iter().map(|t| since(*t, start)).collect::<Vec<_>>()
        );
    }
    let took = since(at[at.len() - 1], start);
    assert!(
        took < interval * (n as u32 - 2) + Duration::from_secs(2),
        "the rate is kept, not undershot by much: {took:?}"
    );
    let waits = w
        .wagate
        .metric("wagate_pacing_wait_seconds_count{priority=\"live\"}")
        .await;
    assert!(waits >= n as f64, "{waits} paced posts counted");
}

/// Bulk sends (templates queued through the admin API) fill a slow channel's schedule and
/// more than the sender's concurrency; a user who writes meanwhile is answered at once, not
/// after them: bulk sends queue apart, and a live reply takes the next slot.
#[tokio::test]
async fn a_live_reply_goes_before_bulk_sends_queued_ahead_of_it() {
    let w = World::start_with(&[("WAGATE_SENDER_CONCURRENCY", "2")]).await;
    w.wagate
        .agent("demo", serde_json::json!({"kind": "echo"}))
        .await;
    let (status, answer) = put_channel(&w, serde_json::json!({"mps": 2})).await;
    assert_eq!(status, 200, "{answer}");
    let bulk = 8;
    for i in 0..bulk {
        let r = w
            .wagate
            .admin(Method::POST, "/v1/agents/demo/messages")
            .json(&serde_json::json!({"to": user(i), "content_sid": format!("HX{}", "ab".repeat(16))}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    // The bulk sends are under way: the schedule is taken.
    w.twilio.wait_for_sent(1, WAIT).await;
    let live = "+14155550999";
    let wrote = SystemTime::now();
    let r = w
        .wagate
        .inbound("demo", &sid(500), live, "are you there?")
        .await;
    assert_eq!(r.status(), 200);
    let to = format!("whatsapp:{live}");
    let sent = eventually(WAIT, "the live reply", || async {
        let sent = w.twilio.sent();
        sent.iter().any(|m| m.to == to).then_some(sent)
    })
    .await;
    let position = sent.iter().position(|m| m.to == to).unwrap_or(usize::MAX);
    let reply_at = sent[position].received_at;
    assert!(
        position <= 3,
        "the live reply went out after {position} bulk sends of {bulk}"
    );
    assert!(
        since(reply_at, wrote) < Duration::from_millis(1500),
        "the live reply took {:?} (bulk sends go every 500 ms)",
        since(reply_at, wrote)
    );
    // The bulk sends all go out after it, still at the rate.
    let all = w.twilio.wait_for_sent(bulk as usize + 1, WAIT).await;
    assert_eq!(all.len(), bulk as usize + 1);
    let bulk_waits = w
        .wagate
        .metric("wagate_pacing_wait_seconds_count{priority=\"bulk\"}")
        .await;
    assert!(bulk_waits >= bulk as f64, "{bulk_waits}");
}
