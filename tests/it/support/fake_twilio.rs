//! A local stand-in for Twilio's Messages API (`/2010-04-01/Accounts/{AccountSid}/Messages.json`).
//!
//! It speaks Twilio's wire format and is strict where Twilio is: every request is checked
//! against the slice of the official OpenAPI spec in `tests/fixtures/twilio_messages_api.json`
//! (made by `scripts/extract-twilio-spec.py`), plus the documented limits the spec only states
//! in prose. Whatever breaks a rule is answered like Twilio answers (a 4xx with Twilio's error
//! JSON) *and* recorded in [`FakeTwilio::violations`], so a test that ends with
//! `assert!(fake.violations().is_empty())` proves wagate only sent well-formed requests.
//!
//! Behaviour worth knowing when writing tests:
//! - Credentials: only pairs given to [`FakeTwilio::add_account`] pass, and the path's
//!   AccountSid must be that account. Wrong credentials are a 401/20003 but not a violation;
//!   a missing or non-Basic `Authorization` header is both.
//! - Scripted responses ([`FakeTwilio::push_response`]) replace the 201 of the next creates
//!   that pass auth and validation, first in first out; a list (GET) never consumes them.
//! - `Slow`, `AcceptButFail500` and `AcceptButReset` record the message before answering, like
//!   a Twilio that queued it; `TwilioError`, `RateLimited`, `ServerError`, `Reset` and `Stall`
//!   do not record it.
//! - Status callbacks: like Twilio, the fake reports each message it made to its
//!   `StatusCallback`, signed with the account's Auth Token: `sent`, then `delivered`, after
//!   [`FakeTwilio::set_status_delay`] (10 ms unless set), and its list shows the status
//!   reported. A test that posts statuses itself calls [`FakeTwilio::withhold_status_callbacks`]
//!   first, so that the fake's reports cannot outrank its own; [`FakeTwilio::status_reports`]
//!   lists what was reported and what wagate answered.
//! - The list (GET) answers newest first and filters `DateSent`, `DateSent<`, `DateSent>` by
//!   calendar day (UTC) even when a time is given: Twilio documents only day granularity, so
//!   the fake never answers more precisely than Twilio promises.
//!
//! - The Content API (`POST /v1/Content`, JSON) makes `twilio/quick-reply` and
//!   `twilio/list-picker` contents, checked against Twilio's `ContentCreateRequest` and the
//!   limits of those types' pages; [`FakeTwilio::contents`] lists them and
//!   [`FakeTwilio::push_content_error`] scripts a refusal. A message sent with the `ContentSid` of
//!   such a content shows the content's body in the list, as Twilio renders it.
//!
//! This module is longer than most because it carries its own small pattern code (the test
//! crate has no regex crate) to stay a single self-contained file; dates are the `time`
//! crate's.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::serve::{IncomingStream, Listener};
use base64::Engine as _;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use time::{
    Date, OffsetDateTime, PrimitiveDateTime,
    format_description::well_known::{Rfc2822, Rfc3339},
    macros::format_description,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// The spec slice, compiled in so the fake works in a fresh clone without `shared/`.
const SPEC_FIXTURE: &str = include_str!("../../fixtures/twilio_messages_api.json");
/// Twilio's documented body limit (spec prose, error 21617), counted in UTF-16 code units.
const BODY_LIMIT_UTF16: usize = 1600;
/// "You can include up to ten `media_url` parameters per message" (spec prose, error 21623).
const MEDIA_URL_LIMIT: usize = 10;
/// Error 21609: "The maximum length of the StatusCallback is 4000 characters."
const STATUS_CALLBACK_LIMIT: usize = 4000;
/// Content API docs: at most 100 variables, keys up to 16 characters, values up to 1600.
const CONTENT_VARIABLES_MAX_PAIRS: usize = 100;
const CONTENT_VARIABLE_KEY_LIMIT: usize = 16;
const CONTENT_VARIABLE_VALUE_LIMIT: usize = 1600;
const DEFAULT_PAGE_SIZE: usize = 50;

/// A message create that the fake accepted (answered 201, or recorded by a scripted outcome).
#[derive(Clone, Debug)]
pub struct SentMessage {
    pub sid: String,
    pub account_sid: String,
    pub to: String,
    /// The `From` field; empty when the message was sent through `MessagingServiceSid` alone.
    pub from: String,
    pub body: Option<String>,
    pub content_sid: Option<String>,
    pub content_variables: Option<String>,
    pub status_callback: Option<String>,
    /// Every form field in arrival order (repeated keys such as `MediaUrl` appear repeatedly).
    pub form: Vec<(String, String)>,
    pub received_at: SystemTime,
}

/// A content the fake's Content API made.
#[derive(Clone, Debug)]
pub struct CreatedContent {
    pub sid: String,
    pub account_sid: String,
    /// The request's JSON, as posted.
    pub request: Value,
}

impl CreatedContent {
    /// The content type it was made as (`twilio/quick-reply`, `twilio/list-picker`).
    pub fn kind(&self) -> Option<String> {
        self.request["types"]
            .as_object()
            .and_then(|t| t.keys().next().cloned())
    }
}

/// A status callback the fake posted, and wagate's answer.
#[derive(Clone, Debug)]
pub struct StatusReport {
    pub sid: String,
    pub status: &'static str,
    /// The HTTP status wagate answered, or why there was no answer.
    pub answer: Result<u16, String>,
    pub at: SystemTime,
}

/// Any request the fake received, accepted or not.
#[derive(Clone, Debug)]
pub struct RawRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

/// What the next valid create gets instead of 201 (see [`FakeTwilio::push_response`]).
#[derive(Clone, Debug)]
pub enum ScriptedResponse {
    /// Any Twilio error, e.g. `{ status: 400, code: 63016, .. }`. The message is not recorded.
    TwilioError {
        status: u16,
        code: u32,
        message: String,
    },
    /// 429 with code 20429 and, when given, a `Retry-After` header. Not recorded.
    RateLimited { retry_after_secs: Option<u64> },
    /// 500 with code 20500. Not recorded.
    ServerError,
    /// Records the message, waits, then answers 201.
    Slow(Duration),
    /// Closes the connection without answering. Not recorded.
    Reset,
    /// Records the message as sent, then answers 500/20500: the ambiguous outcome.
    AcceptButFail500,
    /// Records the message as sent, then closes the connection without answering: the
    /// ambiguous outcome of a connection lost after Twilio made the message.
    AcceptButReset,
    /// Waits, then closes the connection without answering. Not recorded: a Twilio that hung
    /// before making the message (for a sender that dies while it waits).
    Stall(Duration),
}

/// A running fake Twilio. Cloning shares the same server; it stops when the last clone drops.
#[derive(Clone)]
pub struct FakeTwilio {
    /// `http://127.0.0.1:PORT`, to be used as `WAGATE_TWILIO_API_BASE`.
    pub base_url: String,
    shared: Arc<Shared>,
    _server: Arc<ServerGuard>,
}

impl FakeTwilio {
    pub async fn start() -> FakeTwilio {
        let spec = spec();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("fake twilio: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("fake twilio: local_addr");
        let shared = Arc::new(Shared {
            spec,
            state: Mutex::new(FakeState::default()),
            sent_changed: Notify::new(),
            sid_seed: format!("{addr}-{:?}", SystemTime::now()),
            callbacks: reqwest::Client::new(),
        });
        let app = Router::new()
            .fallback(handle)
            .with_state(shared.clone())
            .into_make_service_with_connect_info::<Conn>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(ClosableListener(listener), app).await;
        });
        FakeTwilio {
            base_url: format!("http://{addr}"),
            shared,
            _server: Arc::new(ServerGuard(task.abort_handle())),
        }
    }

    /// Registers an account; only these `AccountSid:AuthToken` pairs are accepted.
    pub fn add_account(&self, account_sid: &str, auth_token: &str) {
        self.state()
            .accounts
            .insert(account_sid.to_owned(), auth_token.to_owned());
    }

    /// Serves a medium of an inbound message as Twilio does: `GET` on its Media resource with
    /// the account's Basic auth answers 307 to `location` (Twilio's media CDN). Returns the
    /// `MediaUrl` a webhook carries for it.
    pub fn add_media(
        &self,
        account_sid: &str,
        message_sid: &str,
        media_sid: &str,
        location: &str,
    ) -> String {
        let path =
            format!("/2010-04-01/Accounts/{account_sid}/Messages/{message_sid}/Media/{media_sid}");
        self.state().media.insert(path.clone(), location.to_owned());
        format!("{}{path}", self.base_url)
    }

    /// Typing indicators accepted, as (account, messageId), in arrival order.
    pub fn typing_indicators(&self) -> Vec<(String, String)> {
        self.state().typing.clone()
    }

    /// Every accepted create, in arrival order.
    pub fn sent(&self) -> Vec<SentMessage> {
        self.state()
            .sent
            .iter()
            .map(|m| m.message.clone())
            .collect()
    }

    /// Waits until at least `n` creates were accepted and returns all of them; panics with
    /// what did arrive (and any violations) if that takes longer than `timeout`.
    pub async fn wait_for_sent(&self, n: usize, timeout: Duration) -> Vec<SentMessage> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.shared.sent_changed.notified();
            let sent = self.sent();
            if sent.len() >= n {
                return sent;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                panic!("{}", self.wait_failure(n, timeout));
            }
        }
    }

    /// Every request to the REST API (api.twilio.com: messages and media) of any kind, rejected
    /// ones included, in arrival order; typing indicators are in `typing_indicators`, the
    /// Content API's requests in `content_requests`.
    pub fn requests(&self) -> Vec<RawRequest> {
        self.state().requests.clone()
    }

    /// Spec violations seen so far, one readable line each.
    pub fn violations(&self) -> Vec<String> {
        self.state().violations.clone()
    }

    /// Contents made through the Content API, in order.
    pub fn contents(&self) -> Vec<CreatedContent> {
        self.state().contents.clone()
    }

    /// Requests to the Content API, valid or not, in arrival order.
    pub fn content_requests(&self) -> Vec<RawRequest> {
        self.state().content_requests.clone()
    }

    /// Answers the next valid Content API create with this Twilio error instead of 201.
    pub fn push_content_error(&self, status: u16, code: u32, message: &str) {
        self.state()
            .content_script
            .push_back((status, code, message.to_owned()));
    }

    /// Stops reporting statuses to `StatusCallback` from now on (see the module's notes).
    pub fn withhold_status_callbacks(&self) {
        self.state().withhold_statuses = true;
    }

    /// How long after making a message the fake reports it `sent` (and then `delivered`).
    pub fn set_status_delay(&self, delay: Duration) {
        self.state().status_delay = Some(delay);
    }

    /// The status callbacks posted so far, in order.
    pub fn status_reports(&self) -> Vec<StatusReport> {
        self.state().status_reports.clone()
    }

    /// Queues an outcome for the next valid create (FIFO).
    pub fn push_response(&self, r: ScriptedResponse) {
        self.state().script.push_back(r);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.shared.state()
    }

    fn wait_failure(&self, n: usize, timeout: Duration) -> String {
        let state = self.state();
        let mut out = format!(
            "fake twilio: expected at least {n} sent message(s) within {timeout:?}, got {}",
            state.sent.len()
        );
        for (i, m) in state.sent.iter().enumerate() {
            let m = &m.message;
            out.push_str(&format!(
                "\n  sent[{i}] {} to={} from={} body={:?} content_sid={:?}",
                m.sid, m.to, m.from, m.body, m.content_sid
            ));
        }
        out.push_str(&format!("\n  {} request(s) in all:", state.requests.len()));
        for r in state.requests.iter().rev().take(20).rev() {
            let body = String::from_utf8_lossy(&r.body);
            out.push_str(&format!(
                "\n    {} {} {}",
                r.method,
                r.path,
                truncate(&body, 200)
            ));
        }
        if state.violations.is_empty() {
            out.push_str("\n  no violations");
        } else {
            out.push_str("\n  violations:");
            for v in &state.violations {
                out.push_str(&format!("\n    {v}"));
            }
        }
        out
    }
}

