//! The HTTP/2 pool of [`Transport`] against a scripted agent host ([`TestHost`]): refusals,
//! GOAWAY, closed connections, oversized and missing answers, unreachable hosts, stream caps.
//! The transport trusts the fixture CA through [`Transport::with_roots`].

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use futures::future::join_all;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
    task::AbortHandle,
};
use tokio_rustls::{
    TlsAcceptor,
    rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};

use super::*;
use crate::connect::{SILENCE, connect_any, connect_tcp, interleave_families};
use crate::pool::MAX_KNOWN_URLS;
use h2::Reason;

/// The test certificate for 127.0.0.1 and the CA that signed it.
const FIXTURES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/agent-tls"
);
/// What every test call sends, and what [`Reply::Echo`] sends back.
const BODY: &[u8] = br#"{"message":"hello"}"#;
/// For calls that are expected to be answered: long enough never to run out on a slow machine.
const PATIENT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// The test host.

/// What the test host does with one request, chosen by [`Script::reply`] from the request's
/// number: 0 for the first request the host saw, over all its connections.
#[derive(Clone, Copy, Debug)]
enum Reply {
    /// `200`, echoing the request body.
    Echo,
    /// `200` with a body of this many bytes.
    Bytes(usize),
    /// `200`, echoing, once the host has seen this many requests in all.
    EchoOnceSeen(usize),
    /// RST_STREAM(REFUSED_STREAM): refused without processing.
    Refuse,
    /// Refused as [`Reply::Refuse`] the first time its `x-call` header is seen; echoed after.
    RefuseFirstOfEachCall,
    /// A graceful GOAWAY on the request's connection, then [`Reply::EchoOnceSeen`]: the host is
    /// going away but finishes the requests it took. [`TestHost::went_away`] tells when the
    /// client has read the GOAWAY.
    GoAwayThenEchoOnceSeen(usize),
    /// No answer at all; the stream stays open.
    Never,
}

/// What the test host does with a connection it just accepted, chosen by
/// [`Script::at_accept`] from the connection's number: 0 for the first.
#[derive(Clone, Copy, Debug)]
enum AtAccept {
    /// Goes on to the TLS handshake (after [`Script::tls_delay`]).
    Proceed,
    /// Closes it at once: the client's TLS handshake fails.
    Close,
    /// Holds it without a word for longer than any test waits.
    Stall,
}

/// How the test host behaves.
#[derive(Clone, Copy)]
struct Script {
    /// Offers `h2` and `http/1.1` by ALPN; `false` offers `http/1.1` only, then answers one
    /// request per connection, echoing it.
    h2: bool,
    /// The SETTINGS_MAX_CONCURRENT_STREAMS it announces, if any.
    max_streams: Option<u32>,
    /// What each connection meets first, by its number.
    at_accept: fn(usize) -> AtAccept,
    /// How long each connection waits between the TCP accept and the TLS handshake.
    tls_delay: Duration,
    /// The first this many connections send a graceful GOAWAY as soon as the HTTP/2
    /// handshake is done, before any request.
    go_away_at_handshake: usize,
    /// The first this many connections answer every request with GOAWAY(last stream 0,
    /// NO_ERROR): "nothing on this connection was processed".
    go_away_unprocessed: usize,
    /// What to do with each request, by its number.
    reply: fn(usize) -> Reply,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            h2: true,
            max_streams: None,
            at_accept: |_| AtAccept::Proceed,
            tls_delay: Duration::ZERO,
            go_away_at_handshake: 0,
            go_away_unprocessed: 0,
            reply: |_| Reply::Echo,
        }
    }
}

/// A TLS agent host on 127.0.0.1 with the certificate of `tests/fixtures/agent-tls`, speaking
/// HTTP/2 through `h2`'s server as its [`Script`] says, and counting what reaches it. It stops
/// accepting when dropped; connections it holds end with the test's runtime.
struct TestHost {
    /// `https://127.0.0.1:PORT/agent`.
    url: String,
    seen: Arc<Seen>,
    accepting: AbortHandle,
}

/// What reached a [`TestHost`].
struct Seen {
    /// TCP connections accepted, whatever came of them.
    connections: AtomicUsize,
    /// Requests that arrived, refused ones included; answers may wait on it.
    requests: watch::Sender<usize>,
    /// Requests that arrived on each connection, by the order it was accepted in.
    per_connection: Mutex<Vec<usize>>,
    /// Sent to, every open connection closes at once (no GOAWAY, no TLS close_notify).
    close: watch::Sender<()>,
    /// Whether a client has read a GOAWAY of [`Reply::GoAwayThenEchoOnceSeen`].
    went_away: watch::Sender<bool>,
    /// The `x-call` headers seen, for [`Reply::RefuseFirstOfEachCall`].
    calls: Mutex<HashSet<Vec<u8>>>,
    /// HTTP/2 connections that the client ended.
    ended: watch::Sender<usize>,
    /// Connections between TCP accept and the end of the TLS handshake, now and at most.
    handshaking: Mutex<(usize, usize)>,
}

