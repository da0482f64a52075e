//! What travels on the bus: inbound messages (ingress → worker), replies (worker or admin API →
//! sender) and dead letters. JSON, so an operator can read a dead letter as it is.

use serde::{Deserialize, Deserializer, Serialize, de::Error as _};
use serde_json::value::RawValue;
use time::OffsetDateTime;

use crate::domain::{AgentId, ContentSid, MessageSid, SessionId, WhatsAppAddress};

/// Most media one reply may carry: Twilio's limit of `MediaUrl`s on one message, and plenty for
/// a chat.
pub const MAX_MEDIA: usize = 10;

/// Most choices one reply may offer: a `twilio/list-picker` holds up to 10 items.
pub const MAX_QUICK_REPLIES: usize = 10;
/// Most choices sent as `twilio/quick-reply` buttons (WhatsApp shows up to 3); more go as a
/// `twilio/list-picker`.
pub const MAX_QUICK_REPLY_BUTTONS: usize = 3;
/// Longest title of a `twilio/quick-reply` button, in characters (Twilio's limit).
pub const QUICK_REPLY_TITLE_CHARS: usize = 20;
/// Longest item of a `twilio/list-picker`, in characters (Twilio's limit).
pub const LIST_ITEM_CHARS: usize = 24;
/// Longest body of a `twilio/quick-reply` or `twilio/list-picker`, in characters (Twilio's
/// limit): the text of a reply with choices is split into parts no longer than this, so its
/// last part fits the content.
pub const CONTENT_BODY_CHARS: usize = 1024;

/// The longest a choice may be when `count` choices are offered: a button's title for a few,
/// a list item for more.
pub fn choice_chars(count: usize) -> usize {
    if count <= MAX_QUICK_REPLY_BUTTONS {
        QUICK_REPLY_TITLE_CHARS
    } else {
        LIST_ITEM_CHARS
    }
}

/// Whether Twilio can fetch a medium from `url`: https with a host, at most 2048 bytes.
pub fn is_public_media_url(url: &str) -> bool {
    url.len() <= 2048
        && url::Url::parse(url).is_ok_and(|u| u.scheme() == "https" && u.host_str().is_some())
}

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
    pub fields: TwilioFields,
    /// Where Twilio reached ingress (scheme and host of the verified webhook URL), when
    /// `WAGATE_PUBLIC_URL` is not set: the reply's status callbacks go there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_base: Option<String>,
    /// The W3C `traceparent` of ingress's span for this webhook: the worker's turn continues
    /// its trace (`trace`). Absent from older processes' messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// Every field of a Twilio webhook in Twilio's order, carried as the JSON array of name and
/// value pairs it was written as (`[["Body","hi"],…]`) and not taken apart on the way. Nothing
/// downstream reads them yet, and decoding them into strings was most of the cost of decoding
/// an envelope in the worker. The JSON is that of a `Vec<(String, String)>`, so a process that
/// still decodes them as such reads the envelopes of one that does not, and the other way
/// round, during a rolling upgrade.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TwilioFields(Box<RawValue>);

impl TwilioFields {
    /// The fields as a webhook's form gave them.
    pub fn new(pairs: &[(String, String)]) -> Result<Self, serde_json::Error> {
        serde_json::value::to_raw_value(pairs).map(Self)
    }
}

impl PartialEq for TwilioFields {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get()
    }
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
    /// for admin sends, `consent-<MessageSid>` for the confirmation of an opt-out or opt-in.
    /// With the part index it keys the send guard, so a part is posted once.
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
    /// When ingress accepted the inbound message this reply answers (the last of a coalesced
    /// burst; none for admin sends): the start of the end-to-end latency the sender records
    /// once the reply is out. Absent in replies of older processes, which then go unmeasured.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub answers_received_at: Option<OffsetDateTime>,
    /// Media to send (public https URLs Twilio fetches), one a message, the first with the
    /// reply's first part as its caption. Absent from older replies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub media: Vec<String>,
    /// Choices offered with a text reply, as buttons (up to 3) or a list (up to 10) on its
    /// last message. Absent from older replies and replies without choices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quick_replies: Vec<String>,
    /// The W3C `traceparent` of the span that made the reply, so that the sender's spans
    /// join the message's trace (`trace`). Absent from older processes' replies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The inbound message's `callback_base`: where status callbacks go when
    /// `WAGATE_PUBLIC_URL` is not set (admin sends have none and then ask for no callback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_base: Option<String>,
    /// A bulk send (an admin's message or template, not an operator's reply in a conversation):
    /// it travels on the bulk queue and is paced behind live replies (the sender's `pacing`).
    /// Absent from older replies, which are live.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bulk: bool,
}

