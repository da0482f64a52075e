//! [`Agents`] on Redis: each agent and channel a JSON key, the set of agents, and a pub/sub
//! channel that tells every process's cache of a change.

use std::{sync::LazyLock, time::Duration};

use async_trait::async_trait;
use futures::{StreamExt, stream::BoxStream};
use redis::{AsyncCommands, Script};
use tokio::sync::mpsc;

use wagate_core::{
    agent::{Agent, WhatsAppChannel},
    crypto::SealedSecret,
    domain::AgentId,
};

use super::{RedisStore, err, to_json};
use crate::{Agents, Change, GUARD_TTL, SignatureFailure, StoreError};

// KEYS[1] = the key check; ARGV[1] = a fresh check, stored unless one is. Returns the one that
// stands.
const KEY_CHECK: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur then return cur end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"#;

// KEYS[1] = the key check; replaced by ARGV[2] only while it is still ARGV[1].
const REPLACE_KEY_CHECK: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"#;

/// This module's scripts, hashed once: `EVALSHA` needs the SHA-1 of the script's text.
static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    key_check: Script::new(KEY_CHECK),
    replace_key_check: Script::new(REPLACE_KEY_CHECK),
});

struct Scripts {
    key_check: Script,
    replace_key_check: Script,
}

impl RedisStore {
    async fn notify(&self, id: &AgentId) -> Result<(), StoreError> {
        let _: i64 = self
            .conn()
            .publish(self.key("changes"), id.as_str())
            .await
            .map_err(err("publish change"))?;
        Ok(())
    }
}

#[async_trait]
impl Agents for RedisStore {
    async fn put_agent(&self, agent: &Agent) -> Result<(), StoreError> {
        let json = serde_json::to_vec(agent).map_err(StoreError::json("encode agent"))?;
        // The agent and the set of agents are keys of two slots on a cluster: the agent is
        // written first, so the set never names an agent that is missing ([`Self::agents`]
        // skips one anyway); a crash between the steps leaves an agent that is not listed
        // until it is put again, which the caller that saw the error does.
        let _: () = self
            .conn()
            .set(key!(self, "agent:{}", agent.id), json)
            .await
            .map_err(err("put agent"))?;
        let _: i64 = self
            .conn()
            .sadd(self.key("agents"), agent.id.as_str())
            .await
            .map_err(err("put agent"))?;
        self.notify(&agent.id).await
    }

    async fn agent(&self, id: &AgentId) -> Result<Option<Agent>, StoreError> {
        self.get_json(key!(self, "agent:{id}")).await
    }

    async fn agents(&self) -> Result<Vec<Agent>, StoreError> {
        let mut ids: Vec<String> = self
            .conn()
            .smembers(self.key("agents"))
            .await
            .map_err(err("list agents"))?;
        ids.sort();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(a) = self.get_json(key!(self, "agent:{id}")).await? {
                out.push(a);
            }
        }
        Ok(out)
    }

    async fn put_channel(&self, id: &AgentId, channel: &WhatsAppChannel) -> Result<(), StoreError> {
        let json = serde_json::to_vec(channel).map_err(StoreError::json("encode channel"))?;
        let _: () = self
            .conn()
            .set(key!(self, "channel:{id}"), json)
            .await
            .map_err(err("put channel"))?;
        self.notify(id).await
    }

    async fn channel(&self, id: &AgentId) -> Result<Option<WhatsAppChannel>, StoreError> {
        self.get_json(key!(self, "channel:{id}")).await
    }

    async fn changes(&self) -> Result<BoxStream<'static, Change>, StoreError> {
        let (tx, rx) = mpsc::channel(1024);
        let redis = self.redis.clone();
        let channel = self.key("changes");
        tokio::spawn(async move {
            loop {
                if let Ok(mut pubsub) = redis.pubsub().await
                    && pubsub.subscribe(&channel).await.is_ok()
                {
                    // Whatever changed while we were not subscribed is unknown.
                    if tx.send(Change::All).await.is_err() {
                        return;
                    }
                    let mut messages = pubsub.into_on_message();
                    while let Some(msg) = messages.next().await {
                        let Ok(raw) = msg.get_payload::<String>() else {
                            continue;
                        };
                        let Ok(id) = AgentId::parse(&raw) else {
                            continue;
                        };
                        if tx.send(Change::Agent(id)).await.is_err() {
                            return;
                        }
                    }
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Ok(tokio_stream_from(rx))
    }

    async fn delete_agent(&self, id: &AgentId) -> Result<bool, StoreError> {
        // Three slots on a cluster (agent, channel, the set): the channel goes first, so that
        // from then on no webhook is accepted; a crash before the rest leaves the agent listed
        // without a channel, and deleting it again finishes.
        let channel = key!(self, "channel:{id}");
        let _: i64 = self
            .conn()
            .del(&channel)
            .await
            .map_err(err("delete agent"))?;
        // A channel back after a failover would take the deleted agent's webhooks again.
        self.replicated(&channel, "delete agent").await;
        let existed: i64 = self
            .conn()
            .del(key!(self, "agent:{id}"))
            .await
            .map_err(err("delete agent"))?;
        let _: i64 = self
            .conn()
            .srem(self.key("agents"), id.as_str())
            .await
            .map_err(err("delete agent"))?;
        let _: i64 = self
            .conn()
            .del(key!(self, "sigfail:{id}"))
            .await
            .map_err(err("delete agent"))?;
        self.notify(id).await?;
        Ok(existed == 1)
    }

    async fn note_signature_failure(
        &self,
        agent: &AgentId,
        failure: &SignatureFailure,
    ) -> Result<(), StoreError> {
        let _: () = self
            .conn()
            .set_ex(
                key!(self, "sigfail:{agent}"),
                to_json(failure)?,
                GUARD_TTL.as_secs(),
            )
            .await
            .map_err(err("note signature failure"))?;
        Ok(())
    }

    async fn signature_failure(
        &self,
        agent: &AgentId,
    ) -> Result<Option<SignatureFailure>, StoreError> {
        self.get_json(key!(self, "sigfail:{agent}")).await
    }

    async fn key_check(&self, fresh: &SealedSecret) -> Result<SealedSecret, StoreError> {
        let stands: String = SCRIPTS
            .key_check
            .key(self.key("meta:key-check"))
            .arg(fresh.as_str())
            .invoke_async(&mut self.conn())
            .await
            .map_err(err("key check"))?;
        Ok(SealedSecret::from_stored(stands))
    }

    async fn replace_key_check(
        &self,
        old: &SealedSecret,
        new: &SealedSecret,
    ) -> Result<bool, StoreError> {
        let replaced: i64 = SCRIPTS
            .replace_key_check
            .key(self.key("meta:key-check"))
            .arg(old.as_str())
            .arg(new.as_str())
            .invoke_async(&mut self.conn())
            .await
            .map_err(err("replace key check"))?;
        Ok(replaced == 1)
    }
}

fn tokio_stream_from<T: Send + 'static>(mut rx: mpsc::Receiver<T>) -> BoxStream<'static, T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}
