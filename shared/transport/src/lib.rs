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
//! Plain `http://` hosts, hosts that answer ALPN with HTTP/1.1, and every host when a proxy is
//! configured go through reqwest over HTTP/1.1, a connection per call in flight.

use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use futures::{StreamExt, stream::FuturesUnordered};
use h2::{Reason, client::SendRequest};
use http::{HeaderName, HeaderValue, Request, StatusCode, Uri};
use tokio::{net::TcpStream, sync::oneshot};
use tokio_rustls::{
    TlsConnector,
    rustls::{self, pki_types::ServerName},
};

/// The most an agent's answer may hold; a reply longer than this is no WhatsApp reply.
pub const MAX_ANSWER_BYTES: usize = 1 << 20;
/// Streams put on one HTTP/2 connection even when the host allows more, so that a burst is
/// spread over a few connections (and the host's threads) rather than queued on one socket.
const MAX_STREAMS_PER_CONNECTION: usize = 1000;
/// Connections opened to one host at once when a burst of calls finds every one full: over a
/// network each takes a few round trips, and one after another they would hold the burst up.
const MAX_OPENING: usize = 8;
/// An HTTP/2 connection without a call for this long is let go, as reqwest does with HTTP/1.1.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a host that answered ALPN with HTTP/1.1 only is not asked again.
const HTTP1_HOST_RECHECK: Duration = Duration::from_secs(600);
/// Attempts of a call that the host refused before processing it (REFUSED_STREAM), and of
/// opening a connection that the host sends away at once.
const ATTEMPTS: usize = 3;
/// Connections a call may find ended or going away (GOAWAY) before it was processed, moving
/// on to another each time: a host that restarts sends all of them away.
const RETIRED_CONNECTIONS: usize = 8;
/// Agent URLs the pool keeps taken apart; past this it starts over, so that URLs of agents
/// long gone do not pile up.
const MAX_KNOWN_URLS: usize = 4096;
/// The response window of an HTTP/2 connection: many answers arrive at once on one.
const CONNECTION_WINDOW: u32 = 4 << 20;
/// The most header bytes an answer may carry.
const MAX_HEADER_LIST: u32 = 64 << 10;

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
/// HTTP/2 over TLS, reqwest over HTTP/1.1 everywhere else.
pub struct Transport {
    http1: reqwest::Client,
    http2: Option<Arc<Http2Pool>>,
}

