//! What travels on the bus: inbound messages (ingress → worker), replies (worker or admin API →
//! sender) and dead letters. JSON, so an operator can read a dead letter as it is.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::domain::{AgentId, ContentSid, MessageSid, SessionId, WhatsAppAddress};

/// One media attachment of an inbound message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Media {
    /// Twilio's URL of the media (may need the account's Basic auth to fetch).
    pub url: String,
    /// Its MIME type, e.g. `image/jpeg`.
    pub content_type: Option<String>,
}

/// A shared location.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Location {
    /// Latitude as Twilio sent it.
    pub latitude: String,
    /// Longitude as Twilio sent it.
    pub longitude: String,
    /// Street address, when given.
    pub address: Option<String>,
    /// Place name, when given.
    pub label: Option<String>,
}

/// A tapped quick-reply or call-to-action button.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Button {
    /// The developer-defined payload.
    pub payload: Option<String>,
    /// The text on the button.
    pub text: Option<String>,
}

/// A WhatsApp message a user sent to an agent, as accepted by ingress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InboundMessage {
    /// The agent written to.
    pub agent_id: AgentId,
    /// Twilio's id of the message; names it everywhere downstream.
    pub message_sid: MessageSid,
    /// The user's address exactly as Twilio sent it.
    pub from: WhatsAppAddress,
    /// The agent's WhatsApp number.
    pub to: WhatsAppAddress,
    /// The text (empty for media-only messages).
    pub body: String,
    /// The user's WhatsApp profile name.
    pub profile_name: Option<String>,
    /// The user's WhatsApp id.
    pub wa_id: Option<String>,
    /// Attachments in Twilio's order.
    pub media: Vec<Media>,
    /// A shared location.
    pub location: Option<Location>,
    /// A tapped button.
    pub button: Option<Button>,
    /// When ingress accepted it.
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
    /// Every field Twilio sent, in order, so nothing a later feature needs is lost.
    pub fields: Vec<(String, String)>,
}

impl InboundMessage {
    /// The conversation this message belongs to.
    pub fn session_id(&self) -> SessionId {
        SessionId::new(&self.agent_id, &self.from)
    }
}

/// What a reply carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ReplyContent {
    /// Free-form text, already split into parts of at most 1600 UTF-16 units; only allowed
    /// inside the 24-hour window.
    Text {
        /// The parts, posted in this order.
        parts: Vec<String>,
    },
    /// An approved template, allowed at any time.
    Template {
        /// The Content API template.
        content_sid: ContentSid,
        /// Its variables (`{"1": "…"}`), sent as a JSON string.
        variables: serde_json::Map<String, serde_json::Value>,
    },
}

impl ReplyContent {
    /// How many Twilio messages this reply makes.
    pub fn part_count(&self) -> usize {
        match self {
            Self::Text { parts } => parts.len(),
            Self::Template { .. } => 1,
        }
    }
}

/// A reply to post to one WhatsApp user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboundReply {
    /// Unique id of the reply: `in-<MessageSid>` for answers to an inbound message, `api-<uuid>`
    /// for admin sends. With the part index it keys the send guard, so a part is posted once.
    pub id: String,
    /// The sending agent.
    pub agent_id: AgentId,
    /// The user.
    pub to: WhatsAppAddress,
    /// What to send.
    pub content: ReplyContent,
    /// When the reply was made.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

impl OutboundReply {
    /// The id of the reply that answers an inbound message.
    pub fn id_for_inbound(sid: &MessageSid) -> String {
        format!("in-{}", sid.as_str())
    }

    /// The conversation this reply belongs to.
    pub fn session_id(&self) -> SessionId {
        SessionId::new(&self.agent_id, &self.to)
    }
}

/// The stage at which a message failed for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Running the agent (the inbound message is kept; replay runs the agent again).
    Agent,
    /// Posting to Twilio (the reply is kept; replay sends it again without the agent).
    Send,
}

impl Stage {
    /// Its name in the API and in subjects.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Send => "send",
        }
    }
}

/// The message a dead letter keeps: exactly what the failed stage consumed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DeadMessage {
    /// An inbound message whose agent turn failed.
    Inbound(Box<InboundMessage>),
    /// A reply that could not be sent.
    Reply(OutboundReply),
}

/// A message that failed for good, with why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Assigned by the bus; used to replay it.
    #[serde(default)]
    pub id: String,
    /// Where it failed.
    pub stage: Stage,
    /// A sentence saying why, e.g. `twilio 21211: The 'To' number … is not a valid phone number.`
    pub reason: String,
    /// Twilio's error code, where there is one.
    pub code: Option<u32>,
    /// Attempts made.
    pub attempts: u64,
    /// When it was given up.
    #[serde(with = "time::serde::rfc3339")]
    pub failed_at: OffsetDateTime,
    /// The agent it belongs to.
    pub agent_id: AgentId,
    /// The message itself.
    pub message: DeadMessage,
}