struct ServerGuard(tokio::task::AbortHandle);

impl Drop for ServerGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Shared {
    spec: &'static Spec,
    state: Mutex<FakeState>,
    sent_changed: Notify,
    sid_seed: String,
    /// Posts the status callbacks, over kept-alive connections as Twilio's do.
    callbacks: reqwest::Client,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        // A panicking test thread must not hide the recorded evidence from the next assert.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn violation(&self, line: String) {
        self.state().violations.push(line);
    }

    fn new_sid(&self, prefix: &str, counter: u64) -> String {
        let digest = Sha256::digest(format!("{}|{prefix}|{counter}", self.sid_seed));
        format!("{prefix}{}", hex::encode(&digest[..16]))
    }
}

#[derive(Default)]
struct FakeState {
    accounts: HashMap<String, String>,
    sent: Vec<Stored>,
    requests: Vec<RawRequest>,
    violations: Vec<String>,
    script: VecDeque<ScriptedResponse>,
    counter: u64,
    /// Media resources (their paths) and where each redirects.
    media: HashMap<String, String>,
    /// Typing indicators accepted: (account, messageId).
    typing: Vec<(String, String)>,
    /// Contents made, and every request to the Content API.
    contents: Vec<CreatedContent>,
    content_requests: Vec<RawRequest>,
    /// Errors for the next valid Content API creates: (status, code, message).
    content_script: VecDeque<(u16, u32, String)>,
    /// Status callbacks: off once withheld; the delay before `sent` (`None`: the default);
    /// what was posted.
    withhold_statuses: bool,
    status_delay: Option<Duration>,
    status_reports: Vec<StatusReport>,
}

/// How soon the fake reports a message `sent` unless a test says otherwise: Twilio takes a
/// fraction of a second.
const DEFAULT_STATUS_DELAY: Duration = Duration::from_millis(10);

/// A sent message plus what the API shows about it.
#[derive(Clone)]
struct Stored {
    message: SentMessage,
    /// Its text as Twilio's list shows it: `Body`, or the body of the content it was sent as.
    shown_body: Option<String>,
    messaging_service_sid: Option<String>,
    status: &'static str,
    num_media: usize,
    created_secs: i64,
}

// ---------------------------------------------------------------------------------------------
// Request handling

