//! The HTTP/2 pool: per host, its connections with their stream caps and streams in use, the
//! calls waiting for a stream, and the connections being opened (see the crate's README).

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use h2::{Reason, client::SendRequest};
use http::{Request, Uri};
use tokio::sync::oneshot;
use tokio_rustls::{
    TlsConnector,
    rustls::{self, pki_types::ServerName},
};

use crate::{
    ATTEMPTS, Answer, CallError, Post, append,
    connect::{OpenError, connect_tcp},
};

/// Streams put on one HTTP/2 connection even when the host allows more, so that a burst is
/// spread over a few connections (and the host's threads) rather than queued on one socket.
pub(crate) const MAX_STREAMS_PER_CONNECTION: usize = 1000;
/// Connections opened to one host at once when a burst of calls finds every one full: over a
/// network each takes a few round trips, and one after another they would hold the burst up.
pub(crate) const MAX_OPENING: usize = 8;
/// An HTTP/2 connection without a call for this long is let go, as reqwest does with HTTP/1.1.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a host that answered ALPN with HTTP/1.1 only is not asked again.
pub(crate) const HTTP1_HOST_RECHECK: Duration = Duration::from_secs(600);
/// Attempts of a call that the host refused before processing it (REFUSED_STREAM), and of
/// Connections a call may find ended or going away (GOAWAY) before it was processed, moving
/// Agent URLs the pool keeps taken apart; past this it starts over, so that URLs of agents
/// long gone do not pile up.
pub(crate) const MAX_KNOWN_URLS: usize = 4096;
/// The response window of an HTTP/2 connection: many answers arrive at once on one.
pub(crate) const CONNECTION_WINDOW: u32 = 4 << 20;
/// The most header bytes an answer may carry.
pub(crate) const MAX_HEADER_LIST: u32 = 64 << 10;

/// An `https://` URL taken apart for the pool.
pub(crate) struct Target {
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
pub(crate) struct KnownUrl {
    pub(crate) uri: Uri,
    pub(crate) host: Arc<Host>,
}

pub(crate) struct Http2Pool {
    tls: TlsConnector,
    connect_timeout: Duration,
    pub(crate) hosts: Mutex<HashMap<String, Arc<Host>>>,
    /// Each agent URL called so far, taken apart once (`None`: left to reqwest). Parsing it
    /// for every call cost about 8,000 instructions, as a `Url` and again as a `Uri`.
    pub(crate) urls: Mutex<HashMap<String, Option<Arc<KnownUrl>>>>,
    epoch: Instant,
}

impl Http2Pool {
    pub(crate) fn new(connect_timeout: Duration) -> Result<Self, rustls::Error> {
        use rustls_platform_verifier::BuilderVerifierExt;
        let config = Self::tls_builder()?
            .with_platform_verifier()?
            .with_no_client_auth();
        Ok(Self::with_config(config, connect_timeout))
    }

    /// A pool whose hosts must have certificates that `roots` vouch for.
    #[cfg(test)]
    pub(crate) fn with_roots(
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
    pub(crate) fn known(&self, url: &str) -> Option<Arc<KnownUrl>> {
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
    async fn open(&self, host: &Host) -> Result<Option<Arc<Conn>>, OpenError> {
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
            Err(OpenError::SentAway)
        };
        tokio::time::timeout(self.connect_timeout, attempts)
            .await
            .unwrap_or(Err(OpenError::TimedOut))
    }

    async fn open_within(&self, host: &Host) -> Result<Option<Arc<Conn>>, Opening> {
        let tcp = connect_tcp(&host.host, host.port)
            .await
            .map_err(Opening::Failed)?;
        let tls = self
            .tls
            .connect(host.server.clone(), tcp)
            .await
            .map_err(|e| Opening::Failed(OpenError::Tls(Arc::new(e))))?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Ok(None);
        }
        let (send, mut connection) = h2::client::Builder::new()
            .enable_push(false)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(MAX_HEADER_LIST)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| {
                Opening::Failed(OpenError::Http2 {
                    step: "handshake",
                    source: Arc::new(e),
                })
            })?;
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
                _ => Opening::Failed(OpenError::Http2 {
                    step: "settings",
                    source: Arc::new(e),
                }),
            });
        }
        if conn.send.current_max_send_streams() == 0 {
            // Legal, and said by servers under load; opening more would only add connections
            // that take no call either.
            return Err(Opening::Failed(OpenError::NoStreams));
        }
        Ok(Some(conn))
    }
}

/// Why a connection was not opened.
pub(crate) enum Opening {
    Failed(OpenError),
    /// The host said GOAWAY before any call went out on the connection.
    SentAway,
}

/// A graceful GOAWAY from the host: streams it did not take were not processed (RFC 9113, 6.8).
pub(crate) fn sent_away(e: &h2::Error) -> bool {
    e.is_go_away() && e.is_remote() && e.reason() == Some(Reason::NO_ERROR)
}

/// The HTTP/2 connections of one host.
pub(crate) struct Host {
    host: String,
    port: u16,
    server: ServerName<'static>,
    pub(crate) state: Mutex<HostState>,
    /// How many calls wait in [`HostState::waiters`], readable without the lock: a call that
    /// ends looks at it to learn whether its stream has someone to go to.
    queued: AtomicUsize,
}

/// What a waiting call is handed: a route, or why the host could not be reached.
pub(crate) type Grant = Result<Route, OpenError>;

#[derive(Default)]
pub(crate) struct HostState {
    pub(crate) conns: Vec<Arc<Conn>>,
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

pub(crate) enum Route {
    Http1,
    Http2(Lease),
}

impl Host {
    /// A stream on a connection with room. When every connection is full, the call waits in
    /// line and connections are opened, as many at once as the waiting calls fill (one until
    /// the host's cap is known, at most [`MAX_OPENING`]), each by a task of its own so that a
    /// call timing out does not abandon it.
    pub(crate) async fn lease(self: &Arc<Self>, pool: &Arc<Http2Pool>) -> Result<Route, CallError> {
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
            Ok(Err(e)) => Err(CallError::Unreachable(e.to_string())),
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
        result: Result<Option<Arc<Conn>>, OpenError>,
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
pub(crate) struct Conn {
    send: SendRequest<Bytes>,
    in_flight: AtomicUsize,
    /// Set when the connection ended, or when it must take no new call.
    pub(crate) closed: Arc<AtomicBool>,
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
pub(crate) struct Lease {
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

pub(crate) enum Exchange {
    /// The host refused the stream without processing it; the connection goes on.
    Refused(h2::Error),
    /// The connection ended, or is ending, before the request was processed; the pool takes
    /// no more calls on it, and this one may go on another.
    Retired(h2::Error),
    Failed(CallError),
}

impl Lease {
    pub(crate) async fn exchange(self, uri: &Uri, post: &Post<'_>) -> Result<Answer, Exchange> {
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