impl Transport {
    /// A transport whose HTTP/1.1 side keeps up to `concurrency` connections per host open
    /// between calls: with fewer, a busy worker closes connections only to open them again for
    /// the next turn, paying a TCP (and TLS) handshake per call.
    pub fn new(concurrency: usize, connect_timeout: Duration) -> Result<Self, reqwest::Error> {
        let http1 = http1_client(concurrency, connect_timeout).build()?;
        let http2 = if proxy_configured() {
            tracing::info!("a proxy is configured: agent calls go through it over HTTP/1.1");
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
        Ok(Self { http1, http2 })
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

/// reqwest sends calls through a proxy named in these; the HTTP/2 pool does not speak to
/// proxies, so with one configured every call goes through reqwest.
fn proxy_configured() -> bool {
    ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
}

/// An `https://` URL taken apart for the pool.
struct Target {
    uri: Uri,
    /// `host:port`, the pool's key.
    authority: String,
    host: String,
    port: u16,
}

impl Target {
    fn https(url: &str) -> Option<Target> {
        let parsed = reqwest::Url::parse(url).ok()?;
        // reqwest turns credentials in the URL into an Authorization header; left to it.
        if parsed.scheme() != "https"
            || !parsed.username().is_empty()
            || parsed.password().is_some()
        {
            return None;
        }
        let port = parsed.port_or_known_default()?;
        let host = parsed
            .host_str()?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Some(Target {
            uri: parsed.as_str().parse().ok()?,
            authority: format!("{host}:{port}"),
            host,
            port,
        })
    }
}

/// An agent URL the pool serves: its request URI and its host.
struct KnownUrl {
    uri: Uri,
    host: Arc<Host>,
}

struct Http2Pool {
    tls: TlsConnector,
    connect_timeout: Duration,
    hosts: Mutex<HashMap<String, Arc<Host>>>,
    /// Each agent URL called so far, taken apart once (`None`: left to reqwest). Parsing it
    /// for every call cost about 8,000 instructions, as a `Url` and again as a `Uri`.
    urls: Mutex<HashMap<String, Option<Arc<KnownUrl>>>>,
    epoch: Instant,
}

impl Http2Pool {
    fn new(connect_timeout: Duration) -> Result<Self, rustls::Error> {
        use rustls_platform_verifier::BuilderVerifierExt;
        let config = Self::tls_builder()?
            .with_platform_verifier()?
            .with_no_client_auth();
        Ok(Self::with_config(config, connect_timeout))
    }

    /// A pool whose hosts must have certificates that `roots` vouch for.
    #[cfg(test)]
    fn with_roots(
        connect_timeout: Duration,
        roots: rustls::RootCertStore,
    ) -> Result<Self, rustls::Error> {
        let config = Self::tls_builder()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self::with_config(config, connect_timeout))
    }

    /// TLS as every pool speaks it, before the choice of whom to trust.
    fn tls_builder()
    -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>, rustls::Error>
    {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions()
    }

    /// A pool on `config`, offering HTTP/2 and HTTP/1.1 by ALPN.
    fn with_config(mut config: rustls::ClientConfig, connect_timeout: Duration) -> Self {
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Self {
            tls: TlsConnector::from(Arc::new(config)),
            connect_timeout,
            hosts: Mutex::new(HashMap::new()),
            urls: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
        }
    }

    /// What the pool knows of `url`, from its first call on; `None` for URLs left to reqwest
    /// (not `https://`, credentials in the URL, a host name that cannot be a TLS server
    /// name). Agent URLs come from the agents' settings, so the map holds one entry per URL
    /// configured, up to [`MAX_KNOWN_URLS`].
    fn known(&self, url: &str) -> Option<Arc<KnownUrl>> {
        if let Some(known) = self
            .urls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(url)
        {
            return known.clone();
        }
        let known = Target::https(url).and_then(|target| {
            Some(Arc::new(KnownUrl {
                host: self.host(&target)?,
                uri: target.uri,
            }))
        });
        let mut urls = self.urls.lock().unwrap_or_else(PoisonError::into_inner);
        if urls.len() >= MAX_KNOWN_URLS {
            // Agents come and go and change their URLs; what is forgotten is taken apart again
            // on its next call, and hosts no call holds lose their idle connections with it.
            urls.clear();
            self.hosts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|_, host| Arc::strong_count(host) > 1);
        }
        urls.insert(url.to_owned(), known.clone());
        known
    }

    /// The host of `target`, kept from the first call to it on; `None` when its name cannot
    /// be a TLS server name, which is left to reqwest.
    fn host(&self, target: &Target) -> Option<Arc<Host>> {
        let mut hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(host) = hosts.get(&target.authority) {
            return Some(host.clone());
        }
        let server = match target.host.parse::<IpAddr>() {
            Ok(ip) => ServerName::from(ip),
            Err(_) => ServerName::try_from(target.host.clone()).ok()?,
        };
        let host = Arc::new(Host {
            host: target.host.clone(),
            port: target.port,
            server,
            state: Mutex::new(HostState::default()),
            queued: AtomicUsize::new(0),
        });
        hosts.insert(target.authority.clone(), host.clone());
        Some(host)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Opens a connection to `host`: `None` when the host chose HTTP/1.1 by ALPN. Returns
    /// once the host's settings (its stream cap) are in, which its answer to a PING proves.
    /// A host that is shutting down may send a new connection away at once; another attempt
    /// may well reach one that is not, so that is tried a few times within the timeout.
    async fn open(&self, host: &Host) -> Result<Option<Arc<Conn>>, String> {
        let attempts = async {
            for _ in 0..ATTEMPTS {
                match self.open_within(host).await {
                    Err(Opening::SentAway) => {
                        tracing::debug!(host = %host.host, "an agent host sent a new HTTP/2 connection away; opening another");
                    }
                    Err(Opening::Failed(e)) => return Err(e),
                    Ok(conn) => return Ok(conn),
                }
            }
            Err("HTTP/2: the host sent every new connection away (GOAWAY)".to_owned())
        };
        tokio::time::timeout(self.connect_timeout, attempts)
            .await
            .unwrap_or_else(|_| Err("connect: timed out".to_owned()))
    }

    async fn open_within(&self, host: &Host) -> Result<Option<Arc<Conn>>, Opening> {
        let tcp = connect_tcp(&host.host, host.port)
            .await
            .map_err(Opening::Failed)?;
        let tls = self
            .tls
            .connect(host.server.clone(), tcp)
            .await
            .map_err(|e| Opening::Failed(format!("TLS: {e}")))?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Ok(None);
        }
        let (send, mut connection) = h2::client::Builder::new()
            .enable_push(false)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(MAX_HEADER_LIST)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| Opening::Failed(format!("HTTP/2 handshake: {e}")))?;
        let ping = connection.ping_pong();
        let conn = Arc::new(Conn {
            send,
            in_flight: AtomicUsize::new(0),
            closed: Arc::new(AtomicBool::new(false)),
            idle_since_ms: AtomicU64::new(self.now_ms()),
        });
        // The task holds the flag, not the connection: h2 ends a connection once no stream and
        // no `SendRequest` is left, so the pool letting go of an idle one closes it.
        let closed = conn.closed.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "an HTTP/2 connection to an agent host ended");
            }
            closed.store(true, Ordering::Release);
        });
        if let Some(mut ping) = ping
            && let Err(e) = ping.ping(h2::Ping::opaque()).await
        {
            // h2 closes a connection that was sent away while no stream was open, which is
            // why the PING failed; the connection's own error tells whether that happened.
            return Err(match conn.send.clone().ready().await {
                Err(e) if sent_away(&e) => Opening::SentAway,
                _ => Opening::Failed(format!("HTTP/2 settings: {e}")),
            });
        }
        if conn.send.current_max_send_streams() == 0 {
            // Legal, and said by servers under load; opening more would only add connections
            // that take no call either.
            return Err(Opening::Failed(
                "HTTP/2: the host allows no request at the moment (SETTINGS_MAX_CONCURRENT_STREAMS 0)"
                    .to_owned(),
            ));
        }
        Ok(Some(conn))
    }
}

