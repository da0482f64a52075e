use crate::support;

// Auth Tokens, OpenAI API keys and webhook secrets never appear in plaintext: not in Redis, not
// in the logs (even at debug level), not in any admin API answer, not in any JetStream message.
//
// One scenario gives every secret work to do: agents of all three kinds of secret, a
// conversation through each backend, agent failures and a failed send that leave dead letters,
// a replay, a status callback and a business-initiated message. Each surface is then searched
// for every secret as plaintext, hex, and base64 (standard and URL-safe, at every alignment, so
// a secret inside a longer encoded value such as `Basic base64(sid:token)` is found too).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use futures::StreamExt;
use reqwest::Method;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use support::{
    fake_agent_webhook::FakeAgentWebhook,
    fake_openai::FakeOpenAi,
    fake_twilio::ScriptedResponse,
    harness::{Mode, SANDBOX, Wagate, World, eventually, inbound_form, sid},
};

/// A Twilio account of this suite only (the SID is not a secret; its token is).
const TWILIO_SID: &str = "AC5ec2e7f05ec2e7f05ec2e7f05ec2e7f0";
const TWILIO_TOKEN: &str = "TwTok9x7QmZrLp3VbN8sKd2HfJ6gYc4W";
const OPENAI_KEY: &str = "sk-proj-OaK3yQ9vXw7Lm2Np5Rt8Zb4Hc6Jd1Fg";
const WEBHOOK_SECRET: &str = "whsec_Wh5ecR3tPq8Zn2Xv7Lk4Mb9Tc1Yd6Gf";
const SECRETS: [(&str, &str); 3] = [
    ("Twilio Auth Token", TWILIO_TOKEN),
    ("OpenAI API key", OPENAI_KEY),
    ("webhook secret", WEBHOOK_SECRET),
];

const FROM: &str = "+14155550100";
const FROM_2: &str = "+14155550122";
const WAIT: Duration = Duration::from_secs(20);

/// Named blobs to search: (where it came from, its bytes).
type Corpus = Vec<(String, Vec<u8>)>;

// ---------------------------------------------------------------------------------------------
// Finding a secret in any encoding

/// One spelling of one secret to look for.
struct Needle {
    secret: &'static str,
    form: String,
    text: String,
}

/// The base64 characters that encode `secret` whatever bytes surround it: for each of the three
/// alignments, the full groups made of the secret's bytes alone.
fn base64_cores(engine: &base64::engine::GeneralPurpose, secret: &str) -> Vec<String> {
    (0..3)
        .map(|k| {
            let mut bytes = vec![b'\x00'; k];
            bytes.extend_from_slice(secret.as_bytes());
            let encoded = engine.encode(&bytes);
            let start = if k > 0 { 4 } else { 0 };
            let end = 4 * (bytes.len() / 3);
            encoded[start..end].to_owned()
        })
        .collect()
}

fn needles() -> Vec<Needle> {
    let mut out = Vec::new();
    for (name, secret) in SECRETS {
        let mut forms = vec![
            ("plaintext".to_owned(), secret.to_owned()),
            ("hex".to_owned(), hex::encode(secret)),
            ("HEX".to_owned(), hex::encode_upper(secret)),
        ];
        for (alphabet, engine) in [
            ("base64", &base64::engine::general_purpose::STANDARD),
            ("base64url", &base64::engine::general_purpose::URL_SAFE),
        ] {
            for (k, core) in base64_cores(engine, secret).into_iter().enumerate() {
                assert!(
                    core.len() >= 24,
                    "{name}: base64 core too short to be telling"
                );
                forms.push((format!("{alphabet} at offset {k}"), core));
            }
        }
        out.extend(forms.into_iter().map(|(form, text)| Needle {
            secret: name,
            form,
            text,
        }));
    }
    out
}

