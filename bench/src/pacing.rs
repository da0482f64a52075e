//! P6 pacing: a sender number's rate held by two sender processes together. 10,000 bulk sends
//! (templates, through the admin API) are queued first; then two `wagate sender` processes
//! start and post them. The fake Twilio counts what arrives, sampled every few milliseconds:
//! the achieved rate is the posts after the first over the time from the first to the last,
//! beside the channel's configured `mps` (80, Twilio's default for a WhatsApp sender).

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::{
    fakes::{self, Replies, phone},
    load::{ACCOUNT_SID, AUTH_TOKEN},
    procs::Servers,
    report::{Report, verdict},
    wagate::{ADMIN_TOKEN, AGENT, Deployment},
};

/// Sends queued before the senders start.
const SENDS: usize = 10_000;
/// The channel's number: not the Sandbox.
const NUMBER: &str = "+15005550006";
/// Admin API calls in flight while queueing.
const QUEUEING: usize = 32;
/// How often the fake Twilio's count is read.
const SAMPLE: Duration = Duration::from_millis(5);

/// Runs P6 with `env` for every wagate process.
pub async fn p6(
    dir: &std::path::Path,
    env: Vec<(String, String)>,
    report: &mut Report,
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let servers = Servers::start(dir).await?;
    let (replies, inboxes) = Replies::new(SENDS);
    drop(inboxes);
    let twilio = fakes::twilio(replies.clone()).await?;
    let deployment = Deployment {
        dir,
        servers: Some(&servers),
        twilio_base: format!("http://{twilio}"),
        env,
        wrapper: vec![],
    };
    let ingress = deployment.start("ingress", "ingress").await?;
    ingress.set_up_agent(json!({"kind": "echo"})).await?;
    let http = reqwest::Client::new();
    let channel: Value = http
        .put(format!("{}/v1/agents/{AGENT}/whatsapp", ingress.admin))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({
            "account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN,
            "phone_number": NUMBER, "enabled": true,
            "mps": wagate_core::agent::DEFAULT_MPS,
        }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let Some(configured) = channel["mps"].as_f64() else {
        bail!("the channel's answer has no mps: {channel}");
    };
    eprintln!("P6: queueing {SENDS} templates");
    let template = format!("HX{}", "ab".repeat(16));
    let queued = futures::stream::iter(0..SENDS)
        .map(|i| {
            let request = http
                .post(format!("{}/v1/agents/{AGENT}/messages", ingress.admin))
                .bearer_auth(ADMIN_TOKEN)
                .json(&json!({"to": phone(i), "content_sid": template}));
            async move { request.send().await.map(|r| r.status().as_u16() == 202) }
        })
        .buffer_unordered(QUEUEING)
        .filter(|accepted| std::future::ready(matches!(accepted, Ok(true))))
        .count()
        .await;
    if queued != SENDS {
        bail!("only {queued} of {SENDS} sends were queued");
    }
    eprintln!("P6: two sender processes");
    let _senders = [
        deployment.start("sender", "sender1").await?,
        deployment.start("sender", "sender2").await?,
    ];
    let samples = watch(&replies, configured).await?;
    let (first, last) = match (samples.first(), samples.last()) {
        (Some(first), Some(last)) if last.1 as usize >= SENDS => (first.0, last.0),
        _ => bail!(
            "Twilio got {} of {SENDS} sends",
            replies.received.load(Ordering::Relaxed)
        ),
    };
    let took = last.duration_since(first).as_secs_f64();
    let achieved = (SENDS - 1) as f64 / took;
    let busiest = busiest_second(&samples);
    let off = (achieved / configured - 1.0) * 100.0;
    report.section(
        "P6 pacing",
        &format!(
            "{SENDS} bulk sends (templates through the admin API) to {SENDS} users, queued before two `wagate sender` processes start on NATS + Redis; the channel's mps is 80, Twilio's default for a WhatsApp sender. The fake Twilio's count is read every {} ms: the achieved rate is the posts after the first over the time from the first to the last.",
            SAMPLE.as_millis()
        ),
    );
    report.header(&[
        "configured mps",
        "posts",
        "first to last, s",
        "achieved mps",
        "off by",
        "most posts within one second",
    ]);
    report.row(vec![
        format!("{configured}"),
        SENDS.to_string(),
        format!("{took:.2}"),
        format!("{achieved:.2}"),
        format!("{off:+.2}%"),
        busiest.to_string(),
    ]);
    report.line("");
    report.header(&["goal", "measured", "verdict"]);
    report.row(vec![
        "P6 rate held within 5% with 2 senders and 10,000 queued sends".into(),
        format!("{off:+.2}%"),
        verdict(off.abs() <= 5.0).into(),
    ]);
    Ok(())
}

/// The fake Twilio's count over time, from its first post until all arrived (or the time they
/// should take, twice over, and a minute).
async fn watch(replies: &Arc<Replies>, mps: f64) -> Result<Vec<(Instant, u64)>> {
    let deadline = Instant::now() + Duration::from_secs_f64(SENDS as f64 / mps * 2.0 + 60.0);
    let mut samples = Vec::new();
    while Instant::now() < deadline {
        let n = replies.received.load(Ordering::Relaxed);
        if n > 0 {
            samples.push((Instant::now(), n));
        }
        if n as usize >= SENDS {
            break;
        }
        tokio::time::sleep(SAMPLE).await;
    }
    Ok(samples)
}

/// The most posts that arrived between two samples at most a second apart (the count at the
/// first sample is its base, so the first post's own sample is left out: 1 more than a rate's
/// worth is a burst of one message).
fn busiest_second(samples: &[(Instant, u64)]) -> u64 {
    let mut most = 0;
    let mut start = 0;
    for (end, (at, n)) in samples.iter().enumerate() {
        while start < end && at.duration_since(samples[start].0) > Duration::from_secs(1) {
            start += 1;
        }
        most = most.max(n - samples[start].1);
    }
    most
}
