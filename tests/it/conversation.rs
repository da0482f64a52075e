//! Conversations end to end: the exact request Twilio receives, the session kept in Redis, the
//! agent seeing the history, leads captured once, long replies split, duplicates answered once.

use crate::support;

use std::time::Duration;

use base64::Engine;
use support::{
    fake_agent_webhook::FakeAgentWebhook,
    fake_openai::FakeOpenAi,
    harness::{ACCOUNT_SID, AUTH_TOKEN, SANDBOX, World, sid},
};

const FROM: &str = "+14155550100";
const WAIT: Duration = Duration::from_secs(15);

#[tokio::test]
async fn echo_reply_reaches_twilio_exactly_as_the_api_wants_it() {
    let w = World::start().await;
    w.wagate.echo_agent("demo").await;
    assert_eq!(
        w.wagate
            .inbound("demo", &sid(1), FROM, "Hola ¿qué tal? 👋")
            .await
            .status(),
        200
    );
    let sent = w.twilio.wait_for_sent(1, WAIT).await;
    let m = &sent[0];
    assert_eq!(m.account_sid, ACCOUNT_SID);
    assert_eq!(m.to, format!("whatsapp:{FROM}"));
    assert_eq!(m.from, format!("whatsapp:{SANDBOX}"));
    assert_eq!(m.body.as_deref(), Some("Hola ¿qué tal? 👋"));
    assert_eq!(
        m.status_callback.as_deref(),
        Some(
            format!(
                "{}/webhooks/twilio/whatsapp/demo/status",
                w.wagate.public_url
            )
            .as_str()
        )
    );
    let raw = w
        .twilio
        .requests()
        .into_iter()
        .find(|r| r.method == "POST")
        .unwrap();
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{ACCOUNT_SID}:{AUTH_TOKEN}"))
    );
    assert_eq!(raw.authorization.as_deref(), Some(expected.as_str()));
    assert!(
        w.twilio.violations().is_empty(),
        "{:?}",
        w.twilio.violations()
    );
}

