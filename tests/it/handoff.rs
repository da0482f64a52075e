//! Human handoff: a conversation paused for a person records the user's messages and runs no
//! agent; an operator's message goes out in the business's name and into the history with its
//! author; the agent, given the conversation back, sees everything that was said; an agent can
//! hand off itself (`"handoff": true`), and a pause nobody picks up lapses after the agent's
//! `handoff_resume_after_s`. An OpenAI-compatible agent does the same, and sends media, through
//! the tools it is offered.

use crate::support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{
    fake_agent_webhook::FakeAgentWebhook,
    fake_openai::FakeOpenAi,
    harness::{World, eventually, sid},
};

const WAIT: Duration = Duration::from_secs(20);
const FROM: &str = "+14155550188";
const SECRET: &str = "whsec-handoff-0123456789";

/// The text of the last user message an agent request carries.
fn last_user_text(request: &Value) -> String {
    request["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// A webhook agent that answers `bot: <the user's words>`, and hands off when asked for a
/// person.
async fn agent_world(resume_after_s: Option<u64>) -> (World, FakeAgentWebhook) {
    let hook = FakeAgentWebhook::start(SECRET).await;
    hook.set_reply(|request| {
        let text = last_user_text(request);
        if text.contains("a person") {
            json!({"reply": "A person will answer you here.", "handoff": true})
        } else {
            json!({"reply": format!("bot: {text}")})
        }
    });
    let w = World::start().await;
    let mut agent = json!({
        "name": "Support",
        "backend": {"kind": "webhook", "url": hook.url, "secret": SECRET},
    });
    if let Some(s) = resume_after_s {
        agent["handoff_resume_after_s"] = json!(s);
    }
    let r = w
        .wagate
        .admin(reqwest::Method::PUT, "/v1/agents/help")
        .json(&agent)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    w.wagate.channel("help", true).await;
    (w, hook)
}

async fn post(w: &World, path: &str, body: Value) -> (u16, Value) {
    let r = w
        .wagate
        .admin(reqwest::Method::POST, path)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Waits until the session of `help` with [`FROM`] holds a turn with `content`, and returns
/// the session.
async fn recorded(w: &World, content: &str) -> Value {
    recorded_in(w, "help", content).await
}

#[tokio::test]
async fn a_paused_conversation_waits_for_the_person_whose_words_the_agent_then_sees() {
    let (w, hook) = agent_world(None).await;
    w.wagate.inbound("help", &sid(1), FROM, "hello").await;
    let sent = w.twilio.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].body.as_deref(), Some("bot: hello"));

    let (status, state) = post(
        &w,
        &format!("/v1/agents/help/sessions/{FROM}/pause"),
        json!({"operator": "Grace"}),
    )
    .await;
    assert_eq!(status, 200, "{state}");
    assert_eq!(state["paused"], true, "{state}");
    assert_eq!(state["paused_by"], "Grace", "{state}");
    assert!(state["resumes_at"].is_string(), "{state}");

    // Recorded and shown, and no agent runs: the turn is stored without a call.
    w.wagate
        .inbound("help", &sid(2), FROM, "is anyone there?")
        .await;
    let session = recorded(&w, "is anyone there?").await;
    assert_eq!(session["paused"], true, "{session}");
    assert_eq!(hook.requests().len(), 1, "no agent call while paused");
    assert_eq!(
        w.twilio.sent().len(),
        1,
        "nothing sent for the user's message"
    );

    // The operator answers in the business's name.
    let (status, queued) = post(
        &w,
        "/v1/agents/help/messages",
        json!({"to": FROM, "body": "Hi, Grace here. How can I help?", "operator": "Grace"}),
    )
    .await;
    assert_eq!(status, 202, "{queued}");
    let sent = w.twilio.wait_for_sent(2, WAIT).await;
    assert_eq!(
        sent[1].body.as_deref(),
        Some("Hi, Grace here. How can I help?")
    );
    let session = recorded(&w, "Hi, Grace here. How can I help?").await;
    let by_grace = session["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["content"] == "Hi, Grace here. How can I help?")
        .unwrap()
        .clone();
    assert_eq!(by_grace["role"], "assistant", "{by_grace}");
    assert_eq!(by_grace["author"], "Grace", "{by_grace}");
    assert_eq!(session["paused"], true, "{session}");

    // Given back, the agent answers again and sees what was said meanwhile.
    let (status, state) = post(
        &w,
        &format!("/v1/agents/help/sessions/{FROM}/resume"),
        json!({}),
    )
    .await;
    assert_eq!((status, &state["paused"]), (200, &json!(false)), "{state}");
    w.wagate.inbound("help", &sid(3), FROM, "thanks").await;
    let requests = hook.wait_for_requests(2, WAIT).await;
    let seen: Vec<(String, String)> = requests[1]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_owned(),
                m["content"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for expected in [
        ("user", "is anyone there?"),
        ("assistant", "Hi, Grace here. How can I help?"),
        ("user", "thanks"),
    ] {
        assert!(
            seen.iter()
                .any(|(r, c)| (r.as_str(), c.as_str()) == expected),
            "the agent sees {expected:?}: {seen:?}"
        );
    }
    let sent = w.twilio.wait_for_sent(3, WAIT).await;
    assert_eq!(sent[2].body.as_deref(), Some("bot: thanks"));
    assert_eq!(w.wagate.session("help", FROM).await["paused"], false);
}

#[tokio::test]
async fn an_agent_hands_off_and_a_pause_nobody_picks_up_lapses() {
    let (w, hook) = agent_world(Some(2)).await;
    w.wagate
        .inbound("help", &sid(1), FROM, "I need a person please")
        .await;
    let sent = w.twilio.wait_for_sent(1, WAIT).await;
    assert_eq!(
        sent[0].body.as_deref(),
        Some("A person will answer you here."),
        "the handoff's reply goes out"
    );
    let session = w.wagate.session("help", FROM).await;
    assert_eq!(session["paused"], true, "{session}");
    assert_eq!(session["paused_by"], "agent", "{session}");
    assert_eq!(
        w.wagate.metric("wagate_handoffs_total{by=\"agent\"}").await,
        1.0
    );

    w.wagate.inbound("help", &sid(2), FROM, "hello?").await;
    recorded(&w, "hello?").await;
    assert_eq!(hook.requests().len(), 1, "no agent call while paused");

    // Nobody answered for the agent's 2 s: the agent has the conversation back.
    eventually(WAIT, "the pause to lapse", || async {
        (w.wagate.session("help", FROM).await["paused"] == false).then_some(())
    })
    .await;
    w.wagate
        .inbound("help", &sid(3), FROM, "still there?")
        .await;
    let sent = w.twilio.wait_for_sent(2, WAIT).await;
    assert_eq!(sent[1].body.as_deref(), Some("bot: still there?"));
    assert_eq!(hook.requests().len(), 2);
}

#[tokio::test]
async fn bad_handoff_calls_are_refused_and_change_nothing() {
    let (w, _hook) = agent_world(None).await;
    let pause = format!("/v1/agents/help/sessions/{FROM}/pause");
    for (path, body, status) in [
        (
            "/v1/agents/nobody/sessions/+14155550188/pause".to_owned(),
            json!({}),
            404,
        ),
        (pause.clone(), json!({"operator": ""}), 422),
        (pause.clone(), json!({"operator": "a\u{7}b"}), 422),
        (pause.clone(), json!({"operator": "x".repeat(101)}), 422),
        (pause.clone(), json!({"who": "Grace"}), 400),
        (
            "/v1/agents/help/sessions/not-a-phone/pause".to_owned(),
            json!({}),
            422,
        ),
        (
            "/v1/agents/help/messages".to_owned(),
            json!({"to": FROM, "body": "hi", "operator": " "}),
            422,
        ),
        (
            "/v1/agents/help/messages".to_owned(),
            json!({"to": FROM, "body": "hi", "media": ["http://plain.example.com/a.jpg"]}),
            422,
        ),
    ] {
        let (got, answer) = post(&w, &path, body.clone()).await;
        assert_eq!(got, status, "{path} {body}: {answer}");
        assert!(answer["error"].is_string(), "{path} {body}: {answer}");
    }
    let r = w
        .wagate
        .admin(reqwest::Method::PUT, "/v1/agents/help")
        .json(&json!({"backend": {"kind": "echo"}, "handoff_resume_after_s": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let agent = w.wagate.admin_json("/v1/agents/help").await;
    assert_eq!(agent["handoff_resume_after_s"], 86_400, "{agent}");
    assert_eq!(agent["backend"]["kind"], "webhook", "{agent}");
    w.wagate.inbound("help", &sid(1), FROM, "hello").await;
    let sent = w.twilio.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].body.as_deref(), Some("bot: hello"), "not paused");
    assert_eq!(w.wagate.session("help", FROM).await["paused"], false);
}

#[tokio::test]
async fn an_openai_agent_hands_off_and_sends_media_through_its_tools() {
    let model = FakeOpenAi::start("sk-tools").await;
    model.set_tool_calls(|n, _| {
        (n == 1).then(|| {
            vec![
                (
                    "send_media".to_owned(),
                    json!({"urls": ["https://cdn.example.com/refunds.pdf", "http://insecure.example.com/x.png"]}),
                ),
                (
                    "handoff_to_human".to_owned(),
                    json!({"reason": "a refund"}),
                ),
            ]
        })
    });
    model.set_reply(|_, _| "A person will help you with the refund here.".to_owned());
    let w = World::start().await;
    for (id, tools) in [("shop", true), ("plain", false)] {
        w.wagate
            .agent(
                id,
                json!({"kind": "openai", "base_url": model.base_url, "model": "gpt-tools",
                       "api_key": "sk-tools", "tools": tools}),
            )
            .await;
        w.wagate.channel(id, true).await;
    }
    w.wagate
        .inbound("shop", &sid(1), FROM, "I want my money back")
        .await;
    let sent = w.twilio.wait_for_sent(1, WAIT).await;
    assert_eq!(
        sent[0].body.as_deref(),
        Some("A person will help you with the refund here.")
    );
    let media: Vec<&str> = sent[0]
        .form
        .iter()
        .filter(|(k, _)| k == "MediaUrl")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(
        media,
        ["https://cdn.example.com/refunds.pdf"],
        "only the https URL"
    );
    let requests = model.wait_for_requests(2, WAIT).await;
    let names: Vec<&str> = requests[0]["tools"]
        .as_array()
        .expect("tools offered")
        .iter()
        .filter_map(|t| t.pointer("/function/name").and_then(Value::as_str))
        .collect();
    assert_eq!(
        names,
        ["handoff_to_human", "offer_quick_replies", "send_media"]
    );
    let answers: Vec<&Value> = requests[1]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "tool")
        .collect();
    assert_eq!(answers.len(), 2, "each call answered: {answers:?}");
    assert!(
        answers[0]["content"].as_str().unwrap().contains("1 not"),
        "the model hears of the refused URL: {answers:?}"
    );
    let session = w.wagate.session("shop", FROM).await;
    assert_eq!(
        (&session["paused"], &session["paused_by"]),
        (&json!(true), &json!("agent")),
        "{session}"
    );
    w.wagate.inbound("shop", &sid(2), FROM, "hello?").await;
    recorded_in(&w, "shop", "hello?").await;
    assert_eq!(model.requests().len(), 2, "no model call while paused");

    // An agent with tools off is offered none.
    w.wagate.inbound("plain", &sid(3), FROM, "hi").await;
    let requests = model.wait_for_requests(3, WAIT).await;
    assert!(requests[2].get("tools").is_none(), "{}", requests[2]);
    w.twilio.wait_for_sent(2, WAIT).await;
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

/// Waits until `agent`'s session with [`FROM`] holds a turn with `content`, and returns the
/// session.
async fn recorded_in(w: &World, agent: &str, content: &str) -> Value {
    eventually(WAIT, &format!("{content:?} in the history"), || async {
        let session = w.wagate.session(agent, FROM).await;
        let found = session["messages"]
            .as_array()?
            .iter()
            .any(|m| m["content"] == content);
        found.then_some(session)
    })
    .await
}

/// An OpenAI-compatible agent offers choices to tap through its `offer_quick_replies` tool:
/// they go out as quick-reply buttons with its reply, as a webhook agent's do.
#[tokio::test]
async fn an_openai_agent_offers_quick_replies_through_its_tool() {
    let model = FakeOpenAi::start("sk-choices").await;
    model.set_tool_calls(|n, _| {
        (n == 1).then(|| {
            vec![(
                "offer_quick_replies".to_owned(),
                json!({"choices": ["Yes", "No"]}),
            )]
        })
    });
    model.set_reply(|_, _| "Shall I book the table?".to_owned());
    let w = World::start().await;
    w.wagate
        .agent(
            "book",
            json!({"kind": "openai", "base_url": model.base_url, "model": "m", "api_key": "sk-choices"}),
        )
        .await;
    w.wagate.channel("book", true).await;
    w.wagate
        .inbound("book", &sid(1), FROM, "a table for two")
        .await;
    let sent = w.twilio.wait_for_sent(1, WAIT).await;
    let contents = w.twilio.contents();
    assert_eq!(contents.len(), 1, "{contents:?}");
    assert_eq!(contents[0].kind().as_deref(), Some("twilio/quick-reply"));
    assert_eq!(
        sent[0].content_sid.as_deref(),
        Some(contents[0].sid.as_str())
    );
    let requests = model.wait_for_requests(2, WAIT).await;
    let answer = requests[1]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["role"] == "tool")
        .unwrap()
        .clone();
    assert!(
        answer["content"].as_str().unwrap().contains("Yes, No"),
        "{answer}"
    );
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}
