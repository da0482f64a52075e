//! Events for an agent's event webhook (`events_url`): what happened in its conversations,
//! POSTed to the business the Standard Webhooks way (<https://www.standardwebhooks.com>):
//! `{"type", "timestamp", "data"}` with `webhook-id`, `webhook-timestamp` and
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">` under the agent's
//! `whsec_…` secret.
//!
//! The role where something happens publishes the event on the bus (`shared::events::emit`), only for an
//! agent with an event webhook; the sender role delivers it, at least once, retrying with
//! back-off, and an event that cannot be delivered becomes a dead letter of its own (stage
//! `event`) that can be replayed. Each event's id is made from what it is about (the message
//! sid, the status, the dead letter), so an event published twice (a redelivered turn) is one
//! event on the bus, and a retry keeps its `webhook-id`: receivers deduplicate by it.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use crate::{
    domain::{AgentId, WhatsAppAddress},
    envelope::{DeadLetter, DeadMessage},
};

/// One event for an agent's event webhook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// `evt_…`, made from what the event is about: the `webhook-id` of every delivery attempt.
    pub id: String,
    /// The agent whose webhook gets it.
    pub agent_id: AgentId,
    /// The user it is about: its conversation's events are delivered in order.
    pub user: WhatsAppAddress,
    /// `message.received`, `message.sent`, … (see [`Kind`]).
    #[serde(rename = "type")]
    pub kind: String,
    /// When it happened.
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: OffsetDateTime,
    /// What happened.
    pub data: Value,
    /// The W3C `traceparent` of the span that raised it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// The kinds of events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A WhatsApp user wrote for the first time: a new lead.
    LeadCreated,
    /// A WhatsApp user wrote.
    MessageReceived,
    /// A message (a reply part, an operator's or a template) was accepted by Twilio.
    MessageSent,
    /// Twilio reported it delivered.
    MessageDelivered,
    /// Twilio reported it read.
    MessageRead,
    /// Twilio reported it failed or undelivered.
    MessageFailed,
    /// A message failed for good and was kept as a dead letter.
    DeadLetterCreated,
    /// The conversation was handed to a person.
    ConversationHandoff,
    /// The user opted out or back in.
    OptoutChanged,
}

impl Kind {
    /// Its `type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LeadCreated => "lead.created",
            Self::MessageReceived => "message.received",
            Self::MessageSent => "message.sent",
            Self::MessageDelivered => "message.delivered",
            Self::MessageRead => "message.read",
            Self::MessageFailed => "message.failed",
            Self::DeadLetterCreated => "dead_letter.created",
            Self::ConversationHandoff => "conversation.handoff",
            Self::OptoutChanged => "optout.changed",
        }
    }
}

impl Event {
    /// An event of `kind` about `user`, identified by `about` (unique for what it is about,
    /// among events of its kind).
    pub fn new(
        kind: Kind,
        agent_id: &AgentId,
        user: &WhatsAppAddress,
        about: &str,
        data: Value,
    ) -> Self {
        Self {
            id: format!("evt_{}_{about}", kind.as_str().replace('.', "_")),
            agent_id: agent_id.clone(),
            user: user.clone(),
            kind: kind.as_str().to_owned(),
            timestamp: OffsetDateTime::now_utc(),
            data,
            traceparent: crate::trace::traceparent(&tracing::Span::current()),
        }
    }

    /// The body POSTed to the webhook.
    pub fn body(&self) -> Result<Vec<u8>, serde_json::Error> {
        #[derive(Serialize)]
        struct Body<'a> {
            #[serde(rename = "type")]
            kind: &'a str,
            #[serde(with = "time::serde::rfc3339")]
            timestamp: OffsetDateTime,
            data: &'a Value,
        }
        serde_json::to_vec(&Body {
            kind: &self.kind,
            timestamp: self.timestamp,
            data: &self.data,
        })
    }
}

/// The signing key of a Standard Webhooks secret: the bytes after `whsec_`, base64, 24 to 64
/// of them; `None` for anything else.
pub fn secret_key(secret: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.trim().strip_prefix("whsec_")?)
        .ok()?;
    (24..=64).contains(&key.len()).then_some(key)
}

/// The `webhook-signature` of `body` sent as event `id` at `timestamp` (Unix seconds):
/// `v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`.
pub fn signature(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    use base64::Engine;
    use hmac::{Hmac, KeyInit, Mac};
    // HMAC takes a key of any length, so the `Err` cannot come.
    Hmac::<sha2::Sha256>::new_from_slice(key)
        .map(|mut mac| {
            mac.update(format!("{id}.{timestamp}.").as_bytes());
            mac.update(body);
            let tag = mac.finalize().into_bytes();
            format!(
                "v1,{}",
                base64::engine::general_purpose::STANDARD.encode(tag)
            )
        })
        .unwrap_or_default()
}

/// The `dead_letter.created` event of `letter`, stored as `id`; `None` for an event's own dead
/// letter, which would only report itself to the webhook that did not take it.
pub fn dead_letter_created(letter: &DeadLetter, id: &str) -> Option<Event> {
    let user = match &letter.message {
        DeadMessage::Inbound(m) => &m.from,
        DeadMessage::Reply(r) => &r.to,
        DeadMessage::Event(_) => return None,
    };
    Some(Event::new(
        Kind::DeadLetterCreated,
        &letter.agent_id,
        user,
        id,
        serde_json::json!({
            "id": id, "stage": letter.stage.as_str(), "reason": letter.reason,
            "code": letter.code, "attempts": letter.attempts,
            "phone": user.user(),
        }),
    ))
}