async fn handle(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header_str = |name: header::HeaderName| {
        headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let raw = RawRequest {
        method: method.to_string(),
        path: uri.path().to_owned(),
        query: uri.query().map(str::to_owned),
        authorization: header_str(header::AUTHORIZATION),
        content_type: header_str(header::CONTENT_TYPE),
        body: body.to_vec(),
    };
    let what = format!("{} {}", raw.method, raw.path);
    // Typing indicators are the Messaging API's, kept apart (`typing_indicators`): the
    // requests list is the REST API's, whose posts tests count.
    if raw.path == "/v2/Indicators/Typing.json" {
        return typing(&shared, &what, &method, &raw);
    }
    // The Content API is its own host at Twilio; its requests are kept apart too.
    if raw.path == "/v1/Content" || raw.path.starts_with("/v1/Content/") {
        shared.state().content_requests.push(raw.clone());
        return content(&shared, &what, &method, &raw);
    }
    shared.state().requests.push(raw.clone());
    let media = shared.state().media.get(&raw.path).cloned();
    if let Some(location) = media {
        let account_sid = raw.path.split('/').nth(3).unwrap_or("").to_owned();
        if method != Method::GET {
            return twilio_error(405, 20004, "Method not allowed");
        }
        if !authenticated(&shared, &what, &account_sid, raw.authorization.as_deref()) {
            return twilio_error(401, 20003, "Authenticate");
        }
        return (
            StatusCode::TEMPORARY_REDIRECT,
            [(header::LOCATION, location)],
        )
            .into_response();
    }
    let Some(account_sid) = messages_path_account(&raw.path) else {
        shared.violation(format!(
            "{what}: no such endpoint in the fake (only {})",
            shared.spec.path
        ));
        return not_found(&raw.path);
    };
    if let Err(e) = shared.spec.account_sid.check(&account_sid) {
        shared.violation(format!("{what}: path AccountSid {account_sid:?} {e}"));
        return not_found(&raw.path);
    }
    if !authenticated(&shared, &what, &account_sid, raw.authorization.as_deref()) {
        return twilio_error(401, 20003, "Authenticate");
    }
    match method {
        Method::POST => create(&shared, &conn, &what, &account_sid, &raw).await,
        Method::GET => list(&shared, &what, &account_sid, &raw),
        _ => {
            shared.violation(format!(
                "{what}: method not allowed (the spec has POST and GET)"
            ));
            twilio_error(405, 20004, "Method not allowed")
        }
    }
}

/// `Some(AccountSid)` when `path` is the Messages list resource.
fn messages_path_account(path: &str) -> Option<String> {
    let sid = path
        .strip_prefix("/2010-04-01/Accounts/")?
        .strip_suffix("/Messages.json")?;
    (!sid.is_empty() && !sid.contains('/')).then(|| sid.to_owned())
}

/// Messaging v2's typing indicator (Twilio's `CreateTypingIndicator`): form-encoded `channel`
/// (`whatsapp`) and `messageId` (an `SM` or `MM` sid), HTTP Basic auth of an account; answers
/// `{"success": true}`.
fn typing(shared: &Shared, what: &str, method: &Method, raw: &RawRequest) -> Response {
    if *method != Method::POST {
        shared.violation(format!("{what}: method not allowed (only POST)"));
        return twilio_error(405, 20004, "Method not allowed");
    }
    let account = raw
        .authorization
        .as_deref()
        .and_then(parse_basic)
        .map(|(user, _)| user)
        .unwrap_or_default();
    if !authenticated(shared, what, &account, raw.authorization.as_deref()) {
        return twilio_error(401, 20003, "Authenticate");
    }
    let form: HashMap<String, String> = form_urlencoded::parse(&raw.body).into_owned().collect();
    let message_id = form.get("messageId").cloned().unwrap_or_default();
    let sid_like = message_id.len() == 34
        && (message_id.starts_with("SM") || message_id.starts_with("MM"))
        && message_id[2..].bytes().all(|b| b.is_ascii_hexdigit());
    if form.get("channel").map(String::as_str) != Some("whatsapp") || !sid_like {
        shared.violation(format!(
            "{what}: channel must be whatsapp and messageId an SM/MM sid: {form:?}"
        ));
        return twilio_error(400, 21211, "Invalid parameter");
    }
    shared.state().typing.push((account, message_id));
    (StatusCode::OK, axum::Json(json!({ "success": true }))).into_response()
}

/// The Content API's `CreateContent` (`POST /v1/Content`): a JSON `ContentCreateRequest`
/// (`friendly_name`, `language` and `types` required, `variables` a map of strings), HTTP Basic
/// auth of an account. Of the types, the fake makes `twilio/quick-reply` (`body` of at most
/// 1,024 characters, 1 to 3 `actions` with a `title` of at most 20 and an `id` of at most 200,
/// WhatsApp's limits) and `twilio/list-picker` (`body` of at most 1,024, a `button` of at most
/// 20, 1 to 10 `items` with an `id` of at most 200, an `item` of at most 24 and an optional
/// `description` of at most 72). Answers 201 with the `content.v1.content` resource.
fn content(shared: &Shared, what: &str, method: &Method, raw: &RawRequest) -> Response {
    if *method != Method::POST || raw.path != "/v1/Content" {
        shared.violation(format!(
            "{what}: the fake's Content API has only POST /v1/Content"
        ));
        return not_found(&raw.path);
    }
    let account = raw
        .authorization
        .as_deref()
        .and_then(parse_basic)
        .map(|(user, _)| user)
        .unwrap_or_default();
    if !authenticated(shared, what, &account, raw.authorization.as_deref()) {
        return twilio_error(401, 20003, "Authenticate");
    }
    let media_type = raw
        .content_type
        .as_deref()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if media_type != "application/json" {
        shared.violation(format!(
            "{what}: Content-Type {:?}, the spec takes application/json",
            raw.content_type
        ));
        return twilio_error(415, 20001, "Unsupported Media Type");
    }
    let request: Value = match serde_json::from_slice(&raw.body) {
        Ok(v) => v,
        Err(e) => {
            shared.violation(format!("{what}: the body is not JSON: {e}"));
            return twilio_error(400, 20001, "Invalid JSON");
        }
    };
    let problems = check_content_request(&request);
    if let Some(first) = problems.first() {
        for p in &problems {
            shared.violation(format!("{what}: {p}"));
        }
        return twilio_error(400, 20001, first);
    }
    let scripted = shared.state().content_script.pop_front();
    if let Some((status, code, message)) = scripted {
        return twilio_error(status, code, &message);
    }
    let content = {
        let mut state = shared.state();
        state.counter += 1;
        let content = CreatedContent {
            sid: shared.new_sid("HX", state.counter),
            account_sid: account,
            request: request.clone(),
        };
        state.contents.push(content.clone());
        content
    };
    let now = iso8601(unix_secs(SystemTime::now()));
    let url = format!("https://content.twilio.com/v1/Content/{}", content.sid);
    json_response(
        201,
        json!({
            "date_created": now,
            "date_updated": now,
            "sid": content.sid,
            "account_sid": content.account_sid,
            "friendly_name": request["friendly_name"],
            "language": request["language"],
            "variables": request.get("variables").cloned().unwrap_or_else(|| json!({})),
            "types": request["types"],
            "url": url,
            "links": {
                "approval_fetch": format!("{url}/ApprovalRequests"),
                "approval_create": format!("{url}/ApprovalRequests/whatsapp"),
            },
        }),
    )
}

/// What is wrong with a `ContentCreateRequest`, one line each.
fn check_content_request(request: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(fields) = request.as_object() else {
        return vec!["the body is not a JSON object".to_owned()];
    };
    for name in ["friendly_name", "language"] {
        match fields.get(name) {
            Some(Value::String(s)) if !s.is_empty() => {}
            _ => problems.push(format!("{name} is required and must be a string")),
        }
    }
    if let Some(vars) = fields.get("variables")
        && !vars
            .as_object()
            .is_some_and(|v| v.values().all(Value::is_string))
    {
        problems.push("variables must be a map of strings".to_owned());
    }
    let known = ["friendly_name", "language", "variables", "types"];
    for name in fields.keys().filter(|k| !known.contains(&k.as_str())) {
        problems.push(format!("{name} is not a field of ContentCreateRequest"));
    }
    let Some(types) = fields.get("types").and_then(Value::as_object) else {
        problems.push("types is required and must be an object".to_owned());
        return problems;
    };
    if types.is_empty() {
        problems.push("types names no content type".to_owned());
    }
    let text = |v: &Value, name: &str, max: usize, problems: &mut Vec<String>| match v.get(name) {
        Some(Value::String(s)) if !s.is_empty() && s.chars().count() <= max => {}
        Some(Value::String(s)) if !s.is_empty() => {
            problems.push(format!("{name} {s:?} is over {max} characters"));
        }
        _ => problems.push(format!("{name} is required and must be a non-empty string")),
    };
    for (kind, body) in types {
        match kind.as_str() {
            "twilio/quick-reply" => {
                text(body, "body", 1024, &mut problems);
                match body.get("actions").and_then(Value::as_array) {
                    Some(actions) if (1..=3).contains(&actions.len()) => {
                        for action in actions {
                            text(action, "title", 20, &mut problems);
                            if action.get("id").is_some() {
                                text(action, "id", 200, &mut problems);
                            }
                        }
                    }
                    _ => problems.push(
                        "twilio/quick-reply takes 1 to 3 actions on WhatsApp".to_owned(),
                    ),
                }
            }
            "twilio/list-picker" => {
                text(body, "body", 1024, &mut problems);
                text(body, "button", 20, &mut problems);
                match body.get("items").and_then(Value::as_array) {
                    Some(items) if (1..=10).contains(&items.len()) => {
                        for item in items {
                            text(item, "id", 200, &mut problems);
                            text(item, "item", 24, &mut problems);
                            if item.get("description").is_some() {
                                text(item, "description", 72, &mut problems);
                            }
                        }
                    }
                    _ => problems.push("twilio/list-picker takes 1 to 10 items".to_owned()),
                }
            }
            other => problems.push(format!(
                "content type {other} is not one the fake makes (twilio/quick-reply, twilio/list-picker)"
            )),
        }
    }
    problems
}

/// Whether the Basic credentials are a registered pair for the path's account.
fn authenticated(
    shared: &Shared,
    what: &str,
    path_account: &str,
    authorization: Option<&str>,
) -> bool {
    let Some(header) = authorization else {
        shared.violation(format!(
            "{what}: no Authorization header (the spec requires HTTP Basic)"
        ));
        return false;
    };
    let Some((user, pass)) = parse_basic(header) else {
        shared.violation(format!(
            "{what}: Authorization is not HTTP Basic: {header:?}"
        ));
        return false;
    };
    let state = shared.state();
    let known = state
        .accounts
        .get(&user)
        .is_some_and(|token| *token == pass);
    known && user == path_account
}

fn parse_basic(header: &str) -> Option<(String, String)> {
    let (scheme, encoded) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, pass) = text.split_once(':')?;
    Some((user.to_owned(), pass.to_owned()))
}