/// Every (place, secret, form) where a secret shows, as readable lines.
fn leaks(corpus: &[(String, Vec<u8>)]) -> Vec<String> {
    let needles = needles();
    let mut found = Vec::new();
    for (place, bytes) in corpus {
        // The needles are ASCII, so a lossy conversion keeps every match.
        let text = String::from_utf8_lossy(bytes);
        for n in &needles {
            if let Some(at) = text.find(&n.text) {
                let from = text[..at]
                    .char_indices()
                    .rev()
                    .nth(80)
                    .map_or(0, |(i, _)| i);
                let context: String = text[from..].chars().take(240).collect();
                found.push(format!(
                    "{place}: {} as {} in …{context:?}…",
                    n.secret, n.form
                ));
            }
        }
    }
    found
}

fn assert_no_leaks(surface: &str, corpus: &[(String, Vec<u8>)]) {
    let found = leaks(corpus);
    assert!(
        found.is_empty(),
        "{surface}: {} secret(s) in plaintext or a plain encoding:\n  {}",
        found.len(),
        found.join("\n  ")
    );
}

fn corpus_contains(corpus: &[(String, Vec<u8>)], marker: &str) -> bool {
    corpus
        .iter()
        .any(|(_, b)| String::from_utf8_lossy(b).contains(marker))
}

#[test]
fn the_search_finds_secrets_in_every_encoding_it_claims() {
    let b64 = base64::engine::general_purpose::STANDARD;
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let cases: Vec<(&str, String)> = vec![
        ("plain", format!("token={TWILIO_TOKEN}&x=1")),
        (
            "basic auth header",
            format!(
                "Authorization: Basic {}",
                b64.encode(format!("{TWILIO_SID}:{TWILIO_TOKEN}"))
            ),
        ),
        ("bearer, base64", b64.encode(format!("Bearer {OPENAI_KEY}"))),
        (
            "url-safe, offset 2",
            url.encode(format!("ab{WEBHOOK_SECRET}cd")),
        ),
        (
            "hex in JSON",
            format!("{{\"k\":\"{}\"}}", hex::encode(OPENAI_KEY)),
        ),
        ("HEX", hex::encode_upper(format!("x{WEBHOOK_SECRET}"))),
    ];
    for (what, text) in cases {
        let found = leaks(&[(what.to_owned(), text.into_bytes())]);
        assert!(!found.is_empty(), "{what}: the search misses a secret");
    }
    // And it does not cry wolf over what is not a secret.
    let innocent = format!(
        "{TWILIO_SID} {} {} {}",
        b64.encode(TWILIO_SID),
        &TWILIO_TOKEN[..TWILIO_TOKEN.len() - 1],
        hex::encode(SANDBOX)
    );
    assert!(leaks(&[("innocent".to_owned(), innocent.into_bytes())]).is_empty());
}

// ---------------------------------------------------------------------------------------------
// The scenario

/// A world in which every secret was used, and everything the admin API answered on the way.
struct Scenario {
    w: World,
    _model: FakeOpenAi,
    _hook: FakeAgentWebhook,
    /// (what was called, the answer's status and body)
    answers: Corpus,
    /// Every message that crossed NATS while the scenario ran (subject, headers and payload).
    nats: Arc<Mutex<Corpus>>,
    _nats_task: tokio::task::JoinHandle<()>,
}

impl Scenario {
    async fn admin(&mut self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut b = self.w.wagate.admin(method.clone(), path);
        if let Some(body) = body {
            b = b.json(&body);
        }
        let r = b.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        self.answers.push((
            format!("admin {method} {path} → {status}"),
            text.clone().into_bytes(),
        ));
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn admin_ok(&mut self, method: Method, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.admin(method.clone(), path, body).await;
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {v}"
        );
        v
    }

    async fn inbound(&self, agent: &str, n: u64, from: &str, body: &str) {
        let mut form = inbound_form(&sid(n), from, body);
        for (k, v) in form.iter_mut() {
            if k == "AccountSid" {
                *v = TWILIO_SID.to_owned();
            }
        }
        let r = self
            .w
            .wagate
            .post_signed(&Wagate::inbound_path(agent), &form, TWILIO_TOKEN)
            .await;
        assert_eq!(r.status(), 200, "inbound to {agent}");
    }