/// Why a connection was not opened.
enum Opening {
    Failed(String),
    /// The host said GOAWAY before any call went out on the connection.
    SentAway,
}

/// A graceful GOAWAY from the host: streams it did not take were not processed (RFC 9113, 6.8).
fn sent_away(e: &h2::Error) -> bool {
    e.is_go_away() && e.is_remote() && e.reason() == Some(Reason::NO_ERROR)
}

/// Resolves `host` and connects to the first of its addresses that answers.
async fn connect_tcp(host: &str, port: u16) -> Result<TcpStream, String> {
    let addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("resolve: {e}"))?
        .collect();
    let tcp = connect_any(&interleave_families(addrs)).await?;
    // Requests are written whole; waiting to coalesce them only adds latency.
    let _ = tcp.set_nodelay(true);
    detect_silent_loss(&tcp);
    Ok(tcp)
}

/// How long an attempt to one address has before the next address is tried beside it
/// (RFC 8305's Connection Attempt Delay).
const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// The resolver's addresses, alternating between IPv6 and IPv4 from the family of the first,
/// as RFC 8305 orders them: a host whose addresses of one family are unreachable is reached
/// on the other after one attempt delay, not after trying each of them.
fn interleave_families(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let first_v6 = addrs.first().is_some_and(SocketAddr::is_ipv6);
    let (v6, v4): (Vec<_>, Vec<_>) = addrs.into_iter().partition(SocketAddr::is_ipv6);
    let (mut first, mut second) = if first_v6 {
        (v6.into_iter(), v4.into_iter())
    } else {
        (v4.into_iter(), v6.into_iter())
    };
    let mut ordered = Vec::new();
    loop {
        match (first.next(), second.next()) {
            (None, None) => return ordered,
            (a, b) => ordered.extend(a.into_iter().chain(b)),
        }
    }
}