#[tokio::test]
async fn session_keeps_the_whole_conversation_and_lead_is_captured() {
    let w = World::start().await;
    w.wagate.echo_agent("demo").await;
    for (n, text) in ["one", "two", "three"].iter().enumerate() {
        assert_eq!(
            w.wagate
                .inbound("demo", &sid(n as u64 + 1), FROM, text)
                .await
                .status(),
            200
        );
        w.twilio.wait_for_sent(n + 1, WAIT).await;
    }
    let s = w.wagate.session("demo", FROM).await;
    assert_eq!(s["session_id"], format!("twilio_demo_{FROM}"));
    let turns: Vec<(String, String)> = s["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["role"].as_str().unwrap().to_owned(),
                t["content"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = ["one", "two", "three"]
        .iter()
        .flat_map(|t| {
            [
                ("user".to_owned(), t.to_string()),
                ("assistant".to_owned(), t.to_string()),
            ]
        })
        .collect();
    assert_eq!(turns, expected);
    let leads: serde_json::Value = w
        .wagate
        .admin(reqwest::Method::GET, "/v1/agents/demo/leads")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let leads = leads.as_array().unwrap();
    assert_eq!(leads.len(), 1);
    assert_eq!(leads[0]["phone"], FROM);
    assert_eq!(leads[0]["platform"], "whatsapp");
    assert_eq!(leads[0]["profile_name"], "Test User");
    assert_eq!(leads[0]["message_count"], 3);
    let csv = w
        .wagate
        .admin_text("/v1/agents/demo/leads?format=csv")
        .await;
    assert!(
        csv.starts_with("phone,platform,profile_name,first_seen,last_seen,message_count"),
        "{csv}"
    );
    assert!(
        csv.contains(&format!("{FROM},whatsapp,Test User,")),
        "{csv}"
    );
}

#[tokio::test]
async fn openai_backend_gets_the_first_exchange_with_the_second_message() {
    let model = FakeOpenAi::start("sk-test-key-123").await;
    let w = World::start().await;
    w.wagate
        .agent(
            "bot",
            serde_json::json!({
                "kind": "openai", "base_url": model.base_url, "model": "gpt-test",
                "api_key": "sk-test-key-123", "system_prompt": "You are terse."
            }),
        )
        .await;
    w.wagate.channel("bot", true).await;
    w.wagate.inbound("bot", &sid(1), FROM, "What is 2+2?").await;
    let first = w.twilio.wait_for_sent(1, WAIT).await;
    w.wagate.inbound("bot", &sid(2), FROM, "And times 3?").await;
    w.twilio.wait_for_sent(2, WAIT).await;
    let requests = model.wait_for_requests(2, WAIT).await;
    let messages = requests[1]["messages"].as_array().unwrap();
    let pairs: Vec<(&str, &str)> = messages
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap(),
                m["content"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        pairs,
        vec![
            ("system", "You are terse."),
            ("user", "What is 2+2?"),
            ("assistant", first[0].body.as_deref().unwrap()),
            ("user", "And times 3?"),
        ]
    );
    assert_eq!(requests[1]["model"], "gpt-test");
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

#[tokio::test]
async fn webhook_backend_is_signed_and_its_reply_is_sent() {
    let hook = FakeAgentWebhook::start("whsec-0123456789abcdef").await;
    let w = World::start().await;
    w.wagate.agent("biz", serde_json::json!({"kind": "webhook", "url": hook.url, "secret": "whsec-0123456789abcdef"})).await;
    w.wagate.channel("biz", true).await;
    w.wagate.inbound("biz", &sid(1), FROM, "ping").await;
    let sent = w.twilio.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].body.as_deref(), Some("webhook says: ping"));
    assert_eq!(hook.bad_signatures(), 0);
    let req = &hook.requests()[0];
    assert_eq!(req["session_id"], format!("twilio_biz_{FROM}"));
    assert_eq!(req["agent_id"], "biz");
    assert_eq!(req["from"], format!("whatsapp:{FROM}"));
    assert_eq!(
        req["messages"],
        serde_json::json!([{"role": "user", "content": "ping"}])
    );
    assert_eq!(req["message"]["profile_name"], "Test User");
    let fields = req["message"]["fields"].as_array().unwrap();
    assert!(
        fields.contains(&serde_json::json!(["Body", "ping"])),
        "every Twilio field reaches the agent as a name and value pair: {fields:?}"
    );
}

#[tokio::test]
async fn worker_concurrency_bounds_the_agent_calls_running_at_once() {
    let hook = FakeAgentWebhook::start(HOOK_SECRET).await;
    assert_eq!(
        six_conversations_at_once(&hook, &[("WAGATE_WORKER_CONCURRENCY", "2")]).await,
        2,
        "six conversations, WAGATE_WORKER_CONCURRENCY=2: two agent calls at a time"
    );
}

/// An HTTPS agent that offers HTTP/2 and caps its streams at 2 still gets as many calls at
/// once as `WAGATE_WORKER_CONCURRENCY` allows: on one HTTP/2 connection, the calls beyond the
/// host's stream cap would wait in line, spending their agent timeout.
#[tokio::test]
async fn worker_concurrency_holds_against_an_agent_host_that_caps_http2_streams() {
    let hook = FakeAgentWebhook::start_tls(HOOK_SECRET, Some(2)).await;
    assert_eq!(
        six_conversations_at_once(&hook, &tls_settings()).await,
        6,
        "six conversations, WAGATE_WORKER_CONCURRENCY=6: six agent calls at a time"
    );
    assert_eq!(
        hook.connections(),
        vec!["h2"; 3],
        "two streams per connection: a new HTTP/2 connection each time the others are full"
    );
}

/// A host that allows more streams than the worker has calls gets them all on one connection,
/// instead of a connection (with its buffers and TLS state) per call.
#[tokio::test]
async fn agent_calls_share_one_http2_connection_within_the_hosts_stream_cap() {
    let hook = FakeAgentWebhook::start_tls(HOOK_SECRET, Some(100)).await;
    assert_eq!(six_conversations_at_once(&hook, &tls_settings()).await, 6);
    assert_eq!(hook.connections(), vec!["h2"]);
}

/// An HTTPS host that answers ALPN with HTTP/1.1 still gets every call at once, a connection
/// per call.
#[tokio::test]
async fn an_https_agent_host_without_http2_gets_http1_connections() {
    let hook = FakeAgentWebhook::start_tls(HOOK_SECRET, None).await;
    assert_eq!(six_conversations_at_once(&hook, &tls_settings()).await, 6);
    let connections = hook.connections();
    assert!(
        connections.len() >= 6 && connections.iter().all(|c| c == "http/1.1"),
        "{connections:?}"
    );
}

/// Six calls at once, trusting the CA of `tests/fixtures/agent-tls`.
fn tls_settings() -> [(&'static str, &'static str); 2] {
    [
        ("WAGATE_WORKER_CONCURRENCY", "6"),
        (
            "SSL_CERT_FILE",
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/agent-tls/ca.pem"
            ),
        ),
    ]
}