    async fn dead_letters(&mut self) -> Vec<Value> {
        let v = self.admin_ok(Method::GET, "/v1/dead-letters", None).await;
        v.as_array().expect("dead letters are a list").clone()
    }

    async fn wait_dead_letters(&mut self, n: usize) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let d = self.dead_letters().await;
            if d.len() >= n {
                return d;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "expected {n} dead letters, have {d:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs the whole scenario.
    async fn run() -> Scenario {
        let model = FakeOpenAi::start(OPENAI_KEY).await;
        let hook = FakeAgentWebhook::start(WEBHOOK_SECRET).await;
        let w = World::start_with(&[("RUST_LOG", "debug")]).await;
        w.twilio.add_account(TWILIO_SID, TWILIO_TOKEN);

        // Everything that crosses NATS from now on.
        let nats = Arc::new(Mutex::new(Vec::new()));
        let client = async_nats::connect(&w.servers.nats_url).await.unwrap();
        let mut all = client.subscribe(">").await.unwrap();
        client.flush().await.unwrap();
        let sink = nats.clone();
        let nats_task = tokio::spawn(async move {
            let _client = client;
            while let Some(m) = all.next().await {
                let mut bytes = format!("{:?}\n", m.headers).into_bytes();
                bytes.extend_from_slice(&m.payload);
                sink.lock()
                    .unwrap()
                    .push((format!("NATS {}", m.subject), bytes));
            }
        });

        let mut s = Scenario {
            w,
            _model: model.clone(),
            _hook: hook.clone(),
            answers: Vec::new(),
            nats,
            _nats_task: nats_task,
        };

        // Agents with every kind of secret, and their channels.
        s.admin_ok(
            Method::PUT,
            "/v1/agents/ai",
            Some(json!({"name": "Model", "backend": {
                "kind": "openai", "base_url": model.base_url, "model": "gpt-test",
                "api_key": OPENAI_KEY, "system_prompt": "You are terse."
            }})),
        )
        .await;
        s.admin_ok(
            Method::PUT,
            "/v1/agents/hook",
            Some(json!({"name": "Hook", "backend": {
                "kind": "webhook", "url": hook.url, "secret": WEBHOOK_SECRET
            }})),
        )
        .await;
        s.admin_ok(
            Method::PUT,
            "/v1/agents/plain",
            Some(json!({"backend": {"kind": "echo"}})),
        )
        .await;
        for id in ["ai", "hook", "plain"] {
            let v = s
                .admin_ok(
                    Method::PUT,
                    &format!("/v1/agents/{id}/whatsapp"),
                    Some(json!({
                        "account_sid": TWILIO_SID, "auth_token": TWILIO_TOKEN,
                        "phone_number": SANDBOX, "enabled": true
                    })),
                )
                .await;
            assert_eq!(v["account_sid"], TWILIO_SID, "{v}");
        }
        // Refused requests that carry a secret: their errors must not echo it.
        let refused = [
            (
                "/v1/agents/bad1",
                json!({"backend": {"kind": "openai", "base_url": "ftp://x", "model": "m", "api_key": OPENAI_KEY}}),
            ),
            (
                "/v1/agents/bad2",
                json!({"backend": {"kind": "webhook", "url": "https://x.example", "secret": WEBHOOK_SECRET, "extra": 1}}),
            ),
            (
                "/v1/agents/plain/whatsapp",
                json!({"account_sid": "AC123", "auth_token": TWILIO_TOKEN, "phone_number": SANDBOX}),
            ),
            (
                "/v1/agents/plain/whatsapp",
                json!({"account_sid": TWILIO_SID, "auth_token": TWILIO_TOKEN, "phone_number": "555-0100"}),
            ),
            (
                "/v1/agents/plain/whatsapp",
                json!({"account_sid": TWILIO_SID, "auth_token": format!("{TWILIO_TOKEN} x"), "phone_number": SANDBOX}),
            ),
        ];
        for (path, body) in refused {
            let (status, v) = s.admin(Method::PUT, path, Some(body)).await;
            assert!((400..500).contains(&status), "PUT {path}: {status} {v}");
        }

        // A conversation through each backend.
        s.inbound("ai", 1, FROM, "hello model").await;
        s.w.twilio.wait_for_sent(1, WAIT).await;
        s.inbound("hook", 2, FROM, "hello hook").await;
        s.w.twilio.wait_for_sent(2, WAIT).await;
        s.inbound("plain", 3, FROM, "hello echo").await;
        let sent = s.w.twilio.wait_for_sent(3, WAIT).await;
        let bodies: Vec<&str> = sent.iter().filter_map(|m| m.body.as_deref()).collect();
        assert!(bodies.contains(&"reply #1 to: hello model"), "{bodies:?}");
        assert!(bodies.contains(&"webhook says: hello hook"), "{bodies:?}");
        assert!(bodies.contains(&"hello echo"), "{bodies:?}");
        assert_eq!(hook.bad_signatures(), 0);

        // A delivery status, signed with the token.
        let status = vec![
            ("MessageSid".to_owned(), sent[0].sid.clone()),
            ("MessageStatus".to_owned(), "delivered".to_owned()),
            ("AccountSid".to_owned(), TWILIO_SID.to_owned()),
            ("ChannelPrefix".to_owned(), "whatsapp".to_owned()),
        ];
        let r =
            s.w.wagate
                .post_signed("/webhooks/twilio/whatsapp/ai/status", &status, TWILIO_TOKEN)
                .await;
        assert!(r.status() == 200 || r.status() == 204, "{}", r.status());
        // A forged inbound message: wagate logs the mismatch, and must not log the token.
        let r =
            s.w.wagate
                .post_signed(
                    &Wagate::inbound_path("plain"),
                    &inbound_form(&sid(99), FROM, "forged"),
                    "not-the-token-0000000000000000",
                )
                .await;
        assert_eq!(r.status(), 401);

        // Failures that become dead letters: a send Twilio refuses (20003), a model and a
        // webhook that keep failing.
        s.w.twilio.push_response(ScriptedResponse::TwilioError {
            status: 401,
            code: 20003,
            message: "Authenticate".into(),
        });
        s.inbound("plain", 4, FROM_2, "this send fails").await;
        let dl = s.wait_dead_letters(1).await;
        let send_letter = dl
            .iter()
            .find(|d| d["reason"].as_str().is_some_and(|r| r.contains("20003")))
            .unwrap_or_else(|| panic!("no 20003 dead letter: {dl:?}"))
            .clone();
        for _ in 0..3 {
            model.push_error(500, "overloaded");
            hook.push_status(500);
        }
        s.inbound("ai", 5, FROM_2, "model is down").await;
        s.inbound("hook", 6, FROM_2, "hook is down").await;
        let dl = s.wait_dead_letters(3).await;
        assert_eq!(dl.len(), 3, "{dl:?}");

        // A business-initiated message inside the window, and a replay of the failed send.
        s.admin_ok(
            Method::POST,
            "/v1/agents/plain/messages",
            Some(json!({"to": FROM, "body": "a note from the business"})),
        )
        .await;
        let id = match &send_letter["id"] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        s.admin_ok(Method::POST, &format!("/v1/dead-letters/{id}/replay"), None)
            .await;
        let sent = s.w.twilio.wait_for_sent(5, WAIT).await;
        let bodies: Vec<&str> = sent.iter().filter_map(|m| m.body.as_deref()).collect();
        assert!(bodies.contains(&"this send fails"), "{bodies:?}");
        assert!(bodies.contains(&"a note from the business"), "{bodies:?}");

        // Everything the operator can read.
        s.admin_ok(Method::GET, "/v1/agents", None).await;
        for id in ["ai", "hook", "plain"] {
            s.admin_ok(Method::GET, &format!("/v1/agents/{id}"), None)
                .await;
            s.admin_ok(Method::GET, &format!("/v1/agents/{id}/whatsapp"), None)
                .await;
            s.admin_ok(Method::GET, &format!("/v1/agents/{id}/leads"), None)
                .await;
            s.admin_ok(
                Method::GET,
                &format!("/v1/agents/{id}/leads?format=csv"),
                None,
            )
            .await;
            s.admin_ok(
                Method::GET,
                &format!("/v1/agents/{id}/sessions/{}", FROM.replace('+', "%2B")),
                None,
            )
            .await;
        }
        s.admin_ok(Method::POST, "/v1/agents/hook/whatsapp/disable", None)
            .await;
        s.admin_ok(Method::POST, "/v1/agents/hook/whatsapp/enable", None)
            .await;
        let dl = s.dead_letters().await;
        assert_eq!(dl.len(), 2, "the agent failures remain: {dl:?}");

        // Let the logs and the NATS capture catch up.
        tokio::time::sleep(Duration::from_millis(500)).await;
        s
    }
}

// ---------------------------------------------------------------------------------------------
// The surfaces

/// Every value of every key of the test's Redis, by type.
async fn redis_corpus(w: &World) -> Corpus {
    fn flatten(v: &redis::Value, out: &mut Vec<u8>) {
        match v {
            redis::Value::BulkString(b) => {
                out.extend_from_slice(b);
                out.push(b'\n');
            }
            redis::Value::SimpleString(s) => {
                out.extend_from_slice(s.as_bytes());
                out.push(b'\n');
            }
            redis::Value::VerbatimString { text, .. } => {
                out.extend_from_slice(text.as_bytes());
                out.push(b'\n');
            }
            redis::Value::Array(items) | redis::Value::Set(items) => {
                items.iter().for_each(|i| flatten(i, out));
            }
            redis::Value::Map(pairs) => pairs.iter().for_each(|(k, v)| {
                flatten(k, out);
                flatten(v, out);
            }),
            redis::Value::Int(i) => out.extend_from_slice(format!("{i}\n").as_bytes()),
            _ => {}
        }
    }

    let mut con = w.servers.redis().await;
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut con)
            .await
            .unwrap();
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    keys.sort();
    keys.dedup();
    let mut corpus = vec![("Redis key names".to_owned(), keys.join("\n").into_bytes())];
    for key in &keys {
        let kind: String = redis::cmd("TYPE")
            .arg(key)
            .query_async(&mut con)
            .await
            .unwrap();
        let mut cmd = match kind.as_str() {
            "string" => redis::cmd("GET"),
            "hash" => redis::cmd("HGETALL"),
            "list" => redis::cmd("LRANGE"),
            "set" => redis::cmd("SMEMBERS"),
            "zset" => redis::cmd("ZRANGE"),
            "stream" => redis::cmd("XRANGE"),
            "none" => continue, // expired between SCAN and TYPE
            other => panic!("Redis key {key} has a type this scan does not read: {other}"),
        };
        cmd.arg(key);
        match kind.as_str() {
            "list" => {
                cmd.arg(0).arg(-1);
            }
            "zset" => {
                cmd.arg(0).arg(-1).arg("WITHSCORES");
            }
            "stream" => {
                cmd.arg("-").arg("+");
            }
            _ => {}
        }
        let value: redis::Value = cmd.query_async(&mut con).await.unwrap();
        let mut bytes = Vec::new();
        flatten(&value, &mut bytes);
        corpus.push((format!("Redis {kind} {key}"), bytes));
    }
    corpus
}