async fn create(
    shared: &Arc<Shared>,
    conn: &Conn,
    what: &str,
    account_sid: &str,
    raw: &RawRequest,
) -> Response {
    let content_type = raw.content_type.as_deref().unwrap_or("");
    let media_type = content_type.split(';').next().unwrap_or("").trim();
    if !media_type.eq_ignore_ascii_case(&shared.spec.create_content_type) {
        shared.violation(format!(
            "{what}: Content-Type {content_type:?}, the spec accepts only {}",
            shared.spec.create_content_type
        ));
        // Twilio does not parse other bodies, so it sees no `To` at all.
        return twilio_error(400, 21604, "A 'To' phone number is required.");
    }
    let form: Vec<(String, String)> = form_urlencoded::parse(&raw.body).into_owned().collect();
    let problems = validate_create(shared.spec, &form);
    if let Some(first) = problems.first() {
        for p in &problems {
            shared.violation(format!("{what}: {} (Twilio code {})", p.message, p.code));
        }
        return twilio_error(first.status, first.code, &first.message);
    }

    let scripted = shared.state().script.pop_front();
    match scripted {
        None => created(shared, account_sid, form),
        Some(ScriptedResponse::TwilioError {
            status,
            code,
            message,
        }) => twilio_error(status, code, &message),
        Some(ScriptedResponse::RateLimited { retry_after_secs }) => {
            let mut resp = twilio_error(429, 20429, "Too Many Requests");
            if let Some(secs) = retry_after_secs {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            resp
        }
        Some(ScriptedResponse::ServerError) => {
            twilio_error(500, 20500, "An internal server error has occurred")
        }
        Some(ScriptedResponse::Slow(delay)) => {
            let resp = created(shared, account_sid, form);
            tokio::time::sleep(delay).await;
            resp
        }
        Some(ScriptedResponse::Reset) => {
            conn.kill.store(true, Ordering::SeqCst);
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
        Some(ScriptedResponse::AcceptButFail500) => {
            let _ = created(shared, account_sid, form);
            twilio_error(500, 20500, "An internal server error has occurred")
        }
        Some(ScriptedResponse::AcceptButReset) => {
            let _ = created(shared, account_sid, form);
            conn.kill.store(true, Ordering::SeqCst);
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
        Some(ScriptedResponse::Stall(delay)) => {
            tokio::time::sleep(delay).await;
            conn.kill.store(true, Ordering::SeqCst);
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Records an accepted create and builds its 201.
fn created(shared: &Arc<Shared>, account_sid: &str, form: Vec<(String, String)>) -> Response {
    let field = |name: &str| {
        form.iter()
            .find(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| v.clone())
    };
    let now = SystemTime::now();
    let messaging_service_sid = field("MessagingServiceSid");
    let from = field("From");
    // Twilio's documented first status: `accepted` for a Messaging Service without From.
    let status = if messaging_service_sid.is_some() && from.is_none() {
        "accepted"
    } else {
        "queued"
    };
    let num_media = form.iter().filter(|(k, _)| k == "MediaUrl").count();
    let stored = {
        let mut state = shared.state();
        let shown_body = field("Body").or_else(|| {
            let sid = field("ContentSid")?;
            let content = state.contents.iter().find(|c| c.sid == sid)?;
            let types = content.request["types"].as_object()?;
            types
                .values()
                .find_map(|t| t["body"].as_str().map(str::to_owned))
        });
        state.counter += 1;
        let mut counter = state.counter;
        let prefix = if num_media > 0 { "MM" } else { "SM" };
        let mut sid = shared.new_sid(prefix, counter);
        while state.sent.iter().any(|m| m.message.sid == sid) {
            counter += 1 << 32;
            sid = shared.new_sid(prefix, counter);
        }
        let stored = Stored {
            message: SentMessage {
                sid,
                account_sid: account_sid.to_owned(),
                to: field("To").unwrap_or_default(),
                from: from.unwrap_or_default(),
                body: field("Body"),
                content_sid: field("ContentSid"),
                content_variables: field("ContentVariables"),
                status_callback: field("StatusCallback"),
                form: form.clone(),
                received_at: now,
            },
            shown_body,
            messaging_service_sid,
            status,
            num_media,
            created_secs: unix_secs(now),
        };
        state.sent.push(stored.clone());
        stored
    };
    shared.sent_changed.notify_waiters();
    report_statuses(shared, &stored.message);
    json_response(201, message_json(shared.spec, &stored))
}

/// Reports `message` `sent` and then `delivered` to its `StatusCallback`, as Twilio does, in
/// a task of its own (see the module's notes). The list shows each status once reported.
fn report_statuses(shared: &Arc<Shared>, message: &SentMessage) {
    let (token, delay) = {
        let state = shared.state();
        if state.withhold_statuses {
            return;
        }
        let Some(token) = state.accounts.get(&message.account_sid).cloned() else {
            return;
        };
        (token, state.status_delay.unwrap_or(DEFAULT_STATUS_DELAY))
    };
    let Some(url) = message.status_callback.clone() else {
        return;
    };
    let shared = shared.clone();
    let message = message.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        for status in ["sent", "delivered"] {
            if shared.state().withhold_statuses {
                return;
            }
            let mut form = vec![
                ("AccountSid".to_owned(), message.account_sid.clone()),
                ("MessageSid".to_owned(), message.sid.clone()),
                ("SmsSid".to_owned(), message.sid.clone()),
                ("MessageStatus".to_owned(), status.to_owned()),
                ("SmsStatus".to_owned(), status.to_owned()),
                ("To".to_owned(), message.to.clone()),
                ("ApiVersion".to_owned(), "2010-04-01".to_owned()),
                ("ChannelPrefix".to_owned(), "whatsapp".to_owned()),
            ];
            if !message.from.is_empty() {
                form.push(("From".to_owned(), message.from.clone()));
            }
            let signature = ::twilio::signature::compute_signature(token.as_bytes(), &url, &form);
            {
                let mut state = shared.state();
                if let Some(m) = state.sent.iter_mut().find(|m| m.message.sid == message.sid) {
                    m.status = status;
                }
            }
            let answer = shared
                .callbacks
                .post(&url)
                .header("content-type", "application/x-www-form-urlencoded")
                .header("x-twilio-signature", signature)
                .body(::twilio::form::encode(&form))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .map_err(|e| e.to_string());
            shared.state().status_reports.push(StatusReport {
                sid: message.sid.clone(),
                status,
                answer,
                at: SystemTime::now(),
            });
        }
    });
}

/// The `api.v2010.account.message` resource, with exactly the spec's properties.
fn message_json(spec: &Spec, m: &Stored) -> Value {
    let msg = &m.message;
    let date = rfc2822(m.created_secs);
    let uri_base = format!(
        "/2010-04-01/Accounts/{}/Messages/{}",
        msg.account_sid, msg.sid
    );
    let nullable = |v: &str| {
        if v.is_empty() { Value::Null } else { json!(v) }
    };
    let mut out = Map::new();
    for name in &spec.message_properties {
        let value = match name.as_str() {
            "account_sid" => json!(msg.account_sid),
            "api_version" => json!("2010-04-01"),
            "body" => json!(m.shown_body.clone().unwrap_or_default()),
            "date_created" | "date_sent" | "date_updated" => json!(date),
            "direction" => json!("outbound-api"),
            "error_code" | "error_message" | "price" | "price_unit" => Value::Null,
            "from" => nullable(&msg.from),
            "to" => json!(msg.to),
            "messaging_service_sid" => json!(m.messaging_service_sid),
            "num_media" => json!(m.num_media.to_string()),
            "num_segments" => json!("1"),
            "sid" => json!(msg.sid),
            "status" => json!(m.status),
            "subresource_uris" => json!({
                "media": format!("{uri_base}/Media.json"),
                "feedback": format!("{uri_base}/Feedback.json"),
            }),
            "uri" => json!(format!("{uri_base}.json")),
            other => unreachable!("checked when the spec fixture was loaded: {other}"),
        };
        if let (Some(text), Some(schema)) = (value.as_str(), spec.message_schemas.get(name)) {
            // Only SIDs carry patterns; a failure here is a bug in the fake, not in wagate.
            if let Err(e) = schema.check_string(text) {
                panic!("fake twilio answers {name}={text:?}, which {e}");
            }
        }
        out.insert(name.clone(), value);
    }
    Value::Object(out)
}

/// The Twilio error messages the fake answers with for each kind of problem.
struct Problem {
    status: u16,
    code: u32,
    message: String,
}

fn problem(code: u32, message: String) -> Problem {
    Problem {
        status: 400,
        code,
        message,
    }
}

/// Checks a CreateMessage form against the spec and the documented limits.
fn validate_create(spec: &Spec, form: &[(String, String)]) -> Vec<Problem> {
    let mut problems = Vec::new();
    let present = |name: &str| form.iter().any(|(k, v)| k == name && !v.is_empty());
    let first = |name: &str| {
        form.iter()
            .find(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| v.as_str())
    };

    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (name, value) in form {
        *seen.entry(name.as_str()).or_default() += 1;
        let Some(schema) = spec.create_properties.get(name) else {
            problems.push(problem(
                20001,
                format!(
                    "unknown parameter {name:?}: not a property of the CreateMessage request schema"
                ),
            ));
            continue;
        };
        if value.is_empty() {
            continue;
        }
        if let Err(e) = schema.check(value) {
            problems.push(problem(
                code_for_invalid(name),
                format!("{name}={value:?} {e}"),
            ));
        }
    }
    for (name, count) in &seen {
        let is_array = spec
            .create_properties
            .get(*name)
            .is_some_and(|s| s.ty == "array");
        if *count > 1 && !is_array {
            problems.push(problem(
                60200,
                format!("{name} sent {count} times; it is not an array"),
            ));
        }
    }
    for name in &spec.create_required {
        if !present(name) {
            let code = if name == "To" { 21604 } else { 60200 };
            problems.push(problem(
                code,
                format!("required parameter {name} is missing"),
            ));
        }
    }
    for group in &spec.create_conditional {
        if !group.iter().any(|n| present(n)) {
            let code = if group.iter().any(|n| n == "From") {
                21603
            } else {
                21619
            };
            problems.push(problem(
                code,
                format!("one of {} is required", group.join(" | ")),
            ));
        }
    }

    if let Some(body) = first("Body") {
        let units = body.encode_utf16().count();
        if units > BODY_LIMIT_UTF16 {
            problems.push(problem(
                21617,
                format!("Body is {units} UTF-16 code units, over the {BODY_LIMIT_UTF16} limit"),
            ));
        }
    }
    let media = form.iter().filter(|(k, _)| k == "MediaUrl").count();
    if media > MEDIA_URL_LIMIT {
        problems.push(problem(
            21623,
            format!("{media} MediaUrl values, over the limit of {MEDIA_URL_LIMIT}"),
        ));
    }
    if let Some(url) = first("StatusCallback")
        && url.chars().count() > STATUS_CALLBACK_LIMIT
    {
        problems.push(problem(
            21609,
            format!("StatusCallback over {STATUS_CALLBACK_LIMIT} characters"),
        ));
    }
    if let Some(vars) = first("ContentVariables") {
        if let Err(e) = check_content_variables(vars) {
            problems.push(problem(21656, format!("ContentVariables={vars:?} {e}")));
        }
        if !present("ContentSid") {
            problems.push(problem(
                21656,
                "ContentVariables given without ContentSid".to_owned(),
            ));
        }
    }
    if let (Some(from), Some(to)) = (first("From"), first("To"))
        && channel_of(from) != channel_of(to)
    {
        problems.push(problem(
            21910,
            format!("From {from:?} and To {to:?} are not on the same channel"),
        ));
    }
    problems
}

fn code_for_invalid(name: &str) -> u32 {
    match name {
        "To" => 21211,
        "From" => 21212,
        "StatusCallback" => 21609,
        "ContentSid" => 21655,
        "MessagingServiceSid" => 21705,
        "MediaUrl" => 21620,
        _ => 60200,
    }
}

fn check_content_variables(vars: &str) -> Result<(), String> {
    let parsed: Value = serde_json::from_str(vars).map_err(|e| format!("is not JSON: {e}"))?;
    let Value::Object(map) = parsed else {
        return Err("is not a JSON object".to_owned());
    };
    if map.len() > CONTENT_VARIABLES_MAX_PAIRS {
        return Err(format!(
            "has {} variables, over {CONTENT_VARIABLES_MAX_PAIRS}",
            map.len()
        ));
    }
    for (key, value) in &map {
        if key.chars().count() > CONTENT_VARIABLE_KEY_LIMIT {
            return Err(format!(
                "key {key:?} is over {CONTENT_VARIABLE_KEY_LIMIT} characters"
            ));
        }
        if let Value::String(s) = value
            && s.chars().count() > CONTENT_VARIABLE_VALUE_LIMIT
        {
            return Err(format!(
                "value of {key:?} is over {CONTENT_VARIABLE_VALUE_LIMIT} characters"
            ));
        }
    }
    Ok(())
}

/// `whatsapp` for `whatsapp:+1…`, empty for a bare phone number.
fn channel_of(address: &str) -> &str {
    address.split_once(':').map(|(c, _)| c).unwrap_or("")
}

fn list(shared: &Shared, what: &str, account_sid: &str, raw: &RawRequest) -> Response {
    let query: Vec<(String, String)> = raw
        .query
        .as_deref()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    match parse_list_query(shared.spec, &query) {
        Ok(q) => json_response(200, list_page(shared, account_sid, &q)),
        Err(problems) => {
            for p in &problems {
                shared.violation(format!("{what}: {} (Twilio code {})", p.message, p.code));
            }
            let first = &problems[0];
            twilio_error(first.status, first.code, &first.message)
        }
    }
}

#[derive(Default)]
struct ListQuery {
    to: Option<String>,
    from: Option<String>,
    on_day: Option<i64>,
    from_day: Option<i64>,
    until_day: Option<i64>,
    page_size: Option<usize>,
    page: usize,
    /// Filters as received, for the `uri` fields.
    echo: Vec<(String, String)>,
}

fn parse_list_query(spec: &Spec, query: &[(String, String)]) -> Result<ListQuery, Vec<Problem>> {
    let mut q = ListQuery::default();
    let mut problems = Vec::new();
    for (name, value) in query {
        let Some(schema) = spec.list_parameters.get(name) else {
            problems.push(problem(
                20001,
                format!(
                    "unknown query parameter {name:?} (ListMessage has {})",
                    spec.list_parameters
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
            continue;
        };
        let day = || {
            parse_filter_day(value).ok_or_else(|| {
                problem(
                    60200,
                    format!("{name}={value:?} is not a date the fake understands (YYYY-MM-DD, ISO 8601 or RFC 2822)"),
                )
            })
        };
        let result = match name.as_str() {
            "DateSent" => day().map(|d| q.on_day = Some(d)),
            "DateSent>" => day().map(|d| q.from_day = Some(d)),
            "DateSent<" => day().map(|d| q.until_day = Some(d)),
            _ => schema
                .check(value)
                .map_err(|e| problem(60200, format!("{name}={value:?} {e}"))),
        };
        if let Err(p) = result {
            problems.push(p);
            continue;
        }
        match name.as_str() {
            "To" => q.to = Some(value.clone()),
            "From" => q.from = Some(value.clone()),
            "PageSize" => q.page_size = value.parse().ok(),
            "Page" => q.page = value.parse().unwrap_or(0),
            _ => {}
        }
        if !matches!(name.as_str(), "Page" | "PageSize" | "PageToken") {
            q.echo.push((name.clone(), value.clone()));
        }
    }
    if problems.is_empty() {
        Ok(q)
    } else {
        Err(problems)
    }
}

fn list_page(shared: &Shared, account_sid: &str, q: &ListQuery) -> Value {
    let matching: Vec<Stored> = {
        let state = shared.state();
        let mut v: Vec<Stored> = state
            .sent
            .iter()
            .filter(|m| m.message.account_sid == account_sid)
            .filter(|m| q.to.as_ref().is_none_or(|t| *t == m.message.to))
            .filter(|m| q.from.as_ref().is_none_or(|f| *f == m.message.from))
            .filter(|m| {
                let day = m.created_secs.div_euclid(86_400);
                q.on_day.is_none_or(|d| day == d)
                    && q.from_day.is_none_or(|d| day >= d)
                    && q.until_day.is_none_or(|d| day <= d)
            })
            .cloned()
            .collect();
        v.reverse(); // newest first, like Twilio
        v
    };
    let page_size = q.page_size.unwrap_or(DEFAULT_PAGE_SIZE);
    let start = q.page * page_size;
    let items: Vec<Value> = matching
        .iter()
        .skip(start)
        .take(page_size)
        .map(|m| message_json(shared.spec, m))
        .collect();
    let page_uri = |page: usize| {
        let mut ser = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &q.echo {
            ser.append_pair(k, v);
        }
        ser.append_pair("PageSize", &page_size.to_string());
        ser.append_pair("Page", &page.to_string());
        if page > 0 {
            ser.append_pair("PageToken", &format!("PASM{page:032x}"));
        }
        format!(
            "/2010-04-01/Accounts/{account_sid}/Messages.json?{}",
            ser.finish()
        )
    };
    let has_next = matching.len() > start + items.len();
    let end = (start + items.len()).saturating_sub(1).max(start);
    let mut out = Map::new();
    for name in &shared.spec.list_properties {
        let value = match name.as_str() {
            "end" => json!(end),
            "first_page_uri" => json!(page_uri(0)),
            "next_page_uri" => {
                if has_next {
                    json!(page_uri(q.page + 1))
                } else {
                    Value::Null
                }
            }
            "page" => json!(q.page),
            "page_size" => json!(page_size),
            "previous_page_uri" => {
                if q.page > 0 {
                    json!(page_uri(q.page - 1))
                } else {
                    Value::Null
                }
            }
            "start" => json!(start),
            "uri" => json!(page_uri(q.page)),
            "messages" => Value::Array(items.clone()),
            other => unreachable!("checked when the spec fixture was loaded: {other}"),
        };
        out.insert(name.clone(), value);
    }
    Value::Object(out)
}

// ---------------------------------------------------------------------------------------------
// Responses

fn twilio_error(status: u16, code: u32, message: &str) -> Response {
    json_response(
        status,
        json!({
            "code": code,
            "message": message,
            "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
            "status": status,
        }),
    )
}

fn not_found(path: &str) -> Response {
    twilio_error(
        404,
        20404,
        &format!("The requested resource {path} was not found"),
    )
}

fn json_response(status: u16, body: Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let request_id = format!(
        "RQ{}",
        hex::encode(&Sha256::digest(format!("{:?}", SystemTime::now()))[..16])
    );
    let mut resp = (status, body.to_string()).into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        headers.insert("Twilio-Request-Id", v);
    }
    resp
}

// ---------------------------------------------------------------------------------------------
// The spec fixture

struct Spec {
    path: String,
    account_sid: Schema,
    create_content_type: String,
    create_required: Vec<String>,
    create_conditional: Vec<Vec<String>>,
    create_properties: HashMap<String, Schema>,
    list_parameters: BTreeMap<String, Schema>,
    list_properties: Vec<String>,
    message_properties: Vec<String>,
    /// The message schema, used to check the fake's own answers.
    message_schemas: HashMap<String, Schema>,
}

/// The message fields [`message_json`] knows how to fill.
const MESSAGE_FIELDS: &[&str] = &[
    "account_sid",
    "api_version",
    "body",
    "date_created",
    "date_sent",
    "date_updated",
    "direction",
    "error_code",
    "error_message",
    "from",
    "to",
    "messaging_service_sid",
    "num_media",
    "num_segments",
    "price",
    "price_unit",
    "sid",
    "status",
    "subresource_uris",
    "uri",
];
/// The list-page fields [`list_page`] knows how to fill.
const LIST_FIELDS: &[&str] = &[
    "end",
    "first_page_uri",
    "next_page_uri",
    "page",
    "page_size",
    "previous_page_uri",
    "start",
    "uri",
    "messages",
];

fn spec() -> &'static Spec {
    static SPEC: OnceLock<Spec> = OnceLock::new();
    SPEC.get_or_init(|| Spec::load(SPEC_FIXTURE))
}

impl Spec {
    /// Panics with a pointed message when the fixture and this fake disagree, so that
    /// regenerating the fixture from a newer spec cannot silently weaken the checks.
    fn load(text: &str) -> Spec {
        let v: Value = serde_json::from_str(text).expect("fixture is JSON");
        let obj = |v: &Value, key: &str| -> Map<String, Value> {
            v.get(key)
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_else(|| panic!("twilio fixture: missing object {key:?}"))
        };
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .expect("twilio fixture: expected an array of strings")
                .iter()
                .map(|s| s.as_str().expect("string").to_owned())
                .collect()
        };
        let create = &v["create"];
        let list = &v["list"];
        let message_properties: Vec<String> =
            obj(&v["message"], "properties").keys().cloned().collect();
        let list_properties: Vec<String> =
            obj(list, "response_properties").keys().cloned().collect();
        for (have, known, what) in [
            (&message_properties, MESSAGE_FIELDS, "message"),
            (&list_properties, LIST_FIELDS, "list page"),
        ] {
            let unknown: Vec<_> = have
                .iter()
                .filter(|p| !known.contains(&p.as_str()))
                .collect();
            let missing: Vec<_> = known
                .iter()
                .filter(|k| !have.iter().any(|p| p == *k))
                .collect();
            assert!(
                unknown.is_empty() && missing.is_empty(),
                "twilio fixture: the {what} schema changed (new: {unknown:?}, gone: {missing:?}); teach fake_twilio.rs"
            );
        }
        let schemas = |m: Map<String, Value>| -> Vec<(String, Schema)> {
            m.into_iter()
                .map(|(k, s)| {
                    let schema = Schema::from_json(&s)
                        .unwrap_or_else(|e| panic!("twilio fixture: {k}: {e}"));
                    (k, schema)
                })
                .collect()
        };
        let path_params = obj(&v, "path_parameters");
        let message_schemas = schemas(obj(&v["message"], "properties"))
            .into_iter()
            .collect();
        Spec {
            path: v["path"].as_str().expect("path").to_owned(),
            account_sid: Schema::from_json(&path_params["AccountSid"]).expect("AccountSid schema"),
            create_content_type: create["content_type"]
                .as_str()
                .expect("content_type")
                .to_owned(),
            create_required: strings(&create["required"]),
            create_conditional: create["conditional"]
                .as_array()
                .expect("conditional")
                .iter()
                .map(strings)
                .collect(),
            create_properties: schemas(obj(create, "properties")).into_iter().collect(),
            list_parameters: schemas(obj(list, "query_parameters")).into_iter().collect(),
            list_properties,
            message_properties,
            message_schemas,
        }
    }
}

/// One property's checks: the subset of JSON Schema the fixture uses.
struct Schema {
    ty: String,
    format: Option<String>,
    ignore_format: bool,
    enumeration: Option<Vec<String>>,
    pattern: Option<Pattern>,
    min_length: Option<usize>,
    max_length: Option<usize>,
    minimum: Option<i64>,
    maximum: Option<i64>,
    items: Option<Box<Schema>>,
}

impl Schema {
    fn from_json(v: &Value) -> Result<Schema, String> {
        let usize_of = |k: &str| v.get(k).and_then(Value::as_u64).map(|n| n as usize);
        let int_of = |k: &str| v.get(k).and_then(Value::as_i64);
        Ok(Schema {
            ty: v
                .get("type")
                .and_then(Value::as_str)
                .ok_or("no type")?
                .to_owned(),
            format: v.get("format").and_then(Value::as_str).map(str::to_owned),
            ignore_format: v
                .pointer("/x-twilio/ignoreFormat")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            enumeration: v.get("enum").and_then(Value::as_array).map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            }),
            pattern: match v.get("pattern").and_then(Value::as_str) {
                Some(p) => Some(Pattern::parse(p)?),
                None => None,
            },
            min_length: usize_of("minLength"),
            max_length: usize_of("maxLength"),
            minimum: int_of("minimum"),
            maximum: int_of("maximum"),
            items: match v.get("items") {
                Some(items) => Some(Box::new(Schema::from_json(items)?)),
                None => None,
            },
        })
    }

    /// Checks one form or query value; the error completes a sentence after the value.
    fn check(&self, value: &str) -> Result<(), String> {
        match self.ty.as_str() {
            "array" => match &self.items {
                Some(items) => items.check(value),
                None => Ok(()),
            },
            "integer" => {
                let n: i64 = value.parse().map_err(|_| "is not an integer".to_owned())?;
                if let Some(min) = self.minimum
                    && n < min
                {
                    return Err(format!("is below the minimum {min}"));
                }
                if let Some(max) = self.maximum
                    && n > max
                {
                    return Err(format!("is above the maximum {max}"));
                }
                Ok(())
            }
            "number" => value
                .parse::<f64>()
                .map(|_| ())
                .map_err(|_| "is not a number".to_owned()),
            "boolean" => {
                if value.eq_ignore_ascii_case("true") || value.eq_ignore_ascii_case("false") {
                    Ok(())
                } else {
                    Err("is not true or false".to_owned())
                }
            }
            "string" => self.check_string(value),
            other => Err(format!(
                "has schema type {other:?}, which the fake does not know"
            )),
        }
    }

    fn check_string(&self, value: &str) -> Result<(), String> {
        let len = value.chars().count();
        if let Some(min) = self.min_length
            && len < min
        {
            return Err(format!("is {len} characters, shorter than {min}"));
        }
        if let Some(max) = self.max_length
            && len > max
        {
            return Err(format!("is {len} characters, longer than {max}"));
        }
        if let Some(p) = &self.pattern
            && !p.matches(value)
        {
            return Err(format!("does not match {}", p.source));
        }
        if let Some(allowed) = &self.enumeration
            && !allowed.iter().any(|a| a == value)
        {
            return Err(format!("is not one of {allowed:?}"));
        }
        match self.format.as_deref() {
            _ if self.ignore_format => Ok(()),
            Some("phone-number") => check_address(value),
            Some("uri") => check_http_url(value),
            Some("date-time") => parse_iso8601(value)
                .map(|_| ())
                .ok_or_else(|| "is not an ISO 8601 date-time".to_owned()),
            _ => Ok(()),
        }
    }
}

/// Twilio's `phone-number` format: E.164, a short code, or a channel address (`whatsapp:+1…`).
fn check_address(value: &str) -> Result<(), String> {
    let is_e164 = |s: &str| {
        let digits = s.strip_prefix('+').unwrap_or("");
        (2..=15).contains(&digits.len())
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !digits.starts_with('0')
    };
    let is_short_code =
        |s: &str| (3..=8).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit());
    if is_e164(value) || is_short_code(value) {
        return Ok(());
    }
    let Some((channel, address)) = value.split_once(':') else {
        return Err(
            "is neither E.164 (+14155550100) nor a channel address (whatsapp:+14155550100)"
                .to_owned(),
        );
    };
    if channel.is_empty() || !channel.bytes().all(|b| b.is_ascii_lowercase()) {
        return Err(format!(
            "has channel prefix {channel:?}, expected e.g. \"whatsapp\""
        ));
    }
    if address.is_empty() || address.chars().any(char::is_whitespace) {
        return Err(
            "has an empty address or whitespace in it (a '+' sent unencoded becomes a space)"
                .to_owned(),
        );
    }
    if channel == "whatsapp"
        && (address.starts_with('+') || address.starts_with(|c: char| c.is_ascii_digit()))
        && !is_e164(address)
    {
        return Err(
            "is a whatsapp: address whose number is not E.164 (+ and 2-15 digits)".to_owned(),
        );
    }
    Ok(())
}

/// An absolute http(s) URL with a valid hostname ("underscores are not allowed").
fn check_http_url(value: &str) -> Result<(), String> {
    let rest = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("http://"))
        .ok_or("is not an absolute http(s) URL")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = if host_port.starts_with('[') {
        let end = host_port.find(']').ok_or("has an unclosed IPv6 literal")?;
        (&host_port[..=end], host_port[end + 1..].strip_prefix(':'))
    } else {
        match host_port.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host_port, None),
        }
    };
    if host.is_empty() {
        return Err("has no host".to_owned());
    }
    if !host.starts_with('[')
        && !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(format!(
            "has host {host:?}, which is not a valid hostname (no underscores)"
        ));
    }
    if let Some(p) = port
        && (p.is_empty() || p.parse::<u16>().is_err())
    {
        return Err(format!("has port {p:?}"));
    }
    if value.chars().any(char::is_whitespace) {
        return Err("contains whitespace".to_owned());
    }
    Ok(())
}

