//! One inbound message, start to finish. Every step is idempotent, so a message delivered twice
//! (a worker died before its ack) ends the same way: the lead counts it once, the turn is
//! stored once, and a turn that was already completed republishes its stored reply under the
//! same dedupe id instead of running the agent again.

use std::{sync::Arc, time::Instant};

use shared::{
    bus::{Bus, Delivery, Topic},
    directory::{ChannelDirectory, Lookup},
    dispatch::with_keep_alive,
    envelope::{DeadLetter, DeadMessage, InboundMessage, OutboundReply, ReplyContent, Stage},
    retry::RetrySchedule,
    store::{CompletedTurn, LeadSighting, Role, Store, Turn},
    text::{MAX_BODY_UTF16, split_reply},
};
use time::OffsetDateTime;

use crate::agent::{AgentError, AgentRunner, TurnInput, user_text};

/// What a turn needs.
pub struct TurnContext {
    /// Where replies and dead letters go.
    pub bus: Arc<dyn Bus>,
    /// Sessions, leads, window clock.
    pub store: Arc<dyn Store>,
    /// Agents, cached.
    pub directory: Arc<ChannelDirectory>,
    /// Runs the agent backends.
    pub runner: AgentRunner,
    /// Turns of history the agent sees.
    pub history_window: usize,
    /// When to try a failed turn again.
    pub retry: RetrySchedule,
}

enum Failure {
    Transient(String),
    Permanent(String),
}

impl From<shared::store::StoreError> for Failure {
    fn from(e: shared::store::StoreError) -> Self {
        Self::Transient(e.to_string())
    }
}

impl From<shared::bus::BusError> for Failure {
    fn from(e: shared::bus::BusError) -> Self {
        Self::Transient(e.to_string())
    }
}

/// Handles one delivery and settles it: ack, retry later, or dead letter then ack.
pub async fn handle(ctx: &TurnContext, delivery: Box<dyn Delivery>, msg: InboundMessage) {
    let started = Instant::now();
    let failures_key = format!("turn:{}:{}", msg.agent_id, msg.message_sid);
    let result = process(ctx, delivery.as_ref(), &msg).await;
    let attempt = match &result {
        Ok(()) => 0,
        Err(_) => ctx
            .store
            .count_failure(&failures_key)
            .await
            .unwrap_or_else(|_| delivery.attempt()),
    };
    let outcome = match result {
        Ok(()) => {
            if let Err(e) = delivery.ack().await {
                tracing::warn!(sid = %msg.message_sid, error = %e, "ack failed; the message will come again and republish its stored reply");
            }
            "replied"
        }
        Err(Failure::Transient(reason)) => match ctx.retry.delay_after(attempt) {
            Some(delay) => {
                tracing::warn!(sid = %msg.message_sid, attempt, ?delay, %reason, "turn failed, will retry");
                if let Err(e) = delivery.retry_in(delay).await {
                    tracing::warn!(error = %e, "could not schedule the retry; it comes back after the ack wait");
                }
                "retry"
            }
            None => dead_letter(ctx, delivery.as_ref(), &msg, reason, attempt).await,
        },
        Err(Failure::Permanent(reason)) => {
            dead_letter(ctx, delivery.as_ref(), &msg, reason, attempt).await
        }
    };
    if outcome != "retry" {
        let _ = ctx.store.clear_failures(&failures_key).await;
    }
    metrics::counter!("wagate_turns_total", "outcome" => outcome).increment(1);
    metrics::histogram!("wagate_turn_seconds").record(started.elapsed().as_secs_f64());
}

