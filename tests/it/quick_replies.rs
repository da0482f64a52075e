//! Quick replies: a webhook agent's `"quick_replies"` go out on the reply's last message as a
//! Twilio content (up to 3 choices as `twilio/quick-reply` buttons, more as a
//! `twilio/list-picker`), made once through the Content API and reused from the store by
//! later replies, also after a restart; a content the Content API refuses is sent as text with
//! the choices listed; and the user's tap comes back as their answer.

use crate::support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{
    fake_agent_webhook::FakeAgentWebhook,
    fake_twilio::ScriptedResponse,
    harness::{
        ACCOUNT_SID, AUTH_TOKEN, Mode, SANDBOX, Wagate, World, eventually, inbound_form, sid,
    },
};

const WAIT: Duration = Duration::from_secs(20);
const FROM: &str = "+14155550177";
const SECRET: &str = "whsec-quick-replies-0123456789";
const QUESTION: &str = "Shall I book the table for 8pm?";

/// A world with agent `book` on a webhook that answers every message with `answer`.
async fn agent_world(answer: Value) -> (World, FakeAgentWebhook) {
    agent_world_in(World::start().await, answer).await
}

/// Agent `book` in `w`, on a webhook that answers every message with `answer`.
async fn agent_world_in(w: World, answer: Value) -> (World, FakeAgentWebhook) {
    let hook = FakeAgentWebhook::start(SECRET).await;
    hook.set_reply(move |_| answer.clone());
    w.wagate
        .agent(
            "book",
            json!({"kind": "webhook", "url": hook.url, "secret": SECRET}),
        )
        .await;
    w.wagate.channel("book", true).await;
    (w, hook)
}

fn yes_no() -> Value {
    json!({"reply": QUESTION, "quick_replies": ["Yes", "No"]})
}

#[tokio::test]
async fn two_choices_go_out_as_quick_reply_buttons_made_once_and_reused_after_a_restart() {
    let (mut w, _hook) = agent_world(yes_no()).await;
    w.wagate
        .inbound("book", &sid(1), FROM, "a table please")
        .await;
    let sent = w.twilio.wait_for_sent(1, WAIT).await;
    let contents = w.twilio.contents();
    assert_eq!(contents.len(), 1, "{contents:?}");
    let content = &contents[0];
    assert_eq!(content.kind().as_deref(), Some("twilio/quick-reply"));
    let buttons = &content.request["types"]["twilio/quick-reply"];
    assert_eq!(buttons["body"], QUESTION, "{buttons}");
    let titles: Vec<&str> = buttons["actions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["title"].as_str())
        .collect();
    assert_eq!(titles, ["Yes", "No"]);
    assert_eq!(sent[0].content_sid.as_deref(), Some(content.sid.as_str()));
    assert_eq!(sent[0].body, None, "a content is sent without a Body");

    // The agent's turn in the history names what it offered.
    eventually(WAIT, "the offered choices in the history", || async {
        let contents = w.wagate.session_contents("book", FROM).await;
        contents
            .iter()
            .any(|c| c == &format!("{QUESTION}\n[quick replies: Yes | No]"))
            .then_some(())
    })
    .await;

    // The same question again: the cached content, no second create.
    w.wagate
        .inbound("book", &sid(2), FROM, "and tomorrow?")
        .await;
    let sent = w.twilio.wait_for_sent(2, WAIT).await;
    assert_eq!(sent[1].content_sid.as_deref(), Some(content.sid.as_str()));

    // And after a restart, from the store. Stopped cleanly: a process killed mid-pull leaves
    // JetStream a pull request that holds the next message for its ack wait.
    let (clean, _) = w.wagate.terminate().await;
    assert!(clean, "{}", w.wagate.logs());
    w.wagate.restart().await;
    w.wagate.inbound("book", &sid(3), FROM, "and friday?").await;
    let sent = w.twilio.wait_for_sent(3, WAIT).await;
    assert_eq!(sent[2].content_sid.as_deref(), Some(content.sid.as_str()));
    assert_eq!(w.twilio.content_requests().len(), 1, "one content made");
    assert!(
        w.twilio.violations().is_empty(),
        "{:?}",
        w.twilio.violations()
    );
}

#[tokio::test]
async fn five_choices_go_out_as_a_list_picker() {
    let days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"];
    let (w, _hook) =
        agent_world(json!({"reply": "Which day suits you?", "quick_replies": days})).await;
    w.wagate
        .inbound("book", &sid(1), FROM, "a table please")
        .await;
    let sent = w.twilio.wait_for_sent(1, WAIT).await;
    let contents = w.twilio.contents();
    assert_eq!(contents.len(), 1, "{contents:?}");
    assert_eq!(contents[0].kind().as_deref(), Some("twilio/list-picker"));
    let list = &contents[0].request["types"]["twilio/list-picker"];
    assert_eq!(list["body"], "Which day suits you?", "{list}");
    let items: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["item"].as_str())
        .collect();
    assert_eq!(items, days);
    assert_eq!(
        sent[0].content_sid.as_deref(),
        Some(contents[0].sid.as_str())
    );
    assert!(
        w.twilio.violations().is_empty(),
        "{:?}",
        w.twilio.violations()
    );
}