/// The few regular-expression forms the spec's patterns use: anchors, literals, `\d`,
/// classes with ranges, `(a|b)` groups of literals, and `{n}`, `{n,m}`, `?`, `*`, `+`.
/// Anything else fails at fixture load, never silently.
struct Pattern {
    source: String,
    anchored_start: bool,
    anchored_end: bool,
    pieces: Vec<Piece>,
}

struct Piece {
    atom: Atom,
    min: usize,
    max: usize,
}

enum Atom {
    Literal(char),
    Class(Vec<(char, char)>),
    Alternatives(Vec<Vec<char>>),
}

impl Pattern {
    fn parse(source: &str) -> Result<Pattern, String> {
        let unsupported =
            |what: &str| format!("pattern {source:?}: {what} is not supported by the fake");
        let mut chars: Vec<char> = source.chars().collect();
        let anchored_start = chars.first() == Some(&'^');
        if anchored_start {
            chars.remove(0);
        }
        let anchored_end =
            chars.last() == Some(&'$') && !(chars.len() >= 2 && chars[chars.len() - 2] == '\\');
        if anchored_end {
            chars.pop();
        }
        let mut pieces = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let atom = match chars[i] {
                '[' => {
                    let end = chars[i..]
                        .iter()
                        .position(|&c| c == ']')
                        .ok_or_else(|| unsupported("unclosed ["))?
                        + i;
                    let body = &chars[i + 1..end];
                    if body.first() == Some(&'^') {
                        return Err(unsupported("a negated class"));
                    }
                    let mut ranges = Vec::new();
                    let mut j = 0;
                    while j < body.len() {
                        if j + 2 < body.len() && body[j + 1] == '-' {
                            ranges.push((body[j], body[j + 2]));
                            j += 3;
                        } else {
                            ranges.push((body[j], body[j]));
                            j += 1;
                        }
                    }
                    i = end + 1;
                    Atom::Class(ranges)
                }
                '(' => {
                    let end = chars[i..]
                        .iter()
                        .position(|&c| c == ')')
                        .ok_or_else(|| unsupported("unclosed ("))?
                        + i;
                    let body: String = chars[i + 1..end].iter().collect();
                    if body.contains(['[', '(', '\\', '.', '*', '+', '?', '{']) {
                        return Err(unsupported("a group that is not a list of literals"));
                    }
                    i = end + 1;
                    Atom::Alternatives(body.split('|').map(|s| s.chars().collect()).collect())
                }
                '\\' => {
                    let c = *chars
                        .get(i + 1)
                        .ok_or_else(|| unsupported("a trailing backslash"))?;
                    i += 2;
                    match c {
                        'd' => Atom::Class(vec![('0', '9')]),
                        c if c.is_ascii_alphanumeric() => {
                            return Err(unsupported(&format!("\\{c}")));
                        }
                        c => Atom::Literal(c),
                    }
                }
                '.' | '^' | '$' | '|' | ')' | ']' | '{' | '}' | '*' | '+' | '?' => {
                    return Err(unsupported(&format!("{:?} here", chars[i])));
                }
                c => {
                    i += 1;
                    Atom::Literal(c)
                }
            };
            let (min, max) = match chars.get(i) {
                Some('?') => (0, 1),
                Some('*') => (0, usize::MAX),
                Some('+') => (1, usize::MAX),
                Some('{') => {
                    let end = chars[i..]
                        .iter()
                        .position(|&c| c == '}')
                        .ok_or_else(|| unsupported("unclosed {"))?
                        + i;
                    let body: String = chars[i + 1..end].iter().collect();
                    let bad = || unsupported(&format!("{{{body}}}"));
                    let (lo, hi) = match body.split_once(',') {
                        Some((lo, "")) => (lo.parse().map_err(|_| bad())?, usize::MAX),
                        Some((lo, hi)) => (
                            lo.parse().map_err(|_| bad())?,
                            hi.parse().map_err(|_| bad())?,
                        ),
                        None => {
                            let n = body.parse().map_err(|_| bad())?;
                            (n, n)
                        }
                    };
                    i = end;
                    (lo, hi)
                }
                _ => (1, 1),
            };
            if min != 1 || max != 1 {
                i += 1;
            }
            pieces.push(Piece { atom, min, max });
        }
        Ok(Pattern {
            source: source.to_owned(),
            anchored_start,
            anchored_end,
            pieces,
        })
    }

    fn matches(&self, value: &str) -> bool {
        let chars: Vec<char> = value.chars().collect();
        let starts = if self.anchored_start {
            0..=0
        } else {
            0..=chars.len()
        };
        starts.into_iter().any(|s| self.match_from(0, 0, &chars, s))
    }

    /// Backtracking: piece `p`, already repeated `count` times, at position `pos`.
    fn match_from(&self, p: usize, count: usize, s: &[char], pos: usize) -> bool {
        let Some(piece) = self.pieces.get(p) else {
            return !self.anchored_end || pos == s.len();
        };
        if count < piece.max {
            for len in piece.atom.lengths_at(s, pos) {
                if len > 0 && self.match_from(p, count + 1, s, pos + len) {
                    return true;
                }
            }
        }
        count >= piece.min && self.match_from(p + 1, 0, s, pos)
    }
}

