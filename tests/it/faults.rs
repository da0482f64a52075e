//! Faults around the pipeline: Twilio answering slowly or dropping the connection, Twilio
//! repeating a webhook long after the bus forgot it, JetStream refusing a recorded reply (so its
//! turn comes again), Redis restarting, and SIGTERM with a turn in flight. Each ends with every
//! message answered exactly once.

use crate::support;

use std::time::Duration;

use support::{
    fake_agent_webhook::FakeAgentWebhook,
    fake_twilio::ScriptedResponse,
    harness::{Mode, World, echoed_lines, eventually, sid},
};

const FROM: &str = "+14155550100";
const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_slow_twilio_and_a_dropped_connection_still_give_one_message_each() {
    let w = World::start_with(&[("WAGATE_TWILIO_TIMEOUT_MS", "1000")]).await;
    w.wagate.echo_agent("demo").await;
    // Twilio makes the message but answers after our timeout: ambiguous, settled by lookup.
    w.twilio
        .push_response(ScriptedResponse::Slow(Duration::from_millis(2500)));
    w.wagate.inbound("demo", &sid(1), FROM, "slow").await;
    w.twilio.wait_for_sent(1, WAIT).await;
    // The connection drops before any answer, and Twilio made nothing: sent again, once.
    w.twilio.push_response(ScriptedResponse::Reset);
    w.wagate.inbound("demo", &sid(2), FROM, "reset").await;
    w.twilio.wait_for_sent(2, WAIT).await;
    // A third message is a barrier: its reply follows any second post of the first two.
    w.wagate.inbound("demo", &sid(3), FROM, "after").await;
    let bodies: Vec<String> = w
        .twilio
        .wait_for_sent(3, WAIT)
        .await
        .iter()
        .map(|m| m.body.clone().unwrap())
        .collect();
    assert_eq!(bodies, ["slow", "reset", "after"]);
}

#[tokio::test]
async fn the_same_message_sid_after_the_bus_forgot_it_is_not_answered_again() {
    let w = World::start_with(&[("WAGATE_DEDUPE_WINDOW_MS", "1000")]).await;
    w.wagate.echo_agent("demo").await;
    assert_eq!(
        w.wagate
            .inbound("demo", &sid(7), FROM, "once")
            .await
            .status(),
        200
    );
    w.twilio.wait_for_sent(1, WAIT).await;
    // Long after JetStream's duplicate window: Twilio repeats it four times at once.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let id = sid(7);
    let repeats = (0..4).map(|_| w.wagate.inbound("demo", &id, FROM, "once"));
    for r in futures::future::join_all(repeats).await {
        assert_eq!(r.status(), 200);
    }
    // The user's next message is a barrier: it is handled after the repeats, and its reply
    // follows anything they could have sent.
    w.wagate.inbound("demo", &sid(8), FROM, "next").await;
    let sent = w.twilio.wait_for_sent(2, WAIT).await;
    let bodies: Vec<_> = sent.iter().map(|m| m.body.as_deref()).collect();
    assert_eq!(
        bodies,
        [Some("once"), Some("next")],
        "one reply per MessageSid"
    );
    assert_eq!(w.wagate.leads("demo").await[0]["message_count"], 2);
    assert_eq!(
        w.wagate.session_contents("demo", FROM).await,
        ["once", "once", "next", "next"],
        "each turn is stored once"
    );
}

/// Makes JetStream refuse every publish on `stream` (a byte limit of one, new messages
/// discarded), or takes the limit away again, as a full stream would and then would not.
async fn refuse_publishes(nats_url: &str, stream: &str, refuse: bool) {
    use async_nats::jetstream::stream::DiscardPolicy;
    let js = async_nats::jetstream::new(async_nats::connect(nats_url).await.unwrap());
    let mut config = js
        .get_stream(stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    (config.max_bytes, config.discard) = if refuse {
        (1, DiscardPolicy::New)
    } else {
        (-1, DiscardPolicy::Old)
    };
    js.update_stream(&config).await.unwrap();
}

/// A turn whose reply is recorded but whose message is not acknowledged comes back (here: the
/// outbound stream refused the reply, so the turn failed after recording it, and the message
/// was handed back). The redelivery republishes the recorded reply: the agent is not run again,
/// and the user gets one reply. Reaches into JetStream: skipped in embedded mode (scripts/test).
#[tokio::test]
async fn a_redelivered_turn_whose_reply_was_recorded_does_not_run_the_agent_again() {
    let hook = FakeAgentWebhook::start("whsec-0123456789abcdef").await;
    let w = World::start().await;
    w.wagate.agent("demo", serde_json::json!({"kind": "webhook", "url": hook.url, "secret": "whsec-0123456789abcdef"})).await;
    w.wagate.channel("demo", true).await;
    refuse_publishes(&w.servers.nats_url, "WAGATE_OUTBOUND", true).await;
    assert_eq!(
        w.wagate
            .inbound("demo", &sid(1), FROM, "once")
            .await
            .status(),
        200
    );
    hook.wait_for_requests(1, WAIT).await;
    // The agent answered and the turn was recorded; queueing the reply failed, so the message
    // was handed back unacknowledged and must come again to be finished.
    w.wagate
        .wait_until(WAIT, "the turn to fail on the full outbound stream", || {
            w.wagate.logs().contains("turn failed, will retry")
        })
        .await;
    let s = w.wagate.session("demo", FROM).await;
    assert_eq!(s["messages"].as_array().unwrap().len(), 2, "recorded: {s}");
    refuse_publishes(&w.servers.nats_url, "WAGATE_OUTBOUND", false).await;

    let sent = w.twilio.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].body.as_deref(), Some("webhook says: once"));
    // The inbound message was acknowledged (only a redelivery could, the first delivery was
    // handed back), and the reply was sent: nothing of this message is left to happen.
    eventually(WAIT, "both streams to be empty", || async {
        let inbound = w.servers.stream_state("WAGATE_INBOUND").await.messages;
        let outbound = w.servers.stream_state("WAGATE_OUTBOUND").await.messages;
        (inbound == 0 && outbound == 0).then_some(())
    })
    .await;
    assert_eq!(hook.requests().len(), 1, "the agent ran once");
    assert_eq!(w.twilio.sent().len(), 1, "one reply");
}

