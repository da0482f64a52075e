//! Opening a TCP connection to an agent host: the addresses in the order of Happy Eyeballs
//! (RFC 8305), and the socket options that find a host gone silent.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use futures::{StreamExt, stream::FuturesUnordered};
use tokio::net::TcpStream;

/// Why a connection to an agent host was not opened. It is `Clone` because every call waiting
/// for the connection is told (the I/O errors are shared for that).
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum OpenError {
    /// The host's name did not resolve.
    #[error("resolve: {0}")]
    Resolve(#[source] Arc<io::Error>),
    /// The name resolved to no address.
    #[error("resolve: no address")]
    NoAddress,
    /// No address took the connection; the last one's refusal.
    #[error("connect: {0}")]
    Connect(#[source] Arc<io::Error>),
    /// The connect timeout ran out.
    #[error("connect: timed out")]
    TimedOut,
    /// The TLS handshake failed.
    #[error("TLS: {0}")]
    Tls(#[source] Arc<io::Error>),
    /// The HTTP/2 handshake, or the settings that follow it, failed.
    #[error("HTTP/2 {step}: {source}")]
    Http2 {
        /// Which step: `handshake` or `settings`.
        step: &'static str,
        /// h2's error.
        #[source]
        source: Arc<h2::Error>,
    },
    /// The host said GOAWAY to every new connection.
    #[error("HTTP/2: the host sent every new connection away (GOAWAY)")]
    SentAway,
    /// The host allows no stream at all for now.
    #[error("HTTP/2: the host allows no request at the moment (SETTINGS_MAX_CONCURRENT_STREAMS 0)")]
    NoStreams,
}

/// Resolves `host` and connects to the first of its addresses that answers.
pub(crate) async fn connect_tcp(host: &str, port: u16) -> Result<TcpStream, OpenError> {
    let addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| OpenError::Resolve(Arc::new(e)))?
        .collect();
    let tcp = connect_any(&interleave_families(addrs)).await?;
    // Requests are written whole; waiting to coalesce them only adds latency.
    let _ = tcp.set_nodelay(true);
    detect_silent_loss(&tcp);
    Ok(tcp)
}

/// How long an attempt to one address has before the next address is tried beside it
/// (RFC 8305's Connection Attempt Delay).
pub(crate) const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// The resolver's addresses, alternating between IPv6 and IPv4 from the family of the first,
/// as RFC 8305 orders them: a host whose addresses of one family are unreachable is reached
/// on the other after one attempt delay, not after trying each of them.
pub(crate) fn interleave_families(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
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
pub(crate) async fn connect_any(addrs: &[SocketAddr]) -> Result<TcpStream, OpenError> {
    let mut untried = addrs.iter();
    let mut attempts = FuturesUnordered::new();
    let mut last_error = OpenError::NoAddress;
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
                    last_error = OpenError::Connect(Arc::new(e));
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
pub(crate) const SILENCE: Duration = Duration::from_secs(30);

/// A host that vanished without a word (a NAT or load balancer that forgot the connection)
/// leaves a connection that shows no error by itself, and the pool would go on giving it calls
/// that can only time out. Keepalive probes find it while idle, and the user timeout while a
/// request waits for its acknowledgement; either ends the connection, which retires it.
pub(crate) fn detect_silent_loss(tcp: &TcpStream) {
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