impl TestHost {
    async fn start(script: Script) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("test host: bind 127.0.0.1:0");
        Self::serve(listener, script)
    }

    fn serve(listener: TcpListener, script: Script) -> Self {
        let addr = listener.local_addr().expect("test host: local_addr");
        let seen = Arc::new(Seen {
            connections: AtomicUsize::new(0),
            requests: watch::Sender::new(0),
            per_connection: Mutex::new(Vec::new()),
            close: watch::Sender::new(()),
            went_away: watch::Sender::new(false),
            calls: Mutex::new(HashSet::new()),
            ended: watch::Sender::new(0),
            handshaking: Mutex::new((0, 0)),
        });
        let acceptor = acceptor(script.h2);
        let accepting = tokio::spawn({
            let seen = seen.clone();
            async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let index = seen.connections.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(connection(
                        tcp,
                        index,
                        acceptor.clone(),
                        script,
                        seen.clone(),
                    ));
                }
            }
        });
        Self {
            url: format!("https://{addr}/agent"),
            seen,
            accepting: accepting.abort_handle(),
        }
    }

    fn connections(&self) -> usize {
        self.seen.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> usize {
        *self.seen.requests.borrow()
    }

    fn per_connection(&self) -> Vec<usize> {
        self.seen.per_connection.lock().unwrap().clone()
    }

    /// Waits until a client has read the GOAWAY of [`Reply::GoAwayThenEchoOnceSeen`].
    async fn went_away(&self) {
        let mut went_away = self.seen.went_away.subscribe();
        let _ = went_away.wait_for(|went| *went).await;
    }

    /// The most connections that were being opened at the same time.
    fn most_handshaking(&self) -> usize {
        self.seen.handshaking.lock().unwrap().1
    }

    /// Waits until the client has ended `n` HTTP/2 connections.
    async fn ended(&self, n: usize) {
        let mut ended = self.seen.ended.subscribe();
        let _ = ended.wait_for(|ended| *ended >= n).await;
    }

    /// Drops every connection it holds, as a host does with idle ones.
    fn close_connections(&self) {
        self.seen.close.send_replace(());
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

fn acceptor(h2: bool) -> TlsAcceptor {
    let certs = CertificateDer::pem_file_iter(format!("{FIXTURES}/cert.pem"))
        .expect("read cert.pem")
        .collect::<Result<Vec<_>, _>>()
        .expect("parse cert.pem");
    let key = PrivateKeyDer::from_pem_file(format!("{FIXTURES}/key.pem")).expect("read key.pem");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("certificate and key");
    config.alpn_protocols = match h2 {
        true => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        false => vec![b"http/1.1".to_vec()],
    };
    TlsAcceptor::from(Arc::new(config))
}

/// Serves the `index`th connection the host accepted.
async fn connection(
    tcp: TcpStream,
    index: usize,
    acceptor: TlsAcceptor,
    script: Script,
    seen: Arc<Seen>,
) {
    let mut close = seen.close.subscribe();
    match (script.at_accept)(index) {
        AtAccept::Proceed => {}
        AtAccept::Close => return,
        AtAccept::Stall => {
            tokio::time::sleep(PATIENT * 3).await;
            return;
        }
    }
    {
        let mut handshaking = seen.handshaking.lock().unwrap();
        handshaking.0 += 1;
        handshaking.1 = handshaking.1.max(handshaking.0);
    }
    tokio::time::sleep(script.tls_delay).await;
    let accepted = acceptor.accept(tcp).await;
    seen.handshaking.lock().unwrap().0 -= 1;
    let Ok(tls) = accepted else {
        return;
    };
    if !script.h2 {
        let _ = answer_http1(tls, &seen).await;
        return;
    }
    if index < script.go_away_unprocessed {
        let _ = go_away_unprocessed(tls, &seen).await;
        return;
    }
    let mut builder = h2::server::Builder::new();
    if let Some(max) = script.max_streams {
        builder.max_concurrent_streams(max);
    }
    let Ok(mut conn) = builder.handshake::<_, Bytes>(tls).await else {
        return;
    };
    let mut ping = conn.ping_pong();
    if index < script.go_away_at_handshake {
        conn.graceful_shutdown();
    }
    loop {
        let (request, mut respond) = tokio::select! {
            _ = close.changed() => return,
            next = conn.accept() => match next {
                Some(Ok(stream)) => stream,
                _ => {
                    seen.ended.send_modify(|n| *n += 1);
                    return;
                }
            },
        };
        let number = arrived(&seen, Some(index));
        let first_of_call = || {
            let call = request
                .headers()
                .get("x-call")
                .map(|v| v.as_bytes().to_vec());
            seen.calls.lock().unwrap().insert(call.unwrap_or_default())
        };
        let reply = match (script.reply)(number) {
            Reply::RefuseFirstOfEachCall if !first_of_call() => Reply::Echo,
            Reply::Refuse | Reply::RefuseFirstOfEachCall => {
                respond.send_reset(Reason::REFUSED_STREAM);
                continue;
            }
            Reply::GoAwayThenEchoOnceSeen(n) => {
                conn.graceful_shutdown();
                // h2 sends a PING of ours only after the GOAWAY's own PING round trip, so its
                // PONG proves the client read the GOAWAY.
                if let Some(mut ping) = ping.take() {
                    let seen = seen.clone();
                    tokio::spawn(async move {
                        if ping.ping(h2::Ping::opaque()).await.is_ok() {
                            seen.went_away.send_replace(true);
                        }
                    });
                }
                Reply::EchoOnceSeen(n)
            }
            reply => reply,
        };
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut body = request.into_body();
            let mut received = BytesMut::new();
            while let Some(Ok(chunk)) = body.data().await {
                let _ = body.flow_control().release_capacity(chunk.len());
                received.extend_from_slice(&chunk);
            }
            let answer = match reply {
                Reply::Bytes(n) => Bytes::from(vec![b'x'; n]),
                Reply::EchoOnceSeen(n) => {
                    let _ = seen.requests.subscribe().wait_for(|seen| *seen >= n).await;
                    received.freeze()
                }
                Reply::Never => return std::future::pending().await,
                _ => received.freeze(),
            };
            let head = http::Response::new(());
            if let Ok(mut stream) = respond.send_response(head, false) {
                let _ = stream.send_data(answer, true);
            }
        });
    }
}

