//! Guarantee 3 across processes: with several worker and sender processes, the messages of one
//! conversation are handled one at a time in arrival order, and replies go out in order, while
//! different conversations run in parallel.

use crate::support;

use std::{collections::HashMap, time::Duration};

use support::{
    fake_agent_webhook::FakeAgentWebhook,
    fake_twilio::FakeTwilio,
    harness::{ACCOUNT_SID, AUTH_TOKEN, Servers, Wagate, sid},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conversations_stay_in_order_across_worker_and_sender_processes() {
    let servers = Servers::start().await;
    let twilio = FakeTwilio::start().await;
    twilio.add_account(ACCOUNT_SID, AUTH_TOKEN);
    let hook = FakeAgentWebhook::start("whsec-0123456789abcdef").await;
    // A slow agent that answers with what it was sent: overlapping turns would show.
    hook.set_delay(Duration::from_millis(40));
    hook.set_reply(|req| serde_json::json!({"reply": req["message"]["body"]}));
    let ingress = Wagate::start_role("ingress", &servers, &twilio.base_url, &[]).await;
    // Coalescing off: this test is about order alone (one turn per message); bursts are
    // tested in tests/it/coalescing.rs.
    let mut others = Vec::new();
    for role in ["worker", "worker", "worker", "sender", "sender"] {
        others.push(
            Wagate::start_role(
                role,
                &servers,
                &twilio.base_url,
                &[
                    ("WAGATE_PUBLIC_URL", &ingress.public_url),
                    ("WAGATE_COALESCE_MAX", "1"),
                ],
            )
            .await,
        );
    }
    ingress.agent("biz", serde_json::json!({"kind": "webhook", "url": hook.url, "secret": "whsec-0123456789abcdef"})).await;
    ingress.channel("biz", true).await;

    const CONVERSATIONS: u64 = 6;
    const MESSAGES: u64 = 8;
    let users: Vec<String> = (0..CONVERSATIONS)
        .map(|c| format!("+1415555030{c}"))
        .collect();
    let conversations = users.iter().enumerate().map(|(c, user)| {
        let ingress = &ingress;
        async move {
            for m in 0..MESSAGES {
                let r = ingress
                    .inbound(
                        "biz",
                        &sid(100 * c as u64 + m),
                        user,
                        &format!("{user} #{m}"),
                    )
                    .await;
                assert_eq!(r.status(), 200);
            }
        }
    });
    futures::future::join_all(conversations).await;

    let sent = twilio
        .wait_for_sent((CONVERSATIONS * MESSAGES) as usize, Duration::from_secs(60))
        .await;
    let mut replies: HashMap<String, Vec<String>> = HashMap::new();
    for m in &sent {
        replies
            .entry(m.to.clone())
            .or_default()
            .push(m.body.clone().unwrap());
    }
    for user in &users {
        let expected: Vec<String> = (0..MESSAGES).map(|m| format!("{user} #{m}")).collect();
        assert_eq!(
            replies[&format!("whatsapp:{user}")],
            expected,
            "replies to {user} in order"
        );
        let turns = ingress.session_contents("biz", user).await;
        let alternating: Vec<String> = expected
            .iter()
            .flat_map(|e| [e.clone(), e.clone()])
            .collect();
        assert_eq!(
            turns, alternating,
            "session of {user}: each turn whole and in order"
        );
    }
    // Each agent call saw exactly the turns before it: no two turns of a conversation overlapped.
    for req in hook.requests() {
        let body = req["message"]["body"].as_str().unwrap();
        let m: usize = body.rsplit('#').next().unwrap().parse().unwrap();
        assert_eq!(
            req["messages"].as_array().unwrap().len(),
            2 * m + 1,
            "history seen by {body}"
        );
    }
    assert_eq!(
        hook.requests().len(),
        (CONVERSATIONS * MESSAGES) as usize,
        "each message ran the agent once"
    );
    drop(others);
}

/// Messages of one conversation that wait in one worker behind a slow turn go one after the
/// other as soon as the turn before them is done: the worker knows it acked that turn, so the
/// next message does not wait for JetStream to apply the ack (acks are sent, not confirmed).
#[tokio::test]
async fn queued_messages_of_a_conversation_follow_without_waiting_for_their_turn() {
    let servers = Servers::start().await;
    let twilio = FakeTwilio::start().await;
    twilio.add_account(ACCOUNT_SID, AUTH_TOKEN);
    let hook = FakeAgentWebhook::start("whsec-0123456789abcdef").await;
    // Slow enough that every later message is queued before the first turn ends.
    hook.set_delay(Duration::from_millis(300));
    hook.set_reply(|req| serde_json::json!({"reply": req["message"]["body"]}));
    let wagate = Wagate::start(&servers, &twilio.base_url, &[("WAGATE_COALESCE_MAX", "1")]).await;
    wagate.agent("biz", serde_json::json!({"kind": "webhook", "url": hook.url, "secret": "whsec-0123456789abcdef"})).await;
    wagate.channel("biz", true).await;

    const MESSAGES: u64 = 5;
    let user = "+14155550400";
    for m in 0..MESSAGES {
        let r = wagate.inbound("biz", &sid(m), user, &format!("#{m}")).await;
        assert_eq!(r.status(), 200);
    }
    let sent = twilio
        .wait_for_sent(MESSAGES as usize, Duration::from_secs(30))
        .await;
    let bodies: Vec<String> = sent.iter().map(|m| m.body.clone().unwrap()).collect();
    let expected: Vec<String> = (0..MESSAGES).map(|m| format!("#{m}")).collect();
    assert_eq!(bodies, expected, "in order");
    let metrics = wagate.metrics().await;
    let waits: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("wagate_order_waits_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(waits, 0.0, "no message was handed back to wait: {metrics}");
}
