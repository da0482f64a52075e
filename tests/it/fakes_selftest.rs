//! Self-tests of the test fakes in `tests/it/support/`: each fake is driven with plain reqwest,
//! so a wagate test that fails can trust the fake and look at wagate.

use crate::support;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use support::fake_agent_webhook::{self, FakeAgentWebhook};
use support::fake_openai::{self, FakeOpenAi};
use support::fake_twilio::{FakeTwilio, ScriptedResponse};

const ACCOUNT: &str = "AC0123456789abcdef0123456789abcdef";
const TOKEN: &str = "0123456789abcdef0123456789abcdef";
const USER: &str = "whatsapp:+15551230001";
const OTHER_USER: &str = "whatsapp:+15551230002";
const SENDER: &str = "whatsapp:+14155238886";
const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// fake_twilio

async fn twilio() -> (FakeTwilio, String) {
    let fake = FakeTwilio::start().await;
    fake.add_account(ACCOUNT, TOKEN);
    let url = format!(
        "{}/2010-04-01/Accounts/{ACCOUNT}/Messages.json",
        fake.base_url
    );
    (fake, url)
}

async fn post_form(url: &str, user: &str, pass: &str, form: &[(&str, &str)]) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .basic_auth(user, Some(pass))
        .form(form)
        .send()
        .await
        .expect("request to the fake")
}

async fn send(url: &str, to: &str, body: &str) -> reqwest::Response {
    post_form(
        url,
        ACCOUNT,
        TOKEN,
        &[("To", to), ("From", SENDER), ("Body", body)],
    )
    .await
}