/// Counts a request that arrived on connection `index`; returns its number.
fn arrived(seen: &Seen, index: Option<usize>) -> usize {
    if let Some(index) = index {
        let mut per_connection = seen.per_connection.lock().unwrap();
        if per_connection.len() <= index {
            per_connection.resize(index + 1, 0);
        }
        per_connection[index] += 1;
    }
    let mut number = 0;
    seen.requests.send_modify(|n| {
        number = *n;
        *n += 1;
    });
    number
}

/// Speaks just enough HTTP/2, frame by frame, to answer each request with GOAWAY(last stream
/// 0, NO_ERROR). `h2`'s server cannot: its GOAWAY names the last stream it read as processed.
async fn go_away_unprocessed(
    mut io: impl AsyncRead + AsyncWrite + Unpin,
    seen: &Seen,
) -> std::io::Result<()> {
    const SETTINGS: u8 = 4;
    const PING: u8 = 6;
    const HEADERS: u8 = 1;
    const GOAWAY: u8 = 7;
    const ACK: u8 = 1;
    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
        let mut frame = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 0];
        frame.extend_from_slice(payload);
        frame
    }
    let mut preface = [0; 24];
    io.read_exact(&mut preface).await?;
    io.write_all(&frame(SETTINGS, 0, &[])).await?;
    io.flush().await?;
    loop {
        let mut head = [0; 9];
        io.read_exact(&mut head).await?;
        let mut payload = vec![0; u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize];
        io.read_exact(&mut payload).await?;
        let reply = match (head[3], head[4] & ACK) {
            (SETTINGS, 0) => frame(SETTINGS, ACK, &[]),
            (PING, 0) => frame(PING, ACK, &payload),
            (HEADERS, _) => {
                arrived(seen, None);
                // Last stream id 0, error code NO_ERROR.
                frame(GOAWAY, 0, &[0; 8])
            }
            _ => continue,
        };
        io.write_all(&reply).await?;
        io.flush().await?;
    }
}

