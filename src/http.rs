//! The HTTP listeners (webhooks, admin API, a worker's or sender's metrics): HTTP/1 connections
//! served by hyper with limits on what a client may hold, so that held-open or half-sent
//! requests cannot starve a listener, and a shutdown that never waits on clients beyond the
//! grace period.
//!
//! What bounds each stage of a connection:
//! - headers: hyper's header-read timer (`WAGATE_HTTP_HEADER_TIMEOUT_MS`). hyper starts it when
//!   the connection opens and again as soon as a response is done, so on a kept-alive
//!   connection it also bounds the wait for the next request.
//! - body: a deadline on the whole request body from the end of its headers
//!   (`WAGATE_HTTP_BODY_TIMEOUT_MS`); one byte a second does not keep it alive.
//! - idle: a connection with no request in progress on which no byte was read or written for
//!   `WAGATE_HTTP_IDLE_TIMEOUT_MS` is closed. A kept-alive connection therefore waits at most the
//!   shorter of the idle and the header timeouts for its next request, and a client that stops
//!   reading a response it asked for is let go too, which no hyper timer covers.
//! - count: `WAGATE_HTTP_MAX_CONNECTIONS` per listener.

use std::{
    convert::Infallible,
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    http::Request,
};
use http_body::{Frame, SizeHint};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::{GracefulShutdown, Watcher},
};
use shared::{config::Settings, shutdown::Shutdown};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tower::Service;
use tower_http::timeout::DeadlineBody;

/// What a client may hold of a listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time to send a request's headers, from the connection's start or the previous response.
    pub header_timeout: Duration,
    /// Time to send a request's body, from the end of its headers.
    pub body_timeout: Duration,
    /// Time a connection with no request in progress may pass without a byte either way.
    pub idle_timeout: Duration,
    /// Connections held at once.
    pub max_connections: usize,
}

impl Limits {
    /// The limits `settings` configure.
    pub fn of(settings: &Settings) -> Limits {
        Limits {
            header_timeout: Duration::from_millis(settings.http_header_timeout_ms),
            body_timeout: Duration::from_millis(settings.http_body_timeout_ms),
            idle_timeout: Duration::from_millis(settings.http_idle_timeout_ms),
            max_connections: settings.http_max_connections,
        }
    }
}

/// How long the accept loop pauses after an error that is not about one connection (such as
/// running out of descriptors), so that it does not spin while nothing can be accepted.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Serves `router` on `listener` (named by its setting, `name`, in logs) until `shutdown`.
///
/// Then it stops accepting at once, closes the connections that are idle or still sending a
/// request's headers, lets requests in progress finish, and closes whatever is left after
/// `grace`, so that no client holds the process past it.
///
/// A connection over the cap is accepted and closed at once rather than left in the kernel's
/// backlog. The backlog is first come, first served: a health check queued behind a thousand
/// more held connections would wait until each of them had got a slot and timed out, and once
/// the backlog is full, new clients' SYNs are dropped and retried only a second later. Drained,
/// the backlog stays empty, a refused client (a health check among them) learns so at once
/// instead of hanging, and whoever connects after a slot frees (a client that sends nothing
/// more is let go within the header, body or idle timeout) is served at once.
pub async fn serve(
    listener: TcpListener,
    name: &'static str,
    router: Router,
    limits: Limits,
    shutdown: Shutdown,
    grace: Duration,
) -> anyhow::Result<()> {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let force = Shutdown::new();
    let mut at_cap = false;
    let mut accept_failing = false;
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                accept_failing = false;
                stream
            }
            // The client gave up before it was accepted: nothing to do.
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                if !accept_failing {
                    tracing::error!(listener = name, error = %e, "cannot accept connections; retrying");
                    accept_failing = true;
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_PAUSE) => continue,
                }
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if !at_cap {
                tracing::warn!(
                    listener = name,
                    max = limits.max_connections,
                    "connections at WAGATE_HTTP_MAX_CONNECTIONS: new ones are closed at once until some end"
                );
                at_cap = true;
            }
            continue;
        };
        at_cap = false;
        tokio::spawn(connection(
            stream,
            Served {
                http: http.clone(),
                router: router.clone(),
                limits,
            },
            Stop {
                watcher: graceful.watcher(),
                shutdown: shutdown.clone(),
                force: force.clone(),
            },
            slot,
        ));
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = name,
            "shutdown grace passed: closing the connections whose requests are still in progress"
        );
        force.cancel();
    }
    Ok(())
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// What a connection is served with.
struct Served {
    http: http1::Builder,
    router: Router,
    limits: Limits,
}

