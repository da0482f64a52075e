//! The benchmarks, each on fresh servers of its own, and the table they print.

use std::{path::Path, process::Command, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::{
    callgrind,
    fakes::{self, AgentHost, Replies},
    load::{self, AUTH_TOKEN, Target},
    pipeline::{self, Driven},
    procs::{self, Proc, Servers, free_port, nats_binary, repo, version_of},
    report::{Report, median, verdict},
    wagate::{AGENT, Deployment, Wagate},
};

/// What to run and for how long.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Rounds of each P1 target and runs of each P2 deployment; medians are over these.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Length of one P1 round, in seconds.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// HTTP connections of the P1 load generator.
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Benchmarks to run, comma-separated (p1..p6, h1). P5's CPU time per reply comes from the
    /// P2 runs; `p5` adds its instruction count, wagate `serve` run again under callgrind.
    #[arg(long, value_delimiter = ',', default_value = "p1,p2,p3,p4,p5,p6,h1")]
    only: Vec<String>,
    /// P2 layouts to run, comma-separated: serve (on NATS + Redis), serve-cores (the same with
    /// a runtime thread per core for each role), split (one process per role), embedded. The
    /// P2 and P5 goals are read off `serve`, so it always runs.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "serve,serve-cores,split,embedded"
    )]
    layouts: Vec<String>,
    /// Extra settings for every wagate process, e.g. `--wagate-env WAGATE_COALESCE_MS=50`.
    #[arg(long = "wagate-env", value_parser = parse_setting)]
    wagate_env: Vec<(String, String)>,
    /// Where the table is written as well.
    #[arg(long, default_value = "target/bench/report.md")]
    out: std::path::PathBuf,
}

/// The settings of the wagate processes of a pipeline run: `WAGATE_THREADS=1`, as
/// docs/benchmarks.md advises where wagate shares the machine's two cores with nats-server,
/// redis-server and the bench, or with `threads_per_core` a thread per core for each role; then
/// the run's own, then `--wagate-env`, which wins.
fn pipeline_env(
    options: &Options,
    threads_per_core: bool,
    own: &[(&str, String)],
) -> Vec<(String, String)> {
    let threads = if threads_per_core {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    } else {
        1
    };
    std::iter::once(("WAGATE_THREADS".to_owned(), threads.to_string()))
        .chain(own.iter().map(|(k, v)| ((*k).to_owned(), v.clone())))
        .chain(options.wagate_env.iter().cloned())
        .collect()
}

fn parse_setting(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?} is not NAME=VALUE"))
}

/// Runs the chosen benchmarks and prints the report.
pub async fn run(options: Options) -> Result<()> {
    let dir = crate::run_dir()?;
    let mut all = String::new();
    let mut report = Report::default();
    machine(&mut report);
    emit(&mut report, &mut all);
    let wants = |p: &str| options.only.iter().any(|o| o == p);
    if wants("p1") {
        p1(&dir.join("p1"), &options, &mut report).await?;
        emit(&mut report, &mut all);
    }
    if wants("p2") || wants("p5") {
        p2_p5(&dir.join("p2"), &options, &mut report).await?;
        emit(&mut report, &mut all);
    }
    if wants("p3") {
        p3(&dir.join("p3"), &options, &mut report).await?;
        emit(&mut report, &mut all);
    }
    if wants("p4") {
        p4(&dir.join("p4"), &options, &mut report).await?;
        emit(&mut report, &mut all);
    }
    if wants("p6") {
        let env = pipeline_env(&options, false, &[]);
        crate::pacing::p6(&dir.join("p6"), env, &mut report).await?;
        emit(&mut report, &mut all);
    }
    if wants("h1") {
        h1(&dir.join("h1"), &options, &mut report).await?;
        emit(&mut report, &mut all);
    }
    let out = repo().join(&options.out);
    std::fs::write(&out, &all).with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!("\nwritten to {}; logs in {}", out.display(), dir.display());
    Ok(())
}

fn emit(report: &mut Report, all: &mut String) {
    let text = report.flush();
    print!("{text}");
    all.push_str(&text);
}