async fn twilio_error_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let ct = resp.headers()[reqwest::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(ct.starts_with("application/json"), "{ct}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], json!(status), "{body}");
    let code = body["code"].as_u64().expect("numeric code");
    assert_eq!(
        body["more_info"],
        json!(format!("https://www.twilio.com/docs/errors/{code}"))
    );
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    (status, body)
}

fn is_message_sid(sid: &str) -> bool {
    sid.len() == 34
        && (sid.starts_with("SM") || sid.starts_with("MM"))
        && sid[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

fn fixture() -> Value {
    serde_json::from_str(include_str!("../fixtures/twilio_messages_api.json")).unwrap()
}

#[tokio::test]
async fn twilio_valid_create_is_201_with_the_spec_fields_and_recorded() {
    let (fake, url) = twilio().await;
    let callback = "http://127.0.0.1:9/webhooks/twilio/whatsapp/echo/status";
    let body = "Hello, 世界 👋";
    let resp = post_form(
        &url,
        ACCOUNT,
        TOKEN,
        &[
            ("To", USER),
            ("From", SENDER),
            ("Body", body),
            ("StatusCallback", callback),
        ],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 201);
    assert!(resp.headers().contains_key("twilio-request-id"));
    let json: Value = resp.json().await.unwrap();

    let spec_fields: Vec<String> = fixture()["message"]["properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let got: Vec<String> = json.as_object().unwrap().keys().cloned().collect();
    assert_eq!(
        got, spec_fields,
        "the 201 has exactly the spec's message properties"
    );
    let sid = json["sid"].as_str().unwrap();
    assert!(sid.starts_with("SM") && is_message_sid(sid), "{sid}");
    assert_eq!(json["status"], "queued");
    assert_eq!(json["to"], USER);
    assert_eq!(json["from"], SENDER);
    assert_eq!(json["body"], body);
    assert_eq!(json["account_sid"], ACCOUNT);
    assert_eq!(json["direction"], "outbound-api");
    assert_eq!(json["num_segments"], "1");
    assert_eq!(json["error_code"], Value::Null);
    assert_eq!(
        json["uri"],
        format!("/2010-04-01/Accounts/{ACCOUNT}/Messages/{sid}.json")
    );
    let date = json["date_created"].as_str().unwrap();
    // e.g. "Thu, 24 Aug 2023 05:01:45 +0000"
    assert_eq!(date.len(), 31, "{date}");
    assert!(
        date.ends_with(" +0000") && date.as_bytes()[3] == b',',
        "{date}"
    );

    let sent = fake.wait_for_sent(1, WAIT).await;
    assert_eq!(sent.len(), 1);
    let m = &sent[0];
    assert_eq!(m.sid, sid);
    assert_eq!(
        (m.account_sid.as_str(), m.to.as_str(), m.from.as_str()),
        (ACCOUNT, USER, SENDER)
    );
    assert_eq!(m.body.as_deref(), Some(body));
    assert_eq!(m.status_callback.as_deref(), Some(callback));
    assert_eq!(m.content_sid, None);
    assert_eq!(m.form.len(), 4);
    assert!(m.received_at <= SystemTime::now());
    assert_eq!(fake.requests().len(), 1);
    assert_eq!(fake.violations(), Vec::<String>::new());

    // A second create gets another SID.
    let second: Value = send(&url, USER, "again").await.json().await.unwrap();
    assert_ne!(second["sid"], json["sid"]);
}

#[tokio::test]
async fn twilio_template_send_with_content_sid_and_messaging_service() {
    let (fake, url) = twilio().await;
    let vars = r#"{"1":"12/1","2":"3pm"}"#;
    let resp = post_form(
        &url,
        ACCOUNT,
        TOKEN,
        &[
            ("To", USER),
            ("MessagingServiceSid", "MG0123456789abcdef0123456789abcdef"),
            ("ContentSid", "HX0123456789abcdef0123456789abcdef"),
            ("ContentVariables", vars),
        ],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 201);
    let json: Value = resp.json().await.unwrap();
    assert_eq!(json["status"], "accepted", "Messaging Service without From");
    assert_eq!(json["from"], Value::Null);
    let m = &fake.sent()[0];
    assert_eq!(
        m.content_sid.as_deref(),
        Some("HX0123456789abcdef0123456789abcdef")
    );
    assert_eq!(m.content_variables.as_deref(), Some(vars));
    assert_eq!(m.body, None);
    assert_eq!(m.from, "");
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

#[tokio::test]
async fn twilio_missing_to_is_a_violation_with_twilio_error_json() {
    let (fake, url) = twilio().await;
    let resp = post_form(&url, ACCOUNT, TOKEN, &[("From", SENDER), ("Body", "hi")]).await;
    let (status, body) = twilio_error_of(resp).await;
    assert_eq!((status, body["code"].as_u64()), (400, Some(21604)));
    let violations = fake.violations();
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert!(violations[0].contains("To"), "{violations:?}");
    assert!(fake.sent().is_empty());
    assert_eq!(
        fake.requests().len(),
        1,
        "rejected requests are recorded too"
    );
}

#[tokio::test]
async fn twilio_rejects_each_kind_of_malformed_create() {
    let (fake, url) = twilio().await;
    let long_ok = "👋".repeat(800); // 1600 UTF-16 code units: the limit itself is fine
    let too_long = "👋".repeat(801); // 1602 code units, 801 characters
    // (form, expected Twilio code, text the violation must contain)
    type Case<'a> = (Vec<(&'a str, &'a str)>, u64, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec![("To", USER), ("Body", "x")],
            21603,
            "From | MessagingServiceSid",
        ),
        (
            vec![("To", USER), ("From", SENDER)],
            21619,
            "Body | MediaUrl | ContentSid",
        ),
        (
            vec![("To", USER), ("From", SENDER), ("Body", &too_long)],
            21617,
            "1602 UTF-16",
        ),
        (
            vec![
                ("To", USER),
                ("From", SENDER),
                ("Body", "x"),
                ("Tags", "{}"),
            ],
            20001,
            "\"Tags\"",
        ),
        (
            vec![("To", USER), ("From", SENDER), ("ContentSid", "HX123")],
            21655,
            "HX123",
        ),
        (
            vec![
                ("To", USER),
                ("From", SENDER),
                ("ContentSid", "HX0123456789abcdef0123456789abcdeg"),
            ],
            21655,
            "^HX[0-9a-fA-F]{32}$",
        ),
        (
            vec![
                ("To", USER),
                ("From", SENDER),
                ("ContentSid", "XX0123456789abcdef0123456789abcdef"),
            ],
            21655,
            "^HX[0-9a-fA-F]{32}$",
        ),
        (
            vec![
                ("To", USER),
                ("MessagingServiceSid", "MG0123456789ABCDEF0123456789abcdeZ"),
                ("Body", "x"),
            ],
            21705,
            "^MG",
        ),
        (
            vec![
                ("To", USER),
                ("From", SENDER),
                ("ContentSid", "HX0123456789abcdef0123456789abcdef"),
                ("ContentVariables", "[1]"),
            ],
            21656,
            "not a JSON object",
        ),
        (
            vec![
                ("To", USER),
                ("From", SENDER),
                ("ContentSid", "HX0123456789abcdef0123456789abcdef"),
                ("ContentVariables", "{1:"),
            ],
            21656,
            "not JSON",
        ),
        (
            vec![
                ("To", USER),
                ("From", SENDER),
                ("Body", "x"),
                ("StatusCallback", "https://bad_host.example/x"),
            ],
            21609,
            "bad_host",
        ),
        (
            vec![
                ("To", USER),
                ("From", SENDER),
                ("Body", "x"),
                ("StatusCallback", "/relative"),
            ],
            21609,
            "absolute",
        ),
        (
            vec![
                ("To", "whatsapp: 15551230001"),
                ("From", SENDER),
                ("Body", "x"),
            ],
            21211,
            "whitespace",
        ),
        (
            vec![("To", "+15551230001"), ("From", SENDER), ("Body", "x")],
            21910,
            "same channel",
        ),
        (
            vec![("To", USER), ("From", SENDER), ("Body", "x"), ("Body", "y")],
            60200,
            "2 times",
        ),
        (
            vec![
                ("To", USER),
                ("From", SENDER),
                ("Body", "x"),
                ("ContentRetention", "keep"),
            ],
            60200,
            "retain",
        ),
        (
            vec![
                ("To", USER),
                ("From", SENDER),
                ("Body", "x"),
                ("ValidityPeriod", "soon"),
            ],
            60200,
            "integer",
        ),
        (
            vec![
                ("To", USER),
                ("From", SENDER),
                ("Body", "x"),
                ("SendAt", "tomorrow"),
            ],
            60200,
            "ISO 8601",
        ),
    ];
    for (i, (form, code, needle)) in cases.iter().enumerate() {
        let before = fake.violations().len();
        let (status, body) = twilio_error_of(post_form(&url, ACCOUNT, TOKEN, form).await).await;
        assert_eq!(
            (status, body["code"].as_u64()),
            (400, Some(*code)),
            "case {i}: {form:?} -> {body}"
        );
        let new = &fake.violations()[before..];
        assert!(
            new.iter().any(|v| v.contains(needle)),
            "case {i}: {needle:?} not in {new:?}"
        );
    }
    assert!(fake.sent().is_empty());

    let ok = send(&url, USER, &long_ok).await;
    assert_eq!(
        ok.status().as_u16(),
        201,
        "exactly 1600 UTF-16 code units is allowed"
    );

    // A JSON body is not parsed by Twilio: it sees no `To`.
    let before = fake.violations().len();
    let resp = reqwest::Client::new()
        .post(&url)
        .basic_auth(ACCOUNT, Some(TOKEN))
        .json(&json!({"To": USER, "From": SENDER, "Body": "x"}))
        .send()
        .await
        .unwrap();
    let (status, body) = twilio_error_of(resp).await;
    assert_eq!((status, body["code"].as_u64()), (400, Some(21604)));
    assert!(fake.violations()[before].contains("Content-Type"));
}

#[tokio::test]
async fn twilio_bad_auth_is_401_20003() {
    let (fake, url) = twilio().await;
    let (status, body) = twilio_error_of(
        post_form(
            &url,
            ACCOUNT,
            "wrong",
            &[("To", USER), ("From", SENDER), ("Body", "x")],
        )
        .await,
    )
    .await;
    assert_eq!((status, body["code"].as_u64()), (401, Some(20003)));
    assert!(
        fake.violations().is_empty(),
        "wrong credentials are not a spec violation"
    );

    // Valid credentials of one account on another account's path.
    let other = "ACffffffffffffffffffffffffffffffff";
    fake.add_account(other, "other-token");
    let resp = post_form(
        &url,
        other,
        "other-token",
        &[("To", USER), ("From", SENDER), ("Body", "x")],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 401);

    // No Authorization header at all breaks the spec's security requirement.
    let resp = reqwest::Client::new()
        .post(&url)
        .form(&[("To", USER), ("From", SENDER), ("Body", "x")])
        .send()
        .await
        .unwrap();
    let (status, body) = twilio_error_of(resp).await;
    assert_eq!((status, body["code"].as_u64()), (401, Some(20003)));
    assert_eq!(fake.violations().len(), 1);
    assert!(fake.sent().is_empty());
    assert_eq!(fake.requests().len(), 3);
    assert_eq!(fake.requests()[2].authorization, None);
}

#[tokio::test]
async fn twilio_bad_path_is_404_and_a_violation() {
    let (fake, _) = twilio().await;
    let url = format!("{}/2010-04-01/Accounts/AC123/Messages.json", fake.base_url);
    let (status, body) = twilio_error_of(send(&url, USER, "x").await).await;
    assert_eq!((status, body["code"].as_u64()), (404, Some(20404)));
    let url = format!(
        "{}/2010-04-01/Accounts/{ACCOUNT}/Messages/SM00.json",
        fake.base_url
    );
    let (status, _) = twilio_error_of(send(&url, USER, "x").await).await;
    assert_eq!(status, 404);
    assert_eq!(fake.violations().len(), 2, "{:?}", fake.violations());
}

#[tokio::test]
async fn twilio_scripted_responses_in_fifo_order() {
    let (fake, url) = twilio().await;
    fake.push_response(ScriptedResponse::RateLimited {
        retry_after_secs: Some(7),
    });
    fake.push_response(ScriptedResponse::RateLimited {
        retry_after_secs: None,
    });
    fake.push_response(ScriptedResponse::ServerError);
    fake.push_response(ScriptedResponse::TwilioError {
        status: 400,
        code: 63016,
        message: "Failed to send freeform message because you are outside the allowed window."
            .into(),
    });

    let resp = send(&url, USER, "1").await;
    assert_eq!(resp.headers()["retry-after"], "7");
    let (status, body) = twilio_error_of(resp).await;
    assert_eq!((status, body["code"].as_u64()), (429, Some(20429)));

    let resp = send(&url, USER, "2").await;
    assert!(!resp.headers().contains_key("retry-after"));
    assert_eq!(resp.status().as_u16(), 429);

    let (status, body) = twilio_error_of(send(&url, USER, "3").await).await;
    assert_eq!((status, body["code"].as_u64()), (500, Some(20500)));

    let (status, body) = twilio_error_of(send(&url, USER, "4").await).await;
    assert_eq!((status, body["code"].as_u64()), (400, Some(63016)));
    assert!(fake.sent().is_empty(), "none of these is a send");

    assert_eq!(
        send(&url, USER, "5").await.status().as_u16(),
        201,
        "script used up"
    );
    assert_eq!(fake.sent().len(), 1);
    assert!(fake.violations().is_empty());
}

#[tokio::test]
async fn twilio_scripted_slow_reset_and_ambiguous_500() {
    let (fake, url) = twilio().await;

    fake.push_response(ScriptedResponse::Slow(Duration::from_millis(300)));
    let started = Instant::now();
    assert_eq!(send(&url, USER, "slow").await.status().as_u16(), 201);
    assert!(started.elapsed() >= Duration::from_millis(300));

    fake.push_response(ScriptedResponse::Reset);
    let err = reqwest::Client::new()
        .post(&url)
        .basic_auth(ACCOUNT, Some(TOKEN))
        .form(&[("To", USER), ("From", SENDER), ("Body", "reset")])
        .send()
        .await
        .expect_err("the connection is dropped without an answer");
    assert!(err.status().is_none(), "{err:?}");
    eprintln!("reset seen by reqwest as: {err:?}");
    assert_eq!(fake.sent().len(), 1, "a reset create is not recorded");

    fake.push_response(ScriptedResponse::AcceptButFail500);
    let (status, body) = twilio_error_of(send(&url, USER, "ambiguous").await).await;
    assert_eq!((status, body["code"].as_u64()), (500, Some(20500)));
    let sent = fake.sent();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[1].body.as_deref(), Some("ambiguous"));

    // The server keeps serving after the reset.
    assert_eq!(send(&url, USER, "after").await.status().as_u16(), 201);
    assert!(fake.violations().is_empty());
}

fn today_utc() -> String {
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 86_400;
    ymd(days as i64)
}

fn ymd(days: i64) -> String {
    // Same civil-from-days arithmetic as the fake, written independently enough for a test.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

async fn create_content(fake: &FakeTwilio, user: &str, body: &Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/Content", fake.base_url))
        .basic_auth(user, Some(TOKEN))
        .json(body)
        .send()
        .await
        .expect("request to the fake");
    (
        resp.status().as_u16(),
        resp.json().await.unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn twilio_content_api_makes_quick_replies_and_list_pickers_and_shows_their_body() {
    let (fake, url) = twilio().await;
    let buttons = json!({
        "friendly_name": "sure",
        "language": "en",
        "types": {"twilio/quick-reply": {
            "body": "Sure?",
            "actions": [{"title": "Yes", "id": "yes"}, {"title": "No", "id": "no"}],
        }},
    });
    let (status, content) = create_content(&fake, ACCOUNT, &buttons).await;
    assert_eq!(status, 201, "{content}");
    let sid = content["sid"].as_str().unwrap().to_owned();
    assert!(
        sid.len() == 34 && sid.starts_with("HX") && sid[2..].bytes().all(|b| b.is_ascii_hexdigit()),
        "{sid}"
    );
    assert_eq!(content["account_sid"], ACCOUNT);
    assert_eq!(content["types"], buttons["types"]);
    for field in [
        "date_created",
        "date_updated",
        "friendly_name",
        "language",
        "variables",
        "url",
        "links",
    ] {
        assert!(content.get(field).is_some(), "{field} in {content}");
    }

    let picker = json!({
        "friendly_name": "day",
        "language": "en",
        "types": {"twilio/list-picker": {
            "body": "Which day?",
            "button": "Choose",
            "items": [{"id": "mon", "item": "Monday", "description": "Start of the week"}],
        }},
    });
    let (status, _) = create_content(&fake, ACCOUNT, &picker).await;
    assert_eq!(status, 201);
    assert_eq!(fake.contents().len(), 2);
    assert_eq!(
        fake.contents()[1].kind().as_deref(),
        Some("twilio/list-picker")
    );

    // Sent as the content, the message shows its body in the list, as Twilio renders it.
    let resp = post_form(
        &url,
        ACCOUNT,
        TOKEN,
        &[("To", USER), ("From", SENDER), ("ContentSid", &sid)],
    )
    .await;
    assert_eq!(resp.status(), 201);
    let (_, page) = list(&url, &[("To", USER)]).await;
    assert_eq!(page["messages"][0]["body"], "Sure?", "{page}");
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

#[tokio::test]
async fn twilio_content_api_refuses_what_the_spec_and_limits_do_not_allow() {
    let (fake, _) = twilio().await;
    let quick = |actions: Value| {
        json!({"friendly_name": "f", "language": "en",
               "types": {"twilio/quick-reply": {"body": "Sure?", "actions": actions}}})
    };
    let four: Vec<Value> = (0..4).map(|i| json!({"title": format!("t{i}")})).collect();
    let cases = [
        (
            json!({"language": "en", "types": {"twilio/quick-reply": {"body": "b", "actions": [{"title": "t"}]}}}),
            "friendly_name",
        ),
        (
            json!({"friendly_name": "f", "types": {"twilio/quick-reply": {"body": "b", "actions": [{"title": "t"}]}}}),
            "language",
        ),
        (json!({"friendly_name": "f", "language": "en"}), "types"),
        (quick(json!(four)), "1 to 3 actions"),
        (
            quick(json!([{"title": "twenty-one characters"}])),
            "over 20 characters",
        ),
        (quick(json!([{"id": "x"}])), "title is required"),
        (
            json!({"friendly_name": "f", "language": "en", "types": {"twilio/list-picker": {
            "body": "b", "button": "Choose", "items": [{"id": "x", "item": "twenty-five characters!!!"}]}}}),
            "over 24 characters",
        ),
        (
            json!({"friendly_name": "f", "language": "en", "types": {"twilio/list-picker": {
            "body": "b", "items": [{"id": "x", "item": "y"}]}}}),
            "button is required",
        ),
    ];
    for (body, why) in cases {
        let before = fake.violations().len();
        let (status, error) = create_content(&fake, ACCOUNT, &body).await;
        assert_eq!(status, 400, "{body}: {error}");
        let violations = fake.violations();
        assert!(
            violations[before..].iter().any(|v| v.contains(why)),
            "{body}: {why} not in {violations:?}"
        );
    }
    let (status, _) = create_content(
        &fake,
        "AC00000000000000000000000000000000",
        &quick(json!([{"title": "t"}])),
    )
    .await;
    assert_eq!(status, 401);
    fake.push_content_error(400, 20001, "refused");
    let (status, error) = create_content(&fake, ACCOUNT, &quick(json!([{"title": "t"}]))).await;
    assert_eq!((status, error["code"].as_u64()), (400, Some(20001)));
    assert!(fake.contents().is_empty());
}

async fn list(url: &str, query: &[(&str, &str)]) -> (u16, Value) {
    // The workspace's reqwest has no `query` feature: encode by hand.
    let mut url = url.to_owned();
    if !query.is_empty() {
        let encoded = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(query)
            .finish();
        url = format!(
            "{url}{}{encoded}",
            if url.contains('?') { '&' } else { '?' }
        );
    }
    let resp = reqwest::Client::new()
        .get(url)
        .basic_auth(ACCOUNT, Some(TOKEN))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

fn bodies(page: &Value) -> Vec<&str> {
    page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn twilio_list_filters_like_listmessage() {
    let (fake, url) = twilio().await;
    let today = today_utc();
    for (to, body) in [(USER, "a1"), (OTHER_USER, "b1"), (USER, "a2")] {
        assert_eq!(send(&url, to, body).await.status().as_u16(), 201);
    }
    if today_utc() != today {
        eprintln!("skipped: the UTC day changed while the messages were sent");
        return;
    }
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        / 86_400;
    let yesterday = ymd(days - 1);

    let (status, page) = list(&url, &[("To", USER)]).await;
    assert_eq!(status, 200);
    let keys: Vec<String> = page.as_object().unwrap().keys().cloned().collect();
    let mut spec_keys: Vec<String> = fixture()["list"]["response_properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    spec_keys.sort();
    assert_eq!(sorted, spec_keys);
    assert_eq!(bodies(&page), ["a2", "a1"], "newest first, only To");
    assert_eq!(page["page"], 0);
    assert_eq!(page["page_size"], 50);
    assert_eq!(page["next_page_uri"], Value::Null);
    assert_eq!(page["previous_page_uri"], Value::Null);
    assert!(
        page["uri"]
            .as_str()
            .unwrap()
            .contains("To=whatsapp%3A%2B15551230001"),
        "{page}"
    );

    let (_, page) = list(&url, &[("From", SENDER), ("DateSent>", &today)]).await;
    assert_eq!(bodies(&page), ["a2", "b1", "a1"]);
    let (_, page) = list(&url, &[("DateSent<", &yesterday)]).await;
    assert_eq!(bodies(&page), Vec::<&str>::new());
    let (_, page) = list(&url, &[("DateSent", &today), ("To", OTHER_USER)]).await;
    assert_eq!(bodies(&page), ["b1"]);
    // A time of day is accepted but, as Twilio documents, only the day counts.
    let (_, page) = list(&url, &[("DateSent>", &format!("{today}T23:59:59Z"))]).await;
    assert_eq!(bodies(&page).len(), 3);
    // The `DateSent>=2024-01-01` spelling in a raw URL parses as `DateSent>` = `2024-01-01`.
    let raw = format!("{url}?DateSent>={yesterday}&PageSize=2");
    let resp = reqwest::Client::new()
        .get(raw)
        .basic_auth(ACCOUNT, Some(TOKEN))
        .send()
        .await
        .unwrap();
    let page: Value = resp.json().await.unwrap();
    assert_eq!(bodies(&page), ["a2", "b1"]);
    let next = page["next_page_uri"].as_str().expect("a second page");
    let (_, page2) = list(&format!("{}{next}", fake.base_url), &[]).await;
    assert_eq!(bodies(&page2), ["a1"]);
    assert_eq!(page2["page"], 1);
    assert_eq!(page2["start"], 2);
    assert!(page2["previous_page_uri"].is_string());
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());

    // Encoding the operator into the name (`DateSent%3E%3D`) is a different, unknown parameter.
    let (status, body) = list(&url, &[("DateSent>=", &today)]).await;
    assert_eq!((status, body["code"].as_u64()), (400, Some(20001)));
    let (status, _) = list(&url, &[("PageSize", "0")]).await;
    assert_eq!(status, 400);
    let (status, _) = list(&url, &[("DateSent>", "last tuesday")]).await;
    assert_eq!(status, 400);
    assert_eq!(fake.violations().len(), 3, "{:?}", fake.violations());
    assert_eq!(fake.sent().len(), 3, "lists never create");
}

#[tokio::test]
async fn twilio_wait_for_sent_waits_for_late_messages() {
    let (fake, url) = twilio().await;
    let sender = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        send(&url, USER, "late").await.status().as_u16()
    });
    let sent = fake.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].body.as_deref(), Some("late"));
    assert_eq!(sender.await.unwrap(), 201);
}

#[tokio::test]
#[should_panic(expected = "expected at least 2 sent message(s)")]
async fn twilio_wait_for_sent_panics_listing_what_arrived() {
    let (fake, url) = twilio().await;
    send(&url, USER, "only one").await;
    fake.wait_for_sent(2, Duration::from_millis(200)).await;
}

// ---------------------------------------------------------------------------------------------
// fake_openai

const OPENAI_KEY: &str = "sk-test-0123456789";

async fn chat(fake: &FakeOpenAi, key: Option<&str>, body: &Value) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{}/chat/completions", fake.base_url))
        .json(body);
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

fn chat_body(user_content: Value) -> Value {
    json!({
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "earlier"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": user_content},
        ]
    })
}

#[tokio::test]
async fn openai_auth_errors_have_openai_shape() {
    let fake = FakeOpenAi::start(OPENAI_KEY).await;
    assert!(fake.base_url.ends_with("/v1"));
    let (status, body) = chat(&fake, None, &chat_body(json!("hi"))).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["code"], Value::Null);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("didn't provide an API key")
    );

    let (status, body) = chat(&fake, Some("sk-wrong-key-000000"), &chat_body(json!("hi"))).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert!(
        !body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("sk-wrong-key-000000")
    );
    assert_eq!(
        fake.requests().len(),
        2,
        "unauthorized requests are recorded"
    );
}

#[tokio::test]
async fn openai_replies_quote_the_last_user_message() {
    let fake = FakeOpenAi::start(OPENAI_KEY).await;
    let (status, body) = chat(&fake, Some(OPENAI_KEY), &chat_body(json!("hello there"))).await;
    assert_eq!(status, 200);
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "gpt-test");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(body["created"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(body["choices"][0]["index"], 0);
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "reply #1 to: hello there"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let usage = &body["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        )
    );

    let (_, body) = chat(&fake, Some(OPENAI_KEY), &chat_body(json!("second"))).await;
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "reply #2 to: second"
    );
    let requests = fake.wait_for_requests(2, WAIT).await;
    assert_eq!(requests[1]["messages"][3]["content"], "second");
    assert!(fake.violations().is_empty());

    fake.set_reply(|n, req| format!("custom {n} {}", fake_openai::last_user_text(req)));
    let (_, body) = chat(&fake, Some(OPENAI_KEY), &chat_body(json!("x"))).await;
    assert_eq!(body["choices"][0]["message"]["content"], "custom 3 x");
}

#[tokio::test]
async fn openai_user_content_parts_use_the_text_parts() {
    let fake = FakeOpenAi::start(OPENAI_KEY).await;
    let parts = json!([
        {"type": "text", "text": "what is in this picture?"},
        {"type": "image_url", "image_url": {"url": "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages/MM1/Media/ME1"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    ]);
    let (status, body) = chat(&fake, Some(OPENAI_KEY), &chat_body(parts)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "reply #1 to: what is in this picture?"
    );
    let request = &fake.requests()[0];
    assert_eq!(fake_openai::last_user_image_urls(request).len(), 2);
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());

    let bad = json!([{"type": "image_url", "image_url": "https://example.com/a.png"}]);
    let (status, body) = chat(&fake, Some(OPENAI_KEY), &chat_body(bad)).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(fake.violations().len(), 1);
}

#[tokio::test]
async fn openai_delay_errors_and_malformed_requests() {
    let fake = FakeOpenAi::start(OPENAI_KEY).await;
    fake.push_error(429, "Rate limit reached");
    let (status, body) = chat(&fake, Some(OPENAI_KEY), &chat_body(json!("x"))).await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");

    fake.set_delay(Duration::from_millis(250));
    let started = Instant::now();
    let (status, body) = chat(&fake, Some(OPENAI_KEY), &chat_body(json!("slow"))).await;
    assert_eq!(status, 200);
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "reply #2 to: slow"
    );
    fake.set_delay(Duration::ZERO);

    let (status, _) = chat(&fake, Some(OPENAI_KEY), &json!({"messages": []})).await;
    assert_eq!(status, 400);
    let (status, _) = chat(
        &fake,
        Some(OPENAI_KEY),
        &json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(fake.violations().len(), 3, "{:?}", fake.violations());
}

// ---------------------------------------------------------------------------------------------
// fake_agent_webhook

const WEBHOOK_SECRET: &str = "whsec-test";

fn agent_request(body: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "agent_id": "support",
        "session_id": "twilio_support_+15551230001",
        "from": "+15551230001",
        "messages": [
            {"role": "user", "content": "earlier"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": body},
        ],
        "message": {"message_sid": "SM0123456789abcdef0123456789abcdef", "from": USER, "to": SENDER, "body": body},
    }))
    .unwrap()
}