async fn dead_letter(
    ctx: &TurnContext,
    delivery: &dyn Delivery,
    msg: &InboundMessage,
    reason: String,
    attempts: u64,
) -> &'static str {
    tracing::error!(sid = %msg.message_sid, agent = %msg.agent_id, attempts, %reason, "agent turn failed for good: dead letter");
    let letter = DeadLetter {
        id: String::new(),
        stage: Stage::Agent,
        reason,
        code: None,
        attempts,
        failed_at: OffsetDateTime::now_utc(),
        agent_id: msg.agent_id.clone(),
        message: DeadMessage::Inbound(Box::new(msg.clone())),
    };
    match ctx.bus.put_dead_letter(&letter).await {
        Ok(_) => {
            if let Err(e) = delivery.ack().await {
                tracing::warn!(error = %e, "ack after dead letter failed");
            }
            "dead_letter"
        }
        Err(e) => {
            tracing::error!(error = %e, "could not store the dead letter; keeping the message");
            let _ = delivery.retry_in(std::time::Duration::from_secs(5)).await;
            "retry"
        }
    }
}

async fn process(
    ctx: &TurnContext,
    delivery: &dyn Delivery,
    msg: &InboundMessage,
) -> Result<(), Failure> {
    let session = msg.session_id();
    let turn_key = msg.message_sid.as_str();
    if let Some(done) = ctx.store.completed_turn(&session, turn_key).await? {
        return publish_reply(ctx, msg, &done).await;
    }
    let agent = match ctx.directory.lookup(&msg.agent_id).await {
        Ok(Lookup::Found(c)) => c.agent.clone(),
        Ok(_) => {
            return Err(Failure::Permanent(format!(
                "agent {} no longer exists",
                msg.agent_id
            )));
        }
        Err(e) => return Err(Failure::Transient(e.to_string())),
    };
    ctx.store
        .record_lead(&LeadSighting {
            session: &session,
            message_sid: &msg.message_sid,
            profile_name: msg.profile_name.as_deref(),
            at: msg.received_at,
        })
        .await?;
    ctx.store.stamp_inbound(&session, msg.received_at).await?;
    let history = ctx.store.history(&session, ctx.history_window).await?;
    let session_text = session.to_string();
    let input = TurnInput {
        agent: &agent,
        session_id: &session_text,
        history: &history,
        messages: std::slice::from_ref(msg),
    };
    let started = Instant::now();
    let reply = with_keep_alive(delivery, ctx.runner.reply(&input)).await;
    metrics::histogram!("wagate_agent_seconds").record(started.elapsed().as_secs_f64());
    let reply = reply.map_err(|e| match e {
        AgentError::Transient(s) => Failure::Transient(s),
        AgentError::Permanent(s) => Failure::Permanent(s),
    })?;
    let mut turns = vec![Turn {
        role: Role::User,
        content: user_text(msg),
        at: msg.received_at,
    }];
    if !reply.trim().is_empty() {
        turns.push(Turn {
            role: Role::Assistant,
            content: reply.clone(),
            at: OffsetDateTime::now_utc(),
        });
    }
    let completed = CompletedTurn {
        reply_id: OutboundReply::id_for_inbound(&msg.message_sid),
        reply,
    };
    let stored = ctx
        .store
        .complete_turn(&session, &[turn_key.to_owned()], &turns, &completed)
        .await?;
    publish_reply(ctx, msg, &stored).await
}

async fn publish_reply(
    ctx: &TurnContext,
    msg: &InboundMessage,
    done: &CompletedTurn,
) -> Result<(), Failure> {
    let parts = split_reply(&done.reply, MAX_BODY_UTF16);
    if parts.is_empty() {
        tracing::info!(sid = %msg.message_sid, "the agent had nothing to say");
        return Ok(());
    }
    let out = OutboundReply {
        id: done.reply_id.clone(),
        agent_id: msg.agent_id.clone(),
        to: msg.from.clone(),
        content: ReplyContent::Text { parts },
        created_at: OffsetDateTime::now_utc(),
    };
    let payload = serde_json::to_vec(&out).map_err(|e| Failure::Permanent(e.to_string()))?;
    let conversation = format!("{}.{}", msg.agent_id, msg.session_id().subject_token());
    ctx.bus
        .publish(Topic::Outbound, &conversation, &out.id, payload.into())
        .await?;
    Ok(())
}
