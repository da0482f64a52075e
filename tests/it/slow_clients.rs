//! Slow, idle and held-open clients (INTERFACE.md: "Both listeners time out slow or idle
//! clients and cap their connections"): thousands of half-sent requests do not starve either
//! listener, each timeout closes what it should, connections over the cap are turned away, and
//! SIGTERM never waits on clients beyond the shutdown grace.

use crate::support;

use std::time::{Duration, Instant};

use support::harness::{AUTH_TOKEN, Wagate, World, inbound_form, sid};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const FROM: &str = "+14155550100";
/// Half-sent requests held against each listener in the load test.
const HELD_PER_LISTENER: usize = 2_000;
/// The most a probe or a webhook may take while they are held.
const ANSWER_WITHIN: Duration = Duration::from_secs(1);
/// A request line and one header, never the blank line that ends the head.
const HALF_HEAD: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: slow.example\r\n";

/// `host:port` of a base URL such as `http://127.0.0.1:8080`.
fn addr(base: &str) -> &str {
    base.trim_start_matches("http://")
}

/// Opens up to `n` connections to `addr`, each sending `HALF_HEAD`, a hundred at a time, until
/// `deadline`; returns the ones that opened.
async fn hold_half_sent(addr: &str, n: usize, deadline: Instant) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    while held.len() < n && Instant::now() < deadline {
        let batch = (n - held.len()).min(100);
        let mut opening = tokio::task::JoinSet::new();
        for _ in 0..batch {
            let addr = addr.to_owned();
            opening.spawn(async move {
                let open = async {
                    let mut s = TcpStream::connect(&addr).await?;
                    s.write_all(HALF_HEAD).await?;
                    Ok::<_, std::io::Error>(s)
                };
                tokio::time::timeout(Duration::from_secs(2), open).await
            });
        }
        while let Some(opened) = opening.join_next().await {
            if let Ok(Ok(Ok(s))) = opened {
                held.push(s);
            }
        }
    }
    held
}

/// How long after `since` the server closes `stream` (reading past anything it answers
/// first), or `None` if it is still open `within` after `since`.
async fn closes_within(
    stream: &mut TcpStream,
    since: Instant,
    within: Duration,
) -> Option<Duration> {
    let mut buf = [0u8; 1024];
    let until_closed = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return since.elapsed(),
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout_at((since + within).into(), until_closed)
        .await
        .ok()
}

/// Whether the server has not closed `stream` yet (nothing to read and no end of stream).
fn still_open(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(stream.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// GETs `url` on a connection of its own within `ANSWER_WITHIN`: its status and how long it
/// took, or why it failed.
async fn probe(url: &str) -> (Result<u16, String>, Duration) {
    let started = Instant::now();
    let http = reqwest::Client::builder()
        .timeout(ANSWER_WITHIN)
        .build()
        .expect("an HTTP client");
    let status = match http.get(url).send().await {
        Ok(r) => Ok(r.status().as_u16()),
        Err(e) => Err(e.to_string()),
    };
    (status, started.elapsed())
}

/// Raises this process's soft limit of open files to its hard limit (never lowers it: every
/// test of the binary shares it) and returns the hard limit.
#[cfg(target_os = "linux")]
fn raise_own_open_files_limit() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let had = getrlimit(Resource::Nofile);
    if had.current != had.maximum {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: had.maximum,
                maximum: had.maximum,
            },
        )
        .expect("raise this process's soft limit of open files");
    }
    had.maximum
}

/// The probe that found this: half-sent requests held open made `/healthz` on both listeners
/// time out, and held connections made SIGTERM wait the whole grace. wagate is started as
/// systemd starts a service, with a soft limit of 1024 open files, and must still answer
/// `/healthz` on both listeners and a signed webhook within a second while 2,000 half-sent
/// requests are held against each listener, then exit on SIGTERM without waiting for them.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn probes_and_webhooks_answer_while_thousands_of_half_sent_requests_are_held() {
    // This process holds the clients' ends of every connection.
    let hard = raise_own_open_files_limit();
    let enough = (2 * HELD_PER_LISTENER + 1_000) as u64;
    if hard.is_some_and(|h| h < enough) {
        eprintln!("skipped: this test needs a hard limit of at least {enough} open files");
        return;
    }
    let grace = Duration::from_secs(3);
    // The held requests stay within their header allowance for the whole test.
    let mut world = World::start_with_open_files(
        1024,
        &[
            ("WAGATE_SHUTDOWN_GRACE_MS", "3000"),
            ("WAGATE_HTTP_HEADER_TIMEOUT_MS", "60000"),
        ],
    )
    .await;
    let w = &mut world.wagate;
    w.echo_agent("demo").await;

    let opening = Instant::now();
    let deadline = opening + Duration::from_secs(20);
    let mut held = hold_half_sent(addr(&w.public_url), HELD_PER_LISTENER, deadline).await;
    held.extend(hold_half_sent(addr(&w.admin_url), HELD_PER_LISTENER, deadline).await);
    eprintln!(
        "opened {} half-sent requests in {:?}",
        held.len(),
        opening.elapsed()
    );

    let mut slow = Vec::new();
    for base in [&w.public_url, &w.admin_url] {
        for path in ["/healthz", "/readyz"] {
            let (status, took) = probe(&format!("{base}{path}")).await;
            eprintln!("{base}{path} while held: {status:?} in {took:?}");
            if status != Ok(200) || took >= ANSWER_WITHIN {
                slow.push(format!("{base}{path}: {status:?} in {took:?}"));
            }
        }
    }
    let started = Instant::now();
    let webhook = tokio::time::timeout(ANSWER_WITHIN, w.inbound("demo", &sid(1), FROM, "hi")).await;
    let took = started.elapsed();
    let status = webhook.map(|r| r.status().as_u16());
    eprintln!("signed webhook while held: {status:?} in {took:?}");
    if status != Ok(200) {
        slow.push(format!("signed webhook: {status:?} in {took:?}"));
    }
    assert!(slow.is_empty(), "too slow while held: {slow:?}");
    assert_eq!(
        held.len(),
        2 * HELD_PER_LISTENER,
        "every half-sent request was accepted"
    );
    let open = held.iter().filter(|s| still_open(s)).count();
    assert_eq!(
        open,
        held.len(),
        "the half-sent requests were held throughout"
    );

    let (clean, took) = w.terminate().await;
    eprintln!("SIGTERM with {} held: exited in {took:?}", held.len());
    assert!(clean, "exit status 0:\n{}", w.logs());
    assert!(
        took < grace / 2,
        "held connections that sent no whole request are closed at once, so the exit does not wait for them: {took:?}"
    );
}

