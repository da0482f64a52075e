//! The store: agents and their sealed channel settings, conversations, leads, the 24-hour
//! window clock, send guards and delivery statuses. The pipeline talks only to this trait, so
//! Redis and the embedded store are interchangeable. Every method that can race (two workers,
//! two senders) is atomic in each implementation.

pub mod embedded;
pub mod pacing;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use twilio::status::{MessageStatus, StatusUpdate};
use wagate_core::{
    agent::{Agent, WhatsAppChannel},
    crypto::SealedSecret,
    domain::{AgentId, MessageSid, SessionId},
    envelope::OutboundReply,
    window::WindowClocks,
};

pub use pacing::{Pace, Slot};

/// A failure of the store. The text is safe to log: it says what was being done and why it
/// failed, never a stored value or a secret.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis refused a command, or could not be reached.
    #[error("store: {context}: {source}")]
    Redis {
        /// What was being done.
        context: &'static str,
        /// Redis's error.
        #[source]
        source: ::redis::RedisError,
    },
    /// Redis could not be connected to at start; the URL is shown without its credentials.
    #[error("store: could not connect to Redis at {url}: {reason}")]
    Connect {
        /// Where, its password masked.
        url: String,
        /// Why (a timeout, or Redis's error with any credentials masked).
        reason: String,
    },
    /// The embedded database failed.
    #[error("store: {0}")]
    Embedded(#[from] wagate_embedded::DbError),
    /// A record did not encode, or a stored one did not decode.
    #[error("store: {context}: {source}")]
    Json {
        /// What was being encoded or decoded.
        context: &'static str,
        /// serde_json's error.
        #[source]
        source: serde_json::Error,
    },
    /// What the store holds, or was asked, breaks one of its rules (a malformed guard, a turn
    /// of several sessions): a bug or data of another version, not an outage.
    #[error("store: {0}")]
    Invalid(String),
}

/// The store not answering is an outage, not a property of the message.
impl From<StoreError> for wagate_core::failure::Failure {
    fn from(e: StoreError) -> Self {
        Self::transient(e)
    }
}

impl StoreError {
    /// A `map_err` for serde_json's errors.
    pub fn json(context: &'static str) -> impl Fn(serde_json::Error) -> Self {
        move |source| Self::Json { context, source }
    }
}

/// Who said a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The WhatsApp user.
    User,
    /// The agent.
    Assistant,
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    /// Who said it.
    pub role: Role,
    /// What was said.
    pub content: String,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Who wrote a business message that a person sent rather than the agent (an operator's
    /// name): the agent then sees what was said in its name while it was paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
}

impl Turn {
    /// A turn said by the user or the agent.
    pub fn new(role: Role, content: String, at: OffsetDateTime) -> Self {
        Self {
            role,
            content,
            at,
            author: None,
        }
    }
}

/// A conversation handed to a person: while it stands, inbound messages are recorded and no
/// agent runs. It lapses after the agent's `handoff_resume_after_s` without a word from the
/// person ([`Pause::lapses_at`]), so a conversation nobody picked up goes back to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pause {
    /// Since when.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    /// Who paused it: `agent` (the agent handed off), or the operator's name (`api` when the
    /// call named none).
    pub by: String,
    /// The person's last message to the user, or the pause itself: the idle time counts from
    /// here.
    #[serde(with = "time::serde::rfc3339")]
    pub active_at: OffsetDateTime,
}

impl Pause {
    /// A pause starting at `at`.
    pub fn new(by: impl Into<String>, at: OffsetDateTime) -> Self {
        Self {
            since: at,
            by: by.into(),
            active_at: at,
        }
    }

    /// When the pause ends by itself: `idle` after the person's last activity (`None`: not
    /// within the calendar's range).
    pub fn lapses_at(&self, idle: Duration) -> Option<OffsetDateTime> {
        time::Duration::try_from(idle)
            .ok()
            .and_then(|idle| self.active_at.checked_add(idle))
    }

    /// Whether it still stands at `now`.
    pub fn holds(&self, now: OffsetDateTime, idle: Duration) -> bool {
        now - self.active_at < idle
    }
}

