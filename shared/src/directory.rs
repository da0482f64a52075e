//! The agents' WhatsApp channels, with their Auth Tokens decrypted, cached in memory. Every
//! webhook needs the token to check its signature and every send needs it to authenticate, so
//! the hot path must not go to the store and decrypt each time. Entries are dropped when the
//! store announces a change (from any process) and expire after a short time in any case, so
//! a change made through the admin API takes effect at once.
//!
//! The public webhook names the agent in its path, so anyone on the internet chooses the keys
//! looked up here. Both caches are bounded in entries and time, and agent ids that do not exist
//! are kept apart from the agents that do: a flood of random ids evicts only other random ids,
//! never a real agent's channel, and cannot grow the process's memory.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use moka::sync::Cache;
use secrecy::SecretString;

use crate::shutdown::Shutdown;
use store::{Change, Store, StoreError};
use wagate_core::{
    agent::{Agent, WhatsAppChannel},
    crypto::{CryptoError, Keyring, SecretPurpose},
    domain::AgentId,
};

/// How long an entry is trusted without a change notification (a safety net for lost ones).
const ENTRY_TTL: Duration = Duration::from_secs(30);
/// Most agents whose channels are kept decrypted; more only cost a store read each.
pub const MAX_KNOWN: u64 = 100_000;
/// Most agent ids remembered as unknown (or without a channel): the ids an outside caller
/// can make up.
pub const MAX_UNKNOWN: u64 = 10_000;

/// An agent with its channel, ready for use.
pub struct ResolvedChannel {
    /// The agent.
    pub agent: Agent,
    /// Its channel as stored.
    pub channel: WhatsAppChannel,
    /// The decrypted Auth Token.
    pub auth_token: SecretString,
    /// The decrypted secret of the agent's event webhook, if it has one.
    pub events_secret: Option<SecretString>,
}

/// What the directory knows about an agent.
#[derive(Clone)]
pub enum Lookup {
    /// No such agent.
    UnknownAgent,
    /// The agent exists but has no WhatsApp channel.
    NoChannel,
    /// The agent and its channel.
    Found(Arc<ResolvedChannel>),
}

/// A failure to look up a channel.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// The store did not answer.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stored token cannot be decrypted with this process's keys.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

/// Cached channel settings of all agents.
pub struct ChannelDirectory {
    store: Arc<dyn Store>,
    keyring: Arc<Keyring>,
    /// Agents with a channel.
    known: Cache<AgentId, Arc<ResolvedChannel>>,
    /// Ids with no agent or no channel behind them.
    unknown: Cache<AgentId, Lookup>,
}

impl ChannelDirectory {
    /// A directory over `store`; call [`ChannelDirectory::watch`] to follow changes.
    pub fn new(store: Arc<dyn Store>, keyring: Arc<Keyring>) -> Arc<Self> {
        Self::with_limits(store, keyring, MAX_KNOWN, MAX_UNKNOWN)
    }