/// A connection that sends nothing, or only part of its headers, is closed after
/// `WAGATE_HTTP_HEADER_TIMEOUT_MS`; so is a kept-alive connection that does not send its next
/// request (hyper starts the header timer as soon as a response is done).
#[tokio::test]
async fn connections_that_do_not_finish_their_headers_are_closed_after_the_header_timeout() {
    let w = World::start_with(&[("WAGATE_HTTP_HEADER_TIMEOUT_MS", "500")]).await;
    let mut silent = TcpStream::connect(addr(&w.wagate.public_url))
        .await
        .unwrap();
    let silent_since = Instant::now();
    let mut half = TcpStream::connect(addr(&w.wagate.admin_url)).await.unwrap();
    half.write_all(HALF_HEAD).await.unwrap();
    let half_since = Instant::now();
    let mut kept = TcpStream::connect(addr(&w.wagate.public_url))
        .await
        .unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 12];
    kept.read_exact(&mut answer).await.unwrap();
    let kept_since = Instant::now();
    assert_eq!(&answer, b"HTTP/1.1 200");
    for (what, stream, since) in [
        ("a connection that sends nothing", &mut silent, silent_since),
        ("a half-sent request", &mut half, half_since),
        (
            "a kept-alive connection without a next request",
            &mut kept,
            kept_since,
        ),
    ] {
        let closed = closes_within(stream, since, Duration::from_secs(3)).await;
        eprintln!("{what}: closed after {closed:?}");
        let closed = closed.unwrap_or_else(|| panic!("{what} is still open after 3 s"));
        assert!(
            closed >= Duration::from_millis(400) && closed < Duration::from_secs(2),
            "{what} closed after {closed:?}"
        );
    }
}

/// A kept-alive connection with nothing in progress is closed after
/// `WAGATE_HTTP_IDLE_TIMEOUT_MS` when that is shorter than the header timeout.
#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_after_the_idle_timeout() {
    let w = World::start_with(&[
        ("WAGATE_HTTP_IDLE_TIMEOUT_MS", "500"),
        ("WAGATE_HTTP_HEADER_TIMEOUT_MS", "30000"),
    ])
    .await;
    for base in [&w.wagate.public_url, &w.wagate.admin_url] {
        let mut kept = TcpStream::connect(addr(base)).await.unwrap();
        kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = [0u8; 12];
        kept.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 200");
        let closed = closes_within(&mut kept, Instant::now(), Duration::from_secs(5)).await;
        eprintln!("{base}: idle kept-alive connection closed after {closed:?}");
        let closed = closed.unwrap_or_else(|| panic!("{base}: still open after 5 s of idling"));
        assert!(
            closed >= Duration::from_millis(400) && closed < Duration::from_secs(2),
            "{base}: closed after {closed:?}"
        );
    }
}

/// A request whose body never finishes is answered and closed after
/// `WAGATE_HTTP_BODY_TIMEOUT_MS`, however slowly the body trickles in.
#[tokio::test]
async fn a_body_that_never_finishes_is_cut_off_after_the_body_timeout() {
    let w = World::start_with(&[("WAGATE_HTTP_BODY_TIMEOUT_MS", "500")]).await;
    w.wagate.echo_agent("demo").await;
    let mut trickle = TcpStream::connect(addr(&w.wagate.public_url))
        .await
        .unwrap();
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\n",
        Wagate::inbound_path("demo")
    );
    trickle.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    // One byte every 100 ms would keep a gap timeout happy for ever.
    let closed = loop {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still open after 5 s of trickling: {}",
            String::from_utf8_lossy(&answer)
        );
        if trickle.write_all(b"a").await.is_err() {
            break started.elapsed();
        }
        match tokio::time::timeout(Duration::from_millis(100), trickle.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break started.elapsed(),
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    };
    let answer = String::from_utf8_lossy(&answer);
    eprintln!("trickled body: closed after {closed:?}, answered {answer:?}");
    assert!(
        closed >= Duration::from_millis(400) && closed < Duration::from_secs(2),
        "closed after {closed:?}"
    );
    assert!(answer.starts_with("HTTP/1.1 4"), "answered {answer:?}");
}

