//! How agent calls reach their hosts.
//!
//! A worker may run thousands of agent calls at once, most of them waiting on a model. Over
//! HTTP/1.1 each waiting call holds a connection of its own, with hyper's buffers and, over
//! HTTPS, TLS state: about 27 KB per call, most of a worker's memory (docs/benchmarks.md, P3).
//! HTTP/2 carries many calls on one connection, but hyper keeps a single HTTP/2 connection per
//! host and queues the calls beyond the host's stream cap instead of opening another
//! (hyperium/hyper#2197), so a worker would run far fewer calls at once than asked.
//!
//! So HTTPS hosts that offer HTTP/2 by ALPN get a pool of HTTP/2 connections kept here, on the
//! `h2` crate: a call takes a stream on the first connection below the cap the host announced,
//! and a new connection is opened only when every one is full. Calls that find every one full
//! wait in line and are handed, oldest first, the streams that calls give back and those of new
//! connections: a connection that opens wakes only the calls it can carry, however many wait.
//! Plain `http://` hosts go through hyper-util's client over HTTP/1.1, a connection per call
//! in flight, without reqwest's layers around each call (`http1`). Hosts that answer ALPN with
//! HTTP/1.1, URLs with credentials, and every host of a scheme for which a proxy is configured
//! go through reqwest.
//!
//! Layout: this file is the transport and its reqwest side; `http1` the plain HTTP/1.1 client;
//! `pool` the HTTP/2 pool, per host; `connect` the TCP connections it opens; `tests` a scripted
//! HTTP/2 host and the pool against it.

mod connect;
mod http1;
mod pool;

use std::{sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use http::{HeaderName, HeaderValue, StatusCode};
#[cfg(test)]
use tokio_rustls::rustls;

use crate::{
    http1::PlainHttp1,
    pool::{Exchange, Http2Pool, Route},
};

/// The most an agent's answer may hold; a reply longer than this is no WhatsApp reply.
pub const MAX_ANSWER_BYTES: usize = 1 << 20;
/// opening a connection that the host sends away at once.
const ATTEMPTS: usize = 3;
/// on to another each time: a host that restarts sends all of them away.
const RETIRED_CONNECTIONS: usize = 8;

/// One POST to an agent host.
pub struct Post<'a> {
    /// Where to.
    pub url: &'a str,
    /// Headers besides `content-length`, which is set from the body.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The encoded request.
    pub body: Bytes,
    /// For the whole call: connecting, sending and reading the answer.
    pub timeout: Duration,
}

/// What the host answered.
pub struct Answer {
    /// The HTTP status.
    pub status: StatusCode,
    /// The body, at most [`MAX_ANSWER_BYTES`].
    pub body: Bytes,
}

/// Why a call got no answer. The texts never hold the URL, which may carry credentials.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The timeout of the call ran out.
    #[error("did not answer in time")]
    Timeout,
    /// The host could not be reached, or the connection failed.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The answer was longer than [`MAX_ANSWER_BYTES`].
    #[error("answered more than {MAX_ANSWER_BYTES} bytes")]
    TooLarge,
}

/// The agent client of a worker: HTTP/2 connections pooled per host where the host offers
/// HTTP/2 over TLS, hyper-util over HTTP/1.1 for plain `http://` hosts, reqwest for the rest.
pub struct Transport {
    http1: reqwest::Client,
    plain: Option<PlainHttp1>,
    http2: Option<Arc<Http2Pool>>,
}

impl Transport {
    /// A transport whose HTTP/1.1 side keeps up to `concurrency` connections per host open
    /// between calls: with fewer, a busy worker closes connections only to open them again for
    /// the next turn, paying a TCP (and TLS) handshake per call.
    pub fn new(concurrency: usize, connect_timeout: Duration) -> Result<Self, reqwest::Error> {
        let http1 = http1_client(concurrency, connect_timeout).build()?;
        let plain = if proxy_configured(&["HTTP_PROXY", "http_proxy"]) {
            tracing::info!("a proxy is configured: plain http:// agent calls go through it");
            None
        } else {
            Some(PlainHttp1::new(concurrency, connect_timeout))
        };
        let http2 = if proxy_configured(&["HTTPS_PROXY", "https_proxy"]) {
            tracing::info!(
                "a proxy is configured: https:// agent calls go through it over HTTP/1.1"
            );
            None
        } else {
            match Http2Pool::new(connect_timeout) {
                Ok(pool) => Some(Arc::new(pool)),
                Err(e) => {
                    tracing::warn!(error = %e, "no TLS configuration for HTTP/2 agent calls; they use HTTP/1.1");
                    None
                }
            }
        };
        Ok(Self {
            http1,
            plain,
            http2,
        })
    }