impl Atom {
    /// How many characters this atom can consume at `pos` (one entry per way it matches).
    fn lengths_at(&self, s: &[char], pos: usize) -> Vec<usize> {
        let rest = &s[pos.min(s.len())..];
        match self {
            Atom::Literal(c) => rest
                .first()
                .filter(|x| *x == c)
                .map(|_| 1)
                .into_iter()
                .collect(),
            Atom::Class(ranges) => rest
                .first()
                .filter(|x| ranges.iter().any(|(lo, hi)| (lo..=hi).contains(x)))
                .map(|_| 1)
                .into_iter()
                .collect(),
            Atom::Alternatives(alts) => alts
                .iter()
                .filter(|alt| rest.starts_with(alt))
                .map(Vec::len)
                .collect(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dates (UTC), with the `time` crate

fn unix_secs(t: SystemTime) -> i64 {
    OffsetDateTime::from(t).unix_timestamp()
}

fn at(secs: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// `secs` as the Content API writes times, ISO 8601 in UTC (`2024-05-01T12:00:00Z`).
fn iso8601(secs: i64) -> String {
    at(secs).format(&Rfc3339).unwrap_or_default()
}

/// `Thu, 24 Aug 2023 05:01:45 +0000`, Twilio's date format.
fn rfc2822(secs: i64) -> String {
    at(secs).format(&Rfc2822).unwrap_or_default()
}

/// An ISO 8601 date-time: RFC 3339, or without an offset (then UTC), `T` or a space between.
fn parse_iso8601(s: &str) -> Option<OffsetDateTime> {
    let local = format_description!(
        "[year]-[month]-[day][first [T][t][ ]][hour]:[minute]:[second][optional [.[subsecond]]]"
    );
    OffsetDateTime::parse(s, &Rfc3339)
        .or_else(|_| PrimitiveDateTime::parse(s, local).map(PrimitiveDateTime::assume_utc))
        .ok()
}

/// The UTC day (days since 1970-01-01) a `DateSent` filter names: a date (`2024-05-01`), an
/// ISO 8601 date-time (offset optional, UTC if absent) or an RFC 2822 one.
fn parse_filter_day(s: &str) -> Option<i64> {
    Date::parse(s, format_description!("[year]-[month]-[day]"))
        .ok()
        .map(|d| d.midnight().assume_utc())
        .or_else(|| parse_iso8601(s))
        .or_else(|| OffsetDateTime::parse(s, &Rfc2822).ok())
        .map(|t| t.unix_timestamp().div_euclid(86_400))
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(max).collect::<String>())
    }
}

// ---------------------------------------------------------------------------------------------
// A listener whose connections a handler can close without answering (`ScriptedResponse::Reset`)

struct ClosableListener(TcpListener);

/// Connection info handed to the handler: the switch that kills its socket.
#[derive(Clone, Debug)]
struct Conn {
    kill: Arc<AtomicBool>,
}

struct ClosableStream {
    inner: TcpStream,
    kill: Arc<AtomicBool>,
}

impl Listener for ClosableListener {
    type Io = ClosableStream;
    type Addr = Conn;

    async fn accept(&mut self) -> (ClosableStream, Conn) {
        loop {
            match self.0.accept().await {
                Ok((inner, _peer)) => {
                    let kill = Arc::new(AtomicBool::new(false));
                    let conn = Conn { kill: kill.clone() };
                    return (ClosableStream { inner, kill }, conn);
                }
                // e.g. too many open files: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Conn> {
        self.0.local_addr()?;
        Ok(Conn {
            kill: Arc::new(AtomicBool::new(false)),
        })
    }
}

impl Connected<IncomingStream<'_, ClosableListener>> for Conn {
    fn connect_info(stream: IncomingStream<'_, ClosableListener>) -> Self {
        stream.remote_addr().clone()
    }
}

impl ClosableStream {
    fn killed(&self) -> Option<io::Error> {
        self.kill.load(Ordering::SeqCst).then(|| {
            io::Error::new(
                io::ErrorKind::ConnectionReset,
                "fake twilio: scripted reset",
            )
        })
    }
}

impl AsyncRead for ClosableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.killed() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClosableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.killed() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.killed() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
