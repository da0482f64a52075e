//! Conversations and leads: what a worker reads and writes around each turn (the history, the
//! records of completed turns, the pause), the lead every user becomes, the clocks that decide
//! what may be sent to them (the 24-hour window, opt-out and opt-in), the simulated outbox, and
//! forgetting and erasing all of it. Everything here is keyed by the conversation
//! ([`SessionId`]: agent and user), or by the agent for its leads.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use wagate_core::{
    domain::{AgentId, MessageSid, SessionId},
    window::WindowClocks,
};

use crate::StoreError;

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
        let clocks = crate::clocks_from_ms(None, optout, optin);
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

/// The outcome of a completed turn, recorded under each inbound message it answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletedTurn {
    /// The id of the reply that answers the turn ([`wagate_core::envelope::OutboundReply::id`]).
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

/// What a turn starts from ([`Conversations::begin_turn`]).
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
    store: &dyn Conversations,
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

/// Conversations with their leads and clocks. A turn is two calls, [`Self::begin_turn`] and
/// [`Self::complete_turn`], each one round trip, because the worker makes them for every
/// message; the rest serve the admin API, the console and the opt-out keywords.
#[async_trait]
pub trait Conversations: Send + Sync {
    /// Forgets a conversation: its history, its pause and its simulated outbox, so that the
    /// next message starts a new history with the agent. What is not the conversation but a
    /// fact about the user stays: the lead; the window clock (the user did write, and WhatsApp
    /// keeps its 24-hour window open
    /// whatever wagate forgets); the opt-out and opt-in clocks (forgetting a conversation must
    /// never start sending to someone who said STOP); and the turn records, which only keep a
    /// message delivered again from being answered twice, and lapse after [`crate::GUARD_TTL`].
    /// Forgetting a conversation that is not there does nothing.
    async fn forget_session(&self, session: &SessionId) -> Result<(), StoreError>;
    /// Erases everything stored about the user of `session` with its agent, for a data
    /// protection request: the lead, the history, the pause, the turn records, the window, opt-out
    /// and opt-in clocks, the simulated outbox, and the parts sent to them with their delivery
    /// statuses. The opt-out goes too: every record of it holds the number, which is what the
    /// person asked to have erased, and no message can reach them from wagate without someone
    /// giving the number again. Send guards, "seen" marks and failure counts stay: they are
    /// keyed by message ids, hold no number, and lapse after [`crate::GUARD_TTL`]. Dead letters
    /// live on the bus and are the caller's to remove. Erasing nothing does nothing.
    async fn erase_user(&self, session: &SessionId) -> Result<(), StoreError>;
    /// Makes what an erasure deleted unreadable from the store's own files: called once per
    /// erasure request, after all of its deletions ([`Self::erase_user`] for each person, and
    /// the removal of their dead letters), because it can cost far more than they do. The
    /// embedded store rewrites its file ([`wagate_embedded::Db::rewrite`]: redb leaves deleted
    /// bytes in it otherwise), which it shares with the embedded bus, so the removed dead
    /// letters go too; writes wait meanwhile. Redis has nothing to do: a deleted key is gone
    /// from its memory, and its RDB and AOF files are rewritten on their own schedule.
    async fn purge_erased(&self) -> Result<(), StoreError>;

    /// Starts a turn over `sightings`, the messages of one conversation, oldest first: finds
    /// which were answered before, counts each toward its user's lead, moves the 24-hour window
    /// clock to the latest and reads the last `history` turns and the pause, in one round
    /// trip, because the worker does this for every message. It is the only way into the turn
    /// records, the leads' counts and the window clock: nothing else writes them one by one.
    /// Every part is idempotent, so a message delivered twice changes nothing the second time.
    async fn begin_turn(
        &self,
        session: &SessionId,
        sightings: &[LeadSighting<'_>],
        history: usize,
    ) -> Result<TurnStart, StoreError>;
    /// The last `last` turns of a session, oldest first.
    async fn history(&self, session: &SessionId, last: usize) -> Result<Vec<Turn>, StoreError>;
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

    /// All leads of an agent, by first contact.
    async fn leads(&self, agent: &AgentId) -> Result<Vec<Lead>, StoreError>;

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
}

/// The time of the latest of `sightings`, which must all be messages of `session`: what both
/// stores check before [`Conversations::begin_turn`]. `None` when there are none.
pub(crate) fn latest_sighting(
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

/// Turns dropped from a conversation's start at most per completion: the expired ones of a
/// long conversation go over its next completions rather than all in one slow step.
pub(crate) const TRIM_PER_COMPLETION: usize = 64;

/// The second before which turns are older than `keep`, as the first 19 characters of an RFC
/// 3339 time in UTC (how turns store `at`): compared as text, which orders them by time.
pub(crate) fn retention_cutoff(keep: Duration) -> String {
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
pub(crate) fn expired_turn(raw: &[u8], cutoff: &str) -> bool {
    #[derive(Deserialize)]
    struct At<'a> {
        at: &'a str,
    }
    serde_json::from_slice::<At<'_>>(raw)
        .is_ok_and(|t| t.at.get(..19).is_some_and(|at| at < cutoff))
}