/// A WhatsApp user captured as a lead of an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lead {
    /// The user's number (or WhatsApp id for non-phone users).
    pub phone: String,
    /// Always `whatsapp` here.
    pub platform: String,
    /// The latest WhatsApp profile name seen.
    pub profile_name: Option<String>,
    /// First message.
    #[serde(with = "time::serde::rfc3339")]
    pub first_seen: OffsetDateTime,
    /// Latest message.
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: OffsetDateTime,
    /// Messages received from this user.
    pub message_count: u64,
    /// Whether the user opted out and has not opted back in.
    pub opted_out: bool,
    /// When, while they are opted out.
    #[serde(with = "time::serde::rfc3339::option")]
    pub opted_out_at: Option<OffsetDateTime>,
}

impl Lead {
    /// `opted_out` and `opted_out_at` from the lead's opt-out and opt-in times (ms), as
    /// [`wagate_core::window::opted_out`] reads the clocks.
    pub(crate) fn consent(&mut self, optout: Option<i64>, optin: Option<i64>) {
        let at =
            |ms: i64| OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok();
        let clocks = WindowClocks {
            last_inbound: None,
            opted_out_at: optout.and_then(at),
            opted_in_at: optin.and_then(at),
        };
        self.opted_out = wagate_core::window::opted_out(clocks);
        self.opted_out_at = clocks.opted_out_at.filter(|_| self.opted_out);
    }
}

/// One inbound message, as seen by lead capture.
#[derive(Debug, Clone)]
pub struct LeadSighting<'a> {
    /// The conversation (agent and user).
    pub session: &'a SessionId,
    /// The message; each is counted once however often it is delivered.
    pub message_sid: &'a MessageSid,
    /// The profile name sent with it.
    pub profile_name: Option<&'a str>,
    /// When it was received.
    pub at: OffsetDateTime,
}

/// The state of a send guard for one reply part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardState {
    /// This caller now holds the part and must post it, then call `mark_sent` (or `release`),
    /// renewing the hold ([`Store::renew_send`]) while that takes.
    Claimed(Hold),
    /// Already posted; Twilio's message sid.
    Sent(String),
    /// Another sender holds it right now.
    Busy,
    /// This caller now holds the part, taken over from a sender whose lease ran out: that
    /// sender may have posted it before dying, so find out (Twilio's message list) before
    /// posting again.
    Reclaimed(Hold),
}

/// One claim of a send guard, to renew it with. It is the lease's deadline (ms since the
/// epoch) as stored in the guard: every claim writes a later deadline than the lease it took
/// over, and every renewal a later one again, so a holder whose lease ran out and was taken
/// over no longer matches the guard and cannot extend the new holder's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold(pub(crate) u64);

/// A message that the sender recorded instead of posting it to Twilio, because the agent's
/// channel is in simulation mode (for trying an agent without a Twilio account).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimulatedMessage {
    /// Its position in the conversation's outbox, from 1.
    pub index: u64,
    /// What would have been posted as `Body` (or a template's sid and variables).
    pub body: String,
    /// When it was recorded.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// A reply part posted to a user ([`Store::sent_messages`]): Twilio's message and the part, with
/// the delivery status its callbacks reported so far.
#[derive(Debug, Clone, PartialEq)]
pub struct SentMessage {
    /// Twilio's message sid.
    pub sid: String,
    /// The part as posted (its id is the reply's id and `-p<index>`).
    pub part: OutboundReply,
    /// The latest status reported for it, with Twilio's error code; `None` until the first
    /// status callback.
    pub status: Option<(MessageStatus, Option<u32>)>,
}

/// The latest webhook of an agent refused because its signature did not match, for the
/// console's channel health: stored, so that every ingress process's failures show wherever the
/// console is served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureFailure {
    /// When it was refused.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The URL the signature was checked against, without credentials.
    pub signed_url: String,
}