/// Connects to the first of `addrs` to answer (Happy Eyeballs, RFC 8305): an attempt starts on
/// the next address when the one before fails or has not answered within [`ATTEMPT_DELAY`],
/// the earlier ones going on beside it. Trying them one after another, an address that drops
/// packets would hold the connection until its timeout, whatever the next address could do.
async fn connect_any(addrs: &[SocketAddr]) -> Result<TcpStream, String> {
    let mut untried = addrs.iter();
    let mut attempts = FuturesUnordered::new();
    let mut last_error = "resolve: no address".to_owned();
    loop {
        if attempts.is_empty() {
            match untried.next() {
                Some(addr) => attempts.push(TcpStream::connect(*addr)),
                None => return Err(last_error),
            }
        }
        tokio::select! {
            Some(attempt) = attempts.next() => match attempt {
                Ok(tcp) => return Ok(tcp),
                Err(e) => {
                    last_error = format!("connect: {e}");
                    if let Some(addr) = untried.next() {
                        attempts.push(TcpStream::connect(*addr));
                    }
                }
            },
            () = tokio::time::sleep(ATTEMPT_DELAY), if untried.len() > 0 => {
                if let Some(addr) = untried.next() {
                    attempts.push(TcpStream::connect(*addr));
                }
            }
        }
    }
}

/// How long a connection may go without a sign of life from the host while it is idle, or
/// with a request unacknowledged, before the kernel gives it up.
const SILENCE: Duration = Duration::from_secs(30);

/// A host that vanished without a word (a NAT or load balancer that forgot the connection)
/// leaves a connection that shows no error by itself, and the pool would go on giving it calls
/// that can only time out. Keepalive probes find it while idle, and the user timeout while a
/// request waits for its acknowledgement; either ends the connection, which retires it.
fn detect_silent_loss(tcp: &TcpStream) {
    let socket = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(SILENCE)
        .with_interval(SILENCE / 3);
    #[cfg(target_os = "linux")]
    let keepalive = keepalive.with_retries(3);
    let _ = socket.set_tcp_keepalive(&keepalive);
    #[cfg(target_os = "linux")]
    let _ = socket.set_tcp_user_timeout(Some(SILENCE));
}

/// The HTTP/2 connections of one host.
struct Host {
    host: String,
    port: u16,
    server: ServerName<'static>,
    state: Mutex<HostState>,
    /// How many calls wait in [`HostState::waiters`], readable without the lock: a call that
    /// ends looks at it to learn whether its stream has someone to go to.
    queued: AtomicUsize,
}

/// What a waiting call is handed: a route, or why the host could not be reached.
type Grant = Result<Route, String>;

#[derive(Default)]
struct HostState {
    conns: Vec<Arc<Conn>>,
    /// Connections being opened, each by a task of its own.
    connecting: usize,
    /// Calls that found every connection full, oldest first. Each is handed a stream as one
    /// frees up or a connection opens, so a connection wakes only the calls it can take.
    /// Calls that stopped waiting (their timeout ran out) stay until their turn comes and are
    /// skipped then.
    waiters: VecDeque<oneshot::Sender<Grant>>,
    /// The stream cap of the newest connection, so how many waiting calls one more serves;
    /// 0 until a connection told.
    cap: usize,
    http1_until: Option<Instant>,
}

enum Route {
    Http1,
    Http2(Lease),
}