/// Every message still held by the three JetStream streams.
async fn jetstream_corpus(nats_url: &str) -> (Corpus, usize) {
    let client = async_nats::connect(nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut corpus = Vec::new();
    let mut dlq_read = 0;
    for name in ["WAGATE_INBOUND", "WAGATE_OUTBOUND", "WAGATE_DLQ"] {
        let mut stream = js
            .get_stream(name)
            .await
            .unwrap_or_else(|e| panic!("stream {name}: {e}"));
        let state = stream.info().await.unwrap().state.clone();
        if state.messages == 0 {
            continue;
        }
        for seq in state.first_sequence..=state.last_sequence {
            match stream.get_raw_message(seq).await {
                Ok(m) => {
                    let mut bytes = format!("{:?}\n", m.headers).into_bytes();
                    bytes.extend_from_slice(&m.payload);
                    corpus.push((format!("JetStream {name} #{seq} {}", m.subject), bytes));
                    if name == "WAGATE_DLQ" {
                        dlq_read += 1;
                    }
                }
                // Acknowledged work-queue messages and replayed dead letters are deleted.
                Err(e)
                    if e.kind()
                        == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound => {}
                Err(e) => panic!("stream {name} message {seq}: {e}"),
            }
        }
    }
    (corpus, dlq_read)
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn redis_holds_no_plaintext_secret_and_the_token_is_sealed() {
    let s = Scenario::run().await;
    let corpus = redis_corpus(&s.w).await;
    let names: Vec<&str> = corpus.iter().map(|(n, _)| n.as_str()).collect();
    for key in [
        "wagate:agent:ai",
        "wagate:agent:hook",
        "wagate:channel:ai",
        "wagate:channel:hook",
        "wagate:channel:plain",
    ] {
        assert!(
            names.iter().any(|n| n.ends_with(&format!(" {key}"))),
            "the scan did not read {key}: {names:?}"
        );
    }
    assert!(
        corpus_contains(&corpus, "hello model") && corpus_contains(&corpus, "hello hook"),
        "the scan reads the sessions too"
    );
    assert_no_leaks("Redis", &corpus);

    // The stored secrets are sealed values (`v1.<key>.<nonce>.<ciphertext>`).
    let con = s.w.servers.redis().await;
    let get = |key: String| {
        let mut con = con.clone();
        async move {
            let raw: Option<String> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut con)
                .await
                .unwrap();
            let raw = raw.unwrap_or_else(|| panic!("no {key}"));
            serde_json::from_str::<Value>(&raw).unwrap_or_else(|e| panic!("{key}: {e}: {raw}"))
        }
    };
    let mut tokens = Vec::new();
    for id in ["ai", "hook", "plain"] {
        let channel = get(format!("wagate:channel:{id}")).await;
        let token = channel["auth_token"]
            .as_str()
            .unwrap_or_else(|| panic!("channel {id} has no auth_token string: {channel}"));
        assert!(token.starts_with("v1."), "channel {id}: {token}");
        assert!(token.len() > TWILIO_TOKEN.len(), "channel {id}: {token}");
        tokens.push(token.to_owned());
    }
    tokens.sort();
    tokens.dedup();
    assert_eq!(
        tokens.len(),
        3,
        "one token sealed for three agents gives three different ciphertexts"
    );
    let ai = get("wagate:agent:ai".into()).await;
    let key = ai["backend"]["api_key"].as_str().unwrap_or_default();
    assert!(key.starts_with("v1."), "sealed API key: {ai}");
    let hook = get("wagate:agent:hook".into()).await;
    let secret = hook["backend"]["secret"].as_str().unwrap_or_default();
    assert!(secret.starts_with("v1."), "sealed webhook secret: {hook}");
}

#[tokio::test]
async fn debug_logs_hold_no_secret() {
    let s = Scenario::run().await;
    let logs = s.w.wagate.logs();
    assert!(logs.contains("wagate ready"), "{logs}");
    assert!(
        logs.contains("DEBUG") || logs.contains("\"level\":\"DEBUG\""),
        "wagate did not log at debug level:\n{logs}"
    );
    assert!(
        logs.contains("dead letter"),
        "the failures were logged:\n{logs}"
    );
    assert_no_leaks("wagate's logs", &[("log".to_owned(), logs.into_bytes())]);
}

#[tokio::test]
async fn no_admin_answer_holds_a_secret() {
    let s = Scenario::run().await;
    let calls: Vec<&str> = s.answers.iter().map(|(c, _)| c.as_str()).collect();
    for expected in [
        "admin PUT /v1/agents/ai → 200",
        "admin PUT /v1/agents/hook → 200",
        "admin PUT /v1/agents/ai/whatsapp → 200",
        "admin GET /v1/agents → 200",
        "admin GET /v1/agents/ai → 200",
        "admin GET /v1/agents/hook/whatsapp → 200",
        "admin GET /v1/dead-letters → 200",
    ] {
        assert!(calls.contains(&expected), "{expected} not in {calls:?}");
    }
    assert!(
        corpus_contains(&s.answers, "model is down"),
        "the dead letters were read"
    );
    assert_no_leaks("admin API answers", &s.answers);
}

#[tokio::test]
async fn jetstream_messages_hold_no_secret() {
    let s = Scenario::run().await;
    let (stored, dlq_read) = jetstream_corpus(&s.w.servers.nats_url).await;
    assert_eq!(
        dlq_read, 2,
        "the two unreplayed dead letters are read from WAGATE_DLQ"
    );
    assert_no_leaks("JetStream streams", &stored);

    // Work-queue messages are deleted once handled, so also look at everything that was
    // published while the scenario ran.
    let seen = eventually(Duration::from_secs(5), "NATS capture", || async {
        let seen = s.nats.lock().unwrap().clone();
        (corpus_contains(&seen, "this send fails") && corpus_contains(&seen, "hook is down"))
            .then_some(seen)
    })
    .await;
    for prefix in [
        "NATS wagate.inbound.",
        "NATS wagate.outbound.",
        "NATS wagate.dlq.",
    ] {
        assert!(
            seen.iter().any(|(n, _)| n.starts_with(prefix)),
            "nothing captured on {prefix}*"
        );
    }
    assert_no_leaks("messages published on NATS", &seen);
}

/// Every file under `dir`, recursively.
fn files_under(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

#[tokio::test]
async fn files_on_disk_hold_no_secret() {
    // Redis's append-only file keeps every write ever made (overwritten and deleted values
    // too), JetStream's file store keeps messages until it compacts, and ingress's spool keeps
    // what it accepted while NATS was away: all must be clean. One message is spooled, so the
    // spool has something to show.
    let mut s = Scenario::run().await;
    s.w.servers.kill_nats();
    s.inbound("hook", 50, FROM, "spooled while NATS is away")
        .await;
    let (files, corpus) = files_corpus(s.w.servers.dir.path());
    let aof: Vec<(String, Vec<u8>)> = corpus
        .iter()
        .filter(|(n, _)| n.contains("appendonly"))
        .cloned()
        .collect();
    assert!(
        corpus_contains(&aof, "hello model"),
        "Redis's append-only file was read: {files:?}"
    );
    assert!(
        files
            .iter()
            .any(|p| p.to_string_lossy().contains("jetstream")),
        "JetStream's store was read: {files:?}"
    );
    let spool: Corpus = corpus
        .iter()
        .filter(|(n, _)| n.ends_with("spool.redb"))
        .cloned()
        .collect();
    assert!(
        corpus_contains(&spool, "spooled while NATS is away"),
        "the spool was read: {files:?}"
    );
    assert_no_leaks("files of Redis, NATS and wagate", &corpus);
}

/// Every file under `dir` with its bytes, named for the report.
fn files_corpus(dir: &std::path::Path) -> (Vec<std::path::PathBuf>, Corpus) {
    let mut files = Vec::new();
    files_under(dir, &mut files);
    let corpus = files
        .iter()
        .filter_map(|p| {
            std::fs::read(p)
                .ok()
                .map(|b| (format!("file {}", p.display()), b))
        })
        .collect();
    (files, corpus)
}

#[tokio::test]
async fn the_embedded_data_folder_holds_no_secret() {
    // Embedded mode keeps agents, channels, sessions and the bus's messages in one redb file
    // in the data folder; what it was given there must be sealed too.
    let model = FakeOpenAi::start(OPENAI_KEY).await;
    let hook = FakeAgentWebhook::start(WEBHOOK_SECRET).await;
    let mut w = World::start_in(Mode::Embedded, &[]).await;
    w.twilio.add_account(TWILIO_SID, TWILIO_TOKEN);
    let backends = [
        (
            "ai",
            json!({"kind": "openai", "base_url": model.base_url, "model": "gpt-test", "api_key": OPENAI_KEY}),
        ),
        (
            "hook",
            json!({"kind": "webhook", "url": hook.url, "secret": WEBHOOK_SECRET}),
        ),
    ];
    for (id, backend) in backends {
        w.wagate.agent(id, backend).await;
        let r = w
            .wagate
            .admin(Method::PUT, &format!("/v1/agents/{id}/whatsapp"))
            .json(&json!({
                "account_sid": TWILIO_SID, "auth_token": TWILIO_TOKEN,
                "phone_number": SANDBOX, "enabled": true
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // The secrets at work: the token checks the webhooks and authenticates the sends, the key
    // and the secret reach the backends.
    for (n, id) in [(1, "ai"), (2, "hook")] {
        let mut form = inbound_form(&sid(n), FROM, &format!("hello {id}"));
        for (k, v) in form.iter_mut() {
            if k == "AccountSid" {
                *v = TWILIO_SID.to_owned();
            }
        }
        let r = w
            .wagate
            .post_signed(&Wagate::inbound_path(id), &form, TWILIO_TOKEN)
            .await;
        assert_eq!(r.status(), 200);
    }
    w.twilio.wait_for_sent(2, WAIT).await;
    assert_eq!(hook.bad_signatures(), 0);
    // Stopped, so that everything it would write is in the files.
    let (clean, _) = w.wagate.terminate().await;
    assert!(clean, "{}", w.wagate.logs());

    let data = w.servers.dir.path().join("data");
    let (files, corpus) = files_corpus(&data);
    let redb: Corpus = corpus
        .iter()
        .filter(|(n, _)| n.ends_with(".redb"))
        .cloned()
        .collect();
    assert!(
        corpus_contains(&redb, "hello ai") && corpus_contains(&redb, "hello hook"),
        "the scan reads the sessions in the embedded store: {files:?}"
    );
    assert!(
        corpus_contains(&redb, TWILIO_SID),
        "the scan reads the channels in the embedded store: {files:?}"
    );
    assert_no_leaks("files of the embedded data folder", &corpus);
}

#[tokio::test]
async fn a_token_relabelled_with_another_key_id_does_not_open() {
    // The process holds a second key (one being rotated out). The channel's token, sealed under
    // the current key, is relabelled in Redis with the second key's id, as someone with write
    // access to the store could: opening it with that key must fail, so the webhook cannot be
    // verified and is answered 503 (Twilio retries), not accepted with the token in clear.
    let other = wagate_core::crypto::Keyring::generate_key();
    let other_id = wagate_core::crypto::Keyring::from_base64(&other, &[])
        .unwrap()
        .primary_id()
        .to_owned();
    let w = World::start_in(
        Mode::Distributed,
        &[("WAGATE_MASTER_KEY_PREVIOUS", other.expose_secret())],
    )
    .await;
    w.wagate.echo_agent("demo").await;
    let mut con = w.servers.redis().await;
    let key = "wagate:channel:demo";
    let stored: String = redis::cmd("GET")
        .arg(key)
        .query_async(&mut con)
        .await
        .unwrap();
    let mut channel: Value = serde_json::from_str(&stored).unwrap();
    let sealed = channel["auth_token"].as_str().unwrap().to_owned();
    let mut parts: Vec<&str> = sealed.split('.').collect();
    assert_eq!(parts.len(), 4, "{sealed}");
    assert_ne!(parts[1], other_id);
    parts[1] = &other_id;
    channel["auth_token"] = Value::String(parts.join("."));
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(channel.to_string())
        .query_async(&mut con)
        .await
        .unwrap();
    let r = w.wagate.inbound("demo", &sid(1), FROM, "hi").await;
    assert_eq!(r.status(), 503, "a token that did not open cannot verify");
    assert!(
        w.wagate.logs().contains("cannot load the agent's channel"),
        "{}",
        w.wagate.logs()
    );
    // Labelled with its own key again, the same ciphertext opens: the 503 was the key's doing.
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(stored)
        .query_async(&mut con)
        .await
        .unwrap();
    let r = w.wagate.inbound("demo", &sid(1), FROM, "hi").await;
    assert_eq!(r.status(), 200);
    let sent = w.twilio.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].body.as_deref(), Some("hi"));
}