#[tokio::test]
async fn a_content_the_content_api_refuses_goes_out_as_text_with_the_choices_listed() {
    let (w, _hook) = agent_world(yes_no()).await;
    w.twilio
        .push_content_error(400, 20001, "Content could not be created");
    w.wagate
        .inbound("book", &sid(1), FROM, "a table please")
        .await;
    let sent = w.twilio.wait_for_sent(1, WAIT).await;
    assert_eq!(
        sent[0].body.as_deref(),
        Some(format!("{QUESTION}\n\n1. Yes\n2. No").as_str())
    );
    assert_eq!(sent[0].content_sid, None);
    assert_eq!(
        w.twilio.content_requests().len(),
        1,
        "refused once, not retried"
    );
    assert!(w.twilio.contents().is_empty());
    assert!(
        w.twilio.violations().is_empty(),
        "{:?}",
        w.twilio.violations()
    );
}

#[tokio::test]
async fn media_and_the_first_parts_of_a_long_reply_come_first_and_the_choices_last() {
    let long = format!(
        "{} Shall I book it?",
        "The terrace is lovely at night. ".repeat(40)
    );
    let photo = "https://example.com/terrace.jpg";
    let (w, _hook) = agent_world(json!({
        "reply": long,
        "media": [photo],
        "quick_replies": ["Yes", "No"],
    }))
    .await;
    w.wagate
        .inbound("book", &sid(1), FROM, "what is it like?")
        .await;
    let sent = w.twilio.wait_for_sent(2, WAIT).await;
    let contents = w.twilio.contents();
    assert_eq!(contents.len(), 1, "{contents:?}");
    let last = sent.last().unwrap();
    assert_eq!(last.content_sid.as_deref(), Some(contents[0].sid.as_str()));
    let body = contents[0].request["types"]["twilio/quick-reply"]["body"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(body.ends_with("Shall I book it?"), "{body}");
    assert!(body.chars().count() <= 1024, "a content's body holds 1,024");
    // Before it, the photo with the text's first part as its caption.
    let first = &sent[0];
    assert!(
        first
            .form
            .contains(&("MediaUrl".to_owned(), photo.to_owned()))
    );
    let caption = first.body.as_deref().unwrap_or_default();
    assert!(
        long.starts_with(caption) && !caption.is_empty(),
        "{caption:?}"
    );
    assert!(
        sent[..sent.len() - 1]
            .iter()
            .all(|m| m.content_sid.is_none()),
        "only the last message carries the choices"
    );
    assert!(
        w.twilio.violations().is_empty(),
        "{:?}",
        w.twilio.violations()
    );
}

#[tokio::test]
async fn a_content_message_twilio_made_behind_an_ambiguous_answer_is_not_posted_again() {
    // Twilio makes the message and answers 500: the sender must find it in Twilio's list by the
    // text it shows (the content's body) rather than post the choices a second time.
    let (w, _hook) = agent_world(yes_no()).await;
    w.twilio.push_response(ScriptedResponse::AcceptButFail500);
    w.wagate
        .inbound("book", &sid(1), FROM, "a table please")
        .await;
    let found = r#"wagate_send_ambiguous_total{resolution="found"}"#;
    eventually(
        WAIT,
        "the ambiguous send settled from Twilio's list",
        || async { (w.wagate.metric(found).await == 1.0).then_some(()) },
    )
    .await;
    let sent = w.twilio.sent();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(sent[0].content_sid.is_some(), "{sent:?}");
    assert!(
        w.twilio.violations().is_empty(),
        "{:?}",
        w.twilio.violations()
    );
}

#[tokio::test]
async fn a_dead_senders_text_fallback_is_found_by_the_sender_that_takes_over_with_a_content() {
    // The first sender's Content API call is refused, so it posts the choices as text; Twilio
    // makes that message and the sender dies before recording it. The sender that takes the
    // part over gets a content from the Content API, and must still find the text in
    // Twilio's list rather than post the question again. Embedded: a killed process leaves
    // JetStream a pull request that would hold the redelivery for its ack wait.
    let env = [
        ("WAGATE_SEND_LEASE_MS", "1000"),
        ("WAGATE_TWILIO_TIMEOUT_MS", "1000"),
    ];
    let (mut w, _hook) =
        agent_world_in(World::start_in(Mode::Embedded, &env).await, yes_no()).await;
    w.twilio
        .push_content_error(400, 20001, "Content could not be created");
    w.twilio
        .push_response(ScriptedResponse::Slow(Duration::from_secs(300)));
    w.wagate
        .inbound("book", &sid(1), FROM, "a table please")
        .await;
    let as_text = format!("{QUESTION}\n\n1. Yes\n2. No");
    eventually(WAIT, "the text fallback made at Twilio", || async {
        (w.twilio.sent().len() == 1).then_some(())
    })
    .await;
    w.wagate.kill();
    // Longer down than a lease plus the longest attempt (four posts with their waits: 9 s).
    tokio::time::sleep(Duration::from_secs(12)).await;
    w.wagate.restart().await;
    let found = r#"wagate_send_ambiguous_total{resolution="found"}"#;
    eventually(
        WAIT,
        "the dead sender's message found in Twilio's list",
        || async { (w.wagate.metric(found).await == 1.0).then_some(()) },
    )
    .await;
    let sent = w.twilio.sent();
    assert_eq!(sent.len(), 1, "the question went out once: {sent:?}");
    assert_eq!(sent[0].body.as_deref(), Some(as_text.as_str()));
    // The content the new sender made is cached for the next reply.
    w.wagate.inbound("book", &sid(2), FROM, "thanks").await;
    let sent = w.twilio.wait_for_sent(2, WAIT).await;
    let contents = w.twilio.contents();
    assert_eq!(contents.len(), 1, "{contents:?}");
    assert_eq!(
        sent[1].content_sid.as_deref(),
        Some(contents[0].sid.as_str())
    );
}

#[tokio::test]
async fn in_simulation_mode_the_choices_are_recorded_as_text_and_no_content_is_made() {
    let (w, _hook) = agent_world(yes_no()).await;
    let r = w
        .wagate
        .admin(reqwest::Method::PUT, "/v1/agents/book/whatsapp")
        .json(&json!({
            "account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN,
            "phone_number": SANDBOX, "enabled": true, "simulation": true,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    w.wagate
        .inbound("book", &sid(1), FROM, "a table please")
        .await;
    let outbox = eventually(WAIT, "the simulated reply", || async {
        let outbox = w
            .wagate
            .admin_json(&format!("/v1/agents/book/whatsapp/simulated/{FROM}"))
            .await;
        let bodies: Vec<String> = outbox["messages"]
            .as_array()?
            .iter()
            .filter_map(|m| m["body"].as_str().map(str::to_owned))
            .collect();
        (!bodies.is_empty()).then_some(bodies)
    })
    .await;
    assert_eq!(outbox, [format!("{QUESTION}\n\n1. Yes\n2. No")]);
    assert!(w.twilio.content_requests().is_empty());
    assert!(w.twilio.sent().is_empty());
}

#[tokio::test]
async fn an_answer_with_too_many_choices_is_a_dead_letter_saying_why() {
    let eleven: Vec<String> = (1..=11).map(|n| format!("Table {n}")).collect();
    let (w, _hook) = agent_world(json!({"reply": "Which table?", "quick_replies": eleven})).await;
    w.wagate
        .inbound("book", &sid(1), FROM, "a table please")
        .await;
    let reason = eventually(WAIT, "the turn's dead letter", || async {
        let letters = w.wagate.admin_json("/v1/dead-letters").await;
        // A list, or a page holding one.
        let list = letters.as_array().cloned().or_else(|| {
            letters
                .as_object()?
                .values()
                .find_map(|v| v.as_array().cloned())
        })?;
        list.first()?["reason"].as_str().map(str::to_owned)
    })
    .await;
    assert!(
        reason.contains("\"quick_replies\" has more than 10 choices"),
        "{reason}"
    );
    assert!(w.twilio.sent().is_empty());
}

#[tokio::test]
async fn a_tapped_button_reaches_the_agent_as_the_users_answer() {
    let (w, hook) = agent_world(yes_no()).await;
    w.wagate
        .inbound("book", &sid(1), FROM, "a table please")
        .await;
    w.twilio.wait_for_sent(1, WAIT).await;

    // Twilio's form for a tap on a quick-reply button: the button's text as Body and
    // ButtonText, its id as ButtonPayload.
    let mut tap = inbound_form(&sid(2), FROM, "Yes");
    for (name, value) in &mut tap {
        if name == "MessageType" {
            *value = "button".to_owned();
        }
    }
    tap.push(("ButtonText".to_owned(), "Yes".to_owned()));
    tap.push(("ButtonPayload".to_owned(), "Yes".to_owned()));
    let r = w
        .wagate
        .post_signed(&Wagate::inbound_path("book"), &tap, AUTH_TOKEN)
        .await;
    assert_eq!(r.status(), 200);

    let requests = hook.wait_for_requests(2, WAIT).await;
    let second = &requests[1];
    assert_eq!(second["message"]["button"]["payload"], "Yes", "{second}");
    assert_eq!(second["message"]["button"]["text"], "Yes", "{second}");
    let messages = second["messages"].as_array().unwrap();
    let last = messages.last().unwrap();
    assert_eq!(last["role"], "user");
    assert_eq!(last["content"], "Yes");
    // The agent sees what it offered just before the answer.
    let offered = &messages[messages.len() - 2];
    assert_eq!(offered["role"], "assistant");
    assert_eq!(
        offered["content"],
        format!("{QUESTION}\n[quick replies: Yes | No]")
    );
}
