//! The ingress load generator: pre-signed Twilio webhooks, each with its own MessageSid, posted
//! over a fixed number of keep-alive HTTP/1.1 connections (hyper's client), one request at a
//! time per connection, recording each request's latency. Signing happens before the clock
//! starts, so the generator spends its time on HTTP only, the same for every target.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, header};
use hyper_util::rt::TokioIo;

use crate::fakes::phone;

/// The auth token every target checks signatures with.
pub const AUTH_TOKEN: &str = "0123456789abcdef0123456789abcdef";
/// The account every webhook names.
pub const ACCOUNT_SID: &str = "AC0123456789abcdef0123456789abcdef";
/// The business's WhatsApp number: Twilio's sandbox.
pub const SANDBOX: &str = "+14155238886";

/// Where webhooks go: the address to connect to, and the URL Twilio would have signed.
#[derive(Clone)]
pub struct Target {
    /// Socket address of the server.
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT`, as configured at Twilio.
    pub base: String,
    /// The webhook path.
    pub path: String,
}

impl Target {
    /// A target on loopback port `port` for `agent`'s inbound webhook.
    pub fn local(port: u16, agent: &str) -> Target {
        Target {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            base: format!("http://127.0.0.1:{port}"),
            path: format!("/webhooks/twilio/whatsapp/{agent}"),
        }
    }

    fn url(&self) -> String {
        format!("{}{}", self.base, self.path)
    }
}

/// One signed webhook: the form body and its `X-Twilio-Signature`, and the path it goes to
/// when that is not the target's.
pub struct Signed {
    body: Bytes,
    signature: String,
    path: Option<String>,
}

/// The form Twilio posts for an inbound WhatsApp text, with the fields its documentation lists.
pub fn inbound_form(sid: &str, from: &str, text: &str) -> Vec<(String, String)> {
    let wa_id = from.trim_start_matches('+');
    let to = format!("whatsapp:{SANDBOX}");
    let from = format!("whatsapp:{from}");
    [
        ("SmsMessageSid", sid),
        ("NumMedia", "0"),
        ("ProfileName", "Bench User"),
        ("MessageType", "text"),
        ("SmsSid", sid),
        ("WaId", wa_id),
        ("SmsStatus", "received"),
        ("Body", text),
        ("To", to.as_str()),
        ("NumSegments", "1"),
        ("ReferralNumMedia", "0"),
        ("MessageSid", sid),
        ("AccountSid", ACCOUNT_SID),
        ("From", from.as_str()),
        ("ApiVersion", "2010-04-01"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Signs `form` for `url` as Twilio does.
pub fn sign(url: &str, form: &[(String, String)]) -> Signed {
    Signed {
        body: Bytes::from(twilio::form::encode(form)),
        signature: twilio::signature::compute_signature(AUTH_TOKEN.as_bytes(), url, form),
        path: None,
    }
}

/// `count` webhooks, each to an agent id of its own that nobody created (numbered from
/// `first`), as a client probing or flooding the public listener would send them.
pub fn unknown_agents(target: &Target, first: usize, count: usize) -> Vec<Signed> {
    (first..first + count)
        .map(|n| {
            let agent = format!("probe-{n:016x}");
            let path = format!("/webhooks/twilio/whatsapp/{agent}");
            let form = inbound_form(&format!("SM{n:032x}"), &phone(n % 1000), "hello");
            Signed {
                path: Some(path.clone()),
                ..sign(&format!("{}{path}", target.base), &form)
            }
        })
        .collect()
}

/// `count` webhooks for `target` with MessageSids numbered from `first`, from 1,000 users.
pub fn presign(target: &Target, first: u64, count: usize) -> Vec<Signed> {
    let url = target.url();
    (0..count as u64)
        .map(|n| {
            let sid = format!("SM{:032x}", first + n);
            let form = inbound_form(&sid, &phone((n % 1000) as usize), "hello");
            sign(&url, &form)
        })
        .collect()
}

/// What one run measured.
pub struct Outcome {
    /// Requests answered 200.
    pub ok: u64,
    /// Requests answered otherwise, or failed.
    pub errors: u64,
    /// Wall time of the run.
    pub seconds: f64,
    /// Latency of every request, in microseconds, sorted.
    pub latencies_us: Vec<u32>,
}

impl Outcome {
    /// Answered requests per second.
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.seconds
    }

    /// The `q` quantile of latency, in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies_us.len() - 1) as f64 * q).round() as usize;
        f64::from(self.latencies_us[i]) / 1000.0
    }
}

/// Posts `requests` to `target` over `connections` connections for at most `duration` (or
/// until the requests run out).
pub async fn run(
    target: &Target,
    requests: Arc<Vec<Signed>>,
    connections: usize,
    duration: Duration,
) -> Result<Outcome> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (target, requests, next) = (target.clone(), requests.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            connection(&target, &requests, &next, deadline).await
        }));
    }
    let mut outcome = Outcome {
        ok: 0,
        errors: 0,
        seconds: 0.0,
        latencies_us: Vec::new(),
    };
    for task in tasks {
        let (ok, errors, latencies) = task.await??;
        outcome.ok += ok;
        outcome.errors += errors;
        outcome.latencies_us.extend(latencies);
    }
    outcome.seconds = started.elapsed().as_secs_f64();
    outcome.latencies_us.sort_unstable();
    Ok(outcome)
}

async fn connection(
    target: &Target,
    requests: &[Signed],
    next: &AtomicUsize,
    deadline: Instant,
) -> Result<(u64, u64, Vec<u32>)> {
    let stream = tokio::net::TcpStream::connect(target.addr)
        .await
        .with_context(|| format!("cannot connect to {}", target.base))?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let host = target.base.trim_start_matches("http://").to_owned();
    let (mut ok, mut errors, mut latencies) = (0, 0, Vec::with_capacity(64 * 1024));
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(signed) = requests.get(i) else { break };
        if Instant::now() >= deadline {
            break;
        }
        let request = Request::post(signed.path.as_deref().unwrap_or(&target.path))
            .header(header::HOST, host.as_str())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header("x-twilio-signature", signed.signature.as_str())
            .body(Full::new(signed.body.clone()))?;
        let sent = Instant::now();
        sender.ready().await?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        response.into_body().collect().await?;
        latencies.push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX));
        if status == hyper::StatusCode::OK {
            ok += 1;
        } else {
            errors += 1;
        }
    }
    Ok((ok, errors, latencies))
}
