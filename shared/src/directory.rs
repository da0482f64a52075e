//! The agents' WhatsApp channels, with their Auth Tokens decrypted, cached in memory. Every
//! webhook needs the token to check its signature and every send needs it to authenticate, so
//! the hot path must not go to the store and decrypt each time. Entries are dropped when the
//! store announces a change (from any process) and expire after a short time in any case, so
//! a change made through the admin API takes effect at once.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use futures::StreamExt;
use secrecy::SecretString;

use crate::{
    agent::{Agent, WhatsAppChannel},
    crypto::{CryptoError, Keyring, SecretPurpose},
    domain::AgentId,
    shutdown::Shutdown,
    store::{Change, Store, StoreError},
};

/// How long an entry is trusted without a change notification (a safety net for lost ones).
const ENTRY_TTL: Duration = Duration::from_secs(30);

/// An agent with its channel, ready for use.
pub struct ResolvedChannel {
    /// The agent.
    pub agent: Agent,
    /// Its channel as stored.
    pub channel: WhatsAppChannel,
    /// The decrypted Auth Token.
    pub auth_token: SecretString,
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
    entries: RwLock<HashMap<AgentId, (Instant, Lookup)>>,
}

impl ChannelDirectory {
    /// A directory over `store`; call [`ChannelDirectory::watch`] to follow changes.
    pub fn new(store: Arc<dyn Store>, keyring: Arc<Keyring>) -> Arc<Self> {
        Arc::new(Self {
            store,
            keyring,
            entries: RwLock::new(HashMap::new()),
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
        if let Ok(mut e) = self.entries.write() {
            e.remove(id);
        }
    }

    fn forget_all(&self) {
        if let Ok(mut e) = self.entries.write() {
            e.clear();
        }
    }

    /// The agent's channel, from the cache or the store.
    pub async fn lookup(&self, id: &AgentId) -> Result<Lookup, DirectoryError> {
        if let Ok(e) = self.entries.read()
            && let Some((at, lookup)) = e.get(id)
            && at.elapsed() < ENTRY_TTL
        {
            return Ok(lookup.clone());
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
                    Lookup::Found(Arc::new(ResolvedChannel {
                        agent,
                        channel,
                        auth_token,
                    }))
                }
            },
        };
        if let Ok(mut e) = self.entries.write() {
            e.insert(id.clone(), (Instant::now(), lookup.clone()));
        }
        Ok(lookup)
    }
}
