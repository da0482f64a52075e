//! P4: scaling. The same traffic through 1, 2 and 4 worker processes while the agent's latency,
//! not the machine, bounds what each worker can do, on one nats-server and one redis-server and
//! again on a 3-node JetStream cluster and a Redis Cluster. Workers share nothing but NATS and
//! Redis, so each one added should add its bound; the table says how close they come and what
//! each kind of process spends per reply.

use std::{path::Path, time::Duration};

use anyhow::Result;

use crate::{
    fakes::AgentHost,
    measured::{Layout, PipelineFigures, PipelineSpec, pipeline},
    report::{Report, median, verdict},
    scenarios::{Options, pipeline_env},
};

/// `WAGATE_WORKER_CONCURRENCY` of each worker: with [`LATENCY`], a bound of 100 replies/s per
/// worker, so that four of them (400/s) stay within what two cores give every process of a
/// clustered deployment (about 3,400 µs of CPU per reply together, most of it JetStream
/// replicating to three servers): beyond that the machine, not the agent, would set the pace.
const CONCURRENCY: usize = 20;
const LATENCY: Duration = Duration::from_millis(200);
const WORKERS: [usize; 3] = [1, 2, 4];
const CONVERSATIONS: usize = 500;
const ROUNDS: usize = 4;

/// The process kinds of a split deployment, by the names `measured` gives them.
const KINDS: [&str; 3] = ["ingress", "worker", "sender"];

pub async fn p4(dir: &Path, options: &Options, report: &mut Report) -> Result<()> {
    let backends = [
        ("one nats-server, one redis-server", false),
        (
            "3-node JetStream cluster (streams R3), Redis Cluster (3 masters, 3 replicas)",
            true,
        ),
    ];
    let bound = CONCURRENCY as f64 / LATENCY.as_secs_f64();
    report.section(
        "P4 scaling",
        &format!(
            "{CONVERSATIONS} conversations × {ROUNDS} messages, webhook agent over plain HTTP/1.1 answering after {} ms, WAGATE_WORKER_CONCURRENCY={CONCURRENCY} per worker process, so each worker is bound at {bound:.0} replies/s; one ingress and one sender; WAGATE_THREADS=1; {} runs each, medians. CPU is per reply, all processes of a kind together (the workers summed).",
            LATENCY.as_millis(),
            options.rounds
        ),
    );
    report.header(&[
        "NATS and Redis",
        "worker processes",
        "replies/s",
        "of the bound",
        "ingress µs",
        "workers µs",
        "sender µs",
        "nats-server µs",
        "redis-server µs",
        "bench µs",
        "checked",
    ]);
    let mut goals = Vec::new();
    for (i, (backend, clustered)) in backends.into_iter().enumerate() {
        let mut rates = Vec::new();
        for workers in WORKERS {
            eprintln!("P4: {workers} worker process(es) on {backend}");
            let spec = PipelineSpec {
                layout: Layout::Split { workers },
                agent: Some((LATENCY, AgentHost::PlainHttp1)),
                env: pipeline_env(
                    options,
                    false,
                    &[("WAGATE_WORKER_CONCURRENCY", CONCURRENCY.to_string())],
                ),
                conversations: CONVERSATIONS,
                rounds: ROUNDS,
                runs: options.rounds,
                warmup: 100,
                count_instructions: false,
                clustered,
            };
            let run_dir = dir.join(format!("backend{i}-workers{workers}"));
            let f = pipeline(&run_dir, &spec).await?;
            if !f.exact() {
                anyhow::bail!("P4 with {workers} workers on {backend}: {}", f.checked());
            }
            let rate = median(&f.rates());
            let mut row = vec![
                backend.to_owned(),
                workers.to_string(),
                format!("{rate:.0}"),
                format!("{:.0}%", rate / (bound * workers as f64) * 100.0),
            ];
            row.extend(KINDS.map(|kind| format!("{:.0}", median(&kind_cpu_us(&f, kind)))));
            let servers = |pick: fn(&(f64, f64)) -> f64| {
                median(&f.servers_cpu_us.iter().map(pick).collect::<Vec<_>>())
            };
            row.push(format!("{:.0}", servers(|s| s.0)));
            row.push(format!("{:.0}", servers(|s| s.1)));
            row.push(format!("{:.0}", median(&f.bench_cpu_us)));
            row.push(f.checked());
            report.row(row);
            rates.push(rate);
        }
        goals.push((backend, rates));
    }
    report.line("");
    report.header(&["goal", "measured", "verdict"]);
    for (backend, rates) in goals {
        let (one, two, four) = (rates[0], rates[1], rates[2]);
        report.row(vec![
            format!("P4 2 workers ≥ 1.8× 1 worker, {backend}"),
            format!("{:.2}× (4 workers: {:.2}×)", two / one, four / one),
            verdict(two / one >= 1.8).into(),
        ]);
    }
    Ok(())
}

/// CPU per reply of every process of `kind` together, per run.
fn kind_cpu_us(f: &PipelineFigures, kind: &str) -> Vec<f64> {
    f.process_cpu_us
        .iter()
        .map(|run| {
            run.iter()
                .zip(&f.rss)
                .filter(|(_, (name, _))| name.starts_with(kind))
                .map(|(cpu, _)| cpu)
                .sum()
        })
        .collect()
}