/// Answers one HTTP/1.1 request, echoing its body, and closes.
async fn answer_http1(
    mut io: impl AsyncRead + AsyncWrite + Unpin,
    seen: &Seen,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0; 4096];
    let (head_len, body_len) = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let body_len = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (end + 4, body_len);
        }
        match io.read(&mut chunk).await? {
            0 => return Ok(()),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    };
    while buf.len() < head_len + body_len {
        match io.read(&mut chunk).await? {
            0 => return Ok(()),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
    arrived(seen, None);
    let body = &buf[head_len..head_len + body_len];
    let head =
        format!("HTTP/1.1 200 OK\r\ncontent-length: {body_len}\r\nconnection: close\r\n\r\n");
    io.write_all(head.as_bytes()).await?;
    io.write_all(body).await?;
    io.shutdown().await
}

// ---------------------------------------------------------------------------------------------
// The client side.

fn transport() -> Transport {
    let roots = CertificateDer::pem_file_iter(format!("{FIXTURES}/ca.pem"))
        .expect("read ca.pem")
        .collect::<Result<Vec<_>, _>>()
        .expect("parse ca.pem");
    Transport::with_roots(16, PATIENT, &roots)
}

async fn call(transport: &Transport, url: &str, timeout: Duration) -> Result<Answer, CallError> {
    call_with(transport, url, timeout, vec![]).await
}

async fn call_with(
    transport: &Transport,
    url: &str,
    timeout: Duration,
    mut headers: Vec<(HeaderName, HeaderValue)>,
) -> Result<Answer, CallError> {
    headers.push((
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    ));
    transport
        .post(Post {
            url,
            headers,
            body: Bytes::from_static(BODY),
            timeout,
        })
        .await
}

/// The answer of a call that must succeed, checked to be `200`.
fn answered(result: Result<Answer, CallError>) -> Answer {
    let answer = result.unwrap_or_else(|e| panic!("expected an answer, got {e:?}"));
    assert_eq!(answer.status, StatusCode::OK);
    answer
}

fn failed(result: Result<Answer, CallError>) -> CallError {
    match result {
        Ok(answer) => panic!("expected an error, got an answer {}", answer.status),
        Err(e) => e,
    }
}

/// Starts a host on `script`, makes `calls` calls to it at once, and checks that every one
/// was answered with its own body.
async fn answered_at_once(script: Script, calls: usize) -> TestHost {
    let host = TestHost::start(script).await;
    let transport = transport();
    let results = join_all((0..calls).map(|_| call(&transport, &host.url, PATIENT))).await;
    for result in results {
        assert_eq!(answered(result).body, BODY);
    }
    host
}

/// HTTP/2 connections in the pool that it has not seen close.
fn open_connections(transport: &Transport) -> usize {
    let pool = transport.http2.as_ref().expect("an HTTP/2 pool");
    let hosts = pool.hosts.lock().unwrap();
    hosts
        .values()
        .map(|host| {
            let state = host.state.lock().unwrap();
            state
                .conns
                .iter()
                .filter(|c| !c.closed.load(Ordering::Acquire))
                .count()
        })
        .sum()
}

/// Waits until `condition` holds; panics after [`PATIENT`].
async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    let waited = tokio::time::timeout(PATIENT, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out waiting until {what}");
}

// ---------------------------------------------------------------------------------------------
// The tests. Those whose host refuses streams run on one thread, where nothing can happen
// between a call opening its stream and queuing its body: the race that leaves open is the
// subject of `calls_refused_before_their_body_is_queued_are_sent_again`.

#[tokio::test]
async fn a_refused_stream_is_sent_again_on_the_same_connection() {
    let host = TestHost::start(Script {
        reply: |n| if n == 0 { Reply::Refuse } else { Reply::Echo },
        ..Script::default()
    })
    .await;
    let transport = transport();

    let answer = answered(call(&transport, &host.url, PATIENT).await);

    assert_eq!(answer.body, BODY, "the request sent again carries its body");
    assert_eq!(host.requests(), 2);
    assert_eq!(
        host.connections(),
        1,
        "REFUSED_STREAM leaves the connection usable"
    );
}

#[tokio::test]
async fn a_call_refused_every_time_is_unreachable_after_three_attempts() {
    let host = TestHost::start(Script {
        reply: |_| Reply::Refuse,
        ..Script::default()
    })
    .await;
    let transport = transport();

    let e = failed(call(&transport, &host.url, PATIENT).await);

    assert!(matches!(e, CallError::Unreachable(_)), "{e:?}");
    assert_eq!(host.requests(), ATTEMPTS);
    assert_eq!(host.connections(), 1);
}

#[tokio::test]
async fn a_call_the_host_went_away_without_processing_is_sent_on_a_new_connection() {
    let host = TestHost::start(Script {
        go_away_unprocessed: 1,
        ..Script::default()
    })
    .await;
    let transport = transport();

    let answer = answered(call(&transport, &host.url, PATIENT).await);

    assert_eq!(answer.body, BODY);
    assert_eq!(host.connections(), 2, "sent again on a second connection");
    assert_eq!(
        host.requests(),
        2,
        "one request refused by GOAWAY, one answered"
    );
    assert_eq!(host.per_connection(), [0, 1]);
}

/// A host draining its connections may send GOAWAY(NO_ERROR) as soon as one is open. Nothing
/// was sent on it, so the call belongs on another connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_host_sends_away_before_any_call_is_replaced() {
    let host = TestHost::start(Script {
        go_away_at_handshake: 1,
        ..Script::default()
    })
    .await;
    let transport = transport();

    let answer = answered(call(&transport, &host.url, PATIENT).await);

    assert_eq!(answer.body, BODY);
    assert_eq!(host.connections(), 2);
    assert_eq!(host.per_connection(), [0, 1]);
}

