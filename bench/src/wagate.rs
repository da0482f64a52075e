//! Running the release `wagate` binary as its users do: one process per role (or `serve` for
//! all), configured by environment, and the agent and its channel set up through the admin API.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use base64::Engine;
use serde_json::{Value, json};

use crate::{
    load::{ACCOUNT_SID, AUTH_TOKEN, SANDBOX},
    procs::{Proc, Servers, free_port, repo},
};

/// The admin API's bearer token in every bench deployment.
pub const ADMIN_TOKEN: &str = "bench-admin-token";
/// The agent every bench deployment serves.
pub const AGENT: &str = "bench";

/// The release binary built by scripts/bench.
pub fn binary() -> PathBuf {
    repo().join("target/release/wagate")
}

/// A wagate process.
pub struct Wagate {
    /// The process.
    pub proc: Proc,
    /// Webhook listener port (ingress and serve).
    pub port: u16,
    /// Admin API base URL (ingress and serve).
    pub admin: String,
}

/// Where processes of one deployment keep their files, and what they share.
pub struct Deployment<'a> {
    /// Folder for logs and data.
    pub dir: &'a Path,
    /// NATS and Redis, or `None` for embedded mode.
    pub servers: Option<&'a Servers>,
    /// The fake Twilio's base URL.
    pub twilio_base: String,
    /// Extra settings, e.g. concurrency.
    pub env: Vec<(String, String)>,
    /// A program (and its arguments) that runs every wagate process of the deployment, such as
    /// callgrind for P5's instruction count; empty to run wagate itself, or the role's
    /// `WAGATE_BENCH_WRAP_<ROLE>` when that is set.
    pub wrapper: Vec<String>,
}

impl Deployment<'_> {
    /// Starts `wagate <role>` and waits until it logs that it is ready.
    pub async fn start(&self, role: &str, name: &str) -> Result<Wagate> {
        let port = free_port()?;
        let admin_port = free_port()?;
        let metrics_port = free_port()?;
        let key = base64::engine::general_purpose::STANDARD.encode([7u8; 64]);
        // WAGATE_BENCH_WRAP_<ROLE> runs that role under a profiler, e.g.
        // WAGATE_BENCH_WRAP_WORKER=heaptrack (its output lands in the current folder).
        let wrapper = match std::env::var(format!("WAGATE_BENCH_WRAP_{}", role.to_uppercase())) {
            Ok(program) if self.wrapper.is_empty() => vec![program],
            _ => self.wrapper.clone(),
        };
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(binary());
                c
            }
            None => Command::new(binary()),
        };
        cmd.arg(role)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("WAGATE_MASTER_KEY", key)
            .env("WAGATE_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("WAGATE_PUBLIC_URL", format!("http://127.0.0.1:{port}"))
            .env("WAGATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("WAGATE_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
            .env("WAGATE_METRICS_LISTEN", format!("127.0.0.1:{metrics_port}"))
            .env("WAGATE_TWILIO_API_BASE", &self.twilio_base)
            .env("WAGATE_TWILIO_MESSAGING_BASE", &self.twilio_base)
            .env("WAGATE_TWILIO_CONTENT_BASE", &self.twilio_base)
            .env("WAGATE_DATA_DIR", self.dir.join(format!("data-{name}")));
        if let Some(s) = self.servers {
            cmd.env("WAGATE_NATS_URL", &s.nats_url)
                .env("WAGATE_REDIS_URL", &s.redis_url)
                .envs(s.env.iter().map(|(k, v)| (k, v)));
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let log = self.dir.join(format!("{name}.log"));
        let proc = Proc::spawn(name, cmd, &log)?;
        // Under callgrind, start-up takes about fifty times as long.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("wagate ready") {
                break;
            }
            if Instant::now() > deadline {
                bail!("{name} did not get ready; see {}", log.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Wagate {
            proc,
            port,
            admin: format!("http://127.0.0.1:{admin_port}"),
        })
    }
}

impl Wagate {
    /// Creates the bench agent with `backend` and saves and enables its WhatsApp channel.
    pub async fn set_up_agent(&self, backend: Value) -> Result<()> {
        let http = reqwest::Client::new();
        let put = |path: String, body: Value| {
            http.put(format!("{}{path}", self.admin))
                .bearer_auth(ADMIN_TOKEN)
                .json(&body)
                .send()
        };
        let agent = put(
            format!("/v1/agents/{AGENT}"),
            json!({"name": "bench", "backend": backend}),
        )
        .await?;
        if !agent.status().is_success() {
            bail!("creating the agent: {}", agent.text().await?);
        }
        let channel = put(
            format!("/v1/agents/{AGENT}/whatsapp"),
            json!({
                "account_sid": ACCOUNT_SID,
                "auth_token": AUTH_TOKEN,
                "phone_number": SANDBOX,
                "enabled": true,
                // The Sandbox's own pace (a message every 3 s) is not what these measure.
                "mps": wagate_core::agent::MAX_MPS,
            }),
        )
        .await
        .context("saving the channel")?;
        if !channel.status().is_success() {
            bail!("saving the channel: {}", channel.text().await?);
        }
        Ok(())
    }
}
