//! Plain `http://` agent calls, on hyper-util's client rather than reqwest's. HTTP/1.1 takes
//! a connection per call in flight, so a worker holding 10,000 calls holds 10,000 connections,
//! and what each costs is most of its memory. Under reqwest each call also carries its layers
//! (redirects, retries, proxies, a boxed future per layer, a copy of the headers for each):
//! 10,000 calls at once took 294 MiB through reqwest and 269 MiB through hyper-util (T1 over
//! plain HTTP/1.1, docs/benchmarks.md, "P3 on default settings"). What hyper itself keeps per
//! connection (an 8 KiB write buffer, the 9 KB block of its request channel, an 8 KiB read
//! buffer) stays: a read buffer of an exact 1 KiB saved another 25 MiB, but hyper then refuses
//! an answer whose head is longer, and one of 4 KiB saved nothing.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};

use crate::{
    Answer, CallError, Post, append,
    connect::{ATTEMPT_DELAY, SILENCE},
};

/// An idle connection is let go after this long, as reqwest and the HTTP/2 pool do.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The client of plain `http://` hosts.
pub(crate) struct PlainHttp1 {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl PlainHttp1 {
    /// Keeps up to `concurrency` idle connections per host, as [`crate::Transport::new`]
    /// explains; connections find a host gone silent as the HTTP/2 pool's do.
    pub(crate) fn new(concurrency: usize, connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_happy_eyeballs_timeout(Some(ATTEMPT_DELAY));
        connector.set_nodelay(true);
        connector.set_keepalive(Some(SILENCE));
        connector.set_keepalive_interval(Some(SILENCE / 3));
        connector.set_keepalive_retries(Some(3));
        #[cfg(target_os = "linux")]
        connector.set_tcp_user_timeout(Some(SILENCE));
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(concurrency)
            .pool_idle_timeout(IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .build(connector);
        Self { client }
    }

    /// `url` as this client calls it: `None` for a URL that is not `http://`, or that carries
    /// credentials, which reqwest turns into an `Authorization` header.
    pub(crate) fn uri(url: &str) -> Option<Uri> {
        let uri: Uri = url.parse().ok()?;
        (uri.scheme() == Some(&http::uri::Scheme::HTTP)
            && uri.authority().is_some_and(|a| !a.as_str().contains('@')))
        .then_some(uri)
    }

    /// Sends `post` to `uri` and reads the answer.
    pub(crate) async fn exchange(&self, uri: Uri, post: Post<'_>) -> Result<Answer, CallError> {
        let mut request = Request::post(uri);
        for (name, value) in post.headers {
            request = request.header(name, value);
        }
        let request = request
            .body(Full::new(post.body))
            .map_err(|e| CallError::Unreachable(e.to_string()))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| failure(&e))?;
        let status = response.status();
        let mut answer = response.into_body();
        let mut body = BytesMut::new();
        while let Some(frame) = answer.frame().await {
            if let Ok(data) = frame.map_err(|e| failure(&e))?.into_data() {
                append(&mut body, &data)?;
            }
        }
        Ok(Answer {
            status,
            body: body.freeze(),
        })
    }
}

/// `e` with the errors under it, which say what failed (hyper-util's own text is only
/// "client error (Connect)"). None of them holds the URL.
fn failure(e: &(dyn std::error::Error + 'static)) -> CallError {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    CallError::Unreachable(text)
}
