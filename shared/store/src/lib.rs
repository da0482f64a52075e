//! The store: agents and their sealed channel settings, conversations and leads with their
//! 24-hour window clocks, and the send ledger (send guards, delivery statuses, pacing). The
//! pipeline talks only to these traits, so Redis and the embedded store are interchangeable.
//! Every method that can race (two workers, two senders) is atomic in each implementation.
//!
//! # Layout
//!
//! The store is split by concern, each a trait of its own, and [`Store`] is all of them: the
//! one object the roles hold (`Arc<dyn Store>`). Each implementation is split the same way, so
//! what one concern stores, and how, reads in one file per backend.
//!
//! - `agents.rs`: [`Agents`], agents and channels, the change notifications that keep every
//!   process's cache fresh, signature failures and the master key check.
//! - `conversations.rs`: [`Conversations`], turns and history, pauses, leads, the window,
//!   opt-out and opt-in clocks, the simulated outbox, forgetting and erasing.
//! - `ledger.rs`: [`SendLedger`], send guards, sent parts and their statuses, failure counts,
//!   cached Content API sids and the senders' pace.
//! - `pacing.rs`: the pace (a GCRA) that both backends run, in Lua and in memory.
//! - `redis/`: [`redis::RedisStore`]: `mod.rs` (connecting, keys, the helpers every concern
//!   uses), `agents.rs`, `conversations.rs` and `ledger.rs` (each with the Lua scripts it
//!   runs), `conn.rs` (one server, Cluster or Sentinel).
//! - `embedded/`: [`embedded::EmbeddedStore`] on the redb file: `mod.rs`, `agents.rs`,
//!   `conversations.rs` and `ledger.rs` (each with its tables), `expiring.rs` (the records kept
//!   with an expiry, as Redis keeps keys with a TTL).

mod agents;
mod conversations;
pub mod embedded;
mod ledger;
pub mod pacing;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;
use wagate_core::window::WindowClocks;

pub use agents::{Agents, Change, SignatureFailure};
pub use conversations::{
    CompletedTurn, Conversations, Lead, LeadSighting, Pause, Role, SimulatedMessage, Turn,
    TurnStart, window_clocks,
};
pub use ledger::{CONTENT_TTL, GuardState, Hold, SendLedger, SentMessage};
pub use pacing::{Pace, Slot};

/// A time as both backends store it: milliseconds since the Unix epoch, which sort as redb
/// keys and Redis scores and which Lua can compare.
pub(crate) fn ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// The time of a stored [`ms`]; one out of `time`'s range (only a damaged record) reads as the
/// epoch, long past, rather than failing the whole read.
pub(crate) fn from_ms(v: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(v) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// A conversation's window clocks from their stored milliseconds.
pub(crate) fn clocks_from_ms(
    last_inbound: Option<i64>,
    opted_out_at: Option<i64>,
    opted_in_at: Option<i64>,
) -> WindowClocks {
    WindowClocks {
        last_inbound: last_inbound.map(from_ms),
        opted_out_at: opted_out_at.map(from_ms),
        opted_in_at: opted_in_at.map(from_ms),
    }
}

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

/// The whole store: what the roles hold. A caller names the concerns it uses in its imports
/// (`use store::{Conversations, Store}`), which says what of the store a module touches.
#[async_trait]
pub trait Store: Agents + Conversations + SendLedger + 'static {
    /// Whether the store answers: one question for all its concerns, which share one Redis
    /// (or one file).
    async fn ready(&self) -> Result<(), StoreError>;
}

/// How long records that only guard against duplicates are kept.
pub const GUARD_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
