//! The bus: durable publish with a dedupe id, and consumption with ack, delayed redelivery and
//! attempt counts; plus the dead-letter store. The pipeline talks only to this trait, so NATS
//! JetStream and the embedded store are interchangeable.

pub mod embedded;
pub mod jetstream;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use wagate_core::{
    domain::SessionId,
    envelope::{DeadLetter, InboundMessage, OutboundReply},
    events::Event,
    failure::Failure,
};

/// A kind of message that travels on the bus. Where it goes and how it is keyed are said here,
/// once: no role formats a subject, a dedupe id or a payload by hand.
pub trait Envelope: serde::Serialize + serde::de::DeserializeOwned + Send + 'static {
    /// The queue it travels on.
    const TOPIC: Topic;
    /// The conversation it belongs to; a conversation's messages are handled in order.
    fn session_id(&self) -> SessionId;
    /// Its id for the bus's duplicate detection: a second message with the same id within the
    /// duplicate window is dropped.
    fn dedupe_id(&self) -> String;
    /// The W3C `traceparent` it carries (`wagate_core::trace`), which NATS also gets as a header.
    fn traceparent(&self) -> Option<&str>;
    /// The queue this one travels on: [`Self::TOPIC`], unless the kind has several.
    fn topic(&self) -> Topic {
        Self::TOPIC
    }
}

impl Envelope for InboundMessage {
    const TOPIC: Topic = Topic::Inbound;
    fn session_id(&self) -> SessionId {
        InboundMessage::session_id(self)
    }
    /// Twilio's MessageSid (with the agent, whose webhook it came to): Twilio's retries of a
    /// webhook are stored once.
    fn dedupe_id(&self) -> String {
        format!("{}:{}", self.agent_id, self.message_sid)
    }
    fn traceparent(&self) -> Option<&str> {
        self.traceparent.as_deref()
    }
}

impl Envelope for OutboundReply {
    const TOPIC: Topic = Topic::Outbound;
    fn session_id(&self) -> SessionId {
        OutboundReply::session_id(self)
    }
    /// The reply's id: `in-<MessageSid>` for the answer to a message, so that a turn redelivered
    /// after its reply was published publishes nothing more.
    fn dedupe_id(&self) -> String {
        self.id.clone()
    }
    fn traceparent(&self) -> Option<&str> {
        self.traceparent.as_deref()
    }
    /// Bulk sends (an admin's messages and templates) queue apart from the replies of live
    /// conversations, so that a backlog of them never stands in front of a live reply: the
    /// sender consumes both queues at once ([`OutboundReply::bulk`]).
    fn topic(&self) -> Topic {
        if self.bulk {
            Topic::Bulk
        } else {
            Topic::Outbound
        }
    }
}

impl Envelope for Event {
    const TOPIC: Topic = Topic::Events;
    fn session_id(&self) -> SessionId {
        SessionId::new(&self.agent_id, &self.user)
    }
    fn dedupe_id(&self) -> String {
        self.id.clone()
    }
    fn traceparent(&self) -> Option<&str> {
        self.traceparent.as_deref()
    }
}

/// Publishes `message` on its topic, in its conversation, under its dedupe id.
pub async fn publish<E: Envelope>(bus: &dyn Bus, message: &E) -> Result<Published, BusError> {
    publish_as(bus, message, &message.dedupe_id()).await
}

/// Publishes `message` as [`publish`] does, under `dedupe_id` instead of its own: for a
/// message sent again on purpose (a replayed dead letter), which its own id would drop.
pub async fn publish_as<E: Envelope>(
    bus: &dyn Bus,
    message: &E,
    dedupe_id: &str,
) -> Result<Published, BusError> {
    let payload = serde_json::to_vec(message).map_err(BusError::json("encode a message"))?;
    let session = message.session_id();
    let conversation = format!("{}.{}", session.agent(), session.subject_token());
    bus.publish_traced(
        message.topic(),
        &conversation,
        dedupe_id,
        payload.into(),
        message.traceparent(),
    )
    .await
}

/// The queues of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    /// Inbound messages, ingress → worker.
    Inbound,
    /// Replies, worker/admin → sender.
    Outbound,
    /// Events for the agents' event webhooks, every role → sender (`shared::events`).
    Events,
    /// Bulk sends (admin messages and templates), admin → sender: replies too, queued apart
    /// so that live replies never wait behind them.
    Bulk,
}

impl Topic {
    /// Its name in subjects and streams.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
            Self::Events => "events",
            Self::Bulk => "bulk",
        }
    }
}