    /// A directory that keeps at most `known` agents' channels and `unknown` missing ids.
    pub fn with_limits(
        store: Arc<dyn Store>,
        keyring: Arc<Keyring>,
        known: u64,
        unknown: u64,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            keyring,
            known: Cache::builder()
                .max_capacity(known)
                .time_to_live(ENTRY_TTL)
                .build(),
            unknown: Cache::builder()
                .max_capacity(unknown)
                .time_to_live(ENTRY_TTL)
                .build(),
        })
    }

    /// Follows the store's change notifications until shutdown.
    pub async fn watch(self: Arc<Self>, shutdown: Shutdown) -> Result<(), StoreError> {
        let mut changes = self.store.changes().await?;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    change = changes.next() => match change {
                        Some(Change::Agent(id)) => self.forget(&id),
                        Some(Change::All) => self.forget_all(),
                        None => return,
                    }
                }
            }
        });
        Ok(())
    }

    /// Drops one agent's entry (after a local change).
    pub fn forget(&self, id: &AgentId) {
        self.known.invalidate(id);
        self.unknown.invalidate(id);
    }

    fn forget_all(&self) {
        self.known.invalidate_all();
        self.unknown.invalidate_all();
    }

    /// Entries held now, known and unknown together (after pending evictions are applied).
    #[cfg(test)]
    fn entries(&self) -> u64 {
        self.known.run_pending_tasks();
        self.unknown.run_pending_tasks();
        self.known.entry_count() + self.unknown.entry_count()
    }

    /// The agent's channel, from the cache or the store.
    pub async fn lookup(&self, id: &AgentId) -> Result<Lookup, DirectoryError> {
        if let Some(found) = self.known.get(id) {
            return Ok(Lookup::Found(found));
        }
        if let Some(missing) = self.unknown.get(id) {
            return Ok(missing);
        }
        let lookup = match self.store.agent(id).await? {
            None => Lookup::UnknownAgent,
            Some(agent) => match self.store.channel(id).await? {
                None => Lookup::NoChannel,
                Some(channel) => {
                    let auth_token = self.keyring.open(
                        id,
                        SecretPurpose::TwilioAuthToken,
                        &channel.auth_token,
                    )?;
                    let events_secret = agent
                        .events
                        .as_ref()
                        .map(|e| {
                            self.keyring
                                .open(id, SecretPurpose::EventsSecret, &e.secret)
                        })
                        .transpose()?;
                    Lookup::Found(Arc::new(ResolvedChannel {
                        agent,
                        channel,
                        auth_token,
                        events_secret,
                    }))
                }
            },
        };
        match &lookup {
            Lookup::Found(found) => self.known.insert(id.clone(), found.clone()),
            missing => self.unknown.insert(id.clone(), missing.clone()),
        }
        Ok(lookup)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embedded::Embedded;
    use crate::embedded::EmbeddedOptions;
    use time::OffsetDateTime;
    use wagate_core::{
        agent::Backend,
        domain::{AccountSid, PhoneNumber},
    };

    /// Random agent ids from the internet cannot grow the directory past its bound, and do not
    /// push a real agent's channel out of it.
    #[tokio::test]
    async fn made_up_agent_ids_stay_within_the_bound_and_keep_real_agents_cached() {
        let dir = tempfile::tempdir().unwrap();
        let options = EmbeddedOptions {
            duplicate_window: Duration::from_secs(60),
        };
        let embedded = Embedded::open(dir.path(), options).unwrap();
        let store: Arc<dyn Store> = Arc::new(embedded.store);
        let keyring = Arc::new(Keyring::from_base64(&Keyring::generate_key(), &[]).unwrap());
        let real = AgentId::parse("real").unwrap();
        let now = OffsetDateTime::now_utc();
        store
            .put_agent(&Agent {
                id: real.clone(),
                name: "real".into(),
                backend: Backend::Echo,
                handoff_resume_after_s: wagate_core::agent::default_handoff_resume_after_s(),
                retention_days: wagate_core::agent::default_retention_days(),
                history_turns: None,
                history_tokens: None,
                typing_indicator: true,
                events: None,
                created_at: now,
                updated_at: now,
            })
            .await
            .unwrap();
        let token = SecretString::from("token");
        store
            .put_channel(
                &real,
                &WhatsAppChannel {
                    account_sid: AccountSid::parse(&format!("AC{}", "0".repeat(32))).unwrap(),
                    auth_token: keyring.seal(&real, SecretPurpose::TwilioAuthToken, &token),
                    phone_number: PhoneNumber::parse("+14155238886").unwrap(),
                    enabled: true,
                    simulation: false,
                    consent: Default::default(),
                    sandbox_join_code: None,
                    messaging_service_sid: None,
                    mps: None,
                    ordered_parts: true,
                    updated_at: now,
                },
            )
            .await
            .unwrap();
        let directory = ChannelDirectory::with_limits(store.clone(), keyring, 10, 100);
        assert!(matches!(
            directory.lookup(&real).await.unwrap(),
            Lookup::Found(_)
        ));
        for n in 0..5_000 {
            let id = AgentId::parse(&format!("made-up-{n}")).unwrap();
            assert!(matches!(
                directory.lookup(&id).await.unwrap(),
                Lookup::UnknownAgent
            ));
        }
        assert!(
            directory.entries() <= 101,
            "{} entries after 5,000 made-up ids",
            directory.entries()
        );
        // The real agent is still served from memory.
        assert!(directory.known.contains_key(&real));
    }
}
