//! A local OpenAI-compatible Chat Completions server (`POST {base_url}/chat/completions`).
//!
//! - Auth: `Authorization: Bearer <api_key>`; anything else gets 401 with OpenAI's error JSON
//!   (`{"error": {"message", "type", "param", "code"}}`).
//! - Every request to the endpoint is recorded ([`FakeOpenAi::requests`]), authorized or not.
//!   Request number N (1-based, so `requests()[N-1]`) is answered by default with the
//!   assistant text `reply #N to: <text of the last user message>`; the text of a user
//!   message whose content is an array of parts is its `text` parts joined by newlines.
//! - Malformed requests (no `model`, empty `messages`, unknown roles or content parts,
//!   `stream: true`, which the fake does not speak; `tools` not in function-calling shape; a
//!   `tool` message that answers no call of the assistant message before it, or a call left
//!   unanswered) get 400 and land in [`FakeOpenAi::violations`].
//! - [`FakeOpenAi::set_tool_calls`] makes the model call tools: the answer then carries
//!   `tool_calls` (`content` null, `finish_reason` `tool_calls`) as OpenAI's does.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Notify;

type ReplyRule = Arc<dyn Fn(usize, &Value) -> String + Send + Sync>;
/// Which tools the model calls for request N (name and arguments), or `None` to answer.
type ToolRule = Arc<dyn Fn(usize, &Value) -> Option<Vec<(String, Value)>> + Send + Sync>;

/// A running fake. Cloning shares the same server; it stops when the last clone drops.
#[derive(Clone)]
pub struct FakeOpenAi {
    /// `http://127.0.0.1:PORT/v1`; clients POST to `{base_url}/chat/completions`.
    pub base_url: String,
    shared: Arc<Shared>,
    _server: Arc<ServerGuard>,
}