fn machine(report: &mut Report) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or("unknown".into(), |kib| {
            format!("{:.1} GiB", kib / 1024.0 / 1024.0)
        });
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let commit = version_of(Path::new("git"), &["rev-parse", "--short", "HEAD"]);
    report.section("Machine and versions", "");
    report.line(&format!("- {cores} cores ({cpu}), {memory} of memory"));
    report.line(&format!("- wagate {commit}, release build"));
    report.line(&format!(
        "- {}",
        version_of(Path::new("rustc"), &["--version"])
    ));
    report.line(&format!(
        "- nats-server {}",
        version_of(&nats_binary(), &["--version"])
    ));
    report.line(&format!(
        "- {}",
        version_of(Path::new("redis-server"), &["--version"])
    ));
    report.line(&format!(
        "- node {}, express and twilio as pinned in bench/express/package-lock.json",
        version_of(Path::new("node"), &["--version"])
    ));
}

struct P1Target<'a> {
    name: &'static str,
    target: Target,
    proc: &'a Proc,
    rates: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    errors: u64,
    cpu_us: Vec<f64>,
    client_cpu_us: Vec<f64>,
    nats_cpu_us: Vec<f64>,
}

/// NATS, Redis and `wagate ingress` alone, which never calls Twilio.
async fn lone_ingress(dir: &Path, options: &Options) -> Result<(Servers, Wagate)> {
    std::fs::create_dir_all(dir)?;
    let servers = Servers::start(dir).await?;
    let deployment = Deployment {
        dir,
        servers: Some(&servers),
        twilio_base: "http://127.0.0.1:9".into(),
        env: options.wagate_env.clone(),
        wrapper: vec![],
    };
    let ingress = deployment.start("ingress", "ingress").await?;
    Ok((servers, ingress))
}

async fn p1(dir: &Path, options: &Options, report: &mut Report) -> Result<()> {
    let (servers, ingress) = lone_ingress(dir, options).await?;
    ingress.set_up_agent(json!({"kind": "echo"})).await?;

    let probe_port = free_port()?;
    let mut probe_cmd = Command::new(std::env::current_exe()?);
    probe_cmd
        .arg("probe")
        .args(["--listen", &format!("127.0.0.1:{probe_port}")])
        .args(["--nats-url", &servers.nats_url]);
    let mut probe = Proc::spawn("limit probe", probe_cmd, &dir.join("probe.log"))?;
    probe.wait_port(probe_port).await?;

    let express_port = free_port()?;
    let mut express_cmd = Command::new("node");
    express_cmd
        .arg(repo().join("bench/express/server.js"))
        .env("PORT", express_port.to_string())
        .env("TWILIO_AUTH_TOKEN", AUTH_TOKEN)
        .env("NODE_ENV", "production");
    let mut express = Proc::spawn("express", express_cmd, &dir.join("express.log"))?;
    express.wait_port(express_port).await?;

    let mut targets = [
        P1Target::new(
            "wagate ingress",
            Target::local(ingress.port, AGENT),
            &ingress.proc,
        ),
        P1Target::new("limit probe", Target::local(probe_port, AGENT), &probe),
        P1Target::new(
            "Express + twilio.webhook()",
            Target::local(express_port, AGENT),
            &express,
        ),
    ];
    let mut sid = 0u64;
    let cap = 60_000 * options.seconds as usize;
    for t in &targets {
        let warm = Arc::new(load::presign(&t.target, sid, cap / 5));
        sid += warm.len() as u64;
        load::run(&t.target, warm, options.concurrency, Duration::from_secs(1)).await?;
    }
    for round in 0..options.rounds {
        for t in &mut targets {
            let target = t.target.clone();
            let first = sid;
            let requests = Arc::new(
                tokio::task::spawn_blocking(move || load::presign(&target, first, cap)).await?,
            );
            sid += cap as u64;
            let cpu_before = t.proc.cpu_seconds()?;
            let client_before = procs::own_cpu_seconds()?;
            let nats_before = servers.nats.cpu_seconds()?;
            let outcome = load::run(
                &t.target,
                requests,
                options.concurrency,
                Duration::from_secs(options.seconds),
            )
            .await?;
            let cpu = t.proc.cpu_seconds()? - cpu_before;
            let client = procs::own_cpu_seconds()? - client_before;
            let nats = servers.nats.cpu_seconds()? - nats_before;
            eprintln!(
                "P1 round {round}: {} {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
                t.name,
                outcome.rate(),
                outcome.quantile_ms(0.5),
                outcome.quantile_ms(0.99),
                outcome.errors
            );
            t.rates.push(outcome.rate());
            t.p50.push(outcome.quantile_ms(0.5));
            t.p99.push(outcome.quantile_ms(0.99));
            t.errors += outcome.errors;
            let per = |seconds: f64| seconds * 1e6 / outcome.ok.max(1) as f64;
            t.cpu_us.push(per(cpu));
            t.client_cpu_us.push(per(client));
            t.nats_cpu_us.push(per(nats));
        }
    }
    let [wagate, probe_t, express_t] = &targets;
    report.section(
        "P1 ingress",
        &format!(
            "Signed webhooks with unique MessageSids, pre-signed, over {} keep-alive connections; {} rounds of {} s per target, interleaved; medians. wagate and the probe answer only after JetStream acknowledged the message; Express only verifies.",
            options.concurrency, options.rounds, options.seconds
        ),
    );
    report.header(&[
        "target",
        "requests/s",
        "p50 ms",
        "p99 ms",
        "non-200",
        "server CPU µs/request",
        "nats-server CPU µs/request",
        "load generator CPU µs/request",
    ]);
    for t in &targets {
        report.row(vec![
            t.name.into(),
            format!("{:.0}", median(&t.rates)),
            format!("{:.2}", median(&t.p50)),
            format!("{:.2}", median(&t.p99)),
            t.errors.to_string(),
            format!("{:.1}", median(&t.cpu_us)),
            format!("{:.1}", median(&t.nats_cpu_us)),
            format!("{:.1}", median(&t.client_cpu_us)),
        ]);
    }
    let of_limit = median(&wagate.rates) / median(&probe_t.rates);
    let of_peer = median(&wagate.rates) / median(&express_t.rates);
    let p99 = median(&wagate.p99);
    report.line("");
    report.header(&["goal", "measured", "verdict"]);
    report.row(vec![
        "wagate ≥ 80% of the limit probe".into(),
        format!("{:.0}%", of_limit * 100.0),
        verdict(of_limit >= 0.8).into(),
    ]);
    report.row(vec![
        "wagate ≥ 7× Express".into(),
        format!("{of_peer:.1}×"),
        verdict(of_peer >= 7.0).into(),
    ]);
    report.row(vec![
        format!("wagate p99 ≤ 10 ms at concurrency {}", options.concurrency),
        format!("{p99:.2} ms"),
        verdict(p99 <= 10.0).into(),
    ]);
    Ok(())
}