/// The outcome of a completed turn, recorded under each inbound message it answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletedTurn {
    /// The id of the reply that answers the turn ([`OutboundReply::id`]).
    pub reply_id: String,
    /// The agent's reply text (may be empty: nothing to send).
    pub reply: String,
    /// Media the agent sends with it (public https URLs), so that a redelivered message
    /// republishes them too. Absent from older records.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub media: Vec<String>,
    /// The agent handed the conversation to a person with this reply, so that a redelivered
    /// message pauses the conversation too when the first delivery died before it did.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub handoff: bool,
    /// Choices the agent offered with the reply, so that a redelivered message republishes
    /// them too. Absent from older records.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quick_replies: Vec<String>,
}

/// What a turn starts from ([`Store::begin_turn`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TurnStart {
    /// For each message of the turn, in order: the completed turn that answered it, when it
    /// was answered before (the message was delivered again).
    pub completed: Vec<Option<CompletedTurn>>,
    /// The session's last turns, oldest first; empty when every message was answered before.
    pub history: Vec<Turn>,
    /// The conversation's pause, if it has one (it may have lapsed: [`Pause::holds`]).
    pub pause: Option<Pause>,
    /// The user became a lead with these messages.
    pub new_lead: bool,
}

/// The window clocks of `session`, read at once.
pub async fn window_clocks(
    store: &dyn Store,
    session: &SessionId,
) -> Result<WindowClocks, StoreError> {
    let (last_inbound, opted_out_at, opted_in_at) = futures::try_join!(
        store.last_inbound(session),
        store.opted_out_at(session),
        store.opted_in_at(session)
    )?;
    Ok(WindowClocks {
        last_inbound,
        opted_out_at,
        opted_in_at,
    })
}

/// A change to an agent's settings, for caches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// This agent or its channel changed.
    Agent(AgentId),
    /// Notifications may have been missed: drop everything cached.
    All,
}

