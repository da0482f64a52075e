//! An agent, its backend and its WhatsApp channel, as stored. Secrets appear here only sealed
//! ([`SealedSecret`]); the admin API's views leave them out entirely.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{
    crypto::SealedSecret,
    domain::{AccountSid, AgentId, PhoneNumber},
};

/// An AI agent that answers WhatsApp users.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Agent {
    /// Its id, part of the webhook URL and of every session id.
    pub id: AgentId,
    /// A human name.
    pub name: String,
    /// What produces its replies.
    pub backend: Backend,
    /// How long a conversation handed to a person stays paused without a word from them
    /// before the agent takes it back (seconds); agents saved before handoff existed get the
    /// default.
    #[serde(default = "default_handoff_resume_after_s")]
    pub handoff_resume_after_s: u64,
    /// Days a turn of its conversations is kept: older ones are dropped, and a conversation
    /// nobody wrote in for that long is gone.
    #[serde(default = "default_retention_days")]
    pub retention_days: u32,
    /// Turns of history its model sees at most (`None`: the process's
    /// `WAGATE_HISTORY_WINDOW`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_turns: Option<u32>,
    /// Tokens of history its model sees at most, counted as about four characters each
    /// (`None`: no limit but the turns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_tokens: Option<u32>,
    /// Whether users see "typing…" while a turn takes a while (WhatsApp's typing indicator,
    /// which also marks their message read). Agents saved before it existed show it.
    #[serde(default = "default_typing_indicator")]
    pub typing_indicator: bool,
    /// Where its events go (`shared::events`), if anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<EventsEndpoint>,
    /// When it was first saved.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it was last changed.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// A day: a person who took a conversation over and left it a day gives it back to the agent.
pub fn default_handoff_resume_after_s() -> u64 {
    86_400
}

/// An agent's event webhook.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventsEndpoint {
    /// Where events are POSTed.
    pub url: String,
    /// Its Standard Webhooks secret (`whsec_…`), sealed.
    pub secret: SealedSecret,
}

/// The typing indicator is shown unless the agent says otherwise.
pub fn default_typing_indicator() -> bool {
    true
}

/// Ninety days of history, as the data-protection default of most chat platforms.
pub fn default_retention_days() -> u32 {
    90
}

impl Agent {
    /// How long a turn of its conversations is kept ([`Agent::retention_days`]).
    pub fn retention(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.retention_days) * 86_400)
    }

    /// How long a paused conversation waits for its person ([`Agent::handoff_resume_after_s`]).
    pub fn handoff_idle(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.handoff_resume_after_s)
    }
}

/// The transcription model of an OpenAI-compatible agent that names none: OpenAI's.
pub fn default_transcription_model() -> Option<String> {
    Some("whisper-1".to_owned())
}

/// Models are offered wagate's tools unless the agent says otherwise.
pub fn default_tools() -> bool {
    true
}

/// What produces an agent's replies.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Backend {
    /// Replies with what the user wrote: for trying the pipeline without a model.
    Echo,
    /// Any OpenAI-compatible Chat Completions endpoint.
    Openai {
        /// Base URL up to and including the version, e.g. `https://api.openai.com/v1`; never
        /// with credentials, which are kept in `credentials`.
        base_url: String,
        /// The `user:password` that the URL was given with, sealed: sent as HTTP Basic
        /// authentication.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        credentials: Option<SealedSecret>,
        /// Model name.
        model: String,
        /// The API key, sealed.
        api_key: Option<SealedSecret>,
        /// Instructions sent first in every request.
        system_prompt: Option<String>,
        /// Per-agent turn timeout in milliseconds, overriding the process default.
        timeout_ms: Option<u64>,
        /// The model that transcribes voice notes (`POST {base_url}/audio/transcriptions`);
        /// `None` turns transcription off, and voice notes reach the agent as a notice.
        /// Agents saved before it existed get the default.
        #[serde(default = "default_transcription_model")]
        transcription_model: Option<String>,
        /// Whether the model is offered wagate's tools (`handoff_to_human`, `send_media`):
        /// off for a server that refuses requests with tools. Agents saved before tools
        /// existed get them.
        #[serde(default = "default_tools")]
        tools: bool,
    },
    /// The business's own endpoint, called with a signed JSON request.
    Webhook {
        /// Where the conversation is posted; never with credentials, which are kept in
        /// `credentials`.
        url: String,
        /// The `user:password` that the URL was given with, sealed: sent as HTTP Basic
        /// authentication.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        credentials: Option<SealedSecret>,
        /// The HMAC-SHA256 signing secret, sealed.
        secret: SealedSecret,
        /// Per-agent turn timeout in milliseconds, overriding the process default.
        timeout_ms: Option<u64>,
        /// Where its users' voice notes are transcribed before the endpoint gets them (their
        /// words come with the audio); none: the audio alone.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        transcription: Option<Transcriber>,
    },
}