/// A connection over `WAGATE_HTTP_MAX_CONNECTIONS` is closed at once; once a held one ends,
/// the listener serves again.
#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once() {
    let w = World::start_with(&[("WAGATE_HTTP_MAX_CONNECTIONS", "20")]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut held = hold_half_sent(addr(&w.wagate.public_url), 20, deadline).await;
    assert_eq!(held.len(), 20);
    // The accept loop takes them in order: the cap is full once the last one is taken.
    let mut over = TcpStream::connect(addr(&w.wagate.public_url))
        .await
        .unwrap();
    let closed = closes_within(&mut over, Instant::now(), Duration::from_secs(2)).await;
    eprintln!("a connection over the cap: closed after {closed:?}");
    assert!(
        closed.is_some(),
        "a connection over the cap is closed at once"
    );
    // The admin listener has a cap of its own.
    let (status, _) = probe(&format!("{}/healthz", w.wagate.admin_url)).await;
    assert_eq!(status, Ok(200));
    held.truncate(19);
    let url = format!("{}/healthz", w.wagate.public_url);
    support::harness::eventually(Duration::from_secs(5), "a slot to free", || async {
        (probe(&url).await.0 == Ok(200)).then_some(())
    })
    .await;
}

/// On SIGTERM, a request in progress finishes, a connection still sending its headers is
/// closed at once, and one whose request never finishes is closed when the grace is over,
/// so that it does not hold the process past it.
#[tokio::test]
async fn sigterm_finishes_requests_in_progress_and_cuts_the_rest_at_the_grace() {
    let grace = Duration::from_secs(2);
    let mut w = World::start_with(&[("WAGATE_SHUTDOWN_GRACE_MS", "2000")]).await;
    w.wagate.echo_agent("demo").await;
    let url = format!("{}{}", w.wagate.public_url, Wagate::inbound_path("demo"));
    let fields = inbound_form(&sid(1), FROM, "in flight");
    let signature = twilio::signature::compute_signature(AUTH_TOKEN.as_bytes(), &url, &fields);
    let body = twilio::form::encode(&fields);
    let head = |length: usize| {
        format!(
            "POST {} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nX-Twilio-Signature: {signature}\r\nContent-Length: {length}\r\n\r\n",
            Wagate::inbound_path("demo")
        )
    };
    let public = addr(&w.wagate.public_url).to_owned();
    let (first, rest) = body.as_bytes().split_at(body.len() / 2);
    let mut finishing = TcpStream::connect(&public).await.unwrap();
    finishing
        .write_all(head(body.len()).as_bytes())
        .await
        .unwrap();
    finishing.write_all(first).await.unwrap();
    let mut never_finishing = TcpStream::connect(&public).await.unwrap();
    never_finishing
        .write_all(head(body.len()).as_bytes())
        .await
        .unwrap();
    never_finishing.write_all(first).await.unwrap();
    let mut half_head = TcpStream::connect(&public).await.unwrap();
    half_head.write_all(HALF_HEAD).await.unwrap();
    // Both bodies are being read once a probe behind them is answered.
    let (status, _) = probe(&format!("{}/healthz", w.wagate.public_url)).await;
    assert_eq!(status, Ok(200));

    let client = async {
        let half_head_closed = closes_within(&mut half_head, Instant::now(), grace).await;
        finishing.write_all(rest).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(grace, finishing.read_to_end(&mut answer)).await;
        (half_head_closed, read.is_ok(), answer)
    };
    let ((clean, took), (half_head_closed, finished, answer)) =
        tokio::join!(w.wagate.terminate(), client);
    let answer = String::from_utf8_lossy(&answer);
    eprintln!(
        "SIGTERM: half-sent head closed after {half_head_closed:?}; request in progress answered {:?}; exit after {took:?}",
        answer.lines().next()
    );
    assert!(clean, "exit status 0:\n{}", w.wagate.logs());
    let half_head_closed = half_head_closed.expect("the half-sent head is closed before the grace");
    assert!(
        half_head_closed < Duration::from_millis(500),
        "the half-sent head is closed at once: {half_head_closed:?}"
    );
    assert!(
        finished && answer.starts_with("HTTP/1.1 200"),
        "the request in progress finished: {answer:?}"
    );
    assert!(
        took >= grace - Duration::from_millis(200),
        "the request that never finishes is given the grace: exit after {took:?}"
    );
    assert!(
        took < grace + Duration::from_millis(700),
        "and then cut off: exit after {took:?}"
    );
    drop(never_finishing);
}