fn now_secs() -> String {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string()
}

async fn post_signed(fake: &FakeAgentWebhook, ts: &str, sig: &str, body: Vec<u8>) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(&fake.url)
        .header("Content-Type", "application/json")
        .header("X-Wagate-Timestamp", ts)
        .header("X-Wagate-Signature", sig)
        .body(body)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

#[tokio::test]
async fn webhook_good_signature_gets_the_reply() {
    let fake = FakeAgentWebhook::start(WEBHOOK_SECRET).await;
    let body = agent_request("hola");
    let ts = now_secs();
    let sig = fake_agent_webhook::sign(WEBHOOK_SECRET.as_bytes(), &ts, &body);
    // Computed independently of the fake's helper.
    use hmac::{Hmac, KeyInit, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).unwrap();
    mac.update(format!("{ts}.").as_bytes());
    mac.update(&body);
    assert_eq!(
        sig,
        format!("v1={}", hex::encode(mac.finalize().into_bytes()))
    );

    let (status, reply) = post_signed(&fake, &ts, &sig, body).await;
    assert_eq!(status, 200);
    assert_eq!(reply, json!({"reply": "webhook says: hola"}));
    assert_eq!(fake.bad_signatures(), 0);
    let requests = fake.wait_for_requests(1, WAIT).await;
    assert_eq!(requests[0]["agent_id"], "support");
    assert!(fake.violations().is_empty());

    // Key rotation: any one of several v1= entries may match.
    let body = agent_request("again");
    let good = fake_agent_webhook::sign(WEBHOOK_SECRET.as_bytes(), &ts, &body);
    let (status, _) = post_signed(&fake, &ts, &format!("v1=00ff, {good}"), body).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn webhook_bad_signatures_are_401_and_counted() {
    let fake = FakeAgentWebhook::start(WEBHOOK_SECRET).await;
    let ts = now_secs();
    let body = agent_request("hola");
    let wrong_secret = fake_agent_webhook::sign(b"other secret", &ts, &body);
    assert_eq!(
        post_signed(&fake, &ts, &wrong_secret, body.clone()).await.0,
        401
    );

    let good = fake_agent_webhook::sign(WEBHOOK_SECRET.as_bytes(), &ts, &body);
    let tampered = agent_request("hola!");
    assert_eq!(
        post_signed(&fake, &ts, &good, tampered).await.0,
        401,
        "body changed"
    );
    assert_eq!(
        post_signed(
            &fake,
            &ts,
            &good.to_uppercase().replace("V1=", "v1="),
            body.clone()
        )
        .await
        .0,
        401,
        "uppercase hex"
    );
    assert_eq!(
        post_signed(&fake, &ts, good.trim_start_matches("v1="), body.clone())
            .await
            .0,
        401,
        "no v1= prefix"
    );
    let old = (ts.parse::<u64>().unwrap() - 3600).to_string();
    let old_sig = fake_agent_webhook::sign(WEBHOOK_SECRET.as_bytes(), &old, &body);
    assert_eq!(
        post_signed(&fake, &old, &old_sig, body.clone()).await.0,
        401,
        "stale timestamp"
    );

    let resp = reqwest::Client::new()
        .post(&fake.url)
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401, "unsigned");
    assert_eq!(fake.bad_signatures(), 6);
    assert_eq!(fake.requests().len(), 6);
    assert!(fake.violations().is_empty());
}

#[tokio::test]
async fn webhook_signed_but_malformed_body_is_a_violation() {
    let fake = FakeAgentWebhook::start(WEBHOOK_SECRET).await;
    let ts = now_secs();
    let body = serde_json::to_vec(
        &json!({"agent_id": "a", "messages": [{"role": "bot", "content": "x"}]}),
    )
    .unwrap();
    let sig = fake_agent_webhook::sign(WEBHOOK_SECRET.as_bytes(), &ts, &body);
    let (status, _) = post_signed(&fake, &ts, &sig, body).await;
    assert_eq!(status, 400);
    let v = fake.violations();
    assert!(v.iter().any(|v| v.contains("session_id")), "{v:?}");
    assert!(v.iter().any(|v| v.contains("role")), "{v:?}");
    assert_eq!(fake.bad_signatures(), 0);
}