/// An OpenAI-compatible transcription endpoint (`POST {base_url}/audio/transcriptions`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Transcriber {
    /// Base URL up to and including the version, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// The transcription model.
    pub model: String,
    /// The API key, sealed (as an OpenAI-compatible agent's).
    pub api_key: Option<SealedSecret>,
}

/// An agent's WhatsApp deployment through Twilio.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WhatsAppChannel {
    /// The Twilio account that owns the number.
    pub account_sid: AccountSid,
    /// The account's Auth Token, sealed: it verifies webhooks and authenticates sends.
    pub auth_token: SealedSecret,
    /// The WhatsApp sender number (the sandbox's +14155238886 or the business's own).
    pub phone_number: PhoneNumber,
    /// Whether inbound messages are taken; a disabled channel answers 403.
    pub enabled: bool,
    /// Simulation mode: replies are recorded in wagate (see the admin API's `simulated` call
    /// and `wagate chat`) instead of being posted to Twilio, to try an agent without Twilio.
    #[serde(default)]
    pub simulation: bool,
    /// What users opt out and back in with, and what they are told: Twilio's defaults unless
    /// the business chose its own. Channels saved before these existed get the defaults.
    #[serde(default)]
    pub consent: Consent,
    /// The words a phone sends as `join <words>` to join the Twilio Sandbox, shown where a
    /// user who has not joined needs them (63015).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_join_code: Option<String>,
    /// A Twilio Messaging Service (`MG…`) to send through instead of `phone_number` (its
    /// sender pool, and its own settings, then choose the number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messaging_service_sid: Option<String>,
    /// Messages per second this sender may post (`None`: [`DEFAULT_MPS`], or on the Sandbox
    /// the process's sandbox rate): Twilio queues and then refuses what goes faster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mps: Option<f64>,
    /// Whether a reply's part n+1 waits until Twilio reports part n sent (or a later status),
    /// for at most the sender's part timeout: WhatsApp may deliver messages posted in quick
    /// succession out of order. Off: parts go as fast as Twilio accepts them. Channels saved
    /// before this existed have it on.
    #[serde(default = "on")]
    pub ordered_parts: bool,
    /// When it was last changed.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// Serde's default of settings that are on unless turned off.
fn on() -> bool {
    true
}

/// The Twilio Sandbox for WhatsApp's shared number: a channel on it reaches only phones that
/// joined it, and sends slowly.
pub const SANDBOX_NUMBER: &str = "+14155238886";

/// Twilio's default throughput of a WhatsApp sender, in messages per second.
pub const DEFAULT_MPS: f64 = 80.0;

/// The Sandbox's throughput: about one message every 3 seconds.
pub const SANDBOX_MPS: f64 = 1.0 / 3.0;

/// The lowest `mps` a channel may set: one message a minute.
pub const MIN_MPS: f64 = 1.0 / 60.0;

/// The highest `mps` a channel may set: far above any Twilio sender's throughput (a test or
/// benchmark channel that must not be held back sets it), yet a pace still.
pub const MAX_MPS: f64 = 10_000.0;

impl WhatsAppChannel {
    /// Whether the channel is on the Twilio Sandbox.
    pub fn is_sandbox(&self) -> bool {
        self.phone_number.as_str() == SANDBOX_NUMBER
    }

    /// The messages per second it sends at: its own `mps`, else [`DEFAULT_MPS`], or
    /// `sandbox_mps` on the Sandbox's number (`WAGATE_SANDBOX_MPS`, [`SANDBOX_MPS`] unless set).
    pub fn mps(&self, sandbox_mps: f64) -> f64 {
        self.mps.unwrap_or(if self.is_sandbox() {
            sandbox_mps
        } else {
            DEFAULT_MPS
        })
    }
}

/// A channel's opt-out settings; `None` is the default (see [`crate::window`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consent {
    /// Words that opt a user out (a message that is just one of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optout_keywords: Option<Vec<String>>,
    /// Words that opt a user who opted out back in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optin_keywords: Option<Vec<String>>,
    /// The confirmation of an opt-out; empty: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optout_reply: Option<String>,
    /// The confirmation of an opt-in; empty: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optin_reply: Option<String>,
}