/// Durable state of the pipeline.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates or replaces an agent.
    async fn put_agent(&self, agent: &Agent) -> Result<(), StoreError>;
    /// One agent.
    async fn agent(&self, id: &AgentId) -> Result<Option<Agent>, StoreError>;
    /// All agents, by id.
    async fn agents(&self) -> Result<Vec<Agent>, StoreError>;
    /// Creates or replaces an agent's WhatsApp channel.
    async fn put_channel(&self, id: &AgentId, channel: &WhatsAppChannel) -> Result<(), StoreError>;
    /// An agent's WhatsApp channel.
    async fn channel(&self, id: &AgentId) -> Result<Option<WhatsAppChannel>, StoreError>;
    /// Notifications of changes to agents and channels, from any process.
    async fn changes(&self) -> Result<BoxStream<'static, Change>, StoreError>;
    /// Deletes an agent and its channel, and notifies every process's caches, so that its
    /// webhook answers 404 at once. Its conversations and leads are not touched here: they are
    /// erased user by user ([`Store::erase_user`]), which is how the caller finds them (the
    /// agent's leads). True when there was an agent.
    async fn delete_agent(&self, id: &AgentId) -> Result<bool, StoreError>;

    /// Forgets a conversation: its history, its pause and its simulated outbox, so that the
    /// next message starts a new history with the agent. What is not the conversation but a fact about the user stays: the
    /// lead; the window clock (the user did write, and WhatsApp keeps its 24-hour window open
    /// whatever wagate forgets); the opt-out and opt-in clocks (forgetting a conversation must
    /// never start sending to someone who said STOP); and the turn records, which only keep a
    /// message delivered again from being answered twice, and lapse after [`GUARD_TTL`].
    /// Forgetting a conversation that is not there does nothing.
    async fn forget_session(&self, session: &SessionId) -> Result<(), StoreError>;
    /// Erases everything stored about the user of `session` with its agent, for a data
    /// protection request: the lead, the history, the pause, the turn records, the window, opt-out
    /// and opt-in clocks, the simulated outbox, and the parts sent to them with their delivery
    /// statuses. The opt-out goes too: every record of it holds the number, which is what the
    /// person asked to have erased, and no message can reach them from wagate without someone
    /// giving the number again. Send guards, "seen" marks and failure counts stay: they are
    /// keyed by message ids, hold no number, and lapse after [`GUARD_TTL`]. Dead letters live
    /// on the bus and are the caller's to remove. Erasing nothing does nothing.
    async fn erase_user(&self, session: &SessionId) -> Result<(), StoreError>;

    /// Starts a turn over `sightings`, the messages of one conversation, oldest first: finds
    /// which were answered before, counts each toward its user's lead, moves the 24-hour window
    /// clock to the latest and reads the last `history` turns and the pause. The same as
    /// `completed_turn` and `record_lead` per message, `stamp_inbound`, `history` and `pause`,
    /// in one round trip, because the worker does this for every message. Every part is idempotent, so a message delivered
    /// twice changes nothing the second time.
    async fn begin_turn(
        &self,
        session: &SessionId,
        sightings: &[LeadSighting<'_>],
        history: usize,
    ) -> Result<TurnStart, StoreError>;
    /// The last `last` turns of a session, oldest first.
    async fn history(&self, session: &SessionId, last: usize) -> Result<Vec<Turn>, StoreError>;
    /// The completed turn that answered the inbound message `turn_key`, if there is one.
    async fn completed_turn(
        &self,
        session: &SessionId,
        turn_key: &str,
    ) -> Result<Option<CompletedTurn>, StoreError>;
    /// Appends `turns` and records `completed` under every key of `turn_keys` (the inbound
    /// messages of the turn), atomically and only if the first key has no record yet; returns
    /// the record that stands (this one, or that of an earlier completion that won). History
    /// is kept for `keep`: turns older than that are dropped from the conversation's start
    /// (a few at each completion), and a conversation with no completion for that long is
    /// dropped whole.
    async fn complete_turn(
        &self,
        session: &SessionId,
        turn_keys: &[String],
        turns: &[Turn],
        completed: &CompletedTurn,
        keep: Duration,
    ) -> Result<CompletedTurn, StoreError>;

    /// Pauses a conversation (a person takes it over), or with `None` resumes it. A pause
    /// replaces the one before.
    async fn set_pause(&self, session: &SessionId, pause: Option<&Pause>)
    -> Result<(), StoreError>;
    /// The conversation's pause, lapsed or not.
    async fn pause(&self, session: &SessionId) -> Result<Option<Pause>, StoreError>;

    /// Counts an inbound message towards its user's lead, creating the lead on first contact.
    /// Idempotent per message sid.
    async fn record_lead(&self, sighting: &LeadSighting<'_>) -> Result<(), StoreError>;
    /// All leads of an agent, by first contact.
    async fn leads(&self, agent: &AgentId) -> Result<Vec<Lead>, StoreError>;

    /// Moves the 24-hour window clock of a conversation to `at` (never backwards).
    async fn stamp_inbound(
        &self,
        session: &SessionId,
        at: OffsetDateTime,
    ) -> Result<(), StoreError>;
    /// When the user last wrote.
    async fn last_inbound(&self, session: &SessionId)
    -> Result<Option<OffsetDateTime>, StoreError>;
    /// Records that the user opted out (they sent STOP, or Twilio answered 21610) at `at`
    /// (never moving the clock backwards); every send is refused until they opt in after that.
    async fn opt_out(&self, session: &SessionId, at: OffsetDateTime) -> Result<(), StoreError>;
    /// When the user last opted out.
    async fn opted_out_at(&self, session: &SessionId)
    -> Result<Option<OffsetDateTime>, StoreError>;
    /// Records that the user opted back in (they sent START, YES or UNSTOP) at `at` (never moving
    /// the clock backwards), which ends an earlier opt-out.
    async fn opt_in(&self, session: &SessionId, at: OffsetDateTime) -> Result<(), StoreError>;
    /// When the user last opted back in.
    async fn opted_in_at(&self, session: &SessionId) -> Result<Option<OffsetDateTime>, StoreError>;

    /// Takes the send guard of one reply part for `lease`, unless it was sent or is held.
    async fn claim_send(&self, key: &str, lease: Duration) -> Result<GuardState, StoreError>;
    /// Takes the send guard of one reply part, as `claim_send`, and reads the window clocks of
    /// `session`, in one round trip: what a sender asks before it posts a reply's first part.
    async fn claim_send_with_clocks(
        &self,
        session: &SessionId,
        key: &str,
        lease: Duration,
    ) -> Result<(GuardState, WindowClocks), StoreError>;
    /// Records that the part was posted, as Twilio message `message_sid`; `part` is that one
    /// part as a reply of its own (with an id of its own), kept so that a failure Twilio reports
    /// later by status callback can become a dead letter that replays just this part.
    async fn mark_sent(
        &self,
        key: &str,
        message_sid: &str,
        part: &OutboundReply,
    ) -> Result<(), StoreError>;
    /// Records, as `mark_sent`, that the part went out as `message_sid`, a message found in
    /// Twilio's list after an ambiguous answer, but only if no other part is recorded as that
    /// message (atomically): two parts with the same text must not both settle on one message.
    /// True when the message is now this part's (or already was).
    async fn settle_sent(
        &self,
        key: &str,
        message_sid: &str,
        part: &OutboundReply,
    ) -> Result<bool, StoreError>;
    /// The part posted as Twilio message `message_sid`.
    async fn sent_part(&self, message_sid: &str) -> Result<Option<OutboundReply>, StoreError>;
    /// Extends the guard `key` to `lease` from now, only if `hold` still holds it (no other
    /// sender took it over after the lease ran out, and it was neither sent nor released).
    /// The new hold, or `None` when the guard is no longer this claim's.
    async fn renew_send(
        &self,
        key: &str,
        hold: Hold,
        lease: Duration,
    ) -> Result<Option<Hold>, StoreError>;
    /// Gives the guard back without sending (the part will be tried again), if `hold` still
    /// has it: a guard another sender took over after this one's lease ran out stays theirs,
    /// or a third sender could take it while they post.
    async fn release_send(&self, key: &str, hold: Hold) -> Result<(), StoreError>;

    /// Stores a status callback unless a status later in the message's life is already stored;
    /// true when it was applied.
    async fn record_status(&self, update: &StatusUpdate) -> Result<bool, StoreError>;
    /// The stored status of an outbound message.
    async fn status(
        &self,
        message_sid: &MessageSid,
    ) -> Result<Option<(MessageStatus, Option<u32>)>, StoreError>;
    /// The parts posted to the user of `session` that the store still holds (for
    /// [`GUARD_TTL`]), each with its status, in no particular order: the delivery of each reply
    /// in a transcript. The session's index of sent parts (kept for erasure) names them, so this
    /// is one read of the index and one of each part, sent together, rather than a read per turn.
    async fn sent_messages(&self, session: &SessionId) -> Result<Vec<SentMessage>, StoreError>;

    /// Appends a simulated send to the conversation's outbox; returns its index.
    async fn record_simulated(
        &self,
        session: &SessionId,
        body: &str,
        at: OffsetDateTime,
    ) -> Result<u64, StoreError>;
    /// The conversation's simulated sends after index `after` (0: all), oldest first.
    async fn simulated(
        &self,
        session: &SessionId,
        after: u64,
    ) -> Result<Vec<SimulatedMessage>, StoreError>;

    /// Counts a failed attempt at the message `key` and returns the failures so far. Failures
    /// are counted here rather than by the bus, because the bus also counts the deliveries that
    /// were only handed back to wait for their conversation's turn.
    async fn count_failure(&self, key: &str) -> Result<u64, StoreError>;
    /// Forgets the failures of `key` once it succeeded or became a dead letter.
    async fn clear_failures(&self, key: &str) -> Result<(), StoreError>;

    /// The master key check (`shared::key_check`): stores `fresh` unless a check is stored
    /// already, atomically, and returns the check that stands (`fresh`, or the stored one).
    /// Processes starting together on new data thus all test their keys against one check.
    async fn key_check(&self, fresh: &SealedSecret) -> Result<SealedSecret, StoreError>;
    /// Replaces the key check `old` with `new` (the same check sealed with the primary key, at
    /// the end of a rotation), only if `old` is still the one stored; true when it was replaced.
    async fn replace_key_check(
        &self,
        old: &SealedSecret,
        new: &SealedSecret,
    ) -> Result<bool, StoreError>;

    /// Records `failure` as the latest webhook of `agent` refused for its signature, kept for
    /// [`GUARD_TTL`] and removed with the agent. Callers throttle it: a flood of forged
    /// webhooks must not become a flood of writes.
    async fn note_signature_failure(
        &self,
        agent: &AgentId,
        failure: &SignatureFailure,
    ) -> Result<(), StoreError>;
    /// The latest webhook of `agent` refused for its signature, if one was noted.
    async fn signature_failure(
        &self,
        agent: &AgentId,
    ) -> Result<Option<SignatureFailure>, StoreError>;
    /// The Content API sid (`HX…`) cached under `key`, if there is one. A sender makes a
    /// quick-reply or list-picker content once and finds it here afterwards, as does every
    /// other sender and the same one after a restart, rather than making a new content resource
    /// in the account for each reply.
    async fn content_sid(&self, key: &str) -> Result<Option<String>, StoreError>;
    /// Caches `sid` under `key` for [`CONTENT_TTL`] unless a sid is cached there already
    /// (another sender made the same content at the same time), atomically; returns the sid
    /// that stands, so that both senders go on with one content.
    async fn cache_content_sid(&self, key: &str, sid: &str) -> Result<String, StoreError>;

    /// Takes a slot of the pace of the sender `sender` (a Twilio number or Messaging Service
    /// with its account), shared by every sender process: [`Slot::Go`] when the message may be
    /// posted now, else how long to wait before asking again. Atomic, with the store's clock
    /// (Redis's `TIME`), so that senders on hosts whose clocks differ share one pace.
    async fn take_send_slot(&self, sender: &str, pace: Pace) -> Result<Slot, StoreError>;

    /// Whether the store answers.
    async fn ready(&self) -> Result<(), StoreError>;
}

/// The time of the latest of `sightings`, which must all be messages of `session`: what both
/// stores check before [`Store::begin_turn`]. `None` when there are none.
fn latest_sighting(
    session: &SessionId,
    sightings: &[LeadSighting<'_>],
) -> Result<Option<OffsetDateTime>, StoreError> {
    if sightings.iter().any(|s| s.session != session) {
        return Err(StoreError::Invalid(
            "begin_turn takes the messages of one session".into(),
        ));
    }
    Ok(sightings.iter().map(|s| s.at).max())
}

/// How long a cached Content API sid is kept ([`Store::cache_content_sid`]): a content is
/// reused for a month, then made again once, so a cache of one-off questions does not grow
/// forever.
pub const CONTENT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Turns dropped from a conversation's start at most per completion: the expired ones of a
/// long conversation go over its next completions rather than all in one slow step.
const TRIM_PER_COMPLETION: usize = 64;

/// The second before which turns are older than `keep`, as the first 19 characters of an RFC
/// 3339 time in UTC (how turns store `at`): compared as text, which orders them by time.
fn retention_cutoff(keep: Duration) -> String {
    let cutoff = time::Duration::try_from(keep)
        .ok()
        .and_then(|keep| OffsetDateTime::now_utc().checked_sub(keep))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
        .max(OffsetDateTime::UNIX_EPOCH);
    let format = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
    cutoff.format(&format).unwrap_or_default()
}

/// Whether the turn stored as `raw` is older than `cutoff` ([`retention_cutoff`]). A turn that
/// does not decode is kept: dropping what cannot be read is not this step's call.
fn expired_turn(raw: &[u8], cutoff: &str) -> bool {
    #[derive(Deserialize)]
    struct At<'a> {
        at: &'a str,
    }
    serde_json::from_slice::<At<'_>>(raw)
        .is_ok_and(|t| t.at.get(..19).is_some_and(|at| at < cutoff))
}

/// How long records that only guard against duplicates are kept.
pub const GUARD_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
