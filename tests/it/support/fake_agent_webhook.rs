//! A business's own agent endpoint, as wagate's `webhook` backend calls it.
//!
//! wagate POSTs JSON to [`FakeAgentWebhook::url`] with
//! `X-Wagate-Timestamp: <unix seconds>` and
//! `X-Wagate-Signature: v1=<lowercase hex HMAC-SHA256(secret, "<timestamp>.<raw body>")>`
//! (several comma- or space-separated `v1=` entries are allowed; one must verify), and a body
//! `{"agent_id", "session_id", "from", "messages": [{"role", "content"}…], "message": {…}}`.
//!
//! - A missing or wrong signature, or a timestamp more than [`TIMESTAMP_TOLERANCE`] away from
//!   now, is answered 401 and counted in [`FakeAgentWebhook::bad_signatures`].
//! - A signed body without the fields above is answered 400 and listed in
//!   [`FakeAgentWebhook::violations`].
//! - Otherwise the answer is `{"reply": "webhook says: <message.body>"}` (see `set_reply`).
//! - [`FakeAgentWebhook::requests`] holds every request body that arrived, signed or not
//!   (`null` for a body that was not JSON).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// How far `X-Wagate-Timestamp` may be from the fake's clock.
pub const TIMESTAMP_TOLERANCE: Duration = Duration::from_secs(300);
const PATH: &str = "/agent";

type ReplyRule = Arc<dyn Fn(&Value) -> Value + Send + Sync>;

/// A running fake. Cloning shares the same server; it stops when the last clone drops.
#[derive(Clone)]
pub struct FakeAgentWebhook {
    /// `http://127.0.0.1:PORT/agent`: the URL to configure on the agent.
    pub url: String,
    shared: Arc<Shared>,
    _server: Arc<ServerGuard>,
}

impl FakeAgentWebhook {
    pub async fn start(secret: &str) -> FakeAgentWebhook {
        Self::launch(secret, "http", |listener, app, _| async move {
            let _ = axum::serve(listener, app).await;
        })
        .await
    }

    /// The same endpoint over HTTPS, as hosted agents are reached: `https://127.0.0.1:PORT/agent`
    /// with the certificate of `tests/fixtures/agent-tls` (trust `ca.pem`, e.g. through
    /// `SSL_CERT_FILE`). With `h2_streams`, it offers HTTP/2 and HTTP/1.1 by ALPN, like most
    /// HTTPS hosts, and runs at most that many requests at once on one HTTP/2 connection, as
    /// such hosts cap their streams (100 to 250 is usual); without, it offers HTTP/1.1 only.
    /// [`FakeAgentWebhook::connections`] tells what each connection spoke.
    pub async fn start_tls(secret: &str, h2_streams: Option<u32>) -> FakeAgentWebhook {
        use hyper_util::{
            rt::{TokioExecutor, TokioIo},
            server::conn::auto,
            service::TowerToHyperService,
        };
        use tokio_rustls::rustls::{
            self,
            pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        };
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/agent-tls");
        let certs = CertificateDer::pem_file_iter(dir.join("cert.pem"))
            .expect("fake agent webhook: read cert.pem")
            .collect::<Result<Vec<_>, _>>()
            .expect("fake agent webhook: parse cert.pem");
        let key = PrivateKeyDer::from_pem_file(dir.join("key.pem"))
            .expect("fake agent webhook: read key.pem");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("fake agent webhook: TLS versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("fake agent webhook: certificate and key");
        tls.alpn_protocols = match h2_streams {
            Some(_) => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            None => vec![b"http/1.1".to_vec()],
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        Self::launch(secret, "https", move |listener, app, shared| async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let service = TowerToHyperService::new(app.clone());
                let shared = shared.clone();
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let alpn = stream.get_ref().1.alpn_protocol().unwrap_or_default();
                    shared
                        .state()
                        .connections
                        .push(String::from_utf8_lossy(alpn).into_owned());
                    let mut builder = auto::Builder::new(TokioExecutor::new());
                    builder
                        .http2()
                        .max_concurrent_streams(h2_streams.unwrap_or_default());
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        })
        .await
    }

    /// Binds a loopback port and runs `serve` on it with the endpoint's routes; `scheme` is
    /// what `serve` speaks there.
    async fn launch<F, Fut>(secret: &str, scheme: &str, serve: F) -> FakeAgentWebhook
    where
        F: FnOnce(TcpListener, Router, Arc<Shared>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("fake agent webhook: bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("fake agent webhook: local_addr");
        let shared = Arc::new(Shared {
            secret: secret.as_bytes().to_vec(),
            state: Mutex::new(FakeState::default()),
            changed: Notify::new(),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let task = tokio::spawn(serve(listener, app, shared.clone()));
        FakeAgentWebhook {
            url: format!("{scheme}://{addr}{PATH}"),
            shared,
            _server: Arc::new(ServerGuard(task.abort_handle())),
        }
    }

    /// The protocol each TLS connection agreed on by ALPN (`h2`, `http/1.1`), in the order
    /// they were accepted.
    pub fn connections(&self) -> Vec<String> {
        self.shared.state().connections.clone()
    }

    /// Every request body that arrived, in order, whether its signature verified or not.
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
                    "fake agent webhook: expected at least {n} request(s) within {timeout:?}, got {}: {requests:?}; bad signatures: {}; violations: {:?}",
                    requests.len(),
                    self.bad_signatures(),
                    self.violations()
                );
            }
        }
    }

    /// Requests answered 401 because their signature or timestamp did not verify.
    pub fn bad_signatures(&self) -> usize {
        self.shared.state().bad_signatures
    }

