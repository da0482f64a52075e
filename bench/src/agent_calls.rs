//! T1: the agent transport alone, against the maintained alternative. A worker's agent calls go
//! through `wagate-transport`, an HTTP/2 pool of wagate's own (see its README for why). The
//! alternative a reviewer asked to be measured is several reqwest clients with the calls spread
//! over them, so that each client's one HTTP/2 connection per host carries a share of them.
//!
//! Each way makes 10,000 calls at once, as P3's first round does, to the fake agent that
//! answers after 2 s over HTTPS offering HTTP/2 (or, with `--t1-agents http1`, over plain
//! HTTP/1.1, through wagate-transport alone), in a child process of its own
//! (`wagate-bench calls`), which reports its own CPU time and peak RSS; the fake agent counts
//! the connections it accepted. The ways take turns, so the machine's noise falls on both.

use std::{
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::future::join_all;
use serde_json::{Value, json};

use crate::{
    fakes,
    procs::{self, Proc},
    report::{Report, median},
    scenarios::Options,
};

/// Calls in flight at once, as in P3.
const CALLS: usize = 10_000;
const LATENCY: Duration = Duration::from_secs(2);
/// Calls given to each reqwest client: RFC 9113 asks hosts to allow at least 100 streams on a
/// connection, so no client's connection has to queue calls at hosts that follow it.
const CALLS_PER_CLIENT: usize = 100;
/// What each call sends: what the fake agent reads.
const BODY: &str = r#"{"messages":[{"role":"user","content":"hello"}]}"#;

/// How the calls are made.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Via {
    /// `wagate-transport`'s `Transport`, as a worker makes them.
    Pool,
    /// reqwest clients, `CALLS_PER_CLIENT` calls on each, offering HTTP/2 and HTTP/1.1 by ALPN.
    Reqwest,
    /// The same, speaking HTTP/2 only (`http2_prior_knowledge`): hyper then knows before the
    /// handshake that a connection can carry more calls, but hosts without HTTP/2 fail.
    ReqwestH2,
}

impl Via {
    /// As `--via` takes it.
    fn name(self) -> &'static str {
        match self {
            Via::Pool => "pool",
            Via::Reqwest => "reqwest",
            Via::ReqwestH2 => "reqwest-h2",
        }
    }
}