impl OutboundReply {
    /// The id of the reply that answers an inbound message.
    pub fn id_for_inbound(sid: &MessageSid) -> String {
        format!("in-{}", sid.as_str())
    }

    /// The id of the confirmation of the opt-out or opt-in that inbound message `sid` was.
    pub fn id_for_confirmation(sid: &MessageSid) -> String {
        format!("consent-{}", sid.as_str())
    }

    /// Whether this is the confirmation of an opt-out or opt-in: it goes out even to the user
    /// who just opted out, who must hear that it worked (inside the window, as they just
    /// wrote).
    pub fn confirms_consent(&self) -> bool {
        self.id.starts_with("consent-")
    }

    /// The conversation this reply belongs to.
    pub fn session_id(&self) -> SessionId {
        SessionId::new(&self.agent_id, &self.to)
    }
}

/// The stage at which a message failed for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Running the agent (the inbound message is kept; replay runs the agent again).
    Agent,
    /// Posting to Twilio (the reply is kept; replay sends it again without the agent).
    Send,
    /// Delivering an event to the agent's event webhook (replay delivers it again).
    Event,
}

impl Stage {
    /// Its name in the API and in subjects.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Send => "send",
            Self::Event => "event",
        }
    }
}

/// The message a dead letter keeps: exactly what the failed stage consumed. Written untagged,
/// as the message itself; read back by its shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum DeadMessage {
    /// An inbound message whose agent turn failed.
    Inbound(Box<InboundMessage>),
    /// A reply that could not be sent.
    Reply(Box<OutboundReply>),
    /// An event its webhook did not take.
    Event(Box<crate::events::Event>),
}

impl<'de> Deserialize<'de> for DeadMessage {
    /// As serde's untagged enums read, the first variant that fits, but from the JSON text
    /// itself: the raw fields of an inbound message cannot be read from the buffered form that
    /// serde's untagged enums decode from.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = <Box<RawValue>>::deserialize(deserializer)?;
        serde_json::from_str::<InboundMessage>(raw.get())
            .map(|m| Self::Inbound(Box::new(m)))
            .or_else(|_| {
                serde_json::from_str::<OutboundReply>(raw.get()).map(|r| Self::Reply(Box::new(r)))
            })
            .or_else(|_| {
                serde_json::from_str::<crate::events::Event>(raw.get())
                    .map(|e| Self::Event(Box::new(e)))
            })
            .map_err(|_| {
                D::Error::custom("the message is neither an inbound message, a reply nor an event")
            })
    }
}

/// A message that failed for good, with why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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
    #[schema(value_type = String)]
    pub agent_id: AgentId,
    /// The message itself: the inbound message (stage `agent`), the reply (`send`) or the
    /// event (`event`), as the stage consumed it.
    #[schema(value_type = Object)]
    pub message: DeadMessage,
}

impl DeadLetter {
    /// An inbound message whose agent turn failed for good after `attempts`, failed now.
    pub fn agent(message: InboundMessage, reason: String, attempts: u64) -> Self {
        Self::now(
            Stage::Agent,
            DeadMessage::Inbound(Box::new(message)),
            reason,
            None,
            attempts,
        )
    }

    /// A reply (or one part of it) that cannot be sent, with Twilio's code if there is one,
    /// failed now.
    pub fn send(reply: OutboundReply, reason: String, code: Option<u32>, attempts: u64) -> Self {
        Self::now(
            Stage::Send,
            DeadMessage::Reply(Box::new(reply)),
            reason,
            code,
            attempts,
        )
    }

    /// An event its webhook did not take, given up now.
    pub fn event(event: crate::events::Event, reason: String, attempts: u64) -> Self {
        Self::now(
            Stage::Event,
            DeadMessage::Event(Box::new(event)),
            reason,
            None,
            attempts,
        )
    }

    fn now(
        stage: Stage,
        message: DeadMessage,
        reason: String,
        code: Option<u32>,
        attempts: u64,
    ) -> Self {
        let agent_id = match &message {
            DeadMessage::Inbound(m) => m.agent_id.clone(),
            DeadMessage::Reply(r) => r.agent_id.clone(),
            DeadMessage::Event(e) => e.agent_id.clone(),
        };
        Self {
            id: String::new(),
            stage,
            reason,
            code,
            attempts,
            failed_at: OffsetDateTime::now_utc(),
            agent_id,
            message,
        }
    }
}
