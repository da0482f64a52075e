//! P3: slow agents. 10,000 conversations with an agent that answers after 2 s, on one worker
//! process with its default settings: how close the pipeline comes to the bound that the
//! agent's latency sets, and what the worker holds in memory meanwhile.

use std::{path::Path, time::Duration};

use anyhow::Result;

use crate::{
    fakes::AgentHost,
    measured::{Layout, PipelineFigures, PipelineSpec, pipeline},
    report::{Report, median, verdict},
    scenarios::{Options, pipeline_env},
};

pub async fn p3(dir: &Path, options: &Options, report: &mut Report) -> Result<()> {
    const CONVERSATIONS: usize = 10_000;
    const LATENCY: Duration = Duration::from_secs(2);
    let hosts = [
        (
            "https",
            "HTTPS, HTTP/2 with 250 streams per connection",
            AgentHost::Https { h2_streams: 250 },
        ),
        ("http1", "plain HTTP/1.1", AgentHost::PlainHttp1),
    ];
    if let Some(unknown) = options
        .p3_agents
        .iter()
        .find(|a| !hosts.iter().any(|(key, ..)| key == a))
    {
        anyhow::bail!("--p3-agents: no agent host {unknown:?} (https, http1)");
    }
    let mut rows = Vec::new();
    for (i, (_, name, host)) in hosts
        .into_iter()
        .enumerate()
        .filter(|(_, (key, ..))| options.p3_agents.iter().any(|a| a == key))
    {
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
            clustered: false,
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
    let Some((name, f)) = rows.first().filter(|(name, _)| name.starts_with("HTTPS")) else {
        eprintln!("P3: the goals are judged on the agent reached over HTTPS, which did not run");
        return Ok(());
    };
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