impl<'a> P1Target<'a> {
    fn new(name: &'static str, target: Target, proc: &'a Proc) -> Self {
        P1Target {
            name,
            target,
            proc,
            rates: vec![],
            p50: vec![],
            p99: vec![],
            errors: 0,
            cpu_us: vec![],
            client_cpu_us: vec![],
            nats_cpu_us: vec![],
        }
    }
}

/// How the wagate processes of a pipeline run are laid out.
#[derive(Clone, Copy)]
enum Layout {
    /// `wagate serve` on NATS + Redis: every role in one process.
    Serve,
    /// `wagate serve` with no NATS or Redis: the embedded store.
    Embedded,
    /// One ingress, `workers` worker and one sender process, on NATS + Redis.
    Split { workers: usize },
}

struct PipelineSpec {
    layout: Layout,
    /// `None`: the echo agent; otherwise a webhook agent taking this long, reached so.
    agent: Option<(Duration, AgentHost)>,
    env: Vec<(String, String)>,
    conversations: usize,
    rounds: usize,
    runs: usize,
    warmup: usize,
    /// Runs every wagate process under callgrind and counts the instructions of each run.
    count_instructions: bool,
}

struct PipelineFigures {
    drives: Vec<Driven>,
    /// CPU time of all wagate processes per reply, µs, per run.
    wagate_cpu_us: Vec<f64>,
    /// CPU time of nats-server and of redis-server per reply, µs, per run.
    servers_cpu_us: Vec<(f64, f64)>,
    /// CPU time of the bench itself (users' side and fake Twilio) per reply, µs, per run.
    bench_cpu_us: Vec<f64>,
    /// Peak RSS of each wagate process, MiB.
    rss: Vec<(String, f64)>,
    /// Instructions of all wagate processes per reply, per run, when they were counted.
    instructions: Vec<f64>,
}

