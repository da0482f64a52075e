//! `wagate chat`: a terminal dev phone. It talks to a running wagate as a WhatsApp user would:
//! each typed line is signed as Twilio signs webhooks and posted to the agent's webhook, and the
//! agent's replies are printed as they come. For that the agent's channel runs in simulation
//! mode, where the sender records replies in wagate instead of posting them to Twilio, so an
//! agent can be tried without a Twilio account. A channel that posts to Twilio is left alone.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, anyhow, bail};
use clap::Args;
use rand::RngExt;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use twilio::{form, signature::compute_signature};
use wagate_core::domain::{AgentId, PhoneNumber};

/// Arguments of `wagate chat`.
#[derive(Debug, Args)]
pub struct ChatArgs {
    /// The agent to talk to.
    #[arg(long)]
    agent: String,
    /// Your phone number (E.164): the WhatsApp user you play.
    #[arg(long, default_value = "+15555550100")]
    from: String,
    /// Your WhatsApp profile name.
    #[arg(long, default_value = "wagate chat")]
    name: String,
    /// Base URL of the admin API.
    #[arg(
        long = "admin-url",
        env = "WAGATE_ADMIN_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    admin_url: String,
    /// Bearer token of the admin API (default: the data folder's admin.token of embedded mode).
    #[arg(
        long = "admin-token",
        env = "WAGATE_ADMIN_TOKEN",
        hide_env_values = true
    )]
    admin_token: Option<SecretString>,
    /// Data folder whose admin.token to use when no token is given.
    #[arg(long = "data-dir", env = "WAGATE_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    /// Where to post the messages (default: the webhook URL the admin API shows).
    #[arg(long = "webhook-url")]
    webhook_url: Option<String>,
}

/// Runs the chat until end of input.
pub fn main(args: ChatArgs) -> ExitCode {
    crate::run_command("chat", run(args))
}

struct Admin {
    http: reqwest::Client,
    base: String,
    token: SecretString,
}

impl Admin {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(self.token.expose_secret());
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.map_err(|e| {
            anyhow!(wagate_core::redact::text(&format!(
                "cannot reach the admin API at {}: {e} (is wagate running?)",
                self.base
            )))
        })?;
        let status = r.status().as_u16();
        let v = r.json().await.unwrap_or(Value::Null);
        if status == 401 {
            bail!("the admin API refused the token: pass --admin-token or WAGATE_ADMIN_TOKEN");
        }
        Ok((status, v))
    }
}