const HOOK_SECRET: &str = "whsec-0123456789abcdef";

/// Six users write at once to an agent on `hook` that takes a while to answer; returns the
/// most agent calls that ran at the same time, once all six replies reached Twilio.
async fn six_conversations_at_once(hook: &FakeAgentWebhook, env: &[(&str, &str)]) -> usize {
    hook.set_delay(Duration::from_millis(500));
    let w = World::start_with(env).await;
    w.wagate
        .agent(
            "biz",
            serde_json::json!({"kind": "webhook", "url": hook.url, "secret": HOOK_SECRET}),
        )
        .await;
    w.wagate.channel("biz", true).await;
    for i in 0..6u64 {
        let from = format!("+1415555{i:04}");
        assert_eq!(
            w.wagate.inbound("biz", &sid(i), &from, "hi").await.status(),
            200
        );
    }
    let sent = w.twilio.wait_for_sent(6, WAIT).await;
    assert!(
        sent.iter()
            .all(|m| m.body.as_deref() == Some("webhook says: hi")),
        "{sent:?}"
    );
    hook.max_in_flight()
}

#[tokio::test]
async fn one_lead_per_phone_whatever_the_concurrency() {
    one_lead_per_phone_under(&[]).await;
}

/// The same on a single-threaded process: every role's tasks share one thread.
#[tokio::test]
async fn one_lead_per_phone_on_one_thread() {
    one_lead_per_phone_under(&[("WAGATE_THREADS", "1")]).await;
}

