//! The benchmarks, each on fresh servers of its own, and the table they print.

use std::{path::Path, process::Command, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use serde_json::json;

use crate::{
    agent_calls, callgrind,
    fakes::AgentHost,
    load::{self, AUTH_TOKEN, Target},
    measured::{Layout, PipelineSpec, pipeline},
    procs::{self, Proc, Servers, free_port, nats_binary, repo, version_of},
    report::{Report, median, verdict},
    scaling, slow_agents,
    wagate::{AGENT, Deployment, Wagate},
};

/// What to run and for how long.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Rounds of each P1 target and runs of each P2 deployment; medians are over these.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Length of one P1 round, in seconds.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// HTTP connections of the P1 load generator.
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Benchmarks to run, comma-separated (p1..p6, t1, h1). P5's CPU time per reply comes from
    /// the P2 runs; `p5` adds its instruction count, wagate `serve` run again under callgrind.
    #[arg(long, value_delimiter = ',', default_value = "p1,p2,p3,p4,p5,p6,t1,h1")]
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
    /// P3's agent hosts, comma-separated: https (HTTPS offering HTTP/2), http1 (plain
    /// HTTP/1.1). The goals are read off https; `--p3-agents http1` alone halves the run for
    /// trying a change to the HTTP/1.1 side.
    #[arg(
        long = "p3-agents",
        value_delimiter = ',',
        default_value = "https,http1"
    )]
    pub p3_agents: Vec<String>,
    /// T1's agent hosts, comma-separated: h2-250 and h2-50 (HTTPS offering HTTP/2 with that
    /// many streams per connection, against sharded reqwest clients), http1 (plain HTTP/1.1,
    /// wagate-transport alone: a connection per call in flight).
    #[arg(
        long = "t1-agents",
        value_delimiter = ',',
        default_value = "h2-250,h2-50"
    )]
    pub t1_agents: Vec<String>,
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
pub fn pipeline_env(
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
        slow_agents::p3(&dir.join("p3"), &options, &mut report).await?;
        emit(&mut report, &mut all);
    }
    if wants("p4") {
        scaling::p4(&dir.join("p4"), &options, &mut report).await?;
        emit(&mut report, &mut all);
    }
    if wants("t1") {
        agent_calls::t1(&dir.join("t1"), &options, &mut report).await?;
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
            let nats_before = servers.nats_cpu_seconds()?;
            let outcome = load::run(
                &t.target,
                requests,
                options.concurrency,
                Duration::from_secs(options.seconds),
            )
            .await?;
            let cpu = t.proc.cpu_seconds()? - cpu_before;
            let client = procs::own_cpu_seconds()? - client_before;
            let nats = servers.nats_cpu_seconds()? - nats_before;
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
            clustered: false,
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
            "wagate serve on NATS + Redis (WAGATE_THREADS=1) under valgrind's callgrind, which counts the instructions a process executes: the same for the same work on a slow day as on a fast one, where CPU seconds are not. 200 conversations × 5 messages per run, {} runs after a warm-up; the counters are zeroed before each run and read after it. redis-server runs under callgrind too, which counts what the store's commands and scripts cost Redis per reply. Under callgrind wagate runs about fifty times slower, so it batches fewer messages per round trip than at full speed: the count is for comparing builds, not for converting into µs.",
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
        "redis-server instructions per reply (median)",
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
            clustered: false,
        };
        let figures = pipeline(&dir.join(format!("agent{i}")), &spec).await?;
        report.row(vec![
            name.into(),
            format!("{:.0}", median(&figures.instructions)),
            each_run(&figures.instructions),
            format!("{:.0}", median(&figures.redis_instructions)),
            each_run(&figures.redis_instructions),
            figures.checked(),
        ]);
    }
    Ok(())
}

/// Counts of each run, for a report's cell.
fn each_run(counts: &[f64]) -> String {
    counts
        .iter()
        .map(|i| format!("{i:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
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
