//! Event webhooks: an agent with an `events_url` gets what happens in its conversations
//! (`lead.created`, `message.received`, `message.sent`, `message.delivered`, `optout.changed`,
//! `conversation.handoff`, `dead_letter.created`), signed the Standard Webhooks way; each
//! delivery is checked with the `standardwebhooks` library from PyPI (installed into `.venv` by
//! scripts/test-deps), and a tampered one is refused by it. A webhook that fails is tried again
//! under the same `webhook-id`, and one that keeps failing leaves a dead letter that replays.

use crate::support;

use std::{
    collections::VecDeque,
    io::Write,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Router, body::Bytes, extract::State, http::HeaderMap, http::StatusCode};
use base64::Engine;
use serde_json::{Value, json};
use support::harness::{AUTH_TOKEN, World, eventually, sid};

const WAIT: Duration = Duration::from_secs(20);
const FROM: &str = "+14155550166";

/// One delivery the receiver got: its headers (lower-case names) and body.
#[derive(Clone, Debug)]
struct Received {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

#[derive(Default)]
struct Inbox {
    received: Vec<Received>,
    /// Statuses to answer, in order; 200 once they run out.
    script: VecDeque<u16>,
}

type Shared = Arc<Mutex<Inbox>>;

/// A webhook receiver that records every request and answers as scripted.
async fn receiver() -> (String, Shared) {
    async fn take(State(inbox): State<Shared>, headers: HeaderMap, body: Bytes) -> StatusCode {
        let mut inbox = inbox.lock().unwrap();
        inbox.received.push(Received {
            headers: headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.to_vec(),
        });
        let status = inbox.script.pop_front().unwrap_or(200);
        StatusCode::from_u16(status).unwrap()
    }
    let inbox: Shared = Arc::default();
    let app = Router::new().fallback(take).with_state(inbox.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, inbox)
}

fn secret() -> String {
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode([7u8; 32])
    )
}

/// Whether the `standardwebhooks` library accepts `delivery` under `secret`.
fn verified(secret: &str, delivery: &Received) -> bool {
    let python = std::env::var_os("WAGATE_TEST_PYTHON").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"),
        PathBuf::from,
    );
    let script = "import sys, json, base64\n\
        from standardwebhooks import Webhook\n\
        case = json.load(sys.stdin)\n\
        body = base64.b64decode(case['body'])\n\
        try:\n    Webhook(case['secret']).verify(body, case['headers'])\nexcept Exception as e:\n    print(e); sys.exit(3)\n";
    let case = json!({
        "secret": secret,
        "body": base64::engine::general_purpose::STANDARD.encode(&delivery.body),
        "headers": delivery.headers.iter().cloned().collect::<std::collections::HashMap<_, _>>(),
    });
    let mut child = Command::new(&python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "{python:?} could not run ({e}): run scripts/test-deps, which installs standardwebhooks"
            )
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(case.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    match out.status.code() {
        Some(0) => true,
        Some(3) => false,
        other => panic!(
            "the standardwebhooks check did not run ({other:?}): {}",
            String::from_utf8_lossy(&out.stdout)
        ),
    }
}

/// The deliveries of events of `kind` so far.
fn of_kind(inbox: &Shared, kind: &str) -> Vec<Received> {
    inbox
        .lock()
        .unwrap()
        .received
        .iter()
        .filter(|r| r.json()["type"] == kind)
        .cloned()
        .collect()
}

async fn wait_for_kind(inbox: &Shared, kind: &str) -> Received {
    eventually(WAIT, &format!("a {kind} event"), || async {
        of_kind(inbox, kind).into_iter().next()
    })
    .await
}

