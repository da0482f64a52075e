//! One pipeline benchmark: wagate deployed in a layout on fresh NATS and Redis (one server of
//! each, or clusters of them), or embedded; conversations driven through it, each reply checked;
//! and what every process spent per reply.

use std::{path::Path, time::Duration};

use anyhow::Result;
use serde_json::{Value, json};

use crate::{
    callgrind, clusters,
    fakes::{self, AgentHost, Replies},
    load::Target,
    pipeline::{self, Driven},
    procs::{self, Proc, Servers},
    wagate::{AGENT, Deployment, Wagate},
};

/// How the wagate processes of a pipeline run are laid out.
#[derive(Clone, Copy)]
pub enum Layout {
    /// `wagate serve` on NATS + Redis: every role in one process.
    Serve,
    /// `wagate serve` with no NATS or Redis: the embedded store.
    Embedded,
    /// One ingress, `workers` worker and one sender process, on NATS + Redis.
    Split { workers: usize },
}

pub struct PipelineSpec {
    pub layout: Layout,
    /// `None`: the echo agent; otherwise a webhook agent taking this long, reached so.
    pub agent: Option<(Duration, AgentHost)>,
    pub env: Vec<(String, String)>,
    pub conversations: usize,
    pub rounds: usize,
    pub runs: usize,
    pub warmup: usize,
    /// Runs every wagate process, and redis-server, under callgrind and counts the
    /// instructions of each run.
    pub count_instructions: bool,
    /// On a 3-node JetStream cluster and a Redis Cluster instead of one server of each.
    pub clustered: bool,
}

pub struct PipelineFigures {
    pub drives: Vec<Driven>,
    /// CPU time of all wagate processes per reply, µs, per run.
    pub wagate_cpu_us: Vec<f64>,
    /// CPU time of nats-server and of redis-server per reply, µs, per run.
    pub servers_cpu_us: Vec<(f64, f64)>,
    /// CPU time of the bench itself (users' side and fake Twilio) per reply, µs, per run.
    pub bench_cpu_us: Vec<f64>,
    /// CPU time of each wagate process per reply, µs, per run, in the order of `rss`.
    pub process_cpu_us: Vec<Vec<f64>>,
    /// Peak RSS of each wagate process, MiB.
    pub rss: Vec<(String, f64)>,
    /// Instructions of all wagate processes per reply, per run, when they were counted.
    pub instructions: Vec<f64>,
    /// Instructions of redis-server per reply, per run, when they were counted.
    pub redis_instructions: Vec<f64>,
}

impl PipelineFigures {
    pub fn rates(&self) -> Vec<f64> {
        self.drives.iter().map(Driven::rate).collect()
    }

    pub fn flow_rates(&self) -> Vec<f64> {
        self.drives.iter().map(Driven::flow_rate).collect()
    }

    /// CPU time of every process per reply, µs, per run: wagate, nats-server, redis-server and
    /// the bench with its fakes; what the machine's cores must give each reply.
    pub fn all_cpu_us(&self) -> Vec<f64> {
        self.wagate_cpu_us
            .iter()
            .zip(&self.servers_cpu_us)
            .zip(&self.bench_cpu_us)
            .map(|((w, (n, r)), b)| w + n + r + b)
            .collect()
    }

    pub fn exact(&self) -> bool {
        self.drives.iter().all(Driven::exact)
    }

    pub fn checked(&self) -> String {
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

    pub fn rss_text(&self) -> String {
        self.rss
            .iter()
            .map(|(n, m)| format!("{n} {m:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

pub async fn pipeline(dir: &Path, spec: &PipelineSpec) -> Result<PipelineFigures> {
    std::fs::create_dir_all(dir)?;
    let servers = match spec.layout {
        Layout::Embedded => None,
        _ if spec.clustered => Some(clusters::start(dir).await?),
        _ if spec.count_instructions => {
            Some(Servers::start_wrapped(dir, &callgrind::wrapper(dir)).await?)
        }
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
        process_cpu_us: vec![],
        rss: vec![],
        instructions: vec![],
        redis_instructions: vec![],
    };
    let cpu = |procs: &[Wagate]| -> Result<Vec<f64>> {
        procs.iter().map(|w| w.proc.cpu_seconds()).collect()
    };
    let servers_cpu = || -> Result<(f64, f64)> {
        match &servers {
            Some(s) => Ok((s.nats_cpu_seconds()?, s.redis_cpu_seconds()?)),
            None => Ok((0.0, 0.0)),
        }
    };
    for run in 0..spec.runs {
        let batch: Vec<_> = inboxes.drain(..spec.conversations).collect();
        let redis_pid = servers
            .as_ref()
            .and_then(|s| s.redis.first())
            .map(Proc::pid);
        if spec.count_instructions {
            for pid in procs.iter().map(|w| w.proc.pid()).chain(redis_pid) {
                callgrind::zero(pid)?;
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
            figures.instructions.push(each);
            let redis = match redis_pid {
                Some(pid) => callgrind::dump(pid, dir)? as f64 / replies,
                None => 0.0,
            };
            figures.redis_instructions.push(redis);
            eprintln!(
                "  run {run}: {each:.0} instructions per reply in wagate, {redis:.0} in redis-server, counted by callgrind"
            );
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
        figures.process_cpu_us.push(each);
    }
    for w in &procs {
        figures
            .rss
            .push((w.proc.name.clone(), w.proc.peak_rss_mib()?));
    }
    Ok(figures)
}