impl FakeOpenAi {
    pub async fn start(api_key: &str) -> FakeOpenAi {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("fake openai: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("fake openai: local_addr");
        let shared = Arc::new(Shared {
            api_key: api_key.to_owned(),
            state: Mutex::new(FakeState::default()),
            changed: Notify::new(),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeOpenAi {
            base_url: format!("http://{addr}/v1"),
            shared,
            _server: Arc::new(ServerGuard(task.abort_handle())),
        }
    }

    /// Request bodies received at `/v1/chat/completions`, in arrival order (`null` for a body
    /// that was not JSON).
    pub fn requests(&self) -> Vec<Value> {
        self.shared.state().requests.clone()
    }

    /// Waits for at least `n` requests and returns them all; panics with what arrived if
    /// that takes longer than `timeout`.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.shared.changed.notified();
            let requests = self.requests();
            if requests.len() >= n {
                return requests;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                panic!(
                    "fake openai: expected at least {n} request(s) within {timeout:?}, got {}:\n{}\nviolations: {:?}",
                    requests.len(),
                    requests
                        .iter()
                        .map(|r| format!("  {r}"))
                        .collect::<Vec<_>>()
                        .join("\n"),
                    self.violations()
                );
            }
        }
    }

    /// Delays every answer from now on (to test timeouts and concurrency).
    pub fn set_delay(&self, delay: Duration) {
        self.shared.state().delay = delay;
    }

    /// Replaces the default reply text; the rule gets N (1-based) and the request body.
    pub fn set_reply(&self, rule: impl Fn(usize, &Value) -> String + Send + Sync + 'static) {
        self.shared.state().reply = Some(Arc::new(rule));
    }

    /// Makes the model call tools: for request N, `rule` names the calls (tool name and
    /// arguments), or `None` for an answer in words.
    pub fn set_tool_calls(
        &self,
        rule: impl Fn(usize, &Value) -> Option<Vec<(String, Value)>> + Send + Sync + 'static,
    ) {
        self.shared.state().tool_calls = Some(Arc::new(rule));
    }

    /// The next authorized, well-formed requests get this error instead of a completion (FIFO).
    pub fn push_error(&self, status: u16, message: &str) {
        self.shared
            .state()
            .errors
            .push_back((status, message.to_owned()));
    }

    /// Malformed requests seen (tests assert this is empty).
    pub fn violations(&self) -> Vec<String> {
        self.shared.state().violations.clone()
    }

    /// Audio received at `/v1/audio/transcriptions` (authorized and well-formed), in order.
    pub fn transcriptions(&self) -> Vec<Transcribed> {
        self.shared.state().transcriptions.clone()
    }
}

/// One upload to `POST /v1/audio/transcriptions`, answered `{"text": "heard N bytes"}`.
#[derive(Debug, Clone)]
pub struct Transcribed {
    pub model: String,
    pub file_name: String,
    pub content_type: String,
    pub bytes: Vec<u8>,
}

/// OpenAI's audio transcription endpoint: multipart with `model` and `file`.
async fn transcription(shared: &Shared, headers: &HeaderMap, body: Bytes) -> Response {
    if let Some(denied) = auth_failure(&shared.api_key, headers) {
        return denied;
    }
    let boundary = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| multer::parse_boundary(v).ok());
    let Some(boundary) = boundary else {
        shared
            .state()
            .violations
            .push("POST /v1/audio/transcriptions: not multipart/form-data".into());
        return openai_error(400, "not multipart", "invalid_request_error", None, None);
    };
    let stream = futures::stream::once(async move { Ok::<Bytes, std::io::Error>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let (mut model, mut file) = (None, None);
    while let Ok(Some(field)) = multipart.next_field().await {
        match field.name() {
            Some("model") => model = field.text().await.ok(),
            Some("file") => {
                let name = field.file_name().unwrap_or("").to_owned();
                let ct = field
                    .content_type()
                    .map(|m| m.to_string())
                    .unwrap_or_default();
                file = field.bytes().await.ok().map(|b| (name, ct, b.to_vec()));
            }
            _ => {}
        }
    }
    let (Some(model), Some((file_name, content_type, bytes))) = (model, file) else {
        shared
            .state()
            .violations
            .push("POST /v1/audio/transcriptions: model and file are required".into());
        return openai_error(
            400,
            "model and file are required",
            "invalid_request_error",
            None,
            None,
        );
    };
    let text = format!("heard {} bytes", bytes.len());
    shared.state().transcriptions.push(Transcribed {
        model,
        file_name,
        content_type,
        bytes,
    });
    shared.changed.notify_waiters();
    (StatusCode::OK, axum::Json(json!({ "text": text }))).into_response()
}

/// The text the default reply rule quotes: the last `user` message's text (string content,
/// or its `text` parts joined by newlines); empty when there is no user message.
pub fn last_user_text(request: &Value) -> String {
    let Some(messages) = request.get("messages").and_then(Value::as_array) else {
        return String::new();
    };
    let Some(user) = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
    else {
        return String::new();
    };
    match user.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// The `image_url.url`s of the last user message (a convenience for assertions).
pub fn last_user_image_urls(request: &Value) -> Vec<String> {
    let messages = request.get("messages").and_then(Value::as_array);
    let user = messages.and_then(|m| {
        m.iter()
            .rev()
            .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
    });
    let Some(Value::Array(parts)) = user.and_then(|u| u.get("content")) else {
        return Vec::new();
    };
    parts
        .iter()
        .filter(|p| p.get("type").and_then(Value::as_str) == Some("image_url"))
        .filter_map(|p| p.pointer("/image_url/url").and_then(Value::as_str))
        .map(str::to_owned)
        .collect()
}

struct ServerGuard(tokio::task::AbortHandle);

impl Drop for ServerGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Shared {
    api_key: String,
    state: Mutex<FakeState>,
    changed: Notify,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
struct FakeState {
    requests: Vec<Value>,
    transcriptions: Vec<Transcribed>,
    violations: Vec<String>,
    delay: Duration,
    reply: Option<ReplyRule>,
    tool_calls: Option<ToolRule>,
    errors: VecDeque<(u16, String)>,
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if method == Method::POST && uri.path() == "/v1/audio/transcriptions" {
        return transcription(&shared, &headers, body).await;
    }
    if method != Method::POST || uri.path() != "/v1/chat/completions" {
        shared.state().violations.push(format!(
            "{method} {}: not an endpoint of the fake (POST /v1/chat/completions)",
            uri.path()
        ));
        let message = format!("Invalid URL ({method} {})", uri.path());
        return openai_error(404, &message, "invalid_request_error", None, None);
    }
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let (n, delay) = {
        let mut state = shared.state();
        state.requests.push(parsed.clone().unwrap_or(Value::Null));
        (state.requests.len(), state.delay)
    };
    shared.changed.notify_waiters();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    if let Some(denied) = auth_failure(&shared.api_key, &headers) {
        return denied;
    }
    let problems = validate(&headers, parsed.as_ref());
    if let Some(first) = problems.first() {
        let mut state = shared.state();
        for p in &problems {
            state
                .violations
                .push(format!("POST /v1/chat/completions #{n}: {p}"));
        }
        return openai_error(400, first, "invalid_request_error", None, None);
    }
    let request = parsed.unwrap_or(Value::Null);
    let (scripted, rule, tool_rule) = {
        let mut state = shared.state();
        (
            state.errors.pop_front(),
            state.reply.clone(),
            state.tool_calls.clone(),
        )
    };
    if let Some((status, message)) = scripted {
        let (kind, code) = match status {
            429 => ("requests", Some("rate_limit_exceeded")),
            500..=599 => ("server_error", None),
            _ => ("invalid_request_error", None),
        };
        return openai_error(status, &message, kind, None, code);
    }
    let offered = request.get("tools").is_some();
    if let Some(calls) = tool_rule.filter(|_| offered).and_then(|r| r(n, &request)) {
        return tool_call_completion(n, &request, &calls);
    }
    let content = match rule {
        Some(rule) => rule(n, &request),
        None => format!("reply #{n} to: {}", last_user_text(&request)),
    };
    completion(n, &request, &content)
}

/// An answer that calls tools instead of speaking.
fn tool_call_completion(n: usize, request: &Value, calls: &[(String, Value)]) -> Response {
    let tool_calls: Vec<Value> = calls
        .iter()
        .enumerate()
        .map(|(i, (name, arguments))| {
            json!({
                "id": format!("call_fake{n:04}{i:04}"),
                "type": "function",
                "function": {"name": name, "arguments": arguments.to_string()},
            })
        })
        .collect();
    json_response(
        200,
        json!({
            "id": format!("chatcmpl-fake{n:020}"),
            "object": "chat.completion",
            "created": 0,
            "model": request.get("model").cloned().unwrap_or(Value::Null),
            "choices": [{
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": null,
                    "tool_calls": tool_calls,
                    "refusal": null,
                    "annotations": [],
                },
                "logprobs": null,
                "finish_reason": "tool_calls",
            }],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }),
    )
}

/// The 401 to answer, unless the bearer token is the key.
fn auth_failure(api_key: &str, headers: &HeaderMap) -> Option<Response> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(key) if key == api_key => None,
        Some(key) => Some(openai_error(
            401,
            &format!(
                "Incorrect API key provided: {}. You can find your API key at https://platform.openai.com/account/api-keys.",
                mask(key)
            ),
            "invalid_request_error",
            None,
            Some("invalid_api_key"),
        )),
        None => Some(openai_error(
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank username) if you're accessing the API from your browser and are prompted for a username and password. You can obtain an API key from https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            None,
            None,
        )),
    }
}

