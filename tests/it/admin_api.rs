use crate::support;

// INTERFACE.md's admin API, every call over real HTTP against a running `wagate serve`: the
// answers' shapes, bearer authentication on every route, the validation rules, and bad input of
// every kind answered with a JSON `{"error": …}` and a documented status, never a 5xx.

use std::collections::BTreeSet;
use std::time::Duration;

use base64::Engine;
use reqwest::Method;
use serde_json::{Value, json};
use support::{
    fake_twilio::ScriptedResponse,
    harness::{
        ACCOUNT_SID, ADMIN_TOKEN, AUTH_TOKEN, SANDBOX, World, eventually, sid, status_callback,
    },
};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

const FROM: &str = "+14155550100";
const OTHER: &str = "+14155550111";
const WAIT: Duration = Duration::from_secs(15);
/// The statuses an admin error may have (INTERFACE.md: 400, 404, 422; 401 without the token;
/// 409 outside the 24-hour window).
const ERROR_STATUSES: [u16; 5] = [400, 401, 404, 409, 422];

/// An HTTP answer read whole.
#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: String,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| {
            panic!(
                "answer is not JSON ({e}): {} {:?} {}",
                self.status, self.content_type, self.text
            )
        })
    }
}

async fn read(r: reqwest::Response) -> Answer {
    let status = r.status().as_u16();
    let content_type = r
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let text = r.text().await.unwrap_or_default();
    Answer {
        status,
        content_type,
        text,
    }
}

/// An authorized call with an optional JSON body.
async fn call(w: &World, method: Method, path: &str, body: Option<Value>) -> Answer {
    let mut b = w.wagate.admin(method, path);
    if let Some(body) = body {
        b = b.json(&body);
    }
    read(b.send().await.unwrap()).await
}

/// An authorized call with raw body bytes, sent as `application/json` when `json_type`.
async fn call_raw(w: &World, method: Method, path: &str, body: &[u8], json_type: bool) -> Answer {
    let mut b = w.wagate.admin(method, path).body(body.to_vec());
    if json_type {
        b = b.header("content-type", "application/json");
    }
    read(b.send().await.unwrap()).await
}

/// Why `a` is not a JSON object with a non-empty `error` string, if it is not.
fn json_error_problem(a: &Answer, what: &str) -> Option<String> {
    if !a.content_type.starts_with("application/json") {
        return Some(format!(
            "{what}: error answered with Content-Type {:?}, not JSON: {} {:?}",
            a.content_type, a.status, a.text
        ));
    }
    let Ok(v) = serde_json::from_str::<Value>(&a.text) else {
        return Some(format!(
            "{what}: error body is not JSON: {} {:?}",
            a.status, a.text
        ));
    };
    match v.get("error").and_then(Value::as_str) {
        Some(e) if !e.trim().is_empty() => None,
        _ => Some(format!(
            "{what}: no non-empty \"error\" string in {} {}",
            a.status, a.text
        )),
    }
}

/// Why `a` is not `status` with a JSON `{"error": …}` body, if it is not.
fn error_problem(a: &Answer, status: u16, what: &str) -> Option<String> {
    if a.status != status {
        return Some(format!(
            "{what}: expected {status}, got {} {}",
            a.status, a.text
        ));
    }
    json_error_problem(a, what)
}

/// Why `a` is not sane, if it is not: a 5xx, or an error that is not JSON with a documented
/// status.
fn sane_problem(a: &Answer, what: &str) -> Option<String> {
    if a.status >= 500 {
        return Some(format!("{what}: server error {} {}", a.status, a.text));
    }
    if a.status >= 400 {
        if !ERROR_STATUSES.contains(&a.status) {
            return Some(format!(
                "{what}: undocumented error status {} {}",
                a.status, a.text
            ));
        }
        return json_error_problem(a, what);
    }
    None
}

/// The answer is a JSON object with a non-empty `error` string.
fn assert_json_error(a: &Answer, what: &str) {
    if let Some(p) = json_error_problem(a, what) {
        panic!("{p}");
    }
}

/// The answer has `status` and a JSON `{"error": …}` body.
fn assert_error(a: &Answer, status: u16, what: &str) {
    if let Some(p) = error_problem(a, status, what) {
        panic!("{p}");
    }
}

/// Whatever the input: never a 5xx, and an error is JSON with a documented status.
fn assert_sane(a: &Answer, what: &str) {
    if let Some(p) = sane_problem(a, what) {
        panic!("{p}");
    }
}

/// Collects every failed expectation of a table-driven test, so one run reports them all.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, p: Option<String>) {
        self.0.extend(p);
    }
    fn error(&mut self, a: &Answer, status: u16, what: &str) {
        self.add(error_problem(a, status, what));
    }
    fn json_error(&mut self, a: &Answer, what: &str) {
        self.add(json_error_problem(a, what));
    }
    fn sane(&mut self, a: &Answer, what: &str) {
        self.add(sane_problem(a, what));
    }
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.0.push(what());
        }
    }
    fn finish(self) {
        assert!(
            self.0.is_empty(),
            "{} problem(s):\n  {}",
            self.0.len(),
            self.0.join("\n  ")
        );
    }
}