impl PipelineFigures {
    fn rates(&self) -> Vec<f64> {
        self.drives.iter().map(Driven::rate).collect()
    }

    fn flow_rates(&self) -> Vec<f64> {
        self.drives.iter().map(Driven::flow_rate).collect()
    }

    /// CPU time of every process per reply, µs, per run: wagate, nats-server, redis-server and
    /// the bench with its fakes; what the machine's cores must give each reply.
    fn all_cpu_us(&self) -> Vec<f64> {
        self.wagate_cpu_us
            .iter()
            .zip(&self.servers_cpu_us)
            .zip(&self.bench_cpu_us)
            .map(|((w, (n, r)), b)| w + n + r + b)
            .collect()
    }

    fn exact(&self) -> bool {
        self.drives.iter().all(Driven::exact)
    }

    fn checked(&self) -> String {
        let replies: u64 = self.drives.iter().map(|d| d.replies).sum();
        let bad: u64 = self
            .drives
            .iter()
            .map(|d| d.wrong + d.missing + d.extra)
            .sum();
        if bad == 0 {
            format!("all {replies} exactly once")
        } else {
            format!("{bad} WRONG of {replies}")
        }
    }

    fn rss_text(&self) -> String {
        self.rss
            .iter()
            .map(|(n, m)| format!("{n} {m:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

async fn pipeline(dir: &Path, spec: &PipelineSpec) -> Result<PipelineFigures> {
    std::fs::create_dir_all(dir)?;
    let servers = match spec.layout {
        Layout::Embedded => None,
        _ => Some(Servers::start(dir).await?),
    };
    let conversations = spec.conversations * spec.runs + spec.warmup;
    let (replies, inboxes) = Replies::new(conversations);
    let mut inboxes: Vec<_> = inboxes.into_iter().enumerate().collect();
    let twilio = fakes::twilio(replies).await?;
    let mut env = spec.env.clone();
    if let Some((_, AgentHost::Https { .. })) = spec.agent {
        env.push(("SSL_CERT_FILE".into(), fakes::AGENT_CA.into()));
    }
    let deployment = Deployment {
        dir,
        servers: servers.as_ref(),
        twilio_base: format!("http://{twilio}"),
        env,
        wrapper: if spec.count_instructions {
            callgrind::wrapper(dir)
        } else {
            vec![]
        },
    };
    let mut procs: Vec<Wagate> = Vec::new();
    match spec.layout {
        Layout::Serve | Layout::Embedded => procs.push(deployment.start("serve", "serve").await?),
        Layout::Split { workers } => {
            procs.push(deployment.start("ingress", "ingress").await?);
            for w in 1..=workers {
                procs.push(deployment.start("worker", &format!("worker{w}")).await?);
            }
            procs.push(deployment.start("sender", "sender").await?);
        }
    }
    let backend: Value = match spec.agent {
        None => json!({"kind": "echo"}),
        Some((latency, host)) => {
            let url = fakes::slow_agent(latency, host).await?;
            json!({"kind": "webhook", "url": url, "secret": "bench-agent-secret"})
        }
    };
    procs[0].set_up_agent(backend).await?;
    let target = Target::local(procs[0].port, AGENT);
    let warm: Vec<_> = inboxes.drain(..spec.warmup).collect();
    let warmed = pipeline::drive(&target, warm, 2, 0).await?;
    if !warmed.exact() {
        anyhow::bail!("the warm-up was not answered exactly once: {warmed:?}");
    }
    let mut figures = PipelineFigures {
        drives: vec![],
        wagate_cpu_us: vec![],
        servers_cpu_us: vec![],
        bench_cpu_us: vec![],
        rss: vec![],
        instructions: vec![],
    };
    let cpu = |procs: &[Wagate]| -> Result<Vec<f64>> {
        procs.iter().map(|w| w.proc.cpu_seconds()).collect()
    };
    let servers_cpu = || -> Result<(f64, f64)> {
        match &servers {
            Some(s) => Ok((s.nats.cpu_seconds()?, s.redis.cpu_seconds()?)),
            None => Ok((0.0, 0.0)),
        }
    };
    for run in 0..spec.runs {
        let batch: Vec<_> = inboxes.drain(..spec.conversations).collect();
        if spec.count_instructions {
            for w in &procs {
                callgrind::zero(w.proc.pid())?;
            }
        }
        let (w0, s0, b0) = (cpu(&procs)?, servers_cpu()?, procs::own_cpu_seconds()?);
        let driven = pipeline::drive(&target, batch, spec.rounds, run as u32 + 1).await?;
        let (w1, s1, b1) = (cpu(&procs)?, servers_cpu()?, procs::own_cpu_seconds()?);
        let replies = driven.replies.max(1) as f64;
        if spec.count_instructions {
            let counted = procs
                .iter()
                .map(|w| callgrind::dump(w.proc.pid(), dir))
                .sum::<Result<u64>>()?;
            let each = counted as f64 / replies;
            eprintln!("  run {run}: {each:.0} instructions per reply, counted by callgrind");
            figures.instructions.push(each);
        }
        let each: Vec<f64> = w1
            .iter()
            .zip(&w0)
            .map(|(b, a)| (b - a) * 1e6 / replies)
            .collect();
        let wagate: f64 = each.iter().sum();
        figures.wagate_cpu_us.push(wagate);
        figures
            .servers_cpu_us
            .push(((s1.0 - s0.0) * 1e6 / replies, (s1.1 - s0.1) * 1e6 / replies));
        figures.bench_cpu_us.push((b1 - b0) * 1e6 / replies);
        eprintln!(
            "  run {run}: {:.0} replies/s ({} replies in {:.2} s, {} wrong, {} missing, {} extra, {} retried), wagate CPU {wagate:.0} µs/reply ({}); nats-server {:.0}, redis-server {:.0}, bench {:.0}",
            driven.rate(),
            driven.replies,
            driven.seconds,
            driven.wrong,
            driven.missing,
            driven.extra,
            driven.retries,
            procs
                .iter()
                .zip(&each)
                .map(|(w, c)| format!("{} {c:.0}", w.proc.name))
                .collect::<Vec<_>>()
                .join(", "),
            (s1.0 - s0.0) * 1e6 / replies,
            (s1.1 - s0.1) * 1e6 / replies,
            (b1 - b0) * 1e6 / replies,
        );
        figures.drives.push(driven);
    }
    for w in &procs {
        figures
            .rss
            .push((w.proc.name.clone(), w.proc.peak_rss_mib()?));
    }
    Ok(figures)
}

async fn p2_p5(dir: &Path, options: &Options, report: &mut Report) -> Result<()> {
    let layouts = [
        ("serve", "serve on NATS + Redis", Layout::Serve, false),
        (
            "serve-cores",
            "serve on NATS + Redis, a thread per core for each role",
            Layout::Serve,
            true,
        ),
        (
            "split",
            "ingress + worker + sender on NATS + Redis",
            Layout::Split { workers: 1 },
            false,
        ),
        ("embedded", "serve, embedded store", Layout::Embedded, false),
    ];
    let layouts = layouts
        .into_iter()
        .filter(|(key, ..)| *key == "serve" || options.layouts.iter().any(|l| l == key));
    let mut rows = Vec::new();
    for (i, (_, name, layout, threads_per_core)) in layouts.enumerate() {
        eprintln!("P2: {name}");
        let spec = PipelineSpec {
            layout,
            agent: None,
            env: pipeline_env(options, threads_per_core, &[]),
            conversations: 1000,
            rounds: 10,
            runs: options.rounds,
            warmup: 200,
            count_instructions: false,
        };
        let figures = pipeline(&dir.join(format!("layout{i}")), &spec).await?;
        rows.push((name, figures));
    }
    report.section(
        "P2 pipeline and P5 cost",
        &format!(
            "1,000 conversations at once, each sending 10 messages one after the other (the next when the reply came), echo agent, fake Twilio on loopback; {} runs per layout after a warm-up, medians. Every reply is checked to arrive once with its message's text. CPU is user + system time from /proc over the measured run. wagate runs with WAGATE_THREADS=1 except where the layout says a thread per core (WAGATE_THREADS set to the number of cores).",
            options.rounds
        ),
    );
    report.header(&[
        "layout",
        "replies/s",
        "checked",
        "wagate CPU µs/reply",
        "nats-server CPU µs/reply",
        "redis-server CPU µs/reply",
        "bench (users + fake Twilio) CPU µs/reply",
        "peak RSS MiB",
    ]);
    for (name, f) in &rows {
        report.row(vec![
            (*name).into(),
            format!("{:.0}", median(&f.rates())),
            f.checked(),
            format!("{:.0}", median(&f.wagate_cpu_us)),
            format!(
                "{:.0}",
                median(&f.servers_cpu_us.iter().map(|c| c.0).collect::<Vec<_>>())
            ),
            format!(
                "{:.0}",
                median(&f.servers_cpu_us.iter().map(|c| c.1).collect::<Vec<_>>())
            ),
            format!("{:.0}", median(&f.bench_cpu_us)),
            f.rss_text(),
        ]);
    }
    let serve = &rows[0].1;
    let rate = median(&serve.rates());
    let cost = median(&serve.wagate_cpu_us);
    report.line("");
    report.header(&["goal", "measured", "verdict"]);
    report.row(vec![
        "P2 ≥ 5,000 replies/s (serve on NATS + Redis), each exactly once".into(),
        format!("{rate:.0}/s"),
        verdict(rate >= 5000.0 && serve.exact()).into(),
    ]);
    report.row(vec![
        "P5 ≤ 150 µs of wagate CPU per reply".into(),
        format!("{cost:.0} µs"),
        verdict(cost <= 150.0).into(),
    ]);
    if options.only.iter().any(|o| o == "p5") {
        p5_instructions(&dir.join("instructions"), options, report).await?;
    }
    Ok(())
}

/// P5 again, in instructions: `serve` on NATS + Redis under callgrind, which counts what wagate
/// executes per reply the same whatever the machine's speed that day, so that two builds can
/// be compared across days. Once with the echo agent (P2's pipeline), once with a webhook
/// agent over HTTPS and HTTP/2 that answers at once (the agent call of P3, without its wait).
async fn p5_instructions(dir: &Path, options: &Options, report: &mut Report) -> Result<()> {
    report.section(
        "P5 in instructions",
        &format!(
            "wagate serve on NATS + Redis (WAGATE_THREADS=1) under valgrind's callgrind, which counts the instructions a process executes: the same for the same work on a slow day as on a fast one, where CPU seconds are not. 200 conversations × 5 messages per run, {} runs after a warm-up; the counters are zeroed before each run and read after it. Under callgrind wagate runs about fifty times slower, so it batches fewer messages per round trip than at full speed: the count is for comparing builds, not for converting into µs.",
            options.rounds
        ),
    );
    if !callgrind::available() {
        report.line("Not measured: valgrind (with callgrind_control) is not installed.");
        return Ok(());
    }
    let agents = [
        ("echo agent (as P2)", None),
        (
            "webhook agent over HTTPS, HTTP/2, answering at once (the call of P3)",
            Some((Duration::ZERO, AgentHost::Https { h2_streams: 250 })),
        ),
    ];
    report.header(&[
        "serve on NATS + Redis, with",
        "instructions per reply (median)",
        "each run",
        "checked",
    ]);
    for (i, (name, agent)) in agents.into_iter().enumerate() {
        eprintln!("P5: instructions of serve, under callgrind, {name}");
        let spec = PipelineSpec {
            layout: Layout::Serve,
            agent,
            env: pipeline_env(options, false, &[]),
            conversations: 200,
            rounds: 5,
            runs: options.rounds,
            warmup: 100,
            count_instructions: true,
        };
        let figures = pipeline(&dir.join(format!("agent{i}")), &spec).await?;
        report.row(vec![
            name.into(),
            format!("{:.0}", median(&figures.instructions)),
            figures
                .instructions
                .iter()
                .map(|i| format!("{i:.0}"))
                .collect::<Vec<_>>()
                .join(", "),
            figures.checked(),
        ]);
    }
    Ok(())
}

async fn p3(dir: &Path, options: &Options, report: &mut Report) -> Result<()> {
    const CONVERSATIONS: usize = 10_000;
    const LATENCY: Duration = Duration::from_secs(2);
    let hosts = [
        (
            "HTTPS, HTTP/2 with 250 streams per connection",
            AgentHost::Https { h2_streams: 250 },
        ),
        ("plain HTTP/1.1", AgentHost::PlainHttp1),
    ];
    let mut rows = Vec::new();
    for (i, (name, host)) in hosts.into_iter().enumerate() {
        eprintln!("P3: {CONVERSATIONS} conversations, agent latency {LATENCY:?}, agent {name}");
        let spec = PipelineSpec {
            layout: Layout::Split { workers: 1 },
            agent: Some((LATENCY, host)),
            env: pipeline_env(options, false, &[]),
            conversations: CONVERSATIONS,
            rounds: 3,
            runs: 1,
            warmup: 100,
            count_instructions: false,
        };
        rows.push((name, pipeline(&dir.join(format!("host{i}")), &spec).await?));
    }
    let bound = CONVERSATIONS as f64 / LATENCY.as_secs_f64();
    let worker_rss = |f: &PipelineFigures| {
        f.rss
            .iter()
            .find(|(n, _)| n == "worker1")
            .map_or(f64::NAN, |(_, m)| *m)
    };
    report.section(
        "P3 slow agents",
        "10,000 conversations at once, each sending 3 messages one after the other, to a webhook agent that answers after 2 s; one worker process with default settings (WAGATE_WORKER_CONCURRENCY 10,000), one ingress, one sender, each with WAGATE_THREADS=1. The agent is reached as hosted agents and model APIs are, over HTTPS offering HTTP/2 (250 streams per connection, as Go's HTTP/2 server allows by default), and, for comparison, as a plain HTTP/1.1 endpoint, which takes a connection per call in flight. The bound is conversations ÷ latency = 5,000 replies/s; the measured time includes sending the first messages and their 2 s wait, so a pipeline that handles exactly 5,000 messages a second finishes after about 8 s, at 75% of the bound (the first 10,000 messages take 2 s to enter it, and each of the three rounds waits 2 s). \"Once flowing\" counts from the first reply to the last: the rate the pipeline sustains. \"All CPU\" adds nats-server, redis-server and the bench with its fake agent and fake Twilio to wagate.",
    );
    report.header(&[
        "agent reached over",
        "replies/s",
        "of the bound",
        "replies/s once flowing",
        "wagate CPU µs/reply",
        "nats-server, redis-server, bench CPU µs/reply",
        "all CPU µs/reply",
        "checked",
        "worker peak RSS MiB",
        "all peak RSS MiB",
    ]);
    for (name, f) in &rows {
        let (rate, flow) = (median(&f.rates()), median(&f.flow_rates()));
        report.row(vec![
            (*name).into(),
            format!("{rate:.0}"),
            format!("{:.0}%", rate / bound * 100.0),
            format!("{flow:.0} ({:.0}%)", flow / bound * 100.0),
            format!("{:.0}", median(&f.wagate_cpu_us)),
            format!(
                "{:.0}, {:.0}, {:.0}",
                median(&f.servers_cpu_us.iter().map(|c| c.0).collect::<Vec<_>>()),
                median(&f.servers_cpu_us.iter().map(|c| c.1).collect::<Vec<_>>()),
                median(&f.bench_cpu_us)
            ),
            format!("{:.0}", median(&f.all_cpu_us())),
            f.checked(),
            format!("{:.0}", worker_rss(f)),
            f.rss_text(),
        ]);
    }
    let (name, f) = &rows[0];
    let rate = median(&f.rates());
    let rss = worker_rss(f) * 1.048_576;
    report.line("");
    report.header(&["goal (agent over HTTPS)", "measured", "verdict"]);
    report.row(vec![
        "P3 ≥ 80% of the bound".into(),
        format!("{:.0}%", rate / bound * 100.0),
        verdict(rate / bound >= 0.8 && f.exact()).into(),
    ]);
    report.row(vec![
        "P3 worker RSS ≤ 300 MB".into(),
        format!("{rss:.0} MB"),
        verdict(rss <= 300.0).into(),
    ]);
    eprintln!("P3: goals judged on the agent reached over {name}");
    Ok(())
}

async fn p4(dir: &Path, options: &Options, report: &mut Report) -> Result<()> {
    const CONCURRENCY: usize = 200;
    const LATENCY: Duration = Duration::from_millis(250);
    let mut rates = [vec![], vec![]];
    for workers in [1, 2] {
        eprintln!("P4: {workers} worker process(es)");
        let spec = PipelineSpec {
            layout: Layout::Split { workers },
            agent: Some((LATENCY, AgentHost::PlainHttp1)),
            env: pipeline_env(
                options,
                false,
                &[("WAGATE_WORKER_CONCURRENCY", CONCURRENCY.to_string())],
            ),
            conversations: 1000,
            rounds: 4,
            runs: options.rounds,
            warmup: 100,
            count_instructions: false,
        };
        let f = pipeline(&dir.join(format!("workers{workers}")), &spec).await?;
        if !f.exact() {
            anyhow::bail!("P4 with {workers} workers: {}", f.checked());
        }
        rates[workers - 1] = f.rates();
    }
    let (one, two) = (median(&rates[0]), median(&rates[1]));
    let bound = CONCURRENCY as f64 / LATENCY.as_secs_f64();
    report.section(
        "P4 scaling",
        &format!(
            "1,000 conversations × 4 messages, webhook agent answering after 250 ms, WAGATE_WORKER_CONCURRENCY={CONCURRENCY} per worker process, so one process is bound at {bound:.0} replies/s; one ingress and one sender; WAGATE_THREADS=1; {} runs each, medians.",
            options.rounds
        ),
    );
    report.header(&["worker processes", "replies/s", "of the bound"]);
    report.row(vec![
        "1".into(),
        format!("{one:.0}"),
        format!("{:.0}%", one / bound * 100.0),
    ]);
    report.row(vec![
        "2".into(),
        format!("{two:.0}"),
        format!("{:.0}%", two / bound / 2.0 * 100.0),
    ]);
    report.line("");
    report.header(&["goal", "measured", "verdict"]);
    report.row(vec![
        "P4 2 workers ≥ 1.8× 1 worker".into(),
        format!("{:.2}×", two / one),
        verdict(two / one >= 1.8).into(),
    ]);
    Ok(())
}

/// Requests to made-up agent ids in H1: the warm-up, then the measured flood.
const H1_WARM_UP: usize = 20_000;
const H1_FLOOD: usize = 200_000;

/// H1: what requests to agent ids that do not exist cost the ingress in memory. Each one is
/// looked up in the store and remembered as unknown for a while; that memory must stay bounded
/// however many different ids arrive.
async fn h1(dir: &Path, options: &Options, report: &mut Report) -> Result<()> {
    let (_servers, ingress) = lone_ingress(dir, options).await?;
    let target = Target::local(ingress.port, AGENT);
    let flood = |first: usize, count: usize| {
        let target = target.clone();
        async move {
            let signing = target.clone();
            let requests =
                tokio::task::spawn_blocking(move || load::unknown_agents(&signing, first, count))
                    .await?;
            load::run(
                &target,
                Arc::new(requests),
                options.concurrency,
                Duration::from_secs(600),
            )
            .await
        }
    };
    let warm = flood(0, H1_WARM_UP).await?;
    let before = ingress.proc.rss_mib()?;
    let measured = flood(H1_WARM_UP, H1_FLOOD).await?;
    let after = ingress.proc.rss_mib()?;
    let growth = after - before;
    report.section(
        "H1 requests to unknown agents",
        &format!(
            "One ingress on NATS + Redis; {H1_WARM_UP} webhooks to distinct made-up agent ids as a warm-up, then {H1_FLOOD} more to other made-up ids, over {} connections. Every one is answered 404 (`Unknown agent`) after a store lookup; the ingress keeps at most 10,000 unknown ids for 30 s. RSS is the ingress's VmRSS after each phase.",
            options.concurrency
        ),
    );
    report.header(&[
        "phase",
        "requests",
        "answered 404 or otherwise",
        "requests/s",
        "ingress RSS after, MiB",
    ]);
    for (phase, outcome, rss) in [("warm-up", &warm, before), ("flood", &measured, after)] {
        report.row(vec![
            phase.into(),
            (outcome.ok + outcome.errors).to_string(),
            outcome.errors.to_string(),
            format!(
                "{:.0}",
                (outcome.ok + outcome.errors) as f64 / outcome.seconds
            ),
            format!("{rss:.1}"),
        ]);
    }
    report.line("");
    report.header(&["goal", "measured", "verdict"]);
    report.row(vec![
        format!("ingress RSS grows < 10 MB over {H1_FLOOD} unknown agent ids"),
        format!("{:.1} MB", growth * 1.048_576),
        verdict(growth * 1.048_576 < 10.0).into(),
    ]);
    Ok(())
}