/// OpenAI shows only the ends of a wrong key.
fn mask(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() <= 8 {
        return "*".repeat(chars.len());
    }
    let head: String = chars[..3].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}{}{tail}", "*".repeat(chars.len() - 7))
}

const ROLES: &[&str] = &[
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];
const PART_TYPES: &[&str] = &["text", "image_url", "input_audio", "file", "refusal"];

fn validate(headers: &HeaderMap, body: Option<&Value>) -> Vec<String> {
    let mut problems = Vec::new();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .eq_ignore_ascii_case("application/json")
    {
        problems.push(format!(
            "Content-Type {content_type:?}, expected application/json"
        ));
    }
    let Some(Value::Object(body)) = body else {
        problems.push("the body is not a JSON object".to_owned());
        return problems;
    };
    if body
        .get("model")
        .and_then(Value::as_str)
        .is_none_or(|m| m.is_empty())
    {
        problems.push("you must provide a model parameter".to_owned());
    }
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        problems.push("stream: true is not supported by the fake".to_owned());
    }
    match body.get("messages").and_then(Value::as_array) {
        Some(messages) if !messages.is_empty() => {
            for (i, m) in messages.iter().enumerate() {
                if let Err(e) = check_message(m) {
                    problems.push(format!("messages[{i}]: {e}"));
                }
            }
            problems.extend(check_tool_rounds(messages));
        }
        _ => problems.push("messages must be a non-empty array".to_owned()),
    }
    if let Some(tools) = body.get("tools") {
        problems.extend(check_tools(tools));
    }
    problems
}

/// `tools` as function calling takes them: `[{"type": "function", "function": {"name",
/// "description"?, "parameters"}}]`, names of 1-64 of `[A-Za-z0-9_-]`.
fn check_tools(tools: &Value) -> Vec<String> {
    let Some(tools) = tools.as_array() else {
        return vec!["tools must be an array".to_owned()];
    };
    let mut problems = Vec::new();
    for (i, t) in tools.iter().enumerate() {
        let name = t.pointer("/function/name").and_then(Value::as_str);
        let good_name = name.is_some_and(|n| {
            (1..=64).contains(&n.len())
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        });
        if t.get("type").and_then(Value::as_str) != Some("function") || !good_name {
            problems.push(format!("tools[{i}]: not a function with a valid name"));
        }
        if !t
            .pointer("/function/parameters")
            .is_some_and(Value::is_object)
        {
            problems.push(format!("tools[{i}]: function.parameters must be an object"));
        }
    }
    problems
}