fn admin_token(args: &ChatArgs) -> anyhow::Result<SecretString> {
    if let Some(t) = &args.admin_token {
        return Ok(t.clone());
    }
    let path = args.data_dir.join("admin.token");
    std::fs::read_to_string(&path)
        .map(|t| SecretString::from(t.trim().to_owned()))
        .with_context(|| format!("no admin token: set WAGATE_ADMIN_TOKEN, pass --admin-token, or run next to the data folder ({} not found)", path.display()))
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rng().fill(&mut b[..]);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn run(args: ChatArgs) -> anyhow::Result<()> {
    let agent = AgentId::parse(&args.agent).map_err(|e| anyhow!(e.0))?;
    let from = PhoneNumber::parse(&args.from).map_err(|e| anyhow!("--from: {}", e.0))?;
    let admin = Admin {
        http: reqwest::Client::new(),
        base: args.admin_url.trim_end_matches('/').to_owned(),
        token: admin_token(&args)?,
    };
    let (status, _) = admin
        .call(reqwest::Method::GET, &format!("/v1/agents/{agent}"), None)
        .await?;
    if status == 404 {
        bail!("there is no agent '{agent}': create it first (PUT /v1/agents/{agent})");
    }
    let (status, channel) = admin
        .call(
            reqwest::Method::GET,
            &format!("/v1/agents/{agent}/whatsapp"),
            None,
        )
        .await?;
    if status == 200 && channel["simulation"] != Value::Bool(true) {
        bail!(
            "agent '{agent}' posts to Twilio; to chat with it here, put its channel in simulation mode (PUT /v1/agents/{agent}/whatsapp with \"simulation\": true)"
        );
    }
    // A simulated channel gets a fresh token on every start: chat signs with it, and nothing
    // outside wagate uses it.
    let token = random_hex(16);
    let account_sid = channel["account_sid"]
        .as_str()
        .map_or_else(|| format!("AC{}", "0".repeat(32)), str::to_owned);
    let number = channel["phone_number"]
        .as_str()
        .unwrap_or("+14155238886")
        .to_owned();
    let (status, channel) = admin
        .call(
            reqwest::Method::PUT,
            &format!("/v1/agents/{agent}/whatsapp"),
            Some(json!({"account_sid": account_sid, "auth_token": token, "phone_number": number, "enabled": true, "simulation": true})),
        )
        .await?;
    if status != 200 {
        bail!(
            "could not set up the simulated channel: {}",
            channel["error"]
        );
    }
    let signed_url = channel["webhook_url"]
        .as_str()
        .map(|u| u.split('#').next().unwrap_or(u).to_owned())
        .context("the admin API did not show a webhook_url")?;
    let post_url = args
        .webhook_url
        .clone()
        .unwrap_or_else(|| signed_url.clone());
    let outbox = format!("/v1/agents/{agent}/whatsapp/simulated/{from}");
    let mut seen = last_index(&admin.call(reqwest::Method::GET, &outbox, None).await?.1);
    println!(
        "chatting with {agent} as {from} (simulation: nothing goes to WhatsApp). Type a message; Ctrl-D ends."
    );

    let (lines_tx, mut lines) = tokio::sync::mpsc::channel::<String>(16);
    tokio::spawn(async move {
        let mut input = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = input.next_line().await {
            if lines_tx.send(line).await.is_err() {
                return;
            }
        }
    });
    let mut waiting = 0usize;
    let mut eof_at: Option<tokio::time::Instant> = None;
    let mut last_reply = tokio::time::Instant::now();
    let mut poll = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            line = lines.recv(), if eof_at.is_none() => match line {
                Some(text) if !text.trim().is_empty() => {
                    let sid = format!("SM{}", random_hex(16));
                    let fields: Vec<(String, String)> = [
                        ("SmsMessageSid", sid.as_str()), ("NumMedia", "0"), ("ProfileName", &args.name),
                        ("MessageType", "text"), ("SmsSid", &sid), ("WaId", from.as_str().trim_start_matches('+')),
                        ("SmsStatus", "received"), ("Body", &text), ("To", &format!("whatsapp:{number}")),
                        ("NumSegments", "1"), ("MessageSid", &sid), ("AccountSid", &account_sid),
                        ("From", &format!("whatsapp:{from}")), ("ApiVersion", "2010-04-01"),
                    ]
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                    let signature = compute_signature(token.as_bytes(), &signed_url, &fields);
                    let answer = admin.http.post(&post_url)
                        .header("content-type", "application/x-www-form-urlencoded")
                        .header("x-twilio-signature", signature)
                        .body(form::encode(&fields))
                        .send().await;
                    match answer {
                        Ok(r) if r.status().is_success() => waiting += 1,
                        Ok(r) => {
                            let status = r.status();
                            eprintln!("wagate answered {status}: {}", r.text().await.unwrap_or_default().trim());
                        }
                        Err(e) => eprintln!("{}", wagate_core::redact::text(&format!("cannot reach the webhook at {post_url}: {e}"))),
                    }
                }
                Some(_) => {}
                None => eof_at = Some(tokio::time::Instant::now()),
            },
            _ = poll.tick() => {
                let (_, v) = admin.call(reqwest::Method::GET, &format!("{outbox}?after={seen}"), None).await?;
                for m in v["messages"].as_array().into_iter().flatten() {
                    println!("{agent}> {}", m["body"].as_str().unwrap_or_default());
                    seen = seen.max(m["index"].as_u64().unwrap_or(seen));
                    waiting = waiting.saturating_sub(1);
                    last_reply = tokio::time::Instant::now();
                }
                if let Some(at) = eof_at {
                    // At the end of input, wait for the replies still coming, within reason.
                    let settled = waiting == 0 && last_reply.elapsed() > Duration::from_secs(1);
                    if settled || at.elapsed() > Duration::from_secs(30) {
                        return Ok(());
                    }
                }
            }
        }
    }
}

fn last_index(outbox: &Value) -> u64 {
    outbox["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["index"].as_u64())
        .unwrap_or(0)
}