impl Host {
    /// A stream on a connection with room. When every connection is full, the call waits in
    /// line and connections are opened, as many at once as the waiting calls fill (one until
    /// the host's cap is known, at most [`MAX_OPENING`]), each by a task of its own so that a
    /// call timing out does not abandon it.
    async fn lease(self: &Arc<Self>, pool: &Arc<Http2Pool>) -> Result<Route, CallError> {
        let (granted, spare) = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            if state.http1_until.is_some_and(|t| Instant::now() < t) {
                return Ok(Route::Http1);
            }
            let now = pool.now_ms();
            state.conns.retain(|c| c.usable(now));
            if state.waiters.is_empty()
                && let Some(conn) = state.conns.iter().find(|c| c.has_room())
            {
                return Ok(Route::Http2(Lease::new(conn, self, pool)));
            }
            let (tx, rx) = oneshot::channel();
            state.waiters.push_back(tx);
            self.queued.store(state.waiters.len(), Ordering::SeqCst);
            // Looked at again after joining the line: a call that ended between the look
            // above and the line's count going up saw no one waiting and gave its stream to
            // no one.
            let spare = self.serve_waiters(&mut state, pool);
            self.open_more(&mut state, pool);
            (rx, spare)
        };
        drop(spare);
        match granted.await {
            Ok(Ok(route)) => Ok(route),
            Ok(Err(e)) => Err(CallError::Unreachable(e)),
            Err(_) => Err(CallError::Unreachable(
                "the connection pool let go of the call".to_owned(),
            )),
        }
    }

    /// Hands streams on connections with room to waiting calls, oldest first. Returns the
    /// streams of calls that stopped waiting just as theirs came, to be given back once the
    /// lock is released (giving one back may serve another call, which takes the lock).
    fn serve_waiters(self: &Arc<Self>, state: &mut HostState, pool: &Arc<Http2Pool>) -> Vec<Lease> {
        let mut spare = Vec::new();
        if state.waiters.is_empty() {
            return spare;
        }
        let now = pool.now_ms();
        state.conns.retain(|c| c.usable(now));
        for conn in &state.conns {
            while !state.waiters.is_empty() && conn.has_room() {
                let Some(waiter) = state.waiters.pop_front() else {
                    break;
                };
                if waiter.is_closed() {
                    continue;
                }
                if let Err(Ok(Route::Http2(lease))) =
                    waiter.send(Ok(Route::Http2(Lease::new(conn, self, pool))))
                {
                    spare.push(lease);
                }
            }
        }
        self.queued.store(state.waiters.len(), Ordering::SeqCst);
        spare
    }

    /// Starts opening connections until as many are underway as the waiting calls fill.
    fn open_more(self: &Arc<Self>, state: &mut HostState, pool: &Arc<Http2Pool>) {
        let wanted = match (state.waiters.len(), state.cap) {
            (0, _) => 0,
            (_, 0) => 1,
            (waiting, cap) => waiting.div_ceil(cap).min(MAX_OPENING),
        };
        while state.connecting < wanted {
            state.connecting += 1;
            let (host, pool) = (self.clone(), pool.clone());
            tokio::spawn(async move {
                let result = pool.open(&host).await;
                host.opened_with(&pool, result);
            });
        }
    }

    /// Takes in what came of one connection attempt. A failure fails the waiting calls only
    /// when no other attempt is underway: one connection refused in a burst of several does not
    /// fail the calls the others will carry.
    fn opened_with(
        self: &Arc<Self>,
        pool: &Arc<Http2Pool>,
        result: Result<Option<Arc<Conn>>, String>,
    ) {
        let spare = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.connecting = state.connecting.saturating_sub(1);
            match result {
                Ok(Some(conn)) => {
                    state.cap = conn.cap();
                    tracing::debug!(
                        host = %self.host,
                        connections = state.conns.len() + 1,
                        streams = state.cap,
                        "opened an HTTP/2 connection to an agent host"
                    );
                    state.conns.push(conn);
                    let spare = self.serve_waiters(&mut state, pool);
                    self.open_more(&mut state, pool);
                    spare
                }
                Ok(None) => {
                    state.http1_until = Some(Instant::now() + HTTP1_HOST_RECHECK);
                    self.answer_all(&mut state, || Ok(Route::Http1));
                    Vec::new()
                }
                Err(e) => {
                    if state.connecting == 0 {
                        self.answer_all(&mut state, || Err(e.clone()));
                    }
                    Vec::new()
                }
            }
        };
        drop(spare);
    }

    /// Answers every waiting call the same way.
    fn answer_all(&self, state: &mut HostState, grant: impl Fn() -> Grant) {
        for waiter in state.waiters.drain(..) {
            let _ = waiter.send(grant());
        }
        self.queued.store(0, Ordering::SeqCst);
    }
}

/// One HTTP/2 connection to an agent host.
struct Conn {
    send: SendRequest<Bytes>,
    in_flight: AtomicUsize,
    /// Set when the connection ended, or when it must take no new call.
    closed: Arc<AtomicBool>,
    idle_since_ms: AtomicU64,
}

impl Conn {
    /// The calls it takes at once: the host's stream cap, up to ours.
    fn cap(&self) -> usize {
        self.send
            .current_max_send_streams()
            .min(MAX_STREAMS_PER_CONNECTION)
    }

