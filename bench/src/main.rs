//! `wagate-bench`: wagate's benchmarks, side by side with its peer and with the machine's limit,
//! in one run on one machine. `scripts/bench` builds everything and runs `wagate-bench run`.
//!
//! - P1 ingress: pre-signed webhooks at a fixed concurrency against wagate's ingress, a minimal
//!   limit probe (`wagate-bench probe`) and Express with `twilio.webhook()`, in interleaved
//!   rounds so that the machine's noise falls on all three alike.
//! - P2 pipeline: echo replies per second end to end, each checked to arrive exactly once.
//! - P3 slow agents: 10,000 conversations with a 2 s agent on one worker process.
//! - P4 scaling: one, two and four worker processes while the agent's latency bounds throughput,
//!   on one nats-server and one redis-server, and on a JetStream cluster and a Redis Cluster.
//! - P5 cost: CPU time per reply of all wagate processes, and each one's peak RSS; and the
//!   instructions per reply of `serve`, counted by callgrind, which do not change with the
//!   machine's speed that day.
//! - P6 pacing: a sender number's rate, held by two sender processes posting 10,000 queued
//!   sends.
//! - T1 agent calls: wagate's own HTTP/2 pool (`wagate-transport`) against reqwest clients
//!   sharing the calls out, 10,000 calls at once to a slow HTTPS agent.
//! - H1 unknown agents: the ingress's memory while webhooks flood in for agent ids that do not
//!   exist (the figure: less than 10 MB more over 200,000 of them).
//!
//! The figures are measurements of one run; the goals in the table are the issue's, checked by
//! reading, never asserted.

mod agent_calls;
mod callgrind;
mod clusters;
mod fakes;
mod load;
mod measured;
mod pacing;
mod pipeline;
mod probe;
mod procs;
mod report;
mod scaling;
mod scenarios;
mod slow_agents;
mod wagate;

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Result;

/// The same allocator as wagate's, so that the limit probe is not slowed by a worse one.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "wagate-bench", about = "wagate's side-by-side benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the benchmarks and prints the table (also written to --out).
    Run(scenarios::Options),
    /// The P1 limit probe: verify, publish to JetStream, answer 200. Started by `run`.
    Probe {
        /// Where to listen.
        #[arg(long)]
        listen: SocketAddr,
        /// The NATS server to publish to.
        #[arg(long)]
        nats_url: String,
    },
    /// T1's client: makes agent calls at once and prints what they took. Started by `run`.
    Calls {
        /// Through which client.
        #[arg(long)]
        via: agent_calls::Via,
        /// The agent's URL.
        #[arg(long)]
        url: String,
        /// How many.
        #[arg(long)]
        calls: usize,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Run(options) => runtime.block_on(scenarios::run(options)),
        Command::Probe { listen, nats_url } => runtime.block_on(probe::serve(listen, &nats_url)),
        Command::Calls { via, url, calls } => {
            runtime.block_on(agent_calls::make_calls(via, &url, calls))
        }
    }
}

/// Where a run keeps its logs and data: `target/bench/<unix time>`.
fn run_dir() -> Result<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let dir = procs::repo().join("target/bench").join(stamp.to_string());
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
