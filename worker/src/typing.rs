//! The WhatsApp typing indicator: when a turn starts, Twilio is asked to show the user that a
//! reply is being written (`POST {WAGATE_TWILIO_MESSAGING_BASE}/v2/Indicators/Typing.json`,
//! `channel=whatsapp`, `messageId` = the message being answered), which also marks that message
//! read. WhatsApp hides the indicator when the reply arrives or after 25 s. It is a courtesy:
//! sent beside the turn, never waited for, and a failure is only logged. As Twilio advises, it
//! is shown only for a turn that takes a while: a turn that is done within [`SHOW_AFTER`]
//! shows none, which saves a Twilio request per message for fast agents (the benchmark's echo
//! agent, every turn).

use std::{sync::Arc, time::Duration};

use secrecy::ExposeSecret;
use shared::directory::ResolvedChannel;
use tokio::sync::Semaphore;

/// How long one indicator request may take; the indicator means nothing once the reply is out.
const TIMEOUT: Duration = Duration::from_secs(5);
/// How long a turn runs before its user is shown the indicator.
pub const SHOW_AFTER: Duration = Duration::from_secs(1);
/// Most indicator requests in flight at once; more wait for one of them to finish. A worker
/// holding 10,000 slow turns would otherwise open 10,000 connections to Twilio at the same
/// second, for a courtesy (a connection's state is about 25 KB of the worker's memory, and
/// Twilio refuses an account's requests beyond its concurrency limit anyway). Waiting costs
/// nothing: a turn that ends first drops its indicator unsent.
const MAX_IN_FLIGHT: usize = 64;

/// An indicator waiting for [`SHOW_AFTER`]; dropped when the turn ends, it is not sent (or, if
/// its request is under way, that request is dropped: either way harmless).
pub struct Pending(tokio::task::AbortHandle);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends typing indicators.
#[derive(Clone)]
pub struct Typing {
    client: reqwest::Client,
    /// Shared, so that handing the client to a turn's indicator task copies no string.
    url: Arc<str>,
    in_flight: Arc<Semaphore>,
}

impl Typing {
    /// Indicators through the Messaging API at `messaging_base`.
    pub fn new(messaging_base: &str) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .build()
            .map_err(|e| {
                anyhow::anyhow!("cannot set up the typing indicator's HTTP client: {e}")
            })?;
        Ok(Self {
            client,
            url: format!(
                "{}/v2/Indicators/Typing.json",
                messaging_base.trim_end_matches('/')
            )
            .into(),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        })
    }

    /// Shows the user of `message_sid` that a reply is coming once the turn has run for
    /// [`SHOW_AFTER`], in the background, until the returned guard is dropped. Not for a
    /// channel in simulation mode, which has no Twilio behind it.
    #[must_use = "the indicator is cancelled when the guard is dropped"]
    pub fn show(&self, channel: &Arc<ResolvedChannel>, message_sid: &str) -> Option<Pending> {
        if channel.channel.simulation || !channel.agent.typing_indicator {
            return None;
        }
        // The request is made only once it is due: most turns end before that, and building
        // it (the URL, the form, the credentials) cost more than the wait itself.
        let (typing, channel, message_sid) =
            (self.clone(), channel.clone(), message_sid.to_owned());
        let task = tokio::spawn(async move {
            tokio::time::sleep(SHOW_AFTER).await;
            // The semaphore is never closed.
            let Ok(_permit) = typing.in_flight.acquire().await else {
                return;
            };
            let request = typing
                .client
                .post(&*typing.url)
                .basic_auth(
                    channel.channel.account_sid.as_str(),
                    Some(channel.auth_token.expose_secret()),
                )
                .form(&[("channel", "whatsapp"), ("messageId", message_sid.as_str())]);
            match request.send().await {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => tracing::info!(
                    status = r.status().as_u16(),
                    "Twilio refused the typing indicator"
                ),
                Err(e) => tracing::info!(
                    timeout = e.is_timeout(),
                    "the typing indicator could not be sent"
                ),
            }
        });
        Some(Pending(task.abort_handle()))
    }
}
