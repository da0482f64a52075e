//! Burst coalescing: messages one user sends back to back go to the agent as one turn.

use crate::support;

use std::time::Duration;

use support::{
    fake_agent_webhook::FakeAgentWebhook,
    harness::{World, sid},
};

const FROM: &str = "+14155550100";
const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_burst_within_the_window_is_one_turn_and_echo_joins_it() {
    let w = World::start_with(&[("WAGATE_COALESCE_MS", "1500")]).await;
    w.wagate.echo_agent("demo").await;
    for (n, text) in ["Hi", "I have a question", "about my order"]
        .iter()
        .enumerate()
    {
        assert_eq!(
            w.wagate
                .inbound("demo", &sid(n as u64 + 1), FROM, text)
                .await
                .status(),
            200
        );
    }
    let sent = w.twilio.wait_for_sent(1, WAIT).await;
    assert_eq!(
        sent[0].body.as_deref(),
        Some("Hi\nI have a question\nabout my order")
    );
    // A later message is a barrier: its reply follows any other to the burst.
    w.wagate.inbound("demo", &sid(4), FROM, "thanks").await;
    let sent = w.twilio.wait_for_sent(2, WAIT).await;
    let bodies: Vec<_> = sent.iter().map(|m| m.body.as_deref()).collect();
    assert_eq!(
        bodies,
        [
            Some("Hi\nI have a question\nabout my order"),
            Some("thanks")
        ],
        "one turn, one reply"
    );
    let turns = w.wagate.session_contents("demo", FROM).await;
    assert_eq!(
        turns,
        [
            "Hi",
            "I have a question",
            "about my order",
            "Hi\nI have a question\nabout my order",
            "thanks",
            "thanks"
        ]
    );
    assert_eq!(w.wagate.leads("demo").await[0]["message_count"], 4);
}

#[tokio::test]
async fn messages_that_queue_behind_a_slow_turn_go_together_without_a_window() {
    let hook = FakeAgentWebhook::start("whsec-0123456789abcdef").await;
    hook.set_delay(Duration::from_millis(800));
    let w = World::start().await;
    w.wagate.agent("biz", serde_json::json!({"kind": "webhook", "url": hook.url, "secret": "whsec-0123456789abcdef"})).await;
    w.wagate.channel("biz", true).await;
    w.wagate.inbound("biz", &sid(1), FROM, "first").await;
    hook.wait_for_requests(1, WAIT).await;
    w.wagate.inbound("biz", &sid(2), FROM, "second").await;
    w.wagate.inbound("biz", &sid(3), FROM, "third").await;
    w.twilio.wait_for_sent(2, WAIT).await;
    // A later message is a barrier: its turn and reply follow any other.
    w.wagate.inbound("biz", &sid(4), FROM, "fourth").await;
    let sent = w.twilio.wait_for_sent(3, WAIT).await;
    assert_eq!(
        hook.requests().len(),
        3,
        "the two queued messages made one turn"
    );
    let bodies: Vec<_> = sent[1..].iter().map(|m| m.body.as_deref()).collect();
    assert_eq!(
        bodies,
        [Some("webhook says: third"), Some("webhook says: fourth")]
    );
    let second = &hook.requests()[1];
    let users: Vec<&str> = second["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        users,
        ["first", "second", "third"],
        "the agent sees the whole burst after the history"
    );
}