    /// A transport that trusts only `roots`, on both sides, whatever the platform trusts or a
    /// proxy configured in the environment: for tests against hosts with a test certificate.
    #[cfg(test)]
    fn with_roots(
        concurrency: usize,
        connect_timeout: Duration,
        roots: &[rustls::pki_types::CertificateDer<'static>],
    ) -> Self {
        let certs = roots
            .iter()
            .map(|der| reqwest::Certificate::from_der(der).expect("a root certificate"));
        let http1 = http1_client(concurrency, connect_timeout)
            .no_proxy()
            .tls_certs_only(certs)
            .build()
            .expect("an HTTP/1.1 client");
        let mut store = rustls::RootCertStore::empty();
        for der in roots {
            store.add(der.clone()).expect("a root certificate");
        }
        let pool = Http2Pool::with_roots(connect_timeout, store).expect("a TLS configuration");
        Self {
            http1,
            plain: Some(PlainHttp1::new(concurrency, connect_timeout)),
            http2: Some(Arc::new(pool)),
        }
    }

    /// Sends `post` and reads the answer.
    pub async fn post(&self, post: Post<'_>) -> Result<Answer, CallError> {
        let timeout = post.timeout;
        tokio::time::timeout(timeout, self.exchange(post))
            .await
            .unwrap_or(Err(CallError::Timeout))
    }

    async fn exchange(&self, post: Post<'_>) -> Result<Answer, CallError> {
        if let Some(pool) = &self.http2
            && let Some(known) = pool.known(post.url)
        {
            let (mut refused, mut retired) = (0, 0);
            while let Route::Http2(lease) = known.host.lease(pool).await? {
                match lease.exchange(&known.uri, &post).await {
                    Err(Exchange::Refused(e)) if refused + 1 < ATTEMPTS => {
                        tracing::debug!(error = %e, "an agent host refused a call before processing it; sending it again");
                        refused += 1;
                    }
                    // A host restarting sends every connection away; each one is retired once.
                    Err(Exchange::Retired(e)) if retired + 1 < RETIRED_CONNECTIONS => {
                        tracing::debug!(error = %e, "an agent host's connection ended before the call was processed; sending it on another");
                        retired += 1;
                    }
                    Err(Exchange::Refused(e) | Exchange::Retired(e)) => {
                        return Err(CallError::Unreachable(e.to_string()));
                    }
                    Err(Exchange::Failed(e)) => return Err(e),
                    Ok(answer) => return Ok(answer),
                }
            }
        }
        if let Some(plain) = &self.plain
            && let Some(uri) = PlainHttp1::uri(post.url)
        {
            // Boxed, so that the future of every call, HTTP/2 ones included, does not grow by
            // the room this one needs (184 bytes per call in flight, in a test build).
            return Box::pin(plain.exchange(uri, post)).await;
        }
        self.exchange_http1(post).await
    }

    async fn exchange_http1(&self, post: Post<'_>) -> Result<Answer, CallError> {
        let mut request = self.http1.post(post.url).body(post.body);
        for (name, value) in post.headers {
            request = request.header(name, value);
        }
        let mut response = request.send().await.map_err(reqwest_failure)?;
        let status = response.status();
        let mut body = BytesMut::new();
        while let Some(chunk) = response.chunk().await.map_err(reqwest_failure)? {
            append(&mut body, &chunk)?;
        }
        Ok(Answer {
            status,
            body: body.freeze(),
        })
    }
}

/// The HTTP/1.1 side of [`Transport::new`].
fn http1_client(concurrency: usize, connect_timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        // An agent endpoint that redirects is misconfigured: a 301 would turn the POST into a
        // GET without its body. The 3xx is reported instead, as the HTTP/2 side does.
        .redirect(reqwest::redirect::Policy::none())
        .http1_only()
        .pool_max_idle_per_host(concurrency)
}

fn append(body: &mut BytesMut, chunk: &[u8]) -> Result<(), CallError> {
    if body.len() + chunk.len() > MAX_ANSWER_BYTES {
        return Err(CallError::TooLarge);
    }
    body.extend_from_slice(chunk);
    Ok(())
}

fn reqwest_failure(e: reqwest::Error) -> CallError {
    if e.is_timeout() {
        return CallError::Timeout;
    }
    let mut text = e.to_string();
    if let Some(url) = e.url() {
        text = text.replace(url.as_str(), "<url>");
    }
    CallError::Unreachable(text)
}

/// Whether reqwest would send calls through a proxy named in `names` (the scheme's variables)
/// or in `ALL_PROXY`. Neither the HTTP/2 pool nor the plain HTTP/1.1 client speaks to proxies,
/// so with one configured for a scheme, that scheme's calls go through reqwest.
fn proxy_configured(names: &[&str]) -> bool {
    names
        .iter()
        .chain(&["ALL_PROXY", "all_proxy"])
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
}

#[cfg(test)]
mod tests;