    fn has_room(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) < self.cap()
    }

    /// Open, and either busy or idle for less than [`IDLE_TIMEOUT`].
    fn usable(&self, now_ms: u64) -> bool {
        let idle_ms = now_ms.saturating_sub(self.idle_since_ms.load(Ordering::Acquire));
        !self.closed.load(Ordering::Acquire)
            && (self.in_flight.load(Ordering::Acquire) > 0
                || u128::from(idle_ms) < IDLE_TIMEOUT.as_millis())
    }
}

/// A stream taken on a connection, given back when dropped.
struct Lease {
    conn: Arc<Conn>,
    host: Arc<Host>,
    pool: Arc<Http2Pool>,
}

impl Lease {
    /// Takes a stream on `conn`, which the caller saw with room.
    fn new(conn: &Arc<Conn>, host: &Arc<Host>, pool: &Arc<Http2Pool>) -> Self {
        conn.in_flight.fetch_add(1, Ordering::SeqCst);
        Self {
            conn: conn.clone(),
            host: host.clone(),
            pool: pool.clone(),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Stamped first: a connection seen with no call in flight must not look idle since
        // before this call.
        self.conn
            .idle_since_ms
            .store(self.pool.now_ms(), Ordering::Release);
        // The stream is given back before the line is looked at, and a waiting call joins the
        // line before it looks for room (both sequentially consistent), so one of the two sees
        // the other: no call waits while a stream is free.
        self.conn.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.host.queued.load(Ordering::SeqCst) > 0 {
            let spare = {
                let mut state = self
                    .host
                    .state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                self.host.serve_waiters(&mut state, &self.pool)
            };
            drop(spare);
        }
    }
}

enum Exchange {
    /// The host refused the stream without processing it; the connection goes on.
    Refused(h2::Error),
    /// The connection ended, or is ending, before the request was processed; the pool takes
    /// no more calls on it, and this one may go on another.
    Retired(h2::Error),
    Failed(CallError),
}

impl Lease {
    async fn exchange(self, uri: &Uri, post: &Post<'_>) -> Result<Answer, Exchange> {
        let failed = |e: h2::Error| Exchange::Failed(CallError::Unreachable(e.to_string()));
        // Nothing was sent on a connection that is not ready, or that refused the stream; a
        // user error is about the request, not the connection.
        let unsent = |e: h2::Error| {
            // h2's user errors are the ones with neither an I/O error nor a protocol reason.
            if !e.is_io() && e.reason().is_none() {
                return failed(e);
            }
            self.conn.closed.store(true, Ordering::Release);
            Exchange::Retired(e)
        };
        let mut send = self.conn.send.clone().ready().await.map_err(unsent)?;
        let mut request = Request::post(uri.clone());
        for (name, value) in &post.headers {
            request = request.header(name, value);
        }
        let request = request
            .header(http::header::CONTENT_LENGTH, post.body.len())
            .body(())
            .map_err(|e| Exchange::Failed(CallError::Unreachable(e.to_string())))?;
        let (response, mut stream) = send
            .send_request(request, post.body.is_empty())
            .map_err(unsent)?;
        if !post.body.is_empty() {
            // This fails only when the stream or the connection has already ended (the host
            // may have refused the stream right after its headers); the response tells why.
            let _ = stream.send_data(post.body.clone(), true);
        }
        let response = response.await.map_err(|e| {
            // REFUSED_STREAM, or a graceful GOAWAY that ended this stream, is the host's word
            // that it did not process the request (RFC 9113, 6.8 and 8.7).
            if e.reason() == Some(Reason::REFUSED_STREAM) {
                Exchange::Refused(e)
            } else if sent_away(&e) {
                unsent(e)
            } else {
                failed(e)
            }
        })?;
        let status = response.status();
        let mut recv = response.into_body();
        let mut body = BytesMut::new();
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.map_err(failed)?;
            let _ = recv.flow_control().release_capacity(chunk.len());
            append(&mut body, &chunk).map_err(Exchange::Failed)?;
        }
        Ok(Answer {
            status,
            body: body.freeze(),
        })
    }
}

#[cfg(test)]
mod tests;