    /// Signed requests whose body lacked the documented fields.
    pub fn violations(&self) -> Vec<String> {
        self.shared.state().violations.clone()
    }

    /// Delays every answer from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.state().delay = delay;
    }

    /// The most requests that were being answered at the same time (while the delay ran).
    pub fn max_in_flight(&self) -> usize {
        self.shared.state().max_in_flight
    }

    /// Replaces the answer body; the rule gets the request body and returns the JSON to send.
    pub fn set_reply(&self, rule: impl Fn(&Value) -> Value + Send + Sync + 'static) {
        self.shared.state().reply = Some(Arc::new(rule));
    }

    /// The next well-signed requests get this HTTP status (with `{"error": …}`) instead (FIFO).
    pub fn push_status(&self, status: u16) {
        self.shared.state().statuses.push_back(status);
    }
}

/// The signature header value wagate must send: `v1=<hex HMAC-SHA256(secret, "ts.body")>`.
pub fn sign(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

struct ServerGuard(tokio::task::AbortHandle);

impl Drop for ServerGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Shared {
    secret: Vec<u8>,
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
    bad_signatures: usize,
    violations: Vec<String>,
    delay: Duration,
    reply: Option<ReplyRule>,
    statuses: VecDeque<u16>,
    in_flight: usize,
    max_in_flight: usize,
    connections: Vec<String>,
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if method != Method::POST || uri.path() != PATH {
        shared.state().violations.push(format!(
            "{method} {}: the agent endpoint is POST {PATH}",
            uri.path()
        ));
        return json_response(404, json!({ "error": "not found" }));
    }
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let (n, delay) = {
        let mut state = shared.state();
        state.requests.push(parsed.clone().unwrap_or(Value::Null));
        state.in_flight += 1;
        state.max_in_flight = state.max_in_flight.max(state.in_flight);
        (state.requests.len(), state.delay)
    };
    shared.changed.notify_waiters();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    shared.state().in_flight -= 1;

    if let Err(why) = verify(&shared.secret, &headers, &body) {
        shared.state().bad_signatures += 1;
        return json_response(401, json!({ "error": format!("bad signature: {why}") }));
    }
    let request = match check_body(&headers, parsed) {
        Ok(request) => request,
        Err(problems) => {
            let mut state = shared.state();
            for p in &problems {
                state.violations.push(format!("request #{n}: {p}"));
            }
            return json_response(400, json!({ "error": problems.join("; ") }));
        }
    };
    let (status, rule) = {
        let mut state = shared.state();
        (state.statuses.pop_front(), state.reply.clone())
    };
    if let Some(status) = status {
        return json_response(status, json!({ "error": format!("scripted {status}") }));
    }
    let answer = match rule {
        Some(rule) => rule(&request),
        None => {
            let text = request
                .pointer("/message/body")
                .and_then(Value::as_str)
                .unwrap_or("");
            json!({ "reply": format!("webhook says: {text}") })
        }
    };
    json_response(200, answer)
}

fn verify(secret: &[u8], headers: &HeaderMap, body: &[u8]) -> Result<(), String> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let timestamp = get("x-wagate-timestamp").ok_or("no X-Wagate-Timestamp")?;
    let signatures = get("x-wagate-signature").ok_or("no X-Wagate-Signature")?;
    let secs: u64 = timestamp
        .parse()
        .map_err(|_| format!("X-Wagate-Timestamp {timestamp:?} is not unix seconds"))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if now.abs_diff(secs) > TIMESTAMP_TOLERANCE.as_secs() {
        return Err(format!(
            "timestamp {secs} is {}s from now",
            now.abs_diff(secs)
        ));
    }
    let candidates: Vec<&str> = signatures
        .split([',', ' '])
        .filter_map(|s| s.trim().strip_prefix("v1="))
        .collect();
    if candidates.is_empty() {
        return Err(format!(
            "X-Wagate-Signature {signatures:?} has no v1= entry"
        ));
    }
    let verifies = candidates.iter().any(|hex_sig| {
        // Lowercase hex only, as specified; `hex::decode` alone would accept uppercase.
        let lowercase = hex_sig
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        let Ok(raw) = hex::decode(hex_sig) else {
            return false;
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        lowercase && mac.verify_slice(&raw).is_ok()
    });
    if verifies {
        Ok(())
    } else {
        Err("no v1= signature matches".to_owned())
    }
}

fn check_body(headers: &HeaderMap, parsed: Option<Value>) -> Result<Value, Vec<String>> {
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
    let Some(body @ Value::Object(_)) = parsed else {
        problems.push("the body is not a JSON object".to_owned());
        return Err(problems);
    };
    for field in ["agent_id", "session_id", "from"] {
        if !body.get(field).is_some_and(Value::is_string) {
            problems.push(format!("{field:?} is missing or not a string"));
        }
    }
    if !body.get("message").is_some_and(Value::is_object) {
        problems.push("\"message\" is missing or not an object".to_owned());
    }
    match body.get("messages").and_then(Value::as_array) {
        None => problems.push("\"messages\" is missing or not an array".to_owned()),
        Some(messages) => {
            for (i, m) in messages.iter().enumerate() {
                let role = m.get("role").and_then(Value::as_str);
                if !matches!(role, Some("user" | "assistant" | "system")) {
                    problems.push(format!("messages[{i}].role is {role:?}"));
                }
                if !m.get("content").is_some_and(Value::is_string) {
                    problems.push(format!("messages[{i}].content is not a string"));
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(body)
    } else {
        Err(problems)
    }
}

fn json_response(status: u16, body: Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (status, body.to_string()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