/// A failure of the bus. The text is safe to log: it says what was being done and why it
/// failed, never a payload or a secret.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// NATS refused a request, or could not be reached.
    #[error("bus: {context}: {source}")]
    Nats {
        /// What was being done.
        context: &'static str,
        /// async-nats's error (each request has an error type of its own).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// NATS could not be connected to at start; the URL is shown without its credentials.
    #[error("bus: could not connect to NATS at {url}: {reason}")]
    Connect {
        /// Where, passwords masked.
        url: String,
        /// Why (a timeout, or the client's error with any credentials masked).
        reason: String,
    },
    /// The embedded database failed.
    #[error("bus: {0}")]
    Embedded(#[from] wagate_embedded::DbError),
    /// A message did not encode, or a stored one did not decode.
    #[error("bus: {context}: {source}")]
    Json {
        /// What was being encoded or decoded.
        context: &'static str,
        /// serde_json's error.
        #[source]
        source: serde_json::Error,
    },
    /// The bus is not in the state it must be in (a stream of another configuration, the local
    /// spool full): a refusal that says what to do, not an outage.
    #[error("bus: {0}")]
    Refused(String),
}

/// The bus not answering is an outage, not a property of the message.
impl From<BusError> for Failure {
    fn from(e: BusError) -> Self {
        Self::transient(e)
    }
}

impl BusError {
    /// A `map_err` for the errors of NATS's requests.
    pub fn nats<E>(context: &'static str) -> impl Fn(E) -> Self
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        move |e| Self::Nats {
            context,
            source: e.into(),
        }
    }

    /// A `map_err` for serde_json's errors.
    pub fn json(context: &'static str) -> impl Fn(serde_json::Error) -> Self {
        move |source| Self::Json { context, source }
    }
}

/// What a publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Stored now.
    Stored,
    /// A message with the same dedupe id was already stored; nothing was added.
    Duplicate,
}

/// Messages of a subscription, as they come.
pub type Deliveries = BoxStream<'static, Result<Box<dyn Delivery>, BusError>>;

/// One delivery of a message; it stays owned by this consumer until acked or released.
#[async_trait]
pub trait Delivery: Send + Sync {
    /// The message bytes, handed over: the delivery keeps none of them (a second call gets
    /// none). A consumer holds a delivery until it settles it, through a whole slow turn, and
    /// on JetStream a payload is a slice of the connection's read buffer, which stays allocated
    /// while any slice of it lives: held payloads kept about 2.3 KB per conversation in flight.
    fn take_payload(&mut self) -> Bytes;
    /// Which delivery this is, from 1.
    fn attempt(&self) -> u64;
    /// Done: the message will not come again. May return before the bus has applied it (on
    /// JetStream the ack is sent, not confirmed): an ack lost on the way brings the message back
    /// after the ack wait, where its stored outcome is reused. Because of that gap, a consumer
    /// that acked a message checks the next one of the conversation with
    /// [`Self::is_next_after`] the acked position, which does not look at the acked message.
    async fn ack(&self) -> Result<(), BusError>;
    /// Not done: deliver again after `delay`.
    async fn retry_in(&self, delay: Duration) -> Result<(), BusError>;
    /// Still working: extend the time before the bus assumes this consumer died.
    async fn keep_alive(&self) -> Result<(), BusError>;
    /// How often [`Self::keep_alive`] must be called while the message is worked on, or `None`
    /// when the bus holds a delivery until it is settled, whatever the time.
    fn keep_alive_every(&self) -> Option<Duration>;
    /// Whether this is the oldest unfinished message of its conversation. A consumer handles a
    /// message only when it is, so a conversation's messages are handled in arrival order and
    /// one at a time across every process; otherwise it hands the message back for a moment.
    async fn is_next_in_conversation(&self) -> Result<bool, BusError>;
    /// The message's position in its queue (increasing in publish order).
    fn position(&self) -> u64;
    /// Whether no unfinished message of this conversation lies between the message at
    /// `position` and this one: then both can be handled together as one turn (burst
    /// coalescing) without passing over a message another process holds.
    async fn is_next_after(&self, position: u64) -> Result<bool, BusError>;
}

/// Durable queues and the dead-letter store.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Stores `payload` on `topic` for the conversation named by `conversation` (a subject-safe
    /// token). Returns only once the message is durable. A publish whose `dedupe_id` was seen
    /// within the duplicate window is dropped and reported as [`Published::Duplicate`].
    /// `traceparent` is the message's, for a bus that carries headers (JetStream's
    /// `traceparent` header, for tools that follow traces through NATS); the envelope carries
    /// it in any case, so a bus without headers loses nothing.
    async fn publish_traced(
        &self,
        topic: Topic,
        conversation: &str,
        dedupe_id: &str,
        payload: Bytes,
        traceparent: Option<&str>,
    ) -> Result<Published, BusError>;

    /// [`Bus::publish_traced`] without a trace.
    async fn publish(
        &self,
        topic: Topic,
        conversation: &str,
        dedupe_id: &str,
        payload: Bytes,
    ) -> Result<Published, BusError> {
        self.publish_traced(topic, conversation, dedupe_id, payload, None)
            .await
    }

    /// Consumes `topic` as one member of its shared consumer group.
    async fn subscribe(&self, topic: Topic) -> Result<Deliveries, BusError>;

    /// Stores a dead letter and returns its id.
    async fn put_dead_letter(&self, letter: &DeadLetter) -> Result<String, BusError>;

    /// All dead letters, oldest first.
    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, BusError>;

    /// One dead letter.
    async fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>, BusError>;

    /// Removes a dead letter (after its replay was published); false if it was not there.
    async fn remove_dead_letter(&self, id: &str) -> Result<bool, BusError>;

    /// Whether the bus answers.
    async fn ready(&self) -> Result<(), BusError>;

    /// Messages of `topic` stored and not yet acknowledged: waiting, held back for a retry, or
    /// being handled now. The consumers' lag, as the gauge `wagate_backlog_messages` shows it.
    async fn backlog(&self, topic: Topic) -> Result<u64, BusError>;

    /// Waits until what this process sent (acks are sent, not confirmed) has left it; called
    /// before exiting. A bus inside the process has nothing in transit.
    async fn flush(&self) -> Result<(), BusError> {
        Ok(())
    }
}