/// A host that sends every new connection away is not dialled without end: the call fails
/// after as many connections as a refused call has attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_sends_every_connection_away_is_unreachable() {
    let host = TestHost::start(Script {
        go_away_at_handshake: usize::MAX,
        ..Script::default()
    })
    .await;
    let transport = transport();

    let error = failed(call(&transport, &host.url, PATIENT).await);

    assert!(
        matches!(&error, CallError::Unreachable(text) if text.contains("GOAWAY")),
        "{error:?}"
    );
    assert_eq!(host.connections(), ATTEMPTS);
    assert_eq!(host.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_going_away_finishes_the_call_in_flight_and_new_calls_open_a_connection() {
    // The first call is answered only once the second has arrived, so its connection is still
    // open, with room, when the second call looks for one.
    let host = TestHost::start(Script {
        reply: |n| match n {
            0 => Reply::GoAwayThenEchoOnceSeen(2),
            _ => Reply::Echo,
        },
        ..Script::default()
    })
    .await;
    let transport = transport();

    let (first, second) = tokio::join!(call(&transport, &host.url, PATIENT), async {
        host.went_away().await;
        call(&transport, &host.url, PATIENT).await
    });

    assert_eq!(answered(first).body, BODY);
    assert_eq!(answered(second).body, BODY);
    assert_eq!(host.connections(), 2);
    assert_eq!(
        host.per_connection(),
        [1, 1],
        "neither call was sent twice, and the second not on the connection going away"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_host_closed_while_idle_is_replaced() {
    let host = TestHost::start(Script::default()).await;
    let transport = transport();
    answered(call(&transport, &host.url, PATIENT).await);
    assert_eq!(open_connections(&transport), 1);

    host.close_connections();
    until("the pool sees the connection closed", || {
        open_connections(&transport) == 0
    })
    .await;
    let answer = answered(call(&transport, &host.url, PATIENT).await);

    assert_eq!(answer.body, BODY);
    assert_eq!(host.connections(), 2);
    assert_eq!(host.per_connection(), [1, 1]);
    assert_eq!(open_connections(&transport), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_longer_than_the_limit_is_too_large() {
    let host = TestHost::start(Script {
        reply: |n| match n {
            0 => Reply::Bytes(MAX_ANSWER_BYTES + 1),
            _ => Reply::Bytes(MAX_ANSWER_BYTES),
        },
        ..Script::default()
    })
    .await;
    let transport = transport();

    let e = failed(call(&transport, &host.url, PATIENT).await);
    assert!(matches!(e, CallError::TooLarge), "{e:?}");

    let at_limit = answered(call(&transport, &host.url, PATIENT).await);
    assert_eq!(at_limit.body.len(), MAX_ANSWER_BYTES);
    assert_eq!(
        host.connections(),
        1,
        "the connection outlives the answer it gave up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_never_answers_times_out_and_gives_its_stream_back() {
    // One stream per connection: had the timed-out call kept its stream, the next call would
    // need a second connection.
    let host = TestHost::start(Script {
        max_streams: Some(1),
        reply: |n| if n == 0 { Reply::Never } else { Reply::Echo },
        ..Script::default()
    })
    .await;
    let transport = transport();

    let started = Instant::now();
    let e = failed(call(&transport, &host.url, Duration::from_millis(300)).await);
    assert!(matches!(e, CallError::Timeout), "{e:?}");
    assert!(started.elapsed() < PATIENT, "took {:?}", started.elapsed());

    answered(call(&transport, &host.url, PATIENT).await);
    assert_eq!(host.requests(), 2);
    assert_eq!(host.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_to_a_port_nobody_listens_on_fail_at_once_and_a_later_host_is_reached() {
    // Bound but not listening: connections to it are refused, and no one else can take it.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let url = format!("https://{}/agent", socket.local_addr().unwrap());
    let transport = transport();

    let results = tokio::time::timeout(
        PATIENT,
        join_all((0..20).map(|_| call(&transport, &url, Duration::from_secs(60)))),
    )
    .await
    .expect("every call to fail well before its timeout");
    for result in results {
        let e = failed(result);
        assert!(matches!(e, CallError::Unreachable(_)), "{e:?}");
    }

    let host = TestHost::serve(socket.listen(64).unwrap(), Script::default());
    assert_eq!(host.url, url);
    answered(call(&transport, &url, PATIENT).await);
    assert_eq!(host.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_outlives_the_call_that_timed_out_waiting_for_it() {
    let host = TestHost::start(Script {
        tls_delay: Duration::from_millis(500),
        ..Script::default()
    })
    .await;
    let transport = transport();

    let e = failed(call(&transport, &host.url, Duration::from_millis(100)).await);
    assert!(matches!(e, CallError::Timeout), "{e:?}");

    let answer = answered(call(&transport, &host.url, PATIENT).await);
    assert_eq!(answer.body, BODY);
    assert_eq!(
        host.connections(),
        1,
        "the second call used the connection the first one started"
    );
    assert_eq!(host.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_beyond_the_stream_cap_open_more_connections() {
    // No answer until all five requests are in: they must be in flight at once.
    let script = Script {
        max_streams: Some(2),
        reply: |_| Reply::EchoOnceSeen(5),
        ..Script::default()
    };

    let host = answered_at_once(script, 5).await;

    assert_eq!(host.connections(), 3);
    let mut per_connection = host.per_connection();
    per_connection.sort_unstable();
    assert_eq!(per_connection, [1, 2, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_offers_only_http1_is_called_over_http1() {
    let host = TestHost::start(Script {
        h2: false,
        ..Script::default()
    })
    .await;
    let transport = transport();

    let answer = answered(call(&transport, &host.url, PATIENT).await);
    assert_eq!(answer.body, BODY);
    assert_eq!(
        host.connections(),
        2,
        "the pool's ALPN probe, then reqwest's connection"
    );
    assert_eq!(host.requests(), 1);

    answered(call(&transport, &host.url, PATIENT).await);
    assert_eq!(
        host.connections(),
        3,
        "no second probe: straight to HTTP/1.1"
    );
    assert_eq!(host.requests(), 2);
    assert_eq!(open_connections(&transport), 0);
}

/// A host refuses a stream as soon as its headers arrive, so on a multi-threaded runtime the
/// refusal may be in before the call has queued its body; that call was not processed either,
/// and must be sent again like the others. The race is narrow, hence the many calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_refused_before_their_body_is_queued_are_sent_again() {
    const CALLS: usize = 2000;
    let host = TestHost::start(Script {
        reply: |_| Reply::RefuseFirstOfEachCall,
        ..Script::default()
    })
    .await;
    let transport = transport();

    let mut failures = Vec::new();
    for i in 0..CALLS {
        let header = (HeaderName::from_static("x-call"), HeaderValue::from(i));
        if let Err(e) = call_with(&transport, &host.url, PATIENT, vec![header]).await {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {CALLS} calls refused once failed, the first with {:?}",
        failures.len(),
        failures[0]
    );
    assert_eq!(host.requests(), 2 * CALLS);
    assert_eq!(host.connections(), 1);
}

/// A connection the pool lets go of is closed, not left open to the host: the pool dropping
/// an idle one and a worker dropping its transport both come down to this.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_pool_lets_go_of_is_closed() {
    let host = TestHost::start(Script::default()).await;
    let transport = transport();
    answered(call(&transport, &host.url, PATIENT).await);

    drop(transport);

    tokio::time::timeout(PATIENT, host.ended(1))
        .await
        .expect("the client ends the connection it no longer holds");
    assert_eq!(host.connections(), 1);
}

/// SETTINGS_MAX_CONCURRENT_STREAMS 0 is legal; a host saying it takes no call, and opening
/// connection after connection to it would only pile them up.
#[tokio::test]
async fn a_host_that_allows_no_stream_is_unreachable_without_more_connections() {
    let host = TestHost::start(Script {
        max_streams: Some(0),
        ..Script::default()
    })
    .await;
    let transport = transport();

    let calls = join_all((0..5).map(|_| call(&transport, &host.url, PATIENT))).await;

    for result in calls {
        let error = failed(result);
        assert!(
            matches!(&error, CallError::Unreachable(text) if text.contains("MAX_CONCURRENT_STREAMS")),
            "{error:?}"
        );
    }
    assert_eq!(host.connections(), 1);
    assert_eq!(host.requests(), 0);
}

/// A host restarting sends away every connection it has; a call that meets several of them
/// moves on each time, and more of them than refusals of a stream are allowed.
#[tokio::test]
async fn a_call_moves_past_several_connections_going_away() {
    let host = TestHost::start(Script {
        go_away_unprocessed: ATTEMPTS + 1,
        ..Script::default()
    })
    .await;
    let transport = transport();

    let answer = answered(call(&transport, &host.url, PATIENT).await);

    assert_eq!(answer.body, BODY);
    assert_eq!(host.connections(), ATTEMPTS + 2);
    assert_eq!(host.requests(), ATTEMPTS + 2);
}

#[tokio::test]
async fn connections_probe_a_host_that_fell_silent() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();

    let tcp = connect_tcp("127.0.0.1", addr.port()).await.unwrap();

    let socket = socket2::SockRef::from(&tcp);
    assert!(socket.keepalive().unwrap());
    #[cfg(target_os = "linux")]
    assert_eq!(socket.tcp_user_timeout().unwrap(), Some(SILENCE));
}

/// A redirect is reported, not followed: following a 301 would send the POST on as a GET
/// without its body.
#[tokio::test]
async fn an_agent_endpoint_that_redirects_gets_its_3xx_reported() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/agent", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let server = tokio::spawn({
        let requests = requests.clone();
        async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                requests.fetch_add(1, Ordering::SeqCst);
                let mut head = [0; 4096];
                let _ = tcp.read(&mut head).await;
                let _ = tcp
                    .write_all(b"HTTP/1.1 301 Moved Permanently\r\nlocation: /elsewhere\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            }
        }
    });

    let answer = call(&transport(), &url, PATIENT).await.expect("an answer");

    assert_eq!(answer.status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(requests.load(Ordering::SeqCst), 1);
    server.abort();
}

/// Once the host's stream cap is known, a burst that fills every connection opens the
/// connections it needs at once rather than one after another, each a few round trips.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_opens_the_connections_it_needs_at_once() {
    let script = Script {
        max_streams: Some(2),
        tls_delay: Duration::from_millis(500),
        // Every answer waits for all nine calls, so none frees a stream for another.
        reply: |_| Reply::EchoOnceSeen(9),
        ..Script::default()
    };

    let host = answered_at_once(script, 9).await;

    assert_eq!(host.connections(), 5, "ceil(9 / 2) connections");
    assert!(
        host.most_handshaking() >= 2,
        "the four connections after the first were opened one at a time"
    );
}

/// A connection refused while others are being opened fails no call: the calls wait for the
/// connections still coming, and the pool opens another for those left over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_refused_in_a_burst_fails_no_call_the_others_carry() {
    let script = Script {
        max_streams: Some(2),
        at_accept: |index| {
            if index == 2 {
                AtAccept::Close
            } else {
                AtAccept::Proceed
            }
        },
        tls_delay: Duration::from_millis(200),
        // Every answer waits for all nine calls, so none frees a stream for another.
        reply: |_| Reply::EchoOnceSeen(9),
        ..Script::default()
    };

    let host = answered_at_once(script, 9).await;

    assert_eq!(
        host.connections(),
        6,
        "the first, four at once (one refused), and one more for the call left over"
    );
    let mut per_connection = host.per_connection();
    per_connection.sort_unstable();
    assert_eq!(
        per_connection,
        [0, 1, 2, 2, 2, 2],
        "the refused one took none"
    );
}

/// A call waiting for room takes the stream of a call that ended, not only one on a new
/// connection: here the new connection never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_call_takes_the_stream_a_finished_call_gives_back() {
    let script = Script {
        max_streams: Some(1),
        at_accept: |index| {
            if index == 0 {
                AtAccept::Proceed
            } else {
                AtAccept::Stall
            }
        },
        ..Script::default()
    };

    let host = answered_at_once(script, 3).await;

    assert_eq!(
        host.per_connection(),
        [3],
        "all three on the one connection"
    );
}

/// The pool forgets agent URLs past its limit, and the hosts no call holds with them.
#[test]
fn the_pool_forgets_urls_past_its_limit() {
    let transport = transport();
    let pool = transport.http2.as_ref().expect("an HTTP/2 pool");
    let extra = 10;
    for port in 1..=MAX_KNOWN_URLS + extra {
        let url = format!("https://127.0.0.1:{port}/agent");
        assert!(pool.known(&url).is_some(), "{url} is served by the pool");
    }
    let urls = pool.urls.lock().unwrap().len();
    let hosts = pool.hosts.lock().unwrap().len();
    assert_eq!(urls, extra, "started over at the limit");
    assert_eq!(hosts, extra, "only the hosts of the URLs kept");
}

#[test]
fn addresses_alternate_between_families_from_the_resolvers_first() {
    let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
    let resolved = vec![
        addr("[2001:db8::1]:443"),
        addr("[2001:db8::2]:443"),
        addr("[2001:db8::3]:443"),
        addr("192.0.2.1:443"),
    ];
    assert_eq!(
        interleave_families(resolved),
        [
            addr("[2001:db8::1]:443"),
            addr("192.0.2.1:443"),
            addr("[2001:db8::2]:443"),
            addr("[2001:db8::3]:443"),
        ]
    );
    let resolved = vec![addr("192.0.2.1:443"), addr("[2001:db8::1]:443")];
    assert_eq!(
        interleave_families(resolved.clone()),
        resolved,
        "IPv4 first when the resolver put it first"
    );
}

/// An address that takes no connection and refuses none (its accept queue is full, so the
/// kernel drops the handshake) does not hold up the next address.
#[tokio::test]
async fn an_address_that_never_answers_does_not_hold_up_the_next() {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let stuck = socket.listen(1).unwrap();
    let stuck_addr = stuck.local_addr().unwrap();
    // The queue of a backlog of 1 holds two connections; the ones after them hang.
    let mut queued = Vec::new();
    for _ in 0..2 {
        queued.push(TcpStream::connect(stuck_addr).await.unwrap());
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(stuck_addr))
            .await
            .is_err(),
        "a connection to the full queue hangs, as one to a host that drops packets"
    );
    let open = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let open_addr = open.local_addr().unwrap();

    let tcp = tokio::time::timeout(PATIENT, connect_any(&[stuck_addr, open_addr]))
        .await
        .expect("the second address to be reached well before the timeout")
        .expect("a connection");

    assert_eq!(tcp.peer_addr().unwrap(), open_addr);
}

#[tokio::test]
async fn when_no_address_answers_the_last_failure_is_told() {
    // Bound but not listening: connections to it are refused.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let refused = socket.local_addr().unwrap();

    let e = connect_any(&[refused, refused])
        .await
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("connect: "), "{e}");
    assert_eq!(
        connect_any(&[]).await.unwrap_err().to_string(),
        "resolve: no address"
    );
}

// ---------------------------------------------------------------------------------------------
// Plain `http://` hosts, reached through hyper-util (`http1`), and reqwest where it stays.

/// A plain HTTP/1.1 host that answers each request on a connection with `answer` (`None`: it
/// reads the request and never answers), keeping connections open. Returns its URL, with
/// `userinfo@` before the address when given, the connections it accepted and the request
/// heads it read.
async fn plain_host(
    userinfo: &str,
    answer: fn(&[u8]) -> Option<Vec<u8>>,
) -> (String, Arc<AtomicUsize>, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{userinfo}{}/agent", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let heads = Arc::new(Mutex::new(Vec::new()));
    let (counted, seen) = (accepted.clone(), heads.clone());
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let body_len = head
                        .lines()
                        .find_map(|line| line.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    while buf.len() < end + 4 + body_len {
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body: Vec<u8> = buf.drain(..end + 4 + body_len).skip(end + 4).collect();
                    seen.lock().unwrap().push(head);
                    let Some(reply) = answer(&body) else {
                        std::future::pending::<()>().await;
                        return;
                    };
                    let head =
                        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", reply.len());
                    if tcp.write_all(head.as_bytes()).await.is_err()
                        || tcp.write_all(&reply).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (url, accepted, heads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_http_host_is_called_on_a_connection_kept_open_between_calls() {
    let (url, accepted, heads) = plain_host("", |body| Some(body.to_vec())).await;
    let transport = transport();

    for _ in 0..3 {
        assert_eq!(answered(call(&transport, &url, PATIENT).await).body, BODY);
        // hyper-util hands an HTTP/1.1 connection back to its pool from a task of its own once
        // the connection is ready again; on a loaded machine a call made at once could still
        // find the pool empty and open a second one, which is not what this test is about.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    let heads = heads.lock().unwrap();
    assert_eq!(heads.len(), 3);
    assert!(heads[0].starts_with("post /agent http/1.1"), "{}", heads[0]);
    assert!(
        heads[0].contains("content-type: application/json"),
        "{}",
        heads[0]
    );
    assert!(
        heads[0].contains(&format!("content-length: {}", BODY.len())),
        "{}",
        heads[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_http_answer_longer_than_the_limit_is_too_large() {
    let (url, _, _) = plain_host("", |_| Some(vec![b'x'; MAX_ANSWER_BYTES + 1])).await;

    let e = failed(call(&transport(), &url, PATIENT).await);

    assert!(matches!(e, CallError::TooLarge), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_http_host_that_never_answers_times_out() {
    let (url, _, heads) = plain_host("", |_| None).await;

    let started = Instant::now();
    let e = failed(call(&transport(), &url, Duration::from_millis(300)).await);

    assert!(matches!(e, CallError::Timeout), "{e:?}");
    assert!(started.elapsed() < PATIENT, "took {:?}", started.elapsed());
    assert_eq!(heads.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_http_port_nobody_listens_on_is_unreachable_without_the_url() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/agent?key=secret", listener.local_addr().unwrap());
    drop(listener);

    let e = failed(call(&transport(), &url, PATIENT).await);

    let CallError::Unreachable(text) = e else {
        panic!("expected unreachable, got {e:?}");
    };
    assert!(text.contains("onnect"), "{text}");
    assert!(!text.contains("secret"), "{text}");
}

/// Credentials in a URL are left to reqwest, which sends them as Basic authentication.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_a_plain_http_url_are_sent_as_basic_authentication() {
    let (url, _, heads) = plain_host("bot%40acme:pw@", |body| Some(body.to_vec())).await;

    answered(call(&transport(), &url, PATIENT).await);

    let heads = heads.lock().unwrap();
    // base64("bot@acme:pw"), lowercased with the rest of the head.
    assert!(
        heads[0].contains("authorization: basic ym90qgfjbwu6chc="),
        "{}",
        heads[0]
    );
}
