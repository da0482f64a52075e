//! Agents and their channels: the settings an operator gives, which every role reads (mostly
//! through `shared::directory`'s cache, kept fresh by [`Agents::changes`]), with what belongs
//! to an agent's channel rather than to any conversation: the webhooks refused for their
//! signature, and the master key check that the channels' sealed secrets are opened against.

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use wagate_core::{
    agent::{Agent, WhatsAppChannel},
    crypto::SealedSecret,
    domain::AgentId,
};

use crate::StoreError;

/// A change to an agent's settings, for caches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// This agent or its channel changed.
    Agent(AgentId),
    /// Notifications may have been missed: drop everything cached.
    All,
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

/// Agents, their WhatsApp channels, and the notifications that keep every process's cache of
/// them fresh. Few writes (an operator's), many reads: nothing here is on a message's path
/// except through a cache.
#[async_trait]
pub trait Agents: Send + Sync {
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
    /// erased user by user ([`crate::Conversations::erase_user`]), which is how the caller
    /// finds them (the agent's leads). True when there was an agent.
    async fn delete_agent(&self, id: &AgentId) -> Result<bool, StoreError>;

    /// Records `failure` as the latest webhook of `agent` refused for its signature, kept for
    /// [`crate::GUARD_TTL`] and removed with the agent. Callers throttle it: a flood of forged
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
}