/// How a connection learns that the listener stops.
struct Stop {
    /// Tells hyper to finish the request in progress and then close.
    watcher: Watcher,
    /// The process stops: a connection with no request in progress closes at once.
    shutdown: Shutdown,
    /// The grace has passed: every connection closes.
    force: Shutdown,
}

/// Serves one connection until it ends, is idle too long, or the listener stops. Returning
/// drops the connection, which closes it; `_slot` then frees its place under the cap.
async fn connection(stream: TcpStream, served: Served, stop: Stop, _slot: OwnedSemaphorePermit) {
    let Served {
        http,
        router,
        limits,
    } = served;
    let activity = Arc::new(Activity::new());
    // The client's address, for handlers that limit per client (the console's sign-in), as
    // axum's own `ConnectInfo` would give it.
    let peer = stream.peer_addr().ok().map(axum::extract::ConnectInfo);
    let io = TokioIo::new(Tracked {
        stream,
        activity: activity.clone(),
    });
    let in_request = activity.clone();
    let service = service_fn(move |request: Request<Incoming>| {
        let request_guard = InProgress::start(in_request.clone());
        let mut request = request.map(|body| DeadlineBody::new(limits.body_timeout, body));
        if let Some(peer) = peer {
            request.extensions_mut().insert(peer);
        }
        let response = router.clone().call(request);
        async move {
            let response = response.await?;
            Ok::<_, Infallible>(response.map(|body| Responding {
                body,
                _request: request_guard,
            }))
        }
    });
    let conn = stop.watcher.watch(http.serve_connection(io, service));
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        let check_idle_at = activity.idle_deadline(limits.idle_timeout);
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            () = stop.force.cancelled() => return,
            () = stop.shutdown.cancelled(), if !stopping => {
                if !activity.in_request() {
                    return;
                }
                stopping = true;
            }
            () = tokio::time::sleep_until(check_idle_at) => {
                if !activity.in_request() && activity.quiet_for() >= limits.idle_timeout {
                    return;
                }
            }
        }
    }
}

/// What the idle timeout and the shutdown look at: whether a request is in progress, and when
/// a byte last moved.
struct Activity {
    opened: Instant,
    /// Milliseconds from `opened` to the last read or write that moved bytes.
    last_io_ms: AtomicU64,
    /// Requests from the end of their headers until hyper has taken their response's body.
    requests: AtomicUsize,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            opened: Instant::now(),
            last_io_ms: AtomicU64::new(0),
            requests: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_io_ms.store(ms, Ordering::Relaxed);
    }

    fn last_io(&self) -> Instant {
        self.opened + Duration::from_millis(self.last_io_ms.load(Ordering::Relaxed))
    }

    fn quiet_for(&self) -> Duration {
        self.last_io().elapsed()
    }

    fn in_request(&self) -> bool {
        self.requests.load(Ordering::Relaxed) > 0
    }

    /// When to look again whether the connection has been idle for `timeout`: that long after
    /// the last byte moved, or, while a request is in progress, that long from now.
    fn idle_deadline(&self, timeout: Duration) -> Instant {
        if self.in_request() {
            Instant::now() + timeout
        } else {
            self.last_io() + timeout
        }
    }
}

/// Counts a request as in progress while it lives.
struct InProgress(Arc<Activity>);

impl InProgress {
    fn start(activity: Arc<Activity>) -> InProgress {
        activity.requests.fetch_add(1, Ordering::Relaxed);
        InProgress(activity)
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        // The idle time starts when the request ends, however long it took.
        self.0.touch();
        self.0.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response's body, which keeps its request in progress until hyper has taken all of it (or
/// dropped it), so that neither the idle timeout nor the shutdown cuts a response short.
struct Responding {
    body: Body,
    _request: InProgress,
}

impl http_body::Body for Responding {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A connection's socket, noting when bytes move for the idle timeout.
struct Tracked {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl Tracked {
    fn moved<T>(
        &self,
        done: Poll<io::Result<T>>,
        bytes: impl FnOnce(&T) -> bool,
    ) -> Poll<io::Result<T>> {
        if let Poll::Ready(Ok(n)) = &done
            && bytes(n)
        {
            self.activity.touch();
        }
        done
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let done = Pin::new(&mut self.stream).poll_read(cx, buf);
        let read = buf.filled().len() > before;
        self.moved(done, |_| read)
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let done = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.moved(done, |n| *n > 0)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let done = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.moved(done, |n| *n > 0)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
