//! What a benchmark cannot reach from here, stood in for on loopback: Twilio's Messages API
//! (answering like Twilio, 201 with the message resource) and a business's agent endpoint that
//! takes a fixed time to think. Every reply Twilio receives is routed to the conversation that
//! waits for it, so the bench checks each message was answered exactly once.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Result;
use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, State},
    http::StatusCode,
    response::IntoResponse,
    routing::post,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// The phone number of conversation `i`, `+1555` and seven digits.
pub fn phone(i: usize) -> String {
    format!("+1555{i:07}")
}

fn conversation_of(to: &str) -> Option<usize> {
    to.strip_prefix("whatsapp:+1555")?.parse().ok()
}

/// Where the replies of each conversation go, and what arrived that nobody expected.
pub struct Replies {
    inboxes: Vec<mpsc::UnboundedSender<String>>,
    /// Messages Twilio received, all told.
    pub received: AtomicU64,
    /// Messages to a number that is not one of the bench's conversations.
    pub stray: AtomicU64,
    sids: AtomicU64,
}

impl Replies {
    /// Inboxes for conversations `0..n`, and the receiving ends for the conversations to await.
    pub fn new(n: usize) -> (Arc<Replies>, Vec<mpsc::UnboundedReceiver<String>>) {
        let (inboxes, receivers) = (0..n).map(|_| mpsc::unbounded_channel()).unzip();
        (
            Arc::new(Replies {
                inboxes,
                received: AtomicU64::new(0),
                stray: AtomicU64::new(0),
                sids: AtomicU64::new(0),
            }),
            receivers,
        )
    }
}

/// Serves Twilio's `POST /2010-04-01/Accounts/{AccountSid}/Messages.json` on a free port, and
/// the typing indicator each turn asks for (`POST /v2/Indicators/Typing.json`, as the
/// Messaging API's host), accepted as Twilio accepts it.
pub async fn twilio(replies: Arc<Replies>) -> Result<SocketAddr> {
    let app = Router::new()
        .route(
            "/2010-04-01/Accounts/{account}/Messages.json",
            post(create_message),
        )
        .route(
            "/v2/Indicators/Typing.json",
            post(|| async { Json(json!({"success": true})) }),
        )
        .with_state(replies);
    serve(app).await
}

async fn create_message(
    State(replies): State<Arc<Replies>>,
    Path(account): Path<String>,
    body: Bytes,
) -> impl IntoResponse {
    let form = match twilio::form::parse(&body) {
        Ok(f) => f,
        Err(_) => return (StatusCode::BAD_REQUEST, Json(json!({"code": 20001}))),
    };
    let field = |name: &str| twilio::form::first(&form, name).unwrap_or_default();
    let (to, from, text) = (field("To"), field("From"), field("Body"));
    replies.received.fetch_add(1, Ordering::Relaxed);
    match conversation_of(to).and_then(|i| replies.inboxes.get(i)) {
        Some(inbox) => {
            let _ = inbox.send(text.to_owned());
        }
        None => {
            replies.stray.fetch_add(1, Ordering::Relaxed);
        }
    }
    let n = replies.sids.fetch_add(1, Ordering::Relaxed);
    let sid = format!("SM{n:032x}");
    (
        StatusCode::CREATED,
        Json(json!({
            "account_sid": account,
            "api_version": "2010-04-01",
            "body": text,
            "date_created": "Tue, 24 Nov 2026 12:00:00 +0000",
            "date_sent": null,
            "date_updated": "Tue, 24 Nov 2026 12:00:00 +0000",
            "direction": "outbound-api",
            "error_code": null,
            "error_message": null,
            "from": from,
            "messaging_service_sid": null,
            "num_media": "0",
            "num_segments": "1",
            "price": null,
            "price_unit": "USD",
            "sid": sid,
            "status": "queued",
            "subresource_uris": {"media": format!("/2010-04-01/Accounts/{account}/Messages/{sid}/Media.json")},
            "to": to,
            "uri": format!("/2010-04-01/Accounts/{account}/Messages/{sid}.json"),
        })),
    )
}

/// How the fake agent is reached.
#[derive(Clone, Copy, Debug)]
pub enum AgentHost {
    /// `http://`, HTTP/1.1 only: a connection per call in flight.
    PlainHttp1,
    /// `https://` with the certificate of `tests/fixtures/agent-tls`, offering HTTP/2 (with
    /// this many streams per connection) and HTTP/1.1 by ALPN, as hosted agents and model
    /// APIs are reached.
    Https { h2_streams: u32 },
}

/// The CA that signed the HTTPS fake agent's certificate, for wagate's `SSL_CERT_FILE`.
pub const AGENT_CA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/agent-tls/ca.pem"
);

/// Serves an agent webhook (`POST /agent`) that waits `latency`, then answers with the user's
/// last message, as wagate's webhook backend expects: `{"reply": "…"}`. Returns its URL.
pub async fn slow_agent(latency: Duration, host: AgentHost) -> Result<String> {
    let app = Router::new()
        .route("/agent", post(think))
        .with_state(latency);
    Ok(match host {
        AgentHost::PlainHttp1 => format!("http://{}/agent", serve(app).await?),
        AgentHost::Https { h2_streams } => {
            let accepted = Arc::new(AtomicU64::new(0));
            format!(
                "https://{}/agent",
                serve_tls(app, h2_streams, accepted).await?
            )
        }
    })
}

/// [`slow_agent`] over HTTPS, with the count of the connections it accepted.
pub async fn https_agent(latency: Duration, h2_streams: u32) -> Result<(String, Arc<AtomicU64>)> {
    let app = Router::new()
        .route("/agent", post(think))
        .with_state(latency);
    let accepted = Arc::new(AtomicU64::new(0));
    let addr = serve_tls(app, h2_streams, accepted.clone()).await?;
    Ok((format!("https://{addr}/agent"), accepted))
}

/// [`slow_agent`] over plain HTTP/1.1, with the count of the connections it accepted.
pub async fn plain_agent(latency: Duration) -> Result<(String, Arc<AtomicU64>)> {
    use hyper_util::{
        rt::{TokioExecutor, TokioIo},
        server::conn::auto,
        service::TowerToHyperService,
    };
    let app = Router::new()
        .route("/agent", post(think))
        .with_state(latency);
    let accepted = Arc::new(AtomicU64::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let counted = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::Relaxed);
            let service = TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .http1_only()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Ok((format!("http://{addr}/agent"), accepted))
}

async fn serve_tls(app: Router, h2_streams: u32, accepted: Arc<AtomicU64>) -> Result<SocketAddr> {
    use hyper_util::{
        rt::{TokioExecutor, TokioIo},
        server::conn::auto,
        service::TowerToHyperService,
    };
    use tokio_rustls::rustls::{
        self,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    };
    let dir = std::path::Path::new(AGENT_CA)
        .parent()
        .ok_or_else(|| anyhow::anyhow!("no directory around {AGENT_CA}"))?;
    let certs =
        CertificateDer::pem_file_iter(dir.join("cert.pem"))?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(dir.join("key.pem"))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            accepted.fetch_add(1, Ordering::Relaxed);
            let acceptor = acceptor.clone();
            let service = TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut builder = auto::Builder::new(TokioExecutor::new());
                builder.http2().max_concurrent_streams(h2_streams);
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn think(State(latency): State<Duration>, body: Bytes) -> impl IntoResponse {
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let last = request["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned();
    tokio::time::sleep(latency).await;
    Json(json!({ "reply": last }))
}

async fn serve(app: Router) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("a fake server stopped: {e}");
        }
    });
    Ok(addr)
}