fn timestamp(v: &Value, what: &str) -> OffsetDateTime {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {v}"));
    OffsetDateTime::parse(s, &Rfc3339)
        .unwrap_or_else(|e| panic!("{what} {s:?} is not RFC 3339: {e}"))
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn channel_body(phone: &str, enabled: bool) -> Value {
    json!({"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN, "phone_number": phone, "enabled": enabled})
}

fn template_sid() -> String {
    format!("HX{}", "0123456789abcdef".repeat(2))
}

async fn dead_letters(w: &World) -> Vec<Value> {
    let a = call(w, Method::GET, "/v1/dead-letters", None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    a.json()
        .as_array()
        .expect("dead letters are a list")
        .clone()
}

async fn wait_dead_letters(w: &World, n: usize) -> Vec<Value> {
    eventually(WAIT, "dead letters", || async {
        let d = dead_letters(w).await;
        (d.len() >= n).then_some(d)
    })
    .await
}

/// The ids in a replay answer ("the replayed ids"): a list, or an object holding one.
fn replayed_ids(v: &Value) -> BTreeSet<String> {
    let list = match v {
        Value::Array(a) => a.clone(),
        Value::Object(o) => o
            .values()
            .find_map(|x| x.as_array().cloned())
            .unwrap_or_else(|| panic!("no list of ids in the replay answer {v}")),
        _ => panic!("replay answer is neither a list nor an object: {v}"),
    };
    list.iter()
        .map(|x| match x {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Agents

#[tokio::test]
async fn agents_of_every_backend_are_saved_shown_and_listed() {
    let w = World::start().await;
    let a = call(&w, Method::GET, "/v1/agents", None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json(), json!([]), "a fresh deployment has no agents");

    // echo, with a name
    let a = call(
        &w,
        Method::PUT,
        "/v1/agents/echo-1",
        Some(json!({"name": "Echo One", "backend": {"kind": "echo"}})),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert!(a.content_type.starts_with("application/json"), "{a:?}");
    let echo = a.json();
    assert_eq!(echo["id"], "echo-1");
    assert_eq!(echo["name"], "Echo One");
    assert_eq!(echo["backend"]["kind"], "echo");
    let created = timestamp(&echo["created_at"], "created_at");
    let updated = timestamp(&echo["updated_at"], "updated_at");
    assert!(updated >= created);
    assert!((OffsetDateTime::now_utc() - created).abs() < time::Duration::minutes(1));

    // openai
    let key = "sk-admin-test-key-7f3a9c";
    let a = call(
        &w,
        Method::PUT,
        "/v1/agents/ai_2",
        Some(json!({"name": "Model", "backend": {
            "kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "gpt-4o-mini",
            "api_key": key, "system_prompt": "Be brief."
        }})),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert!(!a.text.contains(key), "the API key came back: {}", a.text);
    let ai = a.json();
    assert_eq!(ai["id"], "ai_2");
    assert_eq!(ai["name"], "Model");
    assert_eq!(ai["backend"]["kind"], "openai");
    assert_eq!(ai["backend"]["base_url"], "http://127.0.0.1:9/v1");
    assert_eq!(ai["backend"]["model"], "gpt-4o-mini");
    assert_eq!(ai["backend"]["system_prompt"], "Be brief.");

    // webhook, without a name: the name defaults to the id
    let secret = "whsec-admin-test-0123456789";
    let a = call(
        &w,
        Method::PUT,
        "/v1/agents/Hook-3",
        Some(json!({"backend": {"kind": "webhook", "url": "https://example.com/agent", "secret": secret}})),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert!(
        !a.text.contains(secret),
        "the webhook secret came back: {}",
        a.text
    );
    let hook = a.json();
    assert_eq!(hook["id"], "Hook-3");
    assert_eq!(hook["name"], "Hook-3", "a missing name defaults to the id");
    assert_eq!(hook["backend"]["kind"], "webhook");
    assert_eq!(hook["backend"]["url"], "https://example.com/agent");

    // GET shows each as it was saved
    for saved in [&echo, &ai, &hook] {
        let id = saved["id"].as_str().unwrap();
        let a = call(&w, Method::GET, &format!("/v1/agents/{id}"), None).await;
        assert_eq!(a.status, 200, "{}", a.text);
        assert!(
            !a.text.contains(key) && !a.text.contains(secret),
            "{}",
            a.text
        );
        let got = a.json();
        for field in ["id", "name", "backend", "created_at", "updated_at"] {
            assert_eq!(got[field], saved[field], "GET {id}: {field}");
        }
    }

    // and the list has all three, once each
    let a = call(&w, Method::GET, "/v1/agents", None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert!(
        !a.text.contains(key) && !a.text.contains(secret),
        "{}",
        a.text
    );
    let list = a.json();
    let list = list.as_array().expect("GET /v1/agents is a list");
    assert_eq!(list.len(), 3, "{list:?}");
    let kinds: BTreeSet<(String, String)> = list
        .iter()
        .map(|a| {
            (
                a["id"].as_str().unwrap().to_owned(),
                a["backend"]["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: BTreeSet<(String, String)> = [
        ("echo-1", "echo"),
        ("ai_2", "openai"),
        ("Hook-3", "webhook"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(kinds, expected);
}

#[tokio::test]
async fn updating_an_agent_keeps_created_at_and_replaces_the_backend() {
    let w = World::start().await;
    let a = call(
        &w,
        Method::PUT,
        "/v1/agents/demo",
        Some(json!({"name": "First", "backend": {"kind": "echo"}})),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let first = a.json();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let a = call(
        &w,
        Method::PUT,
        "/v1/agents/demo",
        Some(json!({"name": "Second", "backend": {
            "kind": "openai", "base_url": "https://llm.example.com/v1", "model": "m1", "api_key": "k-1234567890"
        }})),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let second = a.json();
    assert_eq!(
        second["created_at"], first["created_at"],
        "created_at is kept"
    );
    assert!(
        timestamp(&second["updated_at"], "updated_at")
            > timestamp(&first["updated_at"], "updated_at"),
        "updated_at moves on: {first} then {second}"
    );
    assert_eq!(second["name"], "Second");
    assert_eq!(second["backend"]["kind"], "openai");
    assert_eq!(second["backend"]["model"], "m1");

    let got = call(&w, Method::GET, "/v1/agents/demo", None).await.json();
    assert_eq!(got["created_at"], first["created_at"]);
    assert_eq!(got["updated_at"], second["updated_at"]);
    assert_eq!(got["name"], "Second");
    assert_eq!(got["backend"]["kind"], "openai");

    let list = call(&w, Method::GET, "/v1/agents", None).await.json();
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "an update is not a second agent: {list}"
    );
}

// ---------------------------------------------------------------------------------------------
// WhatsApp channels

#[tokio::test]
async fn whatsapp_channel_answer_has_exactly_the_documented_fields() {
    let w = World::start().await;
    w.wagate.agent("demo", json!({"kind": "echo"})).await;
    let a = call(&w, Method::GET, "/v1/agents/demo/whatsapp", None).await;
    assert_error(&a, 404, "GET whatsapp of an agent without a channel");

    let a = call(
        &w,
        Method::PUT,
        "/v1/agents/demo/whatsapp",
        Some(channel_body(SANDBOX, true)),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert!(
        !a.text.contains(AUTH_TOKEN),
        "the Auth Token came back: {}",
        a.text
    );
    let put = a.json();
    let expected_keys: BTreeSet<String> = [
        "enabled",
        "account_sid",
        "phone_number",
        "webhook_url",
        "status_callback_url",
        "simulation",
        "optout_keywords",
        "optin_keywords",
        "optout_reply",
        "optin_reply",
        "sandbox",
        "sandbox_join_code",
        "messaging_service_sid",
        "mps",
        "ordered_parts",
        "last_errors",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(keys(&put), expected_keys, "{put}");
    assert_eq!(
        put["optout_keywords"],
        json!(["STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"]),
        "Twilio's defaults"
    );
    assert_eq!(put["optin_keywords"], json!(["START", "YES", "UNSTOP"]));
    assert!(put["optout_reply"].as_str().unwrap().contains("START"));
    assert_eq!(put["sandbox"], true, "{SANDBOX} is the Sandbox's number");
    let base = format!("{}/webhooks/twilio/whatsapp/demo", w.wagate.public_url);
    // Twilio's connection overrides ride in the fragment, which Twilio does not sign.
    let webhook_url = format!("{base}#rc=3&rp=ct,rt,5xx");
    assert_eq!(put["enabled"], true);
    assert_eq!(put["account_sid"], ACCOUNT_SID);
    assert_eq!(put["phone_number"], SANDBOX);
    assert_eq!(put["webhook_url"], webhook_url);
    assert_eq!(put["status_callback_url"], format!("{base}/status"));

    let a = call(&w, Method::GET, "/v1/agents/demo/whatsapp", None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert!(!a.text.contains(AUTH_TOKEN), "{}", a.text);
    assert_eq!(a.json(), put, "GET shows what PUT answered");

    // The URL shown is the one that works: a signed inbound message to it is accepted.
    let r = w.wagate.inbound("demo", &sid(1), FROM, "via the url").await;
    assert_eq!(r.status(), 200);
    let sent = w.twilio.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].body.as_deref(), Some("via the url"));
    assert_eq!(
        sent[0].status_callback.as_deref(),
        put["status_callback_url"].as_str()
    );

    // A second PUT replaces the number and switches the channel off.
    let a = call(
        &w,
        Method::PUT,
        "/v1/agents/demo/whatsapp",
        Some(channel_body("+14155550123", false)),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let v = a.json();
    assert_eq!(keys(&v), expected_keys, "{v}");
    assert_eq!(v["phone_number"], "+14155550123");
    assert_eq!(v["enabled"], false);
    let got = call(&w, Method::GET, "/v1/agents/demo/whatsapp", None)
        .await
        .json();
    assert_eq!(got, v);
}

#[tokio::test]
async fn enable_and_disable_switch_the_channel_and_answer_it() {
    let w = World::start().await;
    w.wagate.echo_agent("demo").await;
    let base = format!("{}/webhooks/twilio/whatsapp/demo", w.wagate.public_url);
    // Twilio's connection overrides ride in the fragment, which Twilio does not sign.
    let webhook_url = format!("{base}#rc=3&rp=ct,rt,5xx");

    let a = call(&w, Method::POST, "/v1/agents/demo/whatsapp/disable", None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert!(!a.text.contains(AUTH_TOKEN), "{}", a.text);
    let v = a.json();
    assert_eq!(
        keys(&v),
        [
            "account_sid",
            "enabled",
            "last_errors",
            "messaging_service_sid",
            "mps",
            "optin_keywords",
            "optin_reply",
            "optout_keywords",
            "optout_reply",
            "ordered_parts",
            "phone_number",
            "sandbox",
            "sandbox_join_code",
            "simulation",
            "status_callback_url",
            "webhook_url"
        ]
        .iter()
        .map(|s| s.to_string())
        .collect::<BTreeSet<_>>()
    );
    assert_eq!(v["enabled"], false);
    assert_eq!(v["webhook_url"], webhook_url);
    assert_eq!(v["account_sid"], ACCOUNT_SID);
    assert_eq!(v["phone_number"], SANDBOX);
    let got = call(&w, Method::GET, "/v1/agents/demo/whatsapp", None)
        .await
        .json();
    assert_eq!(got["enabled"], false);
    let r = w
        .wagate
        .inbound("demo", &sid(1), FROM, "are you off?")
        .await;
    assert_eq!(
        r.status(),
        403,
        "a disabled channel refuses inbound messages"
    );

    let a = call(&w, Method::POST, "/v1/agents/demo/whatsapp/enable", None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let v = a.json();
    assert_eq!(v["enabled"], true);
    assert_eq!(v["status_callback_url"], format!("{base}/status"));
    let got = call(&w, Method::GET, "/v1/agents/demo/whatsapp", None)
        .await
        .json();
    assert_eq!(got["enabled"], true);
    let r = w.wagate.inbound("demo", &sid(2), FROM, "back on").await;
    assert_eq!(r.status(), 200);
    let sent = w.twilio.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].body.as_deref(), Some("back on"));

    // Twice in a row is fine and changes nothing more.
    let a = call(&w, Method::POST, "/v1/agents/demo/whatsapp/enable", None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json()["enabled"], true);
}

// ---------------------------------------------------------------------------------------------
// Leads and sessions

#[tokio::test]
async fn leads_as_json_and_as_csv() {
    let w = World::start().await;
    w.wagate.echo_agent("demo").await;
    w.wagate.echo_agent("quiet").await;
    for (n, (from, text)) in [(FROM, "one"), (FROM, "two"), (OTHER, "three")]
        .iter()
        .enumerate()
    {
        let r = w
            .wagate
            .inbound("demo", &sid(n as u64 + 1), from, text)
            .await;
        assert_eq!(r.status(), 200);
        w.twilio.wait_for_sent(n + 1, WAIT).await;
    }

    let a = call(&w, Method::GET, "/v1/agents/demo/leads", None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let leads = a.json();
    let leads = leads.as_array().expect("leads are a list");
    assert_eq!(leads.len(), 2, "{leads:?}");
    let by_phone = |p: &str| {
        leads
            .iter()
            .find(|l| l["phone"] == p)
            .unwrap_or_else(|| panic!("no lead {p}: {leads:?}"))
            .clone()
    };
    for (phone, count) in [(FROM, 2), (OTHER, 1)] {
        let l = by_phone(phone);
        for k in [
            "phone",
            "platform",
            "profile_name",
            "first_seen",
            "last_seen",
            "message_count",
            "opted_out",
            "opted_out_at",
        ] {
            assert!(l.get(k).is_some(), "lead without {k}: {l}");
        }
        assert_eq!(
            (&l["opted_out"], &l["opted_out_at"]),
            (&json!(false), &Value::Null)
        );
        assert_eq!(l["platform"], "whatsapp");
        assert_eq!(l["profile_name"], "Test User");
        assert_eq!(l["message_count"], count, "{l}");
        assert!(
            timestamp(&l["first_seen"], "first_seen") <= timestamp(&l["last_seen"], "last_seen")
        );
    }

    let a = call(&w, Method::GET, "/v1/agents/demo/leads?format=csv", None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert!(
        a.content_type.starts_with("text/csv"),
        "{:?}",
        a.content_type
    );
    let lines: Vec<&str> = a
        .text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        lines.first().copied(),
        Some(
            "phone,platform,profile_name,first_seen,last_seen,message_count,opted_out,opted_out_at"
        ),
        "{}",
        a.text
    );
    assert_eq!(lines.len(), 3, "a header and one row per lead: {}", a.text);
    for (phone, count) in [(FROM, "2"), (OTHER, "1")] {
        let row: Vec<&str> = lines
            .iter()
            .find(|l| l.starts_with(&format!("{phone},")))
            .unwrap_or_else(|| panic!("no CSV row for {phone}: {}", a.text))
            .split(',')
            .collect();
        assert_eq!(row.len(), 8, "{row:?}");
        assert_eq!(&row[6..], &["false", ""], "nobody opted out");
        assert_eq!(&row[..3], &[phone, "whatsapp", "Test User"]);
        let json_lead = by_phone(phone);
        assert_eq!(
            OffsetDateTime::parse(row[3], &Rfc3339).unwrap(),
            timestamp(&json_lead["first_seen"], "first_seen"),
            "CSV and JSON agree on first_seen"
        );
        assert_eq!(
            OffsetDateTime::parse(row[4], &Rfc3339).unwrap(),
            timestamp(&json_lead["last_seen"], "last_seen")
        );
        assert_eq!(row[5], count);
    }

    // An agent nobody wrote to has no leads; its CSV is the header alone.
    let a = call(&w, Method::GET, "/v1/agents/quiet/leads", None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json(), json!([]));
    let a = call(&w, Method::GET, "/v1/agents/quiet/leads?format=csv", None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(
        a.text.trim_end(),
        "phone,platform,profile_name,first_seen,last_seen,message_count,opted_out,opted_out_at"
    );
}

#[tokio::test]
async fn session_is_found_by_encoded_and_by_raw_phone() {
    let w = World::start().await;
    // Two reads of the session compare equal only while no status report comes in between.
    w.twilio.withhold_status_callbacks();
    w.wagate.echo_agent("demo").await;
    for (n, text) in ["hello", "again"].iter().enumerate() {
        let r = w
            .wagate
            .inbound("demo", &sid(n as u64 + 1), FROM, text)
            .await;
        assert_eq!(r.status(), 200);
        w.twilio.wait_for_sent(n + 1, WAIT).await;
    }
    // Both replies recorded as sent (a moment after Twilio has them), so that the two reads
    // below see one state.
    replies_once(&w, "both replies' sids", |r| {
        r.len() == 2 && r.iter().all(|m| m["sid"].is_string())
    })
    .await;
    let encoded = FROM.replace('+', "%2B");
    let mut answers = Vec::new();
    for phone in [encoded.as_str(), FROM] {
        let a = call(
            &w,
            Method::GET,
            &format!("/v1/agents/demo/sessions/{phone}"),
            None,
        )
        .await;
        assert_eq!(a.status, 200, "phone {phone}: {}", a.text);
        let s = a.json();
        assert_eq!(
            s["session_id"],
            format!("twilio_demo_{FROM}"),
            "phone {phone}"
        );
        let turns: Vec<(String, String)> = s["messages"]
            .as_array()
            .unwrap_or_else(|| panic!("no messages list: {s}"))
            .iter()
            .map(|t| {
                timestamp(&t["at"], "at");
                (
                    t["role"].as_str().unwrap().to_owned(),
                    t["content"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let expected: Vec<(String, String)> = ["hello", "again"]
            .iter()
            .flat_map(|t| {
                [
                    ("user".to_owned(), t.to_string()),
                    ("assistant".to_owned(), t.to_string()),
                ]
            })
            .collect();
        assert_eq!(turns, expected, "phone {phone}");
        answers.push(s);
    }
    assert_eq!(answers[0], answers[1], "both spellings name one session");

    let a = call(
        &w,
        Method::GET,
        &format!("/v1/agents/nobody/sessions/{encoded}"),
        None,
    )
    .await;
    assert_error(&a, 404, "session of an unknown agent");
    let a = call(
        &w,
        Method::GET,
        "/v1/agents/demo/sessions/not-a-phone",
        None,
    )
    .await;
    assert!(a.status >= 400, "a phone that is not E.164: {a:?}");
    assert_sane(&a, "session of a phone that is not E.164");
}

// ---------------------------------------------------------------------------------------------
// Pages

/// Every page of `path` (which has `?` already) at `limit` a page: each page's items, following
/// `next_cursor` to the end. `between` runs after the first page.
async fn pages(
    w: &World,
    path: &str,
    limit: usize,
    between: impl AsyncFnOnce(),
) -> Vec<Vec<Value>> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    let mut between = Some(between);
    loop {
        let url = match &cursor {
            Some(c) => format!("{path}limit={limit}&cursor={c}"),
            None => format!("{path}limit={limit}"),
        };
        let a = call(w, Method::GET, &url, None).await;
        assert_eq!(a.status, 200, "{url}: {}", a.text);
        let page = a.json();
        assert_eq!(
            keys(&page),
            ["items", "next_cursor"].map(String::from).into(),
            "{page}"
        );
        let items = page["items"].as_array().expect("items").clone();
        assert!(items.len() <= limit, "{page}");
        out.push(items);
        if let Some(f) = between.take() {
            f().await;
        }
        match &page["next_cursor"] {
            Value::Null => return out,
            Value::String(c) => cursor = Some(c.clone()),
            other => panic!("next_cursor is neither null nor a string: {other}"),
        }
        assert!(out.len() < 20, "pages without end");
    }
}

fn field_of(pages: &[Vec<Value>], field: &str) -> Vec<Vec<String>> {
    pages
        .iter()
        .map(|p| {
            p.iter()
                .map(|v| v[field].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .collect()
}

/// `/v1/agents`, leads and `/v1/dead-letters` page with `limit` and `cursor`; a page goes on
/// after the last item of the one before, whatever was added meanwhile (an item that sorts
/// before the cursor is not seen, one after it is); without `limit` the plain array as before;
/// bad limits and cursors are 400 with a JSON error that says what is wrong.
#[tokio::test]
async fn lists_page_with_limit_and_cursor_and_stay_stable_under_inserts() {
    let w = World::start().await;
    for id in ["a1", "a2", "a3", "a4", "a5"] {
        w.wagate.echo_agent(id).await;
    }
    let agents = pages(&w, "/v1/agents?", 2, async || {
        w.wagate.echo_agent("a0").await;
        w.wagate.echo_agent("a9").await;
    })
    .await;
    assert_eq!(
        field_of(&agents, "id"),
        [vec!["a1", "a2"], vec!["a3", "a4"], vec!["a5", "a9"]]
    );
    let all = call(&w, Method::GET, "/v1/agents", None).await.json();
    assert_eq!(
        all.as_array().map(Vec::len),
        Some(7),
        "the plain array: {all}"
    );

    // Leads by first contact: a user who writes after the first page is on a later one.
    let users = ["+14155550101", "+14155550102", "+14155550103"];
    for (n, user) in users.iter().enumerate() {
        w.wagate.inbound("a1", &sid(n as u64 + 1), user, "hi").await;
        w.twilio.wait_for_sent(n + 1, WAIT).await;
    }
    let leads = pages(&w, "/v1/agents/a1/leads?", 2, async || {
        w.wagate
            .inbound("a1", &sid(10), "+14155550100", "late")
            .await;
        w.twilio.wait_for_sent(4, WAIT).await;
    })
    .await;
    assert_eq!(
        field_of(&leads, "phone"),
        [
            vec!["+14155550101", "+14155550102"],
            vec!["+14155550103", "+14155550100"]
        ]
    );

    // Dead letters by id, filtered too.
    for (n, user) in users.iter().enumerate() {
        w.twilio.push_response(ScriptedResponse::TwilioError {
            status: 400,
            code: 21211,
            message: "The 'To' number is not a valid phone number.".into(),
        });
        w.wagate
            .inbound("a2", &sid(20 + n as u64), user, "hi")
            .await;
        wait_dead_letters(&w, n + 1).await;
    }
    let letters = pages(&w, "/v1/dead-letters?stage=send&", 2, async || {}).await;
    let ids: Vec<Vec<String>> = letters
        .iter()
        .map(|p| p.iter().map(|d| d["id"].to_string()).collect())
        .collect();
    let plain: Vec<String> = dead_letters(&w)
        .await
        .iter()
        .map(|d| d["id"].to_string())
        .collect();
    assert_eq!(ids.concat(), plain, "the pages hold the list, in its order");
    assert_eq!(letters.iter().map(Vec::len).collect::<Vec<_>>(), [2, 1]);

    let agents_cursor = call(&w, Method::GET, "/v1/agents?limit=1", None)
        .await
        .json()["next_cursor"]
        .as_str()
        .expect("a cursor")
        .to_owned();
    for (path, says) in [
        ("/v1/agents?limit=0".to_owned(), "limit"),
        ("/v1/agents?limit=1001".to_owned(), "limit"),
        ("/v1/agents?limit=ten".to_owned(), "limit"),
        ("/v1/agents/a1/leads?limit=".to_owned(), "limit"),
        ("/v1/dead-letters?limit=-1".to_owned(), "limit"),
        ("/v1/agents?cursor=abc".to_owned(), "limit"),
        ("/v1/agents?limit=2&cursor=%21%21".to_owned(), "cursor"),
        ("/v1/agents?limit=2&cursor=e30".to_owned(), "cursor"),
        (
            format!("/v1/dead-letters?limit=2&cursor={agents_cursor}"),
            "cursor",
        ),
        (
            format!("/v1/agents/a1/leads?limit=2&cursor={agents_cursor}"),
            "cursor",
        ),
        ("/v1/agents/a1/leads?format=csv&limit=2".to_owned(), "limit"),
    ] {
        let a = call(&w, Method::GET, &path, None).await;
        assert_error(&a, 400, &path);
        let error = a.json()["error"].as_str().unwrap_or_default().to_owned();
        assert!(error.contains(says), "{path}: {error}");
    }
}

// ---------------------------------------------------------------------------------------------
// Delivery

/// The agent's messages of the session with `FROM` once `done` holds for them.
async fn replies_once(w: &World, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let path = format!("/v1/agents/demo/sessions/{}", FROM.replace('+', "%2B"));
    eventually(WAIT, what, || async {
        let s = call(w, Method::GET, &path, None).await.json();
        let messages = s["messages"].as_array()?.clone();
        for m in messages.iter().filter(|m| m["role"] == "user") {
            assert!(
                m.get("status").is_none() && m.get("sid").is_none(),
                "a user's message has no delivery: {m}"
            );
        }
        let replies: Vec<Value> = messages
            .into_iter()
            .filter(|m| m["role"] == "assistant")
            .collect();
        done(&replies).then_some(replies)
    })
    .await
}

/// Each reply of the session shows its first message's sid and the status Twilio's callbacks
/// reported (a reply of several parts the furthest behind, or its failure), and
/// `GET …/messages/{sid}` answers one message with its reply's parts; another agent's sid
/// or an unknown one is 404.
#[tokio::test]
async fn each_replys_sid_and_status_follow_twilios_callbacks() {
    let w = World::start().await;
    // The test is Twilio here: it reports each status itself.
    w.twilio.withhold_status_callbacks();
    w.wagate.echo_agent("demo").await;
    w.wagate.echo_agent("other").await;
    w.wagate.inbound("demo", &sid(1), FROM, "hello").await;
    let first = w.twilio.wait_for_sent(1, WAIT).await[0].sid.clone();
    replies_once(&w, "the reply's sid, queued", |r| {
        r.len() == 1 && r[0]["sid"] == first.as_str() && r[0]["status"] == "queued"
    })
    .await;
    status_callback(&w, &first, "sent", None).await;
    status_callback(&w, &first, "delivered", None).await;
    replies_once(&w, "the reply delivered", |r| r[0]["status"] == "delivered").await;

    // A reply of two parts: the second goes out once the first is reported sent.
    let long = "word ".repeat(400);
    w.wagate.inbound("demo", &sid(2), FROM, &long).await;
    let second = w.twilio.wait_for_sent(2, WAIT).await[1].sid.clone();
    status_callback(&w, &second, "sent", None).await;
    let third = w.twilio.wait_for_sent(3, WAIT).await[2].sid.clone();
    let replies = replies_once(&w, "the long reply's first sid", |r| {
        r.len() == 2 && r[1]["sid"] == second.as_str()
    })
    .await;
    assert_eq!(replies[0]["status"], "delivered", "{replies:?}");
    status_callback(&w, &second, "read", None).await;
    replies_once(&w, "the furthest behind of the parts", |r| {
        r[1]["status"] == "queued"
    })
    .await;
    status_callback(&w, &third, "undelivered", Some(63016)).await;
    replies_once(&w, "a failed part stands for the reply", |r| {
        r[1]["status"] == "undelivered"
    })
    .await;

    // An operator's message shows its delivery too, under its author.
    let a = call(
        &w,
        Method::POST,
        "/v1/agents/demo/messages",
        Some(json!({"to": FROM, "body": "Grace here", "operator": "Grace"})),
    )
    .await;
    assert_eq!(a.status, 202, "{}", a.text);
    let by_grace = w.twilio.wait_for_sent(4, WAIT).await[3].sid.clone();
    let replies = replies_once(&w, "the operator's message and its sid", |r| {
        r.len() == 3 && r[2]["sid"] == by_grace.as_str()
    })
    .await;
    assert_eq!(replies[2]["author"], "Grace", "{replies:?}");
    assert_eq!(replies[2]["status"], "queued", "{replies:?}");
    assert_eq!(replies[1]["status"], "undelivered", "{replies:?}");

    let a = call(
        &w,
        Method::GET,
        &format!("/v1/agents/demo/messages/{third}"),
        None,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(
        a.json(),
        json!({
            "sid": third,
            "to": FROM,
            "status": "undelivered",
            "error_code": 63016,
            "parts": [
                {"sid": second, "status": "read", "error_code": null},
                {"sid": third, "status": "undelivered", "error_code": 63016},
            ],
        })
    );
    let a = call(
        &w,
        Method::GET,
        &format!("/v1/agents/demo/messages/{first}"),
        None,
    )
    .await;
    assert_eq!(
        a.json()["parts"].as_array().map(Vec::len),
        Some(1),
        "{}",
        a.text
    );
    for (path, what) in [
        (
            format!("/v1/agents/other/messages/{first}"),
            "another agent's sid",
        ),
        (
            format!("/v1/agents/demo/messages/{}", sid(99)),
            "an unknown sid",
        ),
        ("/v1/agents/demo/messages/not-a-sid".to_owned(), "not a sid"),
    ] {
        let a = call(&w, Method::GET, &path, None).await;
        assert_error(&a, 404, what);
    }
}

// ---------------------------------------------------------------------------------------------
// Business-initiated messages

#[tokio::test]
async fn messages_are_202_inside_the_window_409_outside_422_when_invalid() {
    let w = World::start().await;
    w.wagate.echo_agent("demo").await;
    let path = "/v1/agents/demo/messages";

    let a = call(
        &w,
        Method::POST,
        path,
        Some(json!({"to": FROM, "body": "hello?"})),
    )
    .await;
    assert_error(&a, 409, "free text to a user who never wrote");
    let e = a.json()["error"].as_str().unwrap().to_lowercase();
    assert!(e.contains("24-hour") || e.contains("24 hour"), "{e}");

    // A template goes out at any time.
    let a = call(
        &w,
        Method::POST,
        path,
        Some(json!({"to": FROM, "content_sid": template_sid(), "content_variables": {"1": "Ana"}})),
    )
    .await;
    assert_eq!(a.status, 202, "{}", a.text);
    let sent = w.twilio.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].to, format!("whatsapp:{FROM}"));
    assert_eq!(
        sent[0].content_sid.as_deref(),
        Some(template_sid().as_str())
    );

    // Once the user writes, free text is allowed.
    let r = w.wagate.inbound("demo", &sid(1), FROM, "hi there").await;
    assert_eq!(r.status(), 200);
    w.twilio.wait_for_sent(2, WAIT).await;
    let a = call(
        &w,
        Method::POST,
        path,
        Some(json!({"to": FROM, "body": "a follow-up"})),
    )
    .await;
    assert_eq!(a.status, 202, "{}", a.text);
    let sent = w.twilio.wait_for_sent(3, WAIT).await;
    let follow = sent
        .iter()
        .find(|m| m.body.as_deref() == Some("a follow-up"))
        .unwrap_or_else(|| panic!("the follow-up was not sent: {sent:?}"));
    assert_eq!(follow.to, format!("whatsapp:{FROM}"));
    assert_eq!(follow.from, format!("whatsapp:{SANDBOX}"));

    // Invalid requests.
    let a = call(
        &w,
        Method::POST,
        path,
        Some(json!({"to": FROM, "body": "x", "content_sid": template_sid()})),
    )
    .await;
    assert_error(&a, 422, "both body and content_sid");
    // At most 16,000 characters (not bytes: 16,000 emoji are fine, 16,001 are not).
    let a = call(
        &w,
        Method::POST,
        path,
        Some(json!({"to": FROM, "body": "é".repeat(16_001)})),
    )
    .await;
    assert_error(&a, 422, "a body of 16,001 characters");
    assert!(a.text.contains("16000"), "{}", a.text);
    for to in [
        "4155550100",
        "+1 415 555 0100",
        "+1-415-555-0100",
        "+",
        "",
        "+0155550100",
        "+1415555010012345",
        "+1415abc0100",
    ] {
        let a = call(&w, Method::POST, path, Some(json!({"to": to, "body": "x"}))).await;
        assert_error(&a, 422, &format!("to {to:?}"));
        let a = call(
            &w,
            Method::POST,
            path,
            Some(json!({"to": to, "content_sid": template_sid()})),
        )
        .await;
        assert_error(&a, 422, &format!("template to {to:?}"));
    }
    let a = call(&w, Method::POST, path, Some(json!({"to": FROM}))).await;
    assert!(
        [400, 422].contains(&a.status),
        "neither body nor content_sid: {a:?}"
    );
    assert_json_error(&a, "neither body nor content_sid");
    for (body, what) in [
        (
            &b"{\"to\": \"+14155550100\", \"body\": "[..],
            "malformed JSON",
        ),
        (
            &b"[\"+14155550100\", \"hi\"]"[..],
            "a list instead of an object",
        ),
        (&b"{\"body\": \"hi\"}"[..], "no to"),
        (
            &b"{\"to\": 14155550100, \"body\": \"hi\"}"[..],
            "to as a number",
        ),
        (
            &b"{\"to\": \"+14155550100\", \"body\": \"hi\", \"cc\": \"+14155550111\"}"[..],
            "unknown field",
        ),
    ] {
        let a = call_raw(&w, Method::POST, path, body, true).await;
        assert_error(&a, 400, what);
    }
    let a = call(
        &w,
        Method::POST,
        "/v1/agents/nobody/messages",
        Some(json!({"to": FROM, "content_sid": template_sid()})),
    )
    .await;
    assert_error(&a, 404, "messages of an unknown agent");

    // An accepted message to the user is a barrier: sends to one user go out in the order they
    // were queued, so anything a refused request had queued for them would come before it.
    let a = call(
        &w,
        Method::POST,
        path,
        Some(json!({"to": FROM, "body": "last"})),
    )
    .await;
    assert_eq!(a.status, 202, "{}", a.text);
    let sent = w.twilio.wait_for_sent(4, WAIT).await;
    assert_eq!(sent.len(), 4, "refused requests send nothing: {sent:?}");
    assert_eq!(sent[3].body.as_deref(), Some("last"), "{sent:?}");
    assert!(
        w.twilio.violations().is_empty(),
        "{:?}",
        w.twilio.violations()
    );
}

#[tokio::test]
async fn messages_to_an_opted_out_user_are_409_naming_the_opt_out_templates_included() {
    let w = World::start().await;
    w.wagate.echo_agent("demo").await;
    let path = "/v1/agents/demo/messages";
    w.wagate.inbound("demo", &sid(1), FROM, "hi").await;
    w.twilio.wait_for_sent(1, WAIT).await;
    // STOP, then a message whose reply is refused: once that is a dead letter, STOP was
    // recorded (a conversation's messages are handled in order).
    w.wagate.inbound("demo", &sid(2), FROM, "STOP").await;
    w.wagate.inbound("demo", &sid(3), FROM, "hello?").await;
    wait_dead_letters(&w, 1).await;
    for message in [
        json!({"to": FROM, "content_sid": template_sid()}),
        json!({"to": FROM, "body": "inside the window, but opted out"}),
    ] {
        let a = call(&w, Method::POST, path, Some(message)).await;
        assert_error(&a, 409, "a message to an opted-out user");
        let e = a.json()["error"].as_str().unwrap().to_owned();
        assert!(e.contains("opted out") && e.contains("START"), "{e}");
    }
    let a = call(
        &w,
        Method::POST,
        path,
        Some(json!({"to": OTHER, "content_sid": template_sid()})),
    )
    .await;
    assert_eq!(a.status, 202, "another user is not opted out: {}", a.text);

    let lead = w.wagate.leads("demo").await[0].clone();
    assert_eq!(lead["opted_out"], true, "{lead}");
    assert!(lead["opted_out_at"].is_string(), "{lead}");
    w.wagate.inbound("demo", &sid(4), FROM, "start").await;
    // The first reply, the opt-out's confirmation, the template to the other user, and the
    // opt-in's confirmation.
    eventually(WAIT, "the opt-in", || async {
        (w.twilio.sent().len() == 4).then_some(())
    })
    .await;
    let lead = w.wagate.leads("demo").await[0].clone();
    assert_eq!(
        (&lead["opted_out"], &lead["opted_out_at"]),
        (&json!(false), &Value::Null),
        "{lead}"
    );
    let a = call(
        &w,
        Method::POST,
        path,
        Some(json!({"to": FROM, "content_sid": template_sid()})),
    )
    .await;
    assert_eq!(a.status, 202, "{}", a.text);
    w.twilio.wait_for_sent(5, WAIT).await;
}

// ---------------------------------------------------------------------------------------------
// Dead letters

#[tokio::test]
async fn dead_letters_are_listed_and_replayed() {
    let w = World::start().await;
    w.wagate.echo_agent("demo").await;
    assert!(dead_letters(&w).await.is_empty());

    w.twilio.push_response(ScriptedResponse::TwilioError {
        status: 401,
        code: 20003,
        message: "Authenticate".into(),
    });
    w.wagate.inbound("demo", &sid(1), FROM, "lost once").await;
    let dl = wait_dead_letters(&w, 1).await;
    assert_eq!(dl.len(), 1, "{dl:?}");
    let letter = &dl[0];
    for k in ["id", "stage", "reason", "attempts", "failed_at", "message"] {
        assert!(letter.get(k).is_some(), "dead letter without {k}: {letter}");
    }
    assert!(
        letter["stage"].as_str().is_some_and(|s| !s.is_empty()),
        "{letter}"
    );
    assert!(
        letter["reason"].as_str().unwrap().contains("20003"),
        "the reason names Twilio's code: {letter}"
    );
    assert!(
        letter["attempts"].as_u64().is_some_and(|n| n >= 1),
        "{letter}"
    );
    assert!(
        (OffsetDateTime::now_utc() - timestamp(&letter["failed_at"], "failed_at")).abs()
            < time::Duration::minutes(1)
    );
    assert!(letter["message"].is_object(), "{letter}");
    assert!(
        letter["message"].to_string().contains("lost once"),
        "the dead letter carries the message: {letter}"
    );
    assert!(w.twilio.sent().is_empty());

    // Replay one: it is sent, and gone from the list.
    let id = match &letter["id"] {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let a = call(
        &w,
        Method::POST,
        &format!("/v1/dead-letters/{id}/replay"),
        None,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(replayed_ids(&a.json()), BTreeSet::from([id.clone()]));
    let sent = w.twilio.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].body.as_deref(), Some("lost once"));
    assert!(dead_letters(&w).await.is_empty());
    let a = call(
        &w,
        Method::POST,
        &format!("/v1/dead-letters/{id}/replay"),
        None,
    )
    .await;
    assert_error(&a, 404, "replaying a dead letter twice");
    for unknown in ["999999", "not-an-id"] {
        let a = call(
            &w,
            Method::POST,
            &format!("/v1/dead-letters/{unknown}/replay"),
            None,
        )
        .await;
        assert_error(&a, 404, &format!("replay of unknown dead letter {unknown}"));
    }

    // Replay all.
    for _ in 0..2 {
        w.twilio.push_response(ScriptedResponse::TwilioError {
            status: 401,
            code: 20003,
            message: "Authenticate".into(),
        });
    }
    w.wagate.inbound("demo", &sid(2), FROM, "lost twice").await;
    w.wagate
        .inbound("demo", &sid(3), OTHER, "lost thrice")
        .await;
    let dl = wait_dead_letters(&w, 2).await;
    let ids: BTreeSet<String> = dl
        .iter()
        .map(|d| match &d["id"] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect();
    assert_eq!(ids.len(), 2, "{dl:?}");
    // A bulk replay must say what it takes: no body, `{}`, `{"all": false}` or an empty id
    // list replay nothing.
    let a = call(&w, Method::POST, "/v1/dead-letters/replay", None).await;
    assert_eq!(a.status, 400, "{}", a.text);
    for vague in [json!({}), json!({"all": false}), json!({"ids": []})] {
        let a = call(
            &w,
            Method::POST,
            "/v1/dead-letters/replay",
            Some(vague.clone()),
        )
        .await;
        assert_eq!(a.status, 400, "{vague}: {}", a.text);
    }
    assert_eq!(dead_letters(&w).await.len(), 2);
    // By id: only the one named.
    let first = ids.iter().next().unwrap().clone();
    let a = call(
        &w,
        Method::POST,
        "/v1/dead-letters/replay",
        Some(json!({"ids": [first.clone()]})),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(replayed_ids(&a.json()), BTreeSet::from([first]));
    let a = call(
        &w,
        Method::POST,
        "/v1/dead-letters/replay",
        Some(json!({"all": true})),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(replayed_ids(&a.json()).len(), 1);
    let sent = w.twilio.wait_for_sent(3, WAIT).await;
    let bodies: BTreeSet<&str> = sent.iter().filter_map(|m| m.body.as_deref()).collect();
    assert!(
        bodies.contains("lost twice") && bodies.contains("lost thrice"),
        "{bodies:?}"
    );
    assert!(dead_letters(&w).await.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Authentication

/// Every admin route with a body that would succeed (or at least pass validation).
fn routes() -> Vec<(Method, String, Option<Value>)> {
    let encoded = FROM.replace('+', "%2B");
    vec![
        (Method::GET, "/v1/agents".into(), None),
        (
            Method::PUT,
            "/v1/agents/demo".into(),
            Some(json!({"name": "taken over", "backend": {"kind": "echo"}})),
        ),
        (
            Method::PUT,
            "/v1/agents/intruder".into(),
            Some(json!({"backend": {"kind": "echo"}})),
        ),
        (Method::GET, "/v1/agents/demo".into(), None),
        (
            Method::PUT,
            "/v1/agents/demo/whatsapp".into(),
            Some(channel_body("+14155550999", false)),
        ),
        (Method::GET, "/v1/agents/demo/whatsapp".into(), None),
        (Method::POST, "/v1/agents/demo/whatsapp/enable".into(), None),
        (
            Method::POST,
            "/v1/agents/demo/whatsapp/disable".into(),
            None,
        ),
        (Method::GET, "/v1/agents/demo/leads".into(), None),
        (Method::GET, "/v1/agents/demo/leads?format=csv".into(), None),
        (
            Method::GET,
            format!("/v1/agents/demo/sessions/{encoded}"),
            None,
        ),
        (
            Method::GET,
            format!("/v1/agents/demo/sessions/{FROM}"),
            None,
        ),
        (
            Method::POST,
            "/v1/agents/demo/messages".into(),
            Some(json!({"to": FROM, "content_sid": template_sid()})),
        ),
        (
            Method::GET,
            format!("/v1/agents/demo/messages/{}", sid(1)),
            None,
        ),
        (Method::GET, "/v1/dead-letters".into(), None),
        (Method::POST, "/v1/dead-letters/1/replay".into(), None),
        (Method::POST, "/v1/dead-letters/replay".into(), None),
        (
            Method::DELETE,
            format!("/v1/agents/demo/sessions/{encoded}"),
            None,
        ),
        (
            Method::DELETE,
            format!("/v1/agents/demo/leads/{encoded}"),
            None,
        ),
        // Last: the calls above need the agent.
        (Method::DELETE, "/v1/agents/demo".into(), None),
    ]
}

#[tokio::test]
async fn every_route_answers_401_json_without_the_right_bearer_token() {
    let w = World::start().await;
    let mut p = Problems::default();
    w.wagate.echo_agent("demo").await;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let bad_headers: Vec<(&str, Option<String>)> = vec![
        ("no Authorization header", None),
        ("wrong token", Some("Bearer wrong-token".into())),
        (
            "token plus a character",
            Some(format!("Bearer {ADMIN_TOKEN}x")),
        ),
        (
            "token minus a character",
            Some(format!("Bearer {}", &ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1])),
        ),
        ("empty bearer", Some("Bearer ".into())),
        (
            "Basic with the token as password",
            Some(format!("Basic {}", b64(&format!("admin:{ADMIN_TOKEN}")))),
        ),
        (
            "Basic with the token as user",
            Some(format!("Basic {}", b64(&format!("{ADMIN_TOKEN}:")))),
        ),
        (
            "Basic with the raw token",
            Some(format!("Basic {ADMIN_TOKEN}")),
        ),
        ("the token without a scheme", Some(ADMIN_TOKEN.to_owned())),
        ("Token scheme", Some(format!("Token {ADMIN_TOKEN}"))),
    ];
    for (method, path, body) in routes() {
        for (what, header) in &bad_headers {
            let mut b = w
                .wagate
                .http
                .request(method.clone(), format!("{}{path}", w.wagate.admin_url));
            if let Some(h) = header {
                b = b.header("authorization", h);
            }
            if let Some(body) = &body {
                b = b.json(body);
            }
            let a = read(b.send().await.unwrap()).await;
            p.error(&a, 401, &format!("{method} {path} with {what}"));
            p.check(!a.text.contains(ADMIN_TOKEN), || {
                format!("a 401 echoes the admin token: {}", a.text)
            });
        }
    }

    // Paths that are not routes answer 401 too before the token is checked, so that the
    // shape of the API cannot be probed; with the token they are 404. (`/` is the console's
    // sign-in, tested in it::console.)
    for path in ["/v1/nope", "/v1", "/v1/agents/demo/nope", "/admin"] {
        for method in [Method::GET, Method::POST] {
            let url = format!("{}{path}", w.wagate.admin_url);
            let a = read(
                w.wagate
                    .http
                    .request(method.clone(), &url)
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
            p.error(&a, 401, &format!("{method} {path} without a token"));
            let a = call(&w, method.clone(), path, None).await;
            p.error(&a, 404, &format!("{method} {path} with the token"));
        }
    }

    // Nothing of the above took effect. The state is read back at once (a refused call that
    // changed it would have done so before answering); for sends, a template the right token
    // sends to the user is a barrier: anything queued for them before comes first.
    let demo = call(&w, Method::GET, "/v1/agents/demo", None).await.json();
    assert_eq!(demo["name"], "demo");
    let a = call(&w, Method::GET, "/v1/agents/intruder", None).await;
    p.error(&a, 404, "an agent PUT without the token");
    let channel = call(&w, Method::GET, "/v1/agents/demo/whatsapp", None)
        .await
        .json();
    assert_eq!(channel["phone_number"], SANDBOX);
    assert_eq!(channel["enabled"], true);
    let a = call(
        &w,
        Method::POST,
        "/v1/agents/demo/messages",
        Some(json!({"to": FROM, "content_sid": template_sid()})),
    )
    .await;
    assert_eq!(a.status, 202, "{}", a.text);
    let sent = w.twilio.wait_for_sent(1, WAIT).await;
    assert_eq!(sent.len(), 1, "{sent:?}");

    // And the right token opens every route (none of them answers 401).
    for (method, path, body) in routes() {
        let a = call(&w, method.clone(), &path, body).await;
        p.check(a.status != 401, || {
            format!("{method} {path} with the right token: 401 {}", a.text)
        });
        p.sane(&a, &format!("{method} {path} with the right token"));
    }
    p.finish();
}

// ---------------------------------------------------------------------------------------------
// Validation

#[tokio::test]
async fn agent_ids_are_validated_422_on_put_and_404_on_get() {
    let w = World::start().await;
    let mut p = Problems::default();
    let sixty_four = "a".repeat(64);
    let sixty_five = "a".repeat(65);
    for bad in [
        "a.b",
        sixty_five.as_str(),
        "a%20b",
        "a%2Fb",
        "%C3%A9t%C3%A9",
        "a+b",
        "a~b",
    ] {
        let a = call(
            &w,
            Method::PUT,
            &format!("/v1/agents/{bad}"),
            Some(json!({"name": "x", "backend": {"kind": "echo"}})),
        )
        .await;
        p.error(&a, 422, &format!("PUT agent {bad:?}"));
        let a = call(&w, Method::GET, &format!("/v1/agents/{bad}"), None).await;
        p.error(&a, 404, &format!("GET agent {bad:?}"));
        for (method, sub) in [
            (Method::GET, "whatsapp"),
            (Method::GET, "leads"),
            (Method::POST, "whatsapp/enable"),
            (Method::GET, "sessions/%2B14155550100"),
        ] {
            let a = call(&w, method.clone(), &format!("/v1/agents/{bad}/{sub}"), None).await;
            p.check([404, 422].contains(&a.status), || {
                format!("{method} {sub} of agent {bad:?}: expected 404 or 422, got {a:?}")
            });
            p.json_error(&a, &format!("{method} {sub} of agent {bad:?}"));
        }
    }
    // The longest valid id, and every allowed character.
    for good in [sixty_four.as_str(), "Az09_-"] {
        let a = call(
            &w,
            Method::PUT,
            &format!("/v1/agents/{good}"),
            Some(json!({"backend": {"kind": "echo"}})),
        )
        .await;
        assert_eq!(a.status, 200, "PUT agent {good:?}: {}", a.text);
        assert_eq!(a.json()["id"], good);
        let a = call(&w, Method::GET, &format!("/v1/agents/{good}"), None).await;
        assert_eq!(a.status, 200, "GET agent {good:?}: {}", a.text);
    }
    let list = call(&w, Method::GET, "/v1/agents", None).await.json();
    let ids: BTreeSet<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, BTreeSet::from([sixty_four.as_str(), "Az09_-"]));
    p.finish();
}

#[tokio::test]
async fn agent_bodies_that_are_not_the_documented_json_are_400() {
    let w = World::start().await;
    let mut p = Problems::default();
    let cases: Vec<(&str, &[u8])> = vec![
        ("malformed: cut short", br#"{"name": "x", "backend": {"kind": "echo"}"#),
        ("malformed: trailing comma", br#"{"name": "x", "backend": {"kind": "echo"},}"#),
        ("malformed: not JSON", b"name=x&backend=echo"),
        ("malformed: empty body", b""),
        ("malformed: trailing garbage", br#"{"backend": {"kind": "echo"}} trailing"#),
        ("malformed: single quotes", b"{'backend': {'kind': 'echo'}}"),
        ("malformed: invalid UTF-8", b"{\"name\": \"\xff\xfe\", \"backend\": {\"kind\": \"echo\"}}"),
        ("shape: a list", br#"[{"backend": {"kind": "echo"}}]"#),
        ("shape: a string", br#""echo""#),
        ("shape: null", b"null"),
        ("shape: name is a number", br#"{"name": 5, "backend": {"kind": "echo"}}"#),
        ("shape: backend is a string", br#"{"backend": "echo"}"#),
        ("shape: backend without kind", br#"{"backend": {"url": "https://example.com"}}"#),
        ("shape: base_url is a number", br#"{"backend": {"kind": "openai", "base_url": 1, "model": "m"}}"#),
        ("shape: openai without model", br#"{"backend": {"kind": "openai", "base_url": "https://x.example"}}"#),
        ("unknown field at the top", br#"{"name": "x", "backend": {"kind": "echo"}, "colour": "red"}"#),
        ("unknown field in echo", br#"{"backend": {"kind": "echo", "temperature": 1}}"#),
        ("unknown field in openai", br#"{"backend": {"kind": "openai", "base_url": "https://x.example", "model": "m", "apikey": "k"}}"#),
        ("unknown field in webhook", br#"{"backend": {"kind": "webhook", "url": "https://x.example", "secret": "0123456789abcdef0", "hmac": "sha1"}}"#),
        ("missing backend", br#"{"name": "x"}"#),
        ("missing everything", b"{}"),
    ];
    for (what, body) in &cases {
        for json_type in [true, false] {
            let a = call_raw(&w, Method::PUT, "/v1/agents/x", body, json_type).await;
            p.error(&a, 400, what);
        }
    }
    let a = call(
        &w,
        Method::PUT,
        "/v1/agents/x",
        Some(json!({"backend": {"kind": "gpt"}})),
    )
    .await;
    p.check([400, 422].contains(&a.status), || {
        format!("unknown backend kind: expected 400 or 422, got {a:?}")
    });
    p.json_error(&a, "unknown backend kind");
    let a = call(&w, Method::GET, "/v1/agents/x", None).await;
    p.error(&a, 404, "no refused body saved an agent");
    p.finish();
}

#[tokio::test]
async fn whatsapp_channels_are_validated() {
    let w = World::start().await;
    let mut p = Problems::default();
    w.wagate.agent("demo", json!({"kind": "echo"})).await;
    let path = "/v1/agents/demo/whatsapp";
    let hex = "0123456789abcdef0123456789abcdef";
    for bad_sid in [
        format!("AC{}", &hex[..31]),
        format!("AC{hex}0"),
        format!("AC{}g", &hex[..31]),
        format!("SK{hex}"),
        format!("ac{hex}"),
        format!("AC {}", &hex[..31]),
        "AC".to_owned(),
        String::new(),
    ] {
        let a = call(
            &w,
            Method::PUT,
            path,
            Some(json!({"account_sid": bad_sid, "auth_token": AUTH_TOKEN, "phone_number": SANDBOX, "enabled": true})),
        )
        .await;
        p.error(&a, 422, &format!("account_sid {bad_sid:?}"));
    }
    for bad_phone in [
        "14155238886",
        "+1 415 523 8886",
        "+1-415-523-8886",
        "(415) 523-8886",
        "+",
        "",
        "+04155238886",
        "+1415523888612345",
        "+1415abc8886",
        "++14155238886",
    ] {
        let a = call(
            &w,
            Method::PUT,
            path,
            Some(json!({"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN, "phone_number": bad_phone, "enabled": true})),
        )
        .await;
        p.error(&a, 422, &format!("phone_number {bad_phone:?}"));
    }
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("malformed JSON", br#"{"account_sid": "#.to_vec()),
        ("empty body", Vec::new()),
        ("a list", serde_json::to_vec(&json!([ACCOUNT_SID, AUTH_TOKEN, SANDBOX])).unwrap()),
        (
            "account_sid as a number",
            serde_json::to_vec(&json!({"account_sid": 5, "auth_token": AUTH_TOKEN, "phone_number": SANDBOX})).unwrap(),
        ),
        (
            "enabled as a string",
            serde_json::to_vec(&json!({"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN, "phone_number": SANDBOX, "enabled": "yes"})).unwrap(),
        ),
        (
            "unknown field",
            serde_json::to_vec(&json!({"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN, "phone_number": SANDBOX, "region": "us1"})).unwrap(),
        ),
        (
            "missing account_sid",
            serde_json::to_vec(&json!({"auth_token": AUTH_TOKEN, "phone_number": SANDBOX})).unwrap(),
        ),
        (
            "missing phone_number",
            serde_json::to_vec(&json!({"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN})).unwrap(),
        ),
    ];
    for (what, body) in &cases {
        let a = call_raw(&w, Method::PUT, path, body, true).await;
        p.error(&a, 400, what);
        p.check(!a.text.contains(AUTH_TOKEN), || {
            format!("{what}: the error echoes the token: {}", a.text)
        });
    }
    let a = call(&w, Method::GET, path, None).await;
    p.error(&a, 404, "no refused body saved a channel");
    p.finish();
}

#[tokio::test]
async fn unknown_agents_are_404_on_every_agent_route() {
    let w = World::start().await;
    let mut p = Problems::default();
    w.wagate.echo_agent("demo").await;
    let encoded = FROM.replace('+', "%2B");
    let calls: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, "/v1/agents/nobody".into(), None),
        (
            Method::PUT,
            "/v1/agents/nobody/whatsapp".into(),
            Some(channel_body(SANDBOX, true)),
        ),
        (Method::GET, "/v1/agents/nobody/whatsapp".into(), None),
        (
            Method::POST,
            "/v1/agents/nobody/whatsapp/enable".into(),
            None,
        ),
        (
            Method::POST,
            "/v1/agents/nobody/whatsapp/disable".into(),
            None,
        ),
        (Method::GET, "/v1/agents/nobody/leads".into(), None),
        (
            Method::GET,
            "/v1/agents/nobody/leads?format=csv".into(),
            None,
        ),
        (
            Method::GET,
            format!("/v1/agents/nobody/sessions/{encoded}"),
            None,
        ),
        (
            Method::POST,
            "/v1/agents/nobody/messages".into(),
            Some(json!({"to": FROM, "content_sid": template_sid()})),
        ),
        (
            Method::POST,
            "/v1/agents/nobody/messages".into(),
            Some(json!({"to": FROM, "body": "hi"})),
        ),
        (
            Method::GET,
            format!("/v1/agents/nobody/messages/{}", sid(1)),
            None,
        ),
        (
            Method::DELETE,
            format!("/v1/agents/nobody/sessions/{encoded}"),
            None,
        ),
        (
            Method::DELETE,
            format!("/v1/agents/nobody/leads/{encoded}"),
            None,
        ),
        (Method::DELETE, "/v1/agents/nobody".into(), None),
    ];
    for (method, path, body) in calls {
        let a = call(&w, method.clone(), &path, body).await;
        p.error(&a, 404, &format!("{method} {path}"));
    }
    // Ids differ by case: `Demo` is not `demo`.
    let a = call(&w, Method::GET, "/v1/agents/Demo", None).await;
    p.error(&a, 404, "GET /v1/agents/Demo");
    // A PUT of a channel of an unknown agent created nothing.
    let list = call(&w, Method::GET, "/v1/agents", None).await.json();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    p.finish();
}

// ---------------------------------------------------------------------------------------------
// Garbage

fn garbage_bodies() -> Vec<Vec<u8>> {
    let mut bodies: Vec<Vec<u8>> = [
        &b""[..],
        b" ",
        b"\n\n",
        b"null",
        b"true",
        b"0",
        b"-1",
        b"1e999",
        b"\"x\"",
        b"[]",
        b"{}",
        b"[{}]",
        b"{",
        b"}",
        b"{\"",
        b"{\"name\":",
        b"{'name': 'x'}",
        b"\xff\xfe\x00\x01",
        b"\x00",
        b"\xef\xbb\xbf{}",
        b"{\"a\": \"\\ud800\"}",
        b"{\"name\": \"\\u0000\", \"backend\": {\"kind\": \"echo\"}}",
        b"{\"backend\": null}",
        b"{\"backend\": []}",
        b"{\"backend\": {}}",
        b"{\"backend\": {\"kind\": null}}",
        b"{\"backend\": {\"kind\": 1}}",
        b"{\"backend\": {\"kind\": \"\"}}",
        b"{\"backend\": {\"kind\": \"ECHO\"}}",
        b"{\"name\": \"\", \"backend\": {\"kind\": \"echo\"}}",
        b"{\"name\": [\"x\"], \"backend\": {\"kind\": \"echo\"}}",
        b"{\"backend\": {\"kind\": \"openai\"}}",
        b"{\"backend\": {\"kind\": \"openai\", \"base_url\": \"\", \"model\": \"\"}}",
        b"{\"backend\": {\"kind\": \"openai\", \"base_url\": \"ftp://x\", \"model\": \"m\"}}",
        b"{\"backend\": {\"kind\": \"openai\", \"base_url\": \"http://x\", \"model\": \"m\", \"timeout_ms\": -1}}",
        b"{\"backend\": {\"kind\": \"openai\", \"base_url\": \"http://x\", \"model\": \"m\", \"timeout_ms\": 1e300}}",
        b"{\"backend\": {\"kind\": \"openai\", \"base_url\": \"http://x\", \"model\": \"m\", \"timeout_ms\": 18446744073709551616}}",
        b"{\"backend\": {\"kind\": \"openai\", \"base_url\": \"http://x\", \"model\": \"m\", \"timeout_ms\": 0}}",
        b"{\"backend\": {\"kind\": \"webhook\", \"url\": \"javascript:alert(1)\", \"secret\": \"0123456789abcdef0\"}}",
        b"{\"backend\": {\"kind\": \"webhook\", \"url\": \"http://x\", \"secret\": \"short\"}}",
        b"{\"backend\": {\"kind\": \"webhook\", \"url\": \"http://x\"}}",
        b"{\"backend\": {\"kind\": \"webhook\", \"url\": \"http://x\", \"secret\": 12345678901234567890}}",
        b"{\"account_sid\": 1, \"auth_token\": 2, \"phone_number\": 3}",
        b"{\"account_sid\": \"AC0123456789abcdef0123456789abcdef\", \"auth_token\": \"\", \"phone_number\": \"+14155238886\"}",
        b"{\"account_sid\": \"AC0123456789abcdef0123456789abcdef\", \"auth_token\": \"short\", \"phone_number\": \"+14155238886\"}",
        b"{\"account_sid\": \"AC0123456789abcdef0123456789abcdef\", \"auth_token\": \"f3a9c1d2e4b5a6978877665544332211\", \"phone_number\": \"+14155238886\", \"enabled\": null}",
        b"{\"account_sid\": \"AC0123456789abcdef0123456789abcdef\", \"auth_token\": \"f3a9c1d2 e4b5a6978877665544332211\", \"phone_number\": \"+14155238886\"}",
        b"{\"account_sid\": \"AC0123456789abcdef0123456789abcdef\", \"auth_token\": \"f3a9c1d2e4b5a6978877665544332211\", \"phone_number\": \"whatsapp:\"}",
        b"{\"to\": null}",
        b"{\"to\": \"+14155550100\"}",
        b"{\"to\": \"+14155550100\", \"body\": \"\"}",
        b"{\"to\": \"+14155550100\", \"body\": null, \"content_sid\": null}",
        b"{\"to\": \"+14155550100\", \"body\": \"x\", \"content_variables\": {\"1\": \"a\"}}",
        b"{\"to\": \"+14155550100\", \"content_sid\": \"HX\"}",
        b"{\"to\": \"+14155550100\", \"content_sid\": \"HX0123456789abcdef0123456789abcdef\", \"content_variables\": []}",
        b"{\"to\": \"+14155550100\", \"content_sid\": \"HX0123456789abcdef0123456789abcdef\", \"content_variables\": \"x\"}",
        b"{\"to\": \"whatsapp:\", \"body\": \"x\"}",
        b"{\"stage\": \"nonsense\"}",
        b"{\"since\": \"yesterday\"}",
        b"{\"agent\": 5}",
    ]
    .iter()
    .map(|b| b.to_vec())
    .collect();
    bodies.push(format!("{}{}", "[".repeat(5000), "]".repeat(5000)).into_bytes());
    bodies.push(format!("{}1{}", "{\"a\":".repeat(2000), "}".repeat(2000)).into_bytes());
    bodies.push(
        serde_json::to_vec(&json!({"name": "n".repeat(100_000), "backend": {"kind": "echo"}}))
            .unwrap(),
    );
    bodies.push(serde_json::to_vec(&json!({"to": FROM, "body": "b".repeat(100_000)})).unwrap());
    bodies.push(
        serde_json::to_vec(&json!({"account_sid": ACCOUNT_SID, "auth_token": "t".repeat(10_000), "phone_number": SANDBOX})).unwrap(),
    );
    let many: serde_json::Map<String, Value> =
        (0..5000).map(|i| (format!("k{i}"), json!(i))).collect();
    bodies.push(serde_json::to_vec(&Value::Object(many)).unwrap());
    bodies.push((0u8..=255).cycle().take(4096).collect());
    bodies
}

#[tokio::test]
async fn garbage_bodies_on_every_put_and_post_route_never_cause_a_5xx() {
    let w = World::start().await;
    let mut p = Problems::default();
    w.wagate.echo_agent("demo").await;
    let routes: [(Method, &str); 12] = [
        (Method::PUT, "/v1/agents/fuzz"),
        (Method::PUT, "/v1/agents/demo"),
        (Method::PUT, "/v1/agents/a.b"),
        (Method::PUT, "/v1/agents/demo/whatsapp"),
        (Method::PUT, "/v1/agents/nobody/whatsapp"),
        (Method::POST, "/v1/agents/demo/whatsapp/disable"),
        (Method::POST, "/v1/agents/demo/whatsapp/enable"),
        (Method::POST, "/v1/agents/demo/messages"),
        (Method::POST, "/v1/agents/nobody/messages"),
        (Method::POST, "/v1/dead-letters/replay"),
        (Method::POST, "/v1/dead-letters/1/replay"),
        (Method::POST, "/v1/dead-letters/x/replay"),
    ];
    let bodies = garbage_bodies();
    let mut checked = 0;
    for (i, body) in bodies.iter().enumerate() {
        for (method, path) in &routes {
            let json_type = i % 2 == 0;
            let a = call_raw(&w, method.clone(), path, body, json_type).await;
            let shown = String::from_utf8_lossy(&body[..body.len().min(120)]).into_owned();
            p.sane(&a, &format!("{method} {path} with body #{i} {shown:?}"));
            checked += 1;
        }
    }
    assert_eq!(checked, bodies.len() * routes.len());

    // wagate is still whole: the API answers and a conversation still works.
    let a = call(&w, Method::GET, "/v1/agents", None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = call(
        &w,
        Method::PUT,
        "/v1/agents/demo",
        Some(json!({"backend": {"kind": "echo"}})),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    w.wagate.channel("demo", true).await;
    let r = w
        .wagate
        .inbound("demo", &sid(1), FROM, "still alive?")
        .await;
    assert_eq!(r.status(), 200);
    let sent = w.twilio.wait_for_sent(1, WAIT).await;
    assert!(
        sent.iter()
            .any(|m| m.body.as_deref() == Some("still alive?")),
        "{sent:?}"
    );
    let logs = w.wagate.logs();
    assert!(!logs.contains("panicked"), "wagate panicked:\n{logs}");
    p.finish();
}

#[tokio::test]
async fn odd_paths_answer_json_errors_never_5xx() {
    let w = World::start().await;
    let mut p = Problems::default();
    w.wagate.echo_agent("demo").await;
    let long_id = "x".repeat(5000);
    let paths = [
        "/v1/agents/%FF".to_owned(),
        "/v1/agents/%00".to_owned(),
        "/v1/agents/%".to_owned(),
        format!("/v1/agents/{long_id}"),
        "/v1/agents/%FF/leads".to_owned(),
        "/v1/agents/demo/sessions/%FF".to_owned(),
        "/v1/agents/demo/sessions/%".to_owned(),
        "/v1/agents/demo/sessions/%2B".to_owned(),
        "/v1/agents/demo/sessions/whatsapp%3A%2B14155550100".to_owned(),
    ];
    for path in &paths {
        let a = call(&w, Method::GET, path, None).await;
        p.sane(&a, &format!("GET {path}"));
    }
    for path in ["/v1/agents/%FF", "/v1/agents/%00", "/v1/agents/%"] {
        let a = call(
            &w,
            Method::PUT,
            path,
            Some(json!({"backend": {"kind": "echo"}})),
        )
        .await;
        p.check(a.status >= 400, || {
            format!("PUT {path} was accepted: {a:?}")
        });
        p.sane(&a, &format!("PUT {path}"));
    }
    // Unknown endpoints are JSON 404s.
    for path in [
        "/v1/nothing",
        "/v1/agents/demo/nothing",
        "/v1/agents/demo/whatsapp/toggle",
    ] {
        let a = call(&w, Method::GET, path, None).await;
        p.error(&a, 404, &format!("GET {path}"));
    }
    // The agent is unharmed.
    let a = call(&w, Method::GET, "/v1/agents/demo", None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    p.finish();
}

#[tokio::test]
async fn bad_query_strings_answer_json_errors_never_5xx() {
    let w = World::start().await;
    let mut p = Problems::default();
    w.wagate.echo_agent("demo").await;
    for path in [
        "/v1/agents/demo/leads?format=xml",
        "/v1/agents/demo/leads?format=",
        "/v1/agents/demo/leads?format=csv&format=json",
        "/v1/agents/demo/leads?%FF=%FF",
        "/v1/dead-letters?since=yesterday",
        "/v1/dead-letters?stage=nonsense",
        "/v1/dead-letters?%FF",
        "/v1/agents?limit=-1",
    ] {
        let a = call(&w, Method::GET, path, None).await;
        p.sane(&a, &format!("GET {path}"));
    }
    p.finish();
}

#[tokio::test]
async fn methods_a_route_lacks_answer_json_errors() {
    let w = World::start().await;
    let mut p = Problems::default();
    w.wagate.echo_agent("demo").await;
    for (method, path) in [
        (Method::DELETE, "/v1/agents/demo/whatsapp"),
        (Method::PATCH, "/v1/agents/demo/whatsapp"),
        (Method::GET, "/v1/agents/demo/messages"),
        (Method::PUT, "/v1/dead-letters"),
    ] {
        let a = call(&w, method.clone(), path, None).await;
        p.check((400..500).contains(&a.status), || {
            format!("{method} {path}: expected a 4xx, got {a:?}")
        });
        p.json_error(&a, &format!("{method} {path}"));
    }
    let a = call(&w, Method::GET, "/v1/agents/demo", None).await;
    assert_eq!(a.status, 200, "the agent is unharmed: {}", a.text);
    p.finish();
}

#[tokio::test]
async fn a_body_over_the_size_limit_is_a_json_error_not_a_5xx() {
    let w = World::start().await;
    let mut p = Problems::default();
    w.wagate.echo_agent("demo").await;
    // Just over 256 KiB (wagate's limit), small enough that the client finishes writing it and
    // reads the answer even when the server answers before reading it all.
    let big =
        serde_json::to_vec(&json!({"name": "n".repeat(300 * 1024), "backend": {"kind": "echo"}}))
            .unwrap();
    for (method, path) in [
        (Method::PUT, "/v1/agents/big"),
        (Method::PUT, "/v1/agents/demo/whatsapp"),
        (Method::POST, "/v1/agents/demo/messages"),
    ] {
        let mut answer = None;
        for _ in 0..3 {
            // A fresh connection each time: the server may close one it did not read to the end.
            let r = reqwest::Client::new()
                .request(method.clone(), format!("{}{path}", w.wagate.admin_url))
                .bearer_auth(ADMIN_TOKEN)
                .header("content-type", "application/json")
                .body(big.clone())
                .send()
                .await;
            if let Ok(r) = r {
                answer = Some(read(r).await);
                break;
            }
        }
        let Some(a) = answer else {
            p.check(false, || format!("{method} {path} with 300 KiB: no answer"));
            continue;
        };
        p.check((400..500).contains(&a.status), || {
            format!("{method} {path} with 300 KiB: expected a 4xx, got {a:?}")
        });
        p.json_error(&a, &format!("{method} {path} with 300 KiB"));
    }
    let a = call(&w, Method::GET, "/v1/agents/big", None).await;
    p.error(&a, 404, "the oversized agent was not saved");
    p.finish();
}