/// Every `tool` message answers a call of the assistant message just before its run of tool
/// messages, and every call is answered, as OpenAI requires.
fn check_tool_rounds(messages: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut open: Vec<String> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        if role == "tool" {
            let id = m.get("tool_call_id").and_then(Value::as_str).unwrap_or("");
            match open.iter().position(|o| o == id) {
                Some(at) => {
                    open.remove(at);
                }
                None => problems.push(format!(
                    "messages[{i}]: a tool message must answer a tool_call of the preceding assistant message"
                )),
            }
            continue;
        }
        if !open.is_empty() {
            problems.push(format!(
                "messages[{i}]: tool_calls {open:?} were not answered by tool messages"
            ));
            open.clear();
        }
        if let Some(calls) = m.get("tool_calls").and_then(Value::as_array) {
            for call in calls {
                match (
                    call.get("id").and_then(Value::as_str),
                    call.pointer("/function/arguments").and_then(Value::as_str),
                ) {
                    (Some(id), Some(_)) => open.push(id.to_owned()),
                    _ => problems.push(format!(
                        "messages[{i}]: a tool call needs an id and function.arguments as a string"
                    )),
                }
            }
        }
    }
    if !open.is_empty() {
        problems.push(format!("tool_calls {open:?} were not answered"));
    }
    problems
}

fn check_message(m: &Value) -> Result<(), String> {
    let role = m.get("role").and_then(Value::as_str).ok_or("has no role")?;
    if !ROLES.contains(&role) {
        return Err(format!("role {role:?} is not one of {ROLES:?}"));
    }
    match m.get("content") {
        Some(Value::String(_)) => Ok(()),
        None | Some(Value::Null) if role == "assistant" => Ok(()),
        Some(Value::Array(parts)) => parts
            .iter()
            .enumerate()
            .try_for_each(|(i, p)| check_part(p).map_err(|e| format!("content[{i}]: {e}"))),
        other => Err(format!(
            "content {other:?} is neither a string nor an array of parts"
        )),
    }
}

fn check_part(p: &Value) -> Result<(), String> {
    let kind = p.get("type").and_then(Value::as_str).ok_or("has no type")?;
    match kind {
        "text" => p
            .get("text")
            .and_then(Value::as_str)
            .map(|_| ())
            .ok_or_else(|| "a text part needs a string \"text\"".to_owned()),
        "image_url" => {
            let url = p
                .pointer("/image_url/url")
                .and_then(Value::as_str)
                .ok_or("an image_url part needs {\"image_url\": {\"url\": \"…\"}}")?;
            if url.starts_with("https://") || url.starts_with("http://") || url.starts_with("data:")
            {
                Ok(())
            } else {
                Err(format!(
                    "image_url.url {url:?} is not an http(s) or data: URL"
                ))
            }
        }
        "file" => {
            let data = p.pointer("/file/file_data").and_then(Value::as_str);
            let id = p.pointer("/file/file_id").and_then(Value::as_str);
            match (data, id) {
                (Some(d), None) if d.starts_with("data:") => Ok(()),
                (None, Some(_)) => Ok(()),
                _ => Err(
                    "a file part needs {\"file\": {\"file_data\": \"data:…\"}} or a file_id"
                        .to_owned(),
                ),
            }
        }
        k if PART_TYPES.contains(&k) => Ok(()),
        k => Err(format!("unknown content part type {k:?}")),
    }
}

fn completion(n: usize, request: &Value, content: &str) -> Response {
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let prompt_tokens = request
        .get("messages")
        .map(|m| approx_tokens(&m.to_string()))
        .unwrap_or(0);
    let completion_tokens = approx_tokens(content);
    json_response(
        200,
        json!({
            "id": format!("chatcmpl-fake{n:020}"),
            "object": "chat.completion",
            "created": created,
            "model": request.get("model").cloned().unwrap_or(Value::Null),
            "choices": [{
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": content,
                    "refusal": null,
                    "annotations": [],
                },
                "logprobs": null,
                "finish_reason": "stop",
            }],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": { "cached_tokens": 0, "audio_tokens": 0 },
                "completion_tokens_details": {
                    "reasoning_tokens": 0,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            },
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }),
    )
}

/// About four characters per token, like OpenAI's rule of thumb.
fn approx_tokens(text: &str) -> usize {
    text.chars().count().div_ceil(4)
}

fn openai_error(
    status: u16,
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Response {
    json_response(
        status,
        json!({
            "error": { "message": message, "type": kind, "param": param, "code": code }
        }),
    )
}

fn json_response(status: u16, body: Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (status, body.to_string()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert("x-request-id", HeaderValue::from_static("req_fake"));
    resp
}