async fn agent_with_events(w: &World, id: &str, url: &str) {
    let r = w
        .wagate
        .admin(reqwest::Method::PUT, &format!("/v1/agents/{id}"))
        .json(&json!({"backend": {"kind": "echo"}, "events_url": url, "events_secret": secret()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let agent: Value = r.json().await.unwrap();
    assert_eq!(agent["events_secret_set"], true, "{agent}");
    assert!(
        !agent.to_string().contains(&secret()),
        "the secret came back"
    );
    w.wagate.channel(id, true).await;
}

#[tokio::test]
async fn a_conversations_events_arrive_signed_as_standard_webhooks_verify_them() {
    let (url, inbox) = receiver().await;
    let w = World::start().await;
    agent_with_events(&w, "shop", &url).await;
    w.wagate.inbound("shop", &sid(1), FROM, "hello").await;
    let sent = w.twilio.wait_for_sent(1, WAIT).await;
    let lead = wait_for_kind(&inbox, "lead.created").await;
    assert_eq!(lead.json()["data"]["phone"], FROM);
    let received = wait_for_kind(&inbox, "message.received").await;
    let data = received.json()["data"].clone();
    assert_eq!(
        (&data["phone"], &data["body"], &data["message_sid"]),
        (&json!(FROM), &json!("hello"), &json!(sid(1))),
        "{data}"
    );
    let posted = wait_for_kind(&inbox, "message.sent").await;
    assert_eq!(posted.json()["data"]["sid"], sent[0].sid.as_str());

    // Twilio reports it delivered.
    let form = vec![
        ("MessageSid".to_owned(), sent[0].sid.clone()),
        ("MessageStatus".to_owned(), "delivered".to_owned()),
        (
            "AccountSid".to_owned(),
            support::harness::ACCOUNT_SID.to_owned(),
        ),
        ("To".to_owned(), format!("whatsapp:{FROM}")),
    ];
    let r = w
        .wagate
        .post_signed("/webhooks/twilio/whatsapp/shop/status", &form, AUTH_TOKEN)
        .await;
    assert!(r.status().is_success());
    let delivered = wait_for_kind(&inbox, "message.delivered").await;
    assert_eq!(delivered.json()["data"]["status"], "delivered");

    // The user opts out; a person takes the conversation over.
    w.wagate.inbound("shop", &sid(2), FROM, "STOP").await;
    let optout = wait_for_kind(&inbox, "optout.changed").await;
    assert_eq!(optout.json()["data"]["opted_out"], true);
    let r = w
        .wagate
        .admin(
            reqwest::Method::POST,
            &format!("/v1/agents/shop/sessions/{FROM}/pause"),
        )
        .json(&json!({"operator": "Grace"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let handoff = wait_for_kind(&inbox, "conversation.handoff").await;
    assert_eq!(handoff.json()["data"]["by"], "Grace");

    assert_eq!(
        of_kind(&inbox, "lead.created").len(),
        1,
        "a lead is made once"
    );
    for delivery in [&lead, &received, &posted, &delivered, &optout, &handoff] {
        assert!(delivery.header("webhook-id").starts_with("evt_"));
        assert!(
            delivery.header("webhook-signature").starts_with("v1,"),
            "{delivery:?}"
        );
        let event = delivery.json();
        assert!(
            time::OffsetDateTime::parse(
                event["timestamp"].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339
            )
            .is_ok(),
            "{event}"
        );
        assert!(
            verified(&secret(), delivery),
            "standardwebhooks refused {event}"
        );
    }
    // The check can fail: a changed body, or another secret, is refused.
    let mut tampered = received.clone();
    tampered.body = tampered
        .body
        .iter()
        .map(|b| b.to_ascii_uppercase())
        .collect();
    assert!(!verified(&secret(), &tampered));
    let other = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode([9u8; 32])
    );
    assert!(!verified(&other, &received));
}

#[tokio::test]
async fn a_failing_webhook_is_retried_under_the_same_id_then_dead_lettered_and_replayed() {
    let (url, inbox) = receiver().await;
    // The first event of the conversation is its lead.created, taken; then message.received
    // fails twice.
    inbox.lock().unwrap().script.extend([200, 500, 503]);
    let w = World::start_with(&[("WAGATE_EVENTS_RETRY", "100ms,100ms")]).await;
    // Its scripted answers are for the events it names: Twilio's reports would raise more.
    w.twilio.withhold_status_callbacks();
    agent_with_events(&w, "shop", &url).await;
    w.wagate.inbound("shop", &sid(1), FROM, "hello").await;
    let attempts = eventually(WAIT, "the third attempt", || async {
        let got = of_kind(&inbox, "message.received");
        (got.len() == 3).then_some(got)
    })
    .await;
    let ids: Vec<&str> = attempts.iter().map(|a| a.header("webhook-id")).collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "one id: {ids:?}");
    assert!(attempts.iter().all(|a| verified(&secret(), a)));

    // Now it fails for good: three attempts, then a dead letter that replays.
    wait_for_kind(&inbox, "message.sent").await;
    inbox.lock().unwrap().script.extend([500, 500, 500]);
    w.wagate.inbound("shop", &sid(2), FROM, "again").await;
    let letter = eventually(WAIT, "the event's dead letter", || async {
        let letters = w.wagate.admin_json("/v1/dead-letters").await;
        letters
            .as_array()?
            .iter()
            .find(|l| l["stage"] == "event")
            .cloned()
    })
    .await;
    assert!(
        letter["reason"].as_str().unwrap().contains("HTTP 500"),
        "{letter}"
    );
    let again = |inbox: &Shared| -> Vec<Received> {
        of_kind(inbox, "message.received")
            .into_iter()
            .filter(|r| r.json()["data"]["body"] == "again")
            .collect()
    };
    assert_eq!(again(&inbox).len(), 3, "three attempts");
    let r = w
        .wagate
        .admin(
            reqwest::Method::POST,
            &format!("/v1/dead-letters/{}/replay", letter["id"].as_str().unwrap()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let replayed = eventually(WAIT, "the replayed event", || async {
        again(&inbox).get(3).cloned()
    })
    .await;
    assert_eq!(
        replayed.header("webhook-id"),
        again(&inbox)[0].header("webhook-id")
    );
    assert!(verified(&secret(), &replayed));
    // The event's own dead letter raised no event: nothing else came.
    assert!(of_kind(&inbox, "dead_letter.created").is_empty());
}