/// 5 phones × 8 messages posted at once: every message echoed once, one lead per phone.
async fn one_lead_per_phone_under(env: &[(&str, &str)]) {
    let w = World::start_with(env).await;
    w.wagate.echo_agent("demo").await;
    let phones: Vec<String> = (0..5).map(|i| format!("+1415555020{i}")).collect();
    let mut posts = Vec::new();
    for (p, phone) in phones.iter().enumerate() {
        for m in 0..8u64 {
            let wagate = &w.wagate;
            let id = sid(1000 * p as u64 + m);
            let phone = phone.clone();
            posts.push(async move {
                wagate
                    .inbound("demo", &id, &phone, &format!("m{m}"))
                    .await
                    .status()
            });
        }
    }
    let statuses = futures::future::join_all(posts).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // Messages that queue up behind a running turn are answered together (burst
    // coalescing), so count what was handled, not replies: every message echoed exactly once.
    let echoed = || {
        w.twilio
            .sent()
            .iter()
            .flat_map(|m| {
                m.body
                    .clone()
                    .unwrap_or_default()
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .count()
    };
    w.wagate
        .wait_until(Duration::from_secs(30), "all 40 messages echoed", || {
            echoed() >= 40
        })
        .await;
    assert_eq!(echoed(), 40);
    let leads = w.wagate.leads("demo").await;
    assert_eq!(leads.len(), 5, "{leads:?}");
    for lead in leads {
        assert_eq!(lead["message_count"], 8, "{lead}");
        assert!(phones.contains(&lead["phone"].as_str().unwrap().to_owned()));
    }
}

#[tokio::test]
async fn long_reply_is_split_in_order_and_whole() {
    let model = FakeOpenAi::start("k").await;
    let paragraph = |i: usize| {
        format!(
            "Paragraph {i}. {}",
            "All work and no play makes a long reply. ".repeat(20)
        )
    };
    let long: String = (0..8).map(paragraph).collect::<Vec<_>>().join("\n\n");
    let reply = long.clone();
    model.set_reply(move |_, _| reply.clone());
    let w = World::start().await;
    w.wagate.agent("bot", serde_json::json!({"kind": "openai", "base_url": model.base_url, "model": "m", "api_key": "k"})).await;
    w.wagate.channel("bot", true).await;
    w.wagate
        .inbound("bot", &sid(1), FROM, "tell me a lot")
        .await;
    let expected_parts = wagate_core::text::split_reply(&long, 1600);
    assert!(expected_parts.len() >= 3);
    let sent = w.twilio.wait_for_sent(expected_parts.len(), WAIT).await;
    let bodies: Vec<String> = sent.iter().map(|m| m.body.clone().unwrap()).collect();
    assert_eq!(bodies, expected_parts, "parts arrive in order");
    assert!(bodies.iter().all(|b| b.encode_utf16().count() <= 1600));
    assert!(
        bodies.iter().all(|b| b.starts_with("Paragraph")),
        "cut at paragraph boundaries"
    );
    let squash = |s: &str| s.split_whitespace().collect::<String>();
    assert_eq!(squash(&bodies.concat()), squash(&long));
    assert!(
        w.twilio.violations().is_empty(),
        "{:?}",
        w.twilio.violations()
    );
}

/// A runaway answer cannot fan out into hundreds of Twilio requests: a reply over 16,000
/// characters is cut at a word boundary with an ellipsis, sent as its ten or so parts, and
/// counted in a metric.
#[tokio::test]
async fn a_reply_over_the_cap_is_cut_and_counted() {
    let model = FakeOpenAi::start("k").await;
    let huge = "runaway ".repeat(10_000);
    model.set_reply(move |n, _| {
        if n == 1 {
            huge.clone()
        } else {
            "that is all".into()
        }
    });
    let w = World::start().await;
    w.wagate.agent("bot", serde_json::json!({"kind": "openai", "base_url": model.base_url, "model": "m", "api_key": "k"})).await;
    w.wagate.channel("bot", true).await;
    w.wagate.inbound("bot", &sid(1), FROM, "go on").await;
    let capped = wagate_core::text::cap_reply(&"runaway ".repeat(10_000), 16_000).unwrap();
    let expected = wagate_core::text::split_reply(&capped, 1600);
    assert!(expected.len() <= 11, "{} parts", expected.len());
    let sent = w.twilio.wait_for_sent(expected.len(), WAIT).await;
    let bodies: Vec<String> = sent.iter().map(|m| m.body.clone().unwrap()).collect();
    assert_eq!(bodies, expected);
    let chars: usize = bodies.iter().map(|b| b.chars().count()).sum();
    assert!(chars <= 16_000, "{chars} characters sent");
    assert!(bodies.last().unwrap().ends_with("runaway…"));
    support::harness::eventually(WAIT, "the truncation is counted", || async {
        w.wagate
            .metrics()
            .await
            .lines()
            .any(|l| l.starts_with("wagate_replies_truncated_total") && l.ends_with(" 1"))
            .then_some(())
    })
    .await;
    // The next reply is a barrier: it follows every part of the first.
    w.wagate
        .inbound("bot", &sid(2), FROM, "anything else?")
        .await;
    let sent = w.twilio.wait_for_sent(expected.len() + 1, WAIT).await;
    let bodies: Vec<String> = sent.iter().map(|m| m.body.clone().unwrap()).collect();
    assert_eq!(bodies[..expected.len()], expected, "no more parts");
    assert_eq!(bodies[expected.len()..], ["that is all"]);
}

#[tokio::test]
async fn same_message_sid_four_times_at_once_gets_one_reply() {
    let w = World::start().await;
    w.wagate.echo_agent("demo").await;
    let id = sid(42);
    let posts = (0..4).map(|_| w.wagate.inbound("demo", &id, FROM, "once"));
    let statuses = futures::future::join_all(posts).await;
    assert!(statuses.iter().all(|r| r.status() == 200));
    w.twilio.wait_for_sent(1, WAIT).await;
    // The user's next message is a barrier: its reply follows any other to the first.
    w.wagate.inbound("demo", &sid(43), FROM, "next").await;
    let sent = w.twilio.wait_for_sent(2, WAIT).await;
    let bodies: Vec<_> = sent.iter().map(|m| m.body.as_deref()).collect();
    assert_eq!(bodies, [Some("once"), Some("next")]);
    let leads: serde_json::Value = w
        .wagate
        .admin(reqwest::Method::GET, "/v1/agents/demo/leads")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        leads[0]["message_count"], 2,
        "the two messages, each counted once"
    );
}

/// A turn that takes a while shows the user the typing indicator on the message it answers
/// (Twilio's Messaging v2 `Indicators/Typing`, with the account's credentials), beside the reply,
/// not before it; a turn done within a second shows none, saving a Twilio request.
#[tokio::test]
async fn a_slow_turn_shows_the_typing_indicator_and_a_fast_one_does_not() {
    let hook = FakeAgentWebhook::start("whsec-typing-0123456789").await;
    let w = World::start().await;
    w.wagate.echo_agent("demo").await;
    w.wagate.inbound("demo", &sid(6), FROM, "quick").await;
    w.twilio.wait_for_sent(1, WAIT).await;
    // Absence can only be seen by waiting: past the indicator's delay, none came.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        w.twilio.typing_indicators(),
        vec![],
        "a fast turn shows none"
    );

    hook.set_delay(Duration::from_millis(2500));
    w.wagate
        .agent(
            "slow",
            serde_json::json!({"kind": "webhook", "url": hook.url, "secret": "whsec-typing-0123456789"}),
        )
        .await;
    w.wagate.channel("slow", true).await;
    w.wagate
        .inbound("slow", &sid(7), FROM, "are you there?")
        .await;
    let shown = support::harness::eventually(WAIT, "the typing indicator", || async {
        let t = w.twilio.typing_indicators();
        (!t.is_empty()).then_some(t)
    })
    .await;
    assert_eq!(shown, vec![(ACCOUNT_SID.to_owned(), sid(7))]);
    assert_eq!(w.twilio.sent().len(), 1, "shown while the agent thinks");
    w.twilio.wait_for_sent(2, WAIT).await;

    // An agent with the indicator off shows none, however slow: its reply comes 2.5 s in,
    // well after an indicator would have gone out.
    let r = w
        .wagate
        .admin(reqwest::Method::PUT, "/v1/agents/quiet")
        .json(&serde_json::json!({
            "backend": {"kind": "webhook", "url": hook.url, "secret": "whsec-typing-0123456789"},
            "typing_indicator": false,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    w.wagate.channel("quiet", true).await;
    w.wagate.inbound("quiet", &sid(8), FROM, "hello?").await;
    w.twilio.wait_for_sent(3, WAIT).await;
    assert_eq!(
        w.twilio.typing_indicators(),
        vec![(ACCOUNT_SID.to_owned(), sid(7))],
        "none for the agent with the indicator off"
    );
    assert!(
        w.twilio.violations().is_empty(),
        "{:?}",
        w.twilio.violations()
    );
}