/// The child's side: makes `calls` calls to `url` at once and prints what it took, as JSON.
pub async fn make_calls(via: Via, url: &str, calls: usize) -> Result<()> {
    let started = Instant::now();
    let failed = AtomicU64::new(0);
    let first_error = std::sync::Mutex::new(None::<String>);
    let note = |e: String| {
        failed.fetch_add(1, Ordering::Relaxed);
        first_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_or_insert(e);
    };
    match via {
        Via::Pool => {
            let pool = Arc::new(transport::Transport::new(calls, Duration::from_secs(10))?);
            let each = (0..calls).map(|_| {
                let pool = pool.clone();
                async move {
                    pool.post(transport::Post {
                        url,
                        headers: vec![(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("application/json"),
                        )],
                        body: Bytes::from_static(BODY.as_bytes()),
                        timeout: Duration::from_secs(60),
                    })
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|a| match a.status.is_success() {
                        true => Ok(()),
                        false => Err(format!("HTTP {}", a.status)),
                    })
                }
            });
            for result in join_all(each).await {
                if let Err(e) = result {
                    note(e);
                }
            }
        }
        Via::Reqwest | Via::ReqwestH2 => {
            let h2_only = matches!(via, Via::ReqwestH2);
            let clients = reqwest_clients(calls.div_ceil(CALLS_PER_CLIENT), h2_only)?;
            let each = (0..calls).map(|i| {
                let client = clients[i % clients.len()].clone();
                async move {
                    let response = client
                        .post(url)
                        .header("content-type", "application/json")
                        .body(BODY)
                        .timeout(Duration::from_secs(60))
                        .send()
                        .await
                        .map_err(|e| format!("{e:?}"))?;
                    let status = response.status();
                    response.bytes().await.map_err(|e| format!("{e:?}"))?;
                    match status.is_success() {
                        true => Ok(()),
                        false => Err(format!("HTTP {status}")),
                    }
                }
            });
            for result in join_all(each).await {
                if let Err(e) = result {
                    note(e);
                }
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let peak_rss_mib = std::fs::read_to_string("/proc/self/status")?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .context("no VmHWM")?
        / 1024.0;
    println!(
        "{}",
        json!({
            "seconds": seconds,
            "failed": failed.load(Ordering::Relaxed),
            "first_error": first_error.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner),
            "cpu_seconds": procs::own_cpu_seconds()?,
            "peak_rss_mib": peak_rss_mib,
        })
    );
    Ok(())
}

/// `n` reqwest clients that share one TLS configuration (one verifier, one set of roots), as a
/// careful sharded client would be built, offering HTTP/2 and HTTP/1.1 by ALPN or HTTP/2 only.
fn reqwest_clients(n: usize, h2_only: bool) -> Result<Vec<reqwest::Client>> {
    use rustls_platform_verifier::BuilderVerifierExt;
    use tokio_rustls::rustls;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_platform_verifier()?
        .with_no_client_auth();
    tls.alpn_protocols = match h2_only {
        true => vec![b"h2".to_vec()],
        false => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    };
    (0..n)
        .map(|_| {
            let builder = reqwest::Client::builder()
                .tls_backend_preconfigured(tls.clone())
                .connect_timeout(Duration::from_secs(10))
                .redirect(reqwest::redirect::Policy::none());
            let builder = match h2_only {
                true => builder.http2_prior_knowledge(),
                false => builder,
            };
            Ok(builder.build()?)
        })
        .collect()
}

/// What one child run reported, and the connections the fake agent accepted meanwhile.
struct Run {
    seconds: f64,
    failed: u64,
    cpu_us: f64,
    rss_mib: f64,
    connections: u64,
}

/// Runs `wagate-bench calls` once and reads its answer.
async fn child(dir: &Path, via: Via, url: &str, run: usize) -> Result<Run> {
    let name = format!("calls-{}-{run}", via.name());
    let log = dir.join(format!("{name}.log"));
    // WAGATE_BENCH_WRAP_CALLS runs the client under a profiler, as WAGATE_BENCH_WRAP_<ROLE>
    // does a wagate role (e.g. heaptrack, whose output lands in the current folder).
    let mut cmd = match std::env::var("WAGATE_BENCH_WRAP_CALLS") {
        Ok(wrapper) => {
            let mut c = Command::new(wrapper);
            c.arg(std::env::current_exe()?);
            c
        }
        Err(_) => Command::new(std::env::current_exe()?),
    };
    cmd.arg("calls")
        .args(["--via", via.name()])
        .args(["--url", url])
        .args(["--calls", &CALLS.to_string()])
        .env("SSL_CERT_FILE", fakes::AGENT_CA);
    let started = Instant::now();
    let mut proc = Proc::spawn(&name, cmd, &log)?;
    let status = loop {
        if let Some(status) = proc.try_wait()? {
            break status;
        }
        if started.elapsed() > Duration::from_secs(300) {
            anyhow::bail!("{name} did not finish within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let text = std::fs::read_to_string(&log)?;
    if !status.success() {
        anyhow::bail!("{name} failed with {status}: {text}");
    }
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("{name} printed no result: {text}"))?;
    let v: Value = serde_json::from_str(line)?;
    let number = |key: &str| {
        v[key]
            .as_f64()
            .with_context(|| format!("no {key} in {line}"))
    };
    if let Some(e) = v["first_error"].as_str() {
        eprintln!("  {name}: first failure: {e}");
    }
    Ok(Run {
        seconds: number("seconds")?,
        failed: v["failed"].as_u64().unwrap_or_default(),
        cpu_us: number("cpu_seconds")? * 1e6 / CALLS as f64,
        rss_mib: number("peak_rss_mib")?,
        connections: 0,
    })
}

pub async fn t1(dir: &Path, options: &Options, report: &mut Report) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    report.section(
        "T1 agent calls: wagate-transport against sharded reqwest clients",
        &format!(
            "{CALLS} calls at once, from a process of their own, to a fake agent that answers each after {} s, over HTTPS offering HTTP/2 with the stream cap in the first column (250 is Go's default; 50 stands for a host that allows fewer than RFC 9113's 100). `pool` is wagate-transport as a worker uses it; `reqwest` is {} reqwest 0.13 clients sharing one TLS configuration, {CALLS_PER_CLIENT} calls on each, offering HTTP/2 and HTTP/1.1 as the pool does; `reqwest-h2` the same speaking HTTP/2 only (`http2_prior_knowledge`), which a worker could not do, since many agent hosts speak only HTTP/1.1. A plain HTTP/1.1 host (`--t1-agents http1`) is called through `pool` alone, which takes a connection per call in flight there. {} runs each, taking turns; medians. The bound is {CALLS} calls ÷ {} s.",
            LATENCY.as_secs(),
            CALLS.div_ceil(CALLS_PER_CLIENT),
            options.rounds,
            LATENCY.as_secs()
        ),
    );
    report.header(&[
        "host's streams per connection (HTTP/2)",
        "via",
        "calls/s",
        "of the bound",
        "failed",
        "connections accepted",
        "client CPU µs/call",
        "client peak RSS MiB",
    ]);
    for agent in &options.t1_agents {
        // Over plain HTTP/1.1 every client takes a connection per call in flight; only
        // wagate-transport's use of memory and CPU there is of interest.
        let (streams, (url, accepted), vias) = match agent.as_str() {
            "http1" => (
                "plain HTTP/1.1".to_owned(),
                fakes::plain_agent(LATENCY).await?,
                &[Via::Pool][..],
            ),
            _ => {
                let streams: u32 = agent
                    .strip_prefix("h2-")
                    .and_then(|n| n.parse().ok())
                    .with_context(|| {
                        format!("--t1-agents: no agent host {agent:?} (h2-<streams>, http1)")
                    })?;
                (
                    streams.to_string(),
                    fakes::https_agent(LATENCY, streams).await?,
                    &[Via::Pool, Via::Reqwest, Via::ReqwestH2][..],
                )
            }
        };
        let mut runs: Vec<(Via, Vec<Run>)> = vias.iter().map(|via| (*via, vec![])).collect();
        for run in 0..options.rounds {
            for (via, results) in &mut runs {
                let before = accepted.load(Ordering::Relaxed);
                let mut r = child(dir, *via, &url, run).await?;
                r.connections = accepted.load(Ordering::Relaxed) - before;
                eprintln!(
                    "T1 {agent}, {via:?} run {run}: {:.2} s, {} failed, {} connections, {:.0} µs/call, {:.0} MiB",
                    r.seconds, r.failed, r.connections, r.cpu_us, r.rss_mib
                );
                results.push(r);
            }
        }
        let bound = CALLS as f64 / LATENCY.as_secs_f64();
        for (via, results) in &runs {
            let figure = |f: fn(&Run) -> f64| median(&results.iter().map(f).collect::<Vec<_>>());
            let rate = figure(|r| CALLS as f64 / r.seconds);
            report.row(vec![
                streams.clone(),
                via.name().to_owned(),
                format!("{rate:.0}"),
                format!("{:.0}%", rate / bound * 100.0),
                results.iter().map(|r| r.failed).sum::<u64>().to_string(),
                format!("{:.0}", figure(|r| r.connections as f64)),
                format!("{:.0}", figure(|r| r.cpu_us)),
                format!("{:.0}", figure(|r| r.rss_mib)),
            ]);
        }
    }
    Ok(())
}