#[tokio::test]
async fn a_redis_restart_loses_no_session_or_lead_and_work_resumes() {
    let mut w = World::start().await;
    w.wagate.echo_agent("demo").await;
    for n in 0..3 {
        w.wagate
            .inbound("demo", &sid(n), FROM, &format!("m{n}"))
            .await;
        w.twilio.wait_for_sent(n as usize + 1, WAIT).await;
    }
    w.servers.restart_redis().await;
    for n in 3..6 {
        assert_eq!(
            w.wagate
                .inbound("demo", &sid(n), FROM, &format!("m{n}"))
                .await
                .status(),
            200
        );
    }
    // Messages that queue up may be answered together (burst coalescing): compare echoed lines.
    let answered = || {
        echoed_lines(&w.twilio.sent())
            .values()
            .map(Vec::len)
            .sum::<usize>()
    };
    w.wagate
        .wait_until(WAIT, "work to resume after the Redis restart", || {
            answered() >= 6
        })
        .await;
    let lines = echoed_lines(&w.twilio.sent());
    assert_eq!(
        lines[&format!("whatsapp:{FROM}")],
        ["m0", "m1", "m2", "m3", "m4", "m5"]
    );
    let s = w.wagate.session("demo", FROM).await;
    let users: Vec<&str> = s["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["role"] == "user")
        .map(|t| t["content"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["m0", "m1", "m2", "m3", "m4", "m5"], "no turn lost");
    assert_eq!(w.wagate.leads("demo").await[0]["message_count"], 6);
}

#[tokio::test]
async fn sigterm_finishes_the_turn_in_flight_and_exits_within_the_deadline() {
    let hook = FakeAgentWebhook::start("whsec-0123456789abcdef").await;
    hook.set_delay(Duration::from_millis(1000));
    let mut w = World::start_with(&[("WAGATE_SHUTDOWN_GRACE_MS", "5000")]).await;
    w.wagate.agent("demo", serde_json::json!({"kind": "webhook", "url": hook.url, "secret": "whsec-0123456789abcdef"})).await;
    w.wagate.channel("demo", true).await;
    w.wagate.inbound("demo", &sid(1), FROM, "finish me").await;
    hook.wait_for_requests(1, WAIT).await;
    let (clean, took) = w.wagate.terminate().await;
    assert!(clean, "exit status 0 after SIGTERM:\n{}", w.wagate.logs());
    assert!(
        took < Duration::from_secs(7),
        "exited within the grace period ({took:?})"
    );
    assert!(w.wagate.logs().contains("stopped"));
    let sent = w.twilio.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].body.as_deref(), Some("webhook says: finish me"));
    // Finished means acknowledged before the exit. On JetStream an ack that never left would
    // only show after the 30 s ack wait, so look at the stream: it holds nothing.
    if w.servers.mode == Mode::Distributed {
        eventually(WAIT, "the turn's ack to reach JetStream", || async {
            (w.servers.stream_state("WAGATE_INBOUND").await.messages == 0).then_some(())
        })
        .await;
    }
    // Started again, it has nothing left over. A later message of the same user is a barrier:
    // it is handled only after anything left over of that conversation, so once it is answered
    // a second run of the first would have shown.
    w.wagate.restart().await;
    w.wagate.inbound("demo", &sid(2), FROM, "after").await;
    let sent = w.twilio.wait_for_sent(2, WAIT).await;
    let bodies: Vec<_> = sent.iter().map(|m| m.body.as_deref()).collect();
    assert_eq!(
        bodies,
        [Some("webhook says: finish me"), Some("webhook says: after")]
    );
    assert_eq!(hook.requests().len(), 2, "the agent ran once per message");
}
