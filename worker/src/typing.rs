//! The WhatsApp typing indicator: when a turn starts, Twilio is asked to show the user that a
//! reply is being written (`POST {WAGATE_TWILIO_MESSAGING_BASE}/v2/Indicators/Typing.json`,
//! `channel=whatsapp`, `messageId` = the message being answered), which also marks that message
//! read. WhatsApp hides the indicator when the reply arrives or after 25 s. It is a courtesy:
//! sent beside the turn, never waited for, and a failure is only logged.

use std::time::Duration;

use secrecy::ExposeSecret;
use shared::directory::ResolvedChannel;

/// How long one indicator request may take; the indicator means nothing once the reply is out.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Sends typing indicators.
#[derive(Clone)]
pub struct Typing {
    client: reqwest::Client,
    url: String,
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
            ),
        })
    }

    /// Shows the user of `message_sid` that a reply is coming, in the background. Not for a
    /// channel in simulation mode, which has no Twilio behind it.
    pub fn show(&self, channel: &ResolvedChannel, message_sid: &str) {
        if channel.channel.simulation {
            return;
        }
        let request = self
            .client
            .post(&self.url)
            .basic_auth(
                channel.channel.account_sid.as_str(),
                Some(channel.auth_token.expose_secret()),
            )
            .form(&[("channel", "whatsapp"), ("messageId", message_sid)]);
        tokio::spawn(async move {
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
    }
}
