//! `wagate dlq list|replay`: dead letters from the command line. It talks to the admin API of
//! a running wagate (the replay logic lives there once), with the same bearer token.

use std::process::ExitCode;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use secrecy::{ExposeSecret, SecretString};

/// Arguments of `wagate dlq`.
#[derive(Debug, Args)]
pub struct DlqArgs {
    /// Base URL of the admin API.
    #[arg(
        long = "admin-url",
        env = "WAGATE_ADMIN_URL",
        default_value = "http://127.0.0.1:8081",
        global = true
    )]
    admin_url: String,
    /// Bearer token of the admin API.
    #[arg(
        long = "admin-token",
        env = "WAGATE_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    admin_token: Option<SecretString>,
    #[command(subcommand)]
    command: DlqCommand,
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Lists dead letters, oldest first.
    List {
        #[command(flatten)]
        filter: Filter,
        /// Prints the full JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Replays dead letters: the given ids, or every one matching the filters with --all.
    Replay {
        /// Dead-letter ids.
        ids: Vec<String>,
        /// Replays every dead letter that matches the filters.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        #[command(flatten)]
        filter: Filter,
    },
}

/// Which dead letters to take.
#[derive(Debug, Args)]
struct Filter {
    /// Only this agent's.
    #[arg(long)]
    agent: Option<String>,
    /// Only this stage's (`agent` or `send`).
    #[arg(long, value_parser = ["agent", "send"])]
    stage: Option<String>,
    /// Only those whose reason contains this text (e.g. a Twilio code).
    #[arg(long)]
    reason: Option<String>,
    /// Only those that failed at or after this time (RFC 3339).
    #[arg(long)]
    since: Option<String>,
    /// Only those that failed at or before this time (RFC 3339).
    #[arg(long)]
    until: Option<String>,
}

impl Filter {
    fn pairs(&self) -> Vec<(&'static str, &str)> {
        [
            ("agent", &self.agent),
            ("stage", &self.stage),
            ("reason", &self.reason),
            ("since", &self.since),
            ("until", &self.until),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
        .collect()
    }

    fn is_empty(&self) -> bool {
        self.pairs().is_empty()
    }
}

/// Runs the command; prints the outcome or the error.
pub fn main(args: DlqArgs) -> ExitCode {
    crate::run_command("dlq", run(args))
}

async fn run(args: DlqArgs) -> anyhow::Result<()> {
    let token = args
        .admin_token
        .context("set WAGATE_ADMIN_TOKEN (or --admin-token) to the admin API's token")?;
    let base = args.admin_url.trim_end_matches('/');
    let http = reqwest::Client::new();
    let call = |req: reqwest::RequestBuilder| {
        let token = token.expose_secret().to_owned();
        async move {
            let response = req.bearer_auth(token).send().await.map_err(|e| {
                anyhow!(wagate_core::redact::text(&format!(
                    "cannot reach the admin API at {base}: {e}"
                )))
            })?;
            let status = response.status();
            let body: serde_json::Value = response
                .json()
                .await
                .context("the admin API answered something that is not JSON")?;
            if status.is_success() {
                Ok(body)
            } else {
                Err(anyhow!(
                    body["error"]
                        .as_str()
                        .map_or_else(|| format!("HTTP {status}"), str::to_owned)
                ))
            }
        }
    };
    match args.command {
        DlqCommand::List { filter, json } => {
            let list = call(
                http.get(format!("{base}/v1/dead-letters"))
                    .query(&filter.pairs()),
            )
            .await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&list).unwrap_or_default()
                );
            } else {
                print_table(&list);
            }
        }
        DlqCommand::Replay { ids, all, filter } => {
            let mut replayed = Vec::new();
            if all {
                let mut body: serde_json::Map<String, serde_json::Value> = filter
                    .pairs()
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.into()))
                    .collect();
                body.insert("all".into(), true.into());
                let r = call(
                    http.post(format!("{base}/v1/dead-letters/replay"))
                        .json(&body),
                )
                .await?;
                replayed.extend(ids_of(&r));
            } else if ids.is_empty() {
                bail!("give dead-letter ids, or --all (with filters) to replay every match");
            } else {
                if !filter.is_empty() {
                    bail!("filters go with --all");
                }
                for id in &ids {
                    let r = call(http.post(format!("{base}/v1/dead-letters/{id}/replay"))).await?;
                    replayed.extend(ids_of(&r));
                }
            }
            println!("replayed {}: {}", replayed.len(), replayed.join(" "));
        }
    }
    Ok(())
}

fn ids_of(answer: &serde_json::Value) -> Vec<String> {
    answer["replayed"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn print_table(list: &serde_json::Value) {
    let rows = list.as_array().cloned().unwrap_or_default();
    println!(
        "{:<8} {:<6} {:<20} {:<6} {:<4} {:<25} REASON",
        "ID", "STAGE", "AGENT", "CODE", "TRY", "FAILED AT"
    );
    for d in &rows {
        let text = |k: &str| d[k].as_str().unwrap_or("").to_owned();
        let code = d["code"]
            .as_u64()
            .map(|c| c.to_string())
            .unwrap_or_default();
        println!(
            "{:<8} {:<6} {:<20} {:<6} {:<4} {:<25} {}",
            text("id"),
            text("stage"),
            text("agent_id"),
            code,
            d["attempts"].as_u64().unwrap_or(0),
            text("failed_at"),
            text("reason")
        );
    }
    println!("{} dead letter(s)", rows.len());
}
