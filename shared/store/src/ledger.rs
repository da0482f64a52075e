//! The send ledger: what keeps each reply part posted to Twilio once however many senders race
//! for it or die half way (send guards with leases, the parts sent and their delivery
//! statuses), with the other records a delivery leaves behind: failure counts, the Content API
//! sids made for quick replies, and each sender number's pace. Keyed by reply parts, Twilio's
//! message sids and sender numbers rather than by conversation.

use std::time::Duration;

use async_trait::async_trait;

use twilio::status::{MessageStatus, StatusUpdate};
use wagate_core::{
    domain::{MessageSid, SessionId},
    envelope::OutboundReply,
    window::WindowClocks,
};

use crate::{Pace, Slot, StoreError};

/// The state of a send guard for one reply part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardState {
    /// This caller now holds the part and must post it, then call `mark_sent` (or `release`),
    /// renewing the hold ([`SendLedger::renew_send`]) while that takes.
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

/// A reply part posted to a user ([`SendLedger::sent_messages`]): Twilio's message and the
/// part, with the delivery status its callbacks reported so far.
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

/// The send ledger. Every step that two senders can race on is atomic, and the records lapse
/// (guards, parts, statuses and failure counts after [`crate::GUARD_TTL`], a cached content
/// after [`CONTENT_TTL`]), so the ledger does not grow with the messages ever sent.
#[async_trait]
pub trait SendLedger: Send + Sync {
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
    /// [`crate::GUARD_TTL`]), each with its status, in no particular order: the delivery of
    /// each reply in a transcript. The session's index of sent parts (kept for erasure) names
    /// them, so this is one read of the index and one of each part, sent together, rather than
    /// a read per turn.
    async fn sent_messages(&self, session: &SessionId) -> Result<Vec<SentMessage>, StoreError>;

    /// Counts a failed attempt at the message `key` (an inbound message's turn, or a reply's
    /// send) and returns the failures so far. Failures are counted here rather than by the
    /// bus, because the bus also counts the deliveries that were only handed back to wait for
    /// their conversation's turn.
    async fn count_failure(&self, key: &str) -> Result<u64, StoreError>;
    /// Forgets the failures of `key` once it succeeded or became a dead letter.
    async fn clear_failures(&self, key: &str) -> Result<(), StoreError>;

    /// The Content API sid (`HX…`) cached under `key`, if there is one. A sender makes a
    /// quick-reply or list-picker content once and finds it here afterwards, as does every
    /// other sender and the same one after a restart, rather than making a new content resource
    /// in the account for each reply.
    async fn content_sid(&self, key: &str) -> Result<Option<String>, StoreError>;
    /// Caches `sid` under `key` for [`CONTENT_TTL`] unless a sid is cached there already
    /// (another sender made the same content at the same time), atomically; returns the sid
    /// that stands, so that both senders go on with one content.
    async fn cache_content_sid(&self, key: &str, sid: &str) -> Result<String, StoreError>;

    /// Takes up to `want` slots of the pace of the sender `sender` (a Twilio number or
    /// Messaging Service with its account), shared by every sender process: [`Slot::Go`] with
    /// how many were taken (as many messages may be posted now), else how long to wait before
    /// asking again. Atomic, with the store's clock (Redis's `TIME`), so that senders on hosts
    /// whose clocks differ share one pace.
    async fn take_send_slot(&self, sender: &str, pace: Pace, want: u32)
    -> Result<Slot, StoreError>;
}

/// How long a cached Content API sid is kept ([`SendLedger::cache_content_sid`]): a content is
/// reused for a month, then made again once, so a cache of one-off questions does not grow
/// forever.
pub const CONTENT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
