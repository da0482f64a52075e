//! [`Agents`] on the embedded database: agents and channels as JSON by id, the master key
//! check in `store_meta`, and the change notifications on an in-process broadcast channel.

use async_trait::async_trait;
use futures::{StreamExt, stream::BoxStream};
use redb::{ReadableTable, TableDefinition};
use tokio::sync::broadcast;

use wagate_core::{
    agent::{Agent, WhatsAppChannel},
    crypto::SealedSecret,
    domain::AgentId,
};

use super::{EmbeddedStore, Expiring, decode, duration_ms, encode};
use crate::{Agents, Change, GUARD_TTL, SignatureFailure, StoreError};

pub(super) const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("store_agents");

pub(super) const CHANNELS: TableDefinition<&str, &[u8]> = TableDefinition::new("store_channels");

/// Facts about the data itself rather than the pipeline's state: the master key check.
pub(super) const META: TableDefinition<&str, &str> = TableDefinition::new("store_meta");

/// The name of the master key check in [`META`].
const KEY_CHECK: &str = "key-check";

#[async_trait]
impl Agents for EmbeddedStore {
    async fn put_agent(&self, agent: &Agent) -> Result<(), StoreError> {
        self.put_json(AGENTS, &agent.id, encode(agent)?).await
    }

    async fn agent(&self, id: &AgentId) -> Result<Option<Agent>, StoreError> {
        self.get_json(AGENTS, id.as_str()).await
    }

    async fn agents(&self) -> Result<Vec<Agent>, StoreError> {
        let rows = self
            .db
            .read(|txn| {
                let table = txn.open_table(AGENTS)?;
                let mut rows = Vec::new();
                for row in table.iter()? {
                    rows.push(row?.1.value().to_vec());
                }
                Ok(rows)
            })
            .await?;
        rows.iter().map(|r| decode(r)).collect()
    }

    async fn put_channel(&self, id: &AgentId, channel: &WhatsAppChannel) -> Result<(), StoreError> {
        self.put_json(CHANNELS, id, encode(channel)?).await
    }

    async fn channel(&self, id: &AgentId) -> Result<Option<WhatsAppChannel>, StoreError> {
        self.get_json(CHANNELS, id.as_str()).await
    }

    async fn changes(&self) -> Result<BoxStream<'static, Change>, StoreError> {
        let receiver = self.changes.subscribe();
        // As from Redis: first "drop everything", since what changed before is unknown.
        let later = futures::stream::unfold(receiver, |mut receiver| async move {
            match receiver.recv().await {
                Ok(id) => Some((Change::Agent(id), receiver)),
                Err(broadcast::error::RecvError::Lagged(_)) => Some((Change::All, receiver)),
                Err(broadcast::error::RecvError::Closed) => None,
            }
        });
        Ok(futures::stream::once(async { Change::All })
            .chain(later)
            .boxed())
    }

    async fn delete_agent(&self, id: &AgentId) -> Result<bool, StoreError> {
        let key = id.as_str().to_owned();
        let existed = self
            .db
            .write(move |txn| {
                txn.open_table(CHANNELS)?.remove(key.as_str())?;
                let existed = txn.open_table(AGENTS)?.remove(key.as_str())?.is_some();
                Expiring::open(txn)?.remove(("sigfail", "", key.as_str()))?;
                Ok(existed)
            })
            .await?;
        // No subscriber is not an error.
        let _ = self.changes.send(id.clone());
        Ok(existed)
    }

    async fn note_signature_failure(
        &self,
        agent: &AgentId,
        failure: &SignatureFailure,
    ) -> Result<(), StoreError> {
        let agent = agent.as_str().to_owned();
        let record = encode(failure)?;
        let ttl = duration_ms(GUARD_TTL);
        Ok(self
            .db
            .write(move |txn| Expiring::open(txn)?.put(("sigfail", "", &agent), &record, ttl))
            .await?)
    }

    async fn signature_failure(
        &self,
        agent: &AgentId,
    ) -> Result<Option<SignatureFailure>, StoreError> {
        self.get_expiring(("sigfail", "", agent.as_str()))
            .await?
            .map(|r| decode(&r))
            .transpose()
    }

    async fn key_check(&self, fresh: &SealedSecret) -> Result<SealedSecret, StoreError> {
        let fresh = fresh.as_str().to_owned();
        let stands = self
            .db
            .write(move |txn| {
                let mut meta = txn.open_table(META)?;
                let stored = meta.get(KEY_CHECK)?.map(|v| v.value().to_owned());
                match stored {
                    Some(check) => Ok(check),
                    None => {
                        meta.insert(KEY_CHECK, fresh.as_str())?;
                        Ok(fresh.clone())
                    }
                }
            })
            .await?;
        Ok(SealedSecret::from_stored(stands))
    }

    async fn replace_key_check(
        &self,
        old: &SealedSecret,
        new: &SealedSecret,
    ) -> Result<bool, StoreError> {
        let (old, new) = (old.as_str().to_owned(), new.as_str().to_owned());
        Ok(self
            .db
            .write(move |txn| {
                let mut meta = txn.open_table(META)?;
                let current = meta.get(KEY_CHECK)?.map(|v| v.value() == old);
                if current != Some(true) {
                    return Ok(false);
                }
                meta.insert(KEY_CHECK, new.as_str())?;
                Ok(true)
            })
            .await?)
    }
}
