//! Conversations driven end to end, as WhatsApp users drive them: each user sends a message,
//! waits for the reply, then sends the next. Each message is signed like Twilio's webhook and
//! answered 200 or posted again (Twilio retries); each reply must come back exactly once with
//! the text the echo (or slow) agent gives, checked here, never assumed.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Result;
use tokio::sync::{Semaphore, mpsc};

use crate::{
    fakes::phone,
    load::{AUTH_TOKEN, Target, inbound_form},
};

/// What a drive of conversations saw.
#[derive(Debug, Default, Clone, Copy)]
pub struct Driven {
    /// Replies that came back as expected.
    pub replies: u64,
    /// Replies with a text other than the one awaited (a duplicate, or out of order).
    pub wrong: u64,
    /// Messages never answered within the timeout.
    pub missing: u64,
    /// Replies that arrived after their conversation was done: duplicates.
    pub extra: u64,
    /// Webhooks answered other than 200 and posted again.
    pub retries: u64,
    /// From the first message sent to the last reply received.
    pub seconds: f64,
    /// From the first reply received to the last: the time the pipeline was delivering, without
    /// the first message's own wait for its reply.
    pub flowing: f64,
}

impl Driven {
    /// Replies per second.
    pub fn rate(&self) -> f64 {
        self.replies as f64 / self.seconds
    }

    /// Replies per second while they were coming: what the pipeline sustains once it is full.
    pub fn flow_rate(&self) -> f64 {
        self.replies as f64 / self.flowing
    }

    /// Whether every message got exactly its one reply.
    pub fn exact(&self) -> bool {
        self.wrong == 0 && self.missing == 0 && self.extra == 0
    }
}

/// Most webhooks in flight at once, like the connections Twilio opens to one host.
const IN_FLIGHT: usize = 256;
/// How long a message may wait for its reply before the bench calls it missing.
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// Drives each conversation of `inboxes` (index, receiving end) through `rounds` messages.
/// `run` makes the MessageSids and texts of this drive unique.
pub async fn drive(
    target: &Target,
    inboxes: Vec<(usize, mpsc::UnboundedReceiver<String>)>,
    rounds: usize,
    run: u32,
) -> Result<Driven> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(IN_FLIGHT)
        .build()?;
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    let url = format!("{}{}", target.base, target.path);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(inboxes.len());
    for (i, mut inbox) in inboxes {
        let (http, permits, url) = (http.clone(), permits.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut seen = Driven::default();
            let mut first_reply = None;
            'rounds: for j in 0..rounds {
                let text = format!("r{run} c{i} m{j}");
                let sid = format!("SM{run:08x}{i:08x}{j:016x}");
                let form = inbound_form(&sid, &phone(i), &text);
                let signature =
                    twilio::signature::compute_signature(AUTH_TOKEN.as_bytes(), &url, &form);
                let body = twilio::form::encode(&form);
                loop {
                    let answered = {
                        let _permit = permits.acquire().await;
                        http.post(&url)
                            .header("content-type", "application/x-www-form-urlencoded")
                            .header("x-twilio-signature", &signature)
                            .body(body.clone())
                            .send()
                            .await
                    };
                    if answered.is_ok_and(|r| r.status() == 200) {
                        break;
                    }
                    seen.retries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                loop {
                    match tokio::time::timeout(REPLY_TIMEOUT, inbox.recv()).await {
                        Ok(Some(reply)) if reply == text => {
                            seen.replies += 1;
                            first_reply.get_or_insert_with(Instant::now);
                            break;
                        }
                        Ok(Some(_)) => seen.wrong += 1,
                        _ => {
                            seen.missing += (rounds - j) as u64;
                            break 'rounds;
                        }
                    }
                }
            }
            (seen, inbox, first_reply, Instant::now())
        }));
    }
    let mut total = Driven::default();
    let mut last = started;
    let mut first = None::<Instant>;
    let mut inboxes = Vec::with_capacity(tasks.len());
    for task in tasks {
        let (seen, inbox, first_reply, done) = task.await?;
        first = match (first, first_reply) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        total.replies += seen.replies;
        total.wrong += seen.wrong;
        total.missing += seen.missing;
        total.retries += seen.retries;
        last = last.max(done);
        inboxes.push(inbox);
    }
    total.seconds = (last - started).as_secs_f64();
    total.flowing = (last - first.unwrap_or(started)).as_secs_f64();
    // A duplicate would arrive after its original: give stragglers a moment, then count them.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for mut inbox in inboxes {
        while inbox.try_recv().is_ok() {
            total.extra += 1;
        }
    }
    Ok(total)
}
