//! One turn, start to finish: one inbound message, or several that one user sent back to back
//! (burst coalescing). Every step is idempotent, so a message delivered twice (a worker died
//! before its ack) ends the same way: the lead counts it once, the turn is stored once, and a
//! message whose turn was completed republishes the stored reply under the same reply id
//! instead of running the agent again.
//!
//! A message that is an opt-out keyword (STOP and the like, as Twilio's, or the channel's own)
//! records the opt-out, is confirmed, and runs no turn (consent.rs): the user asked for
//! silence. An opt-in keyword (START, YES, UNSTOP) from a user who opted out does the same the
//! other way; from anyone else it is an ordinary answer.
//!
//! A conversation handed to a person (paused) runs no agent either: its messages are recorded
//! for the person. An agent's answer may hand the conversation over itself (`handoff`).
//!
//! A turn's future is as large as its largest state, and it is held for the whole turn, the
//! agent's seconds included: a worker holding 10,000 slow turns holds 10,000 of them. So the
//! steps a turn awaits that need more room than a few pointers (its beginning, the agent's
//! look-up, media, events, the reply's publication, dead letters, and each backend's call in
//! [`AgentRunner::reply`]) are boxed: each takes its room only while it runs, and the agent
//! call, the one step that lasts, takes only its own (worker/src/sizes.rs).

use std::{sync::Arc, time::Instant};

use bus::{Bus, Delivery};
use shared::{
    directory::{ChannelDirectory, Lookup},
    dispatch::with_keep_alive,
    events,
};
use store::{CompletedTurn, LeadSighting, Pause, Role, Store, Turn, TurnStart};
use time::OffsetDateTime;
use wagate_core::{
    domain::SessionId,
    envelope::{CONTENT_BODY_CHARS, DeadLetter, InboundMessage, OutboundReply, ReplyContent},
    events::{Event, Kind},
    failure::Failure,
    retry::RetrySchedule,
    text::{MAX_BODY_UTF16, MAX_REPLY_CHARS, cap_reply, split_reply},
};

use crate::{
    agent::{AgentRunner, TurnInput, user_text},
    consent::consent,
};

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
    /// Fetches inbound images from Twilio for models that see them.
    pub media: crate::media::MediaFetcher,
    /// Shows the user that a reply is being written.
    pub typing: crate::typing::Typing,
    /// Bounds the turns whose begin is at the store at once.
    pub begins: BeginSlots,
}

/// How many turns' begins (the session, its history and the lead, one store call) may be at
/// the store at once. A worker holding 10,000 conversations may start them all in the same
/// second, and each call waiting on the store's one connection holds its keys, arguments and
/// encoded command, about 3 KB: 256 at once keep that connection's pipeline full, while the
/// others wait for a slot holding only what they hold anyway (P3 over HTTP/1.1: worker peak
/// RSS 355-368 -> 337-356 MiB, docs/benchmarks.md).
const BEGINS_AT_ONCE: usize = 256;

/// The slots of [`BEGINS_AT_ONCE`] begins.
pub struct BeginSlots(tokio::sync::Semaphore);

impl Default for BeginSlots {
    fn default() -> Self {
        Self(tokio::sync::Semaphore::new(BEGINS_AT_ONCE))
    }
}

/// One inbound message of a turn and its delivery.
pub type Item = (Box<dyn Delivery>, InboundMessage);

/// Handles one conversation's messages (one, or a burst handled as one turn) and settles every
/// delivery: ack, retry later, or dead letter then ack. True when every message was acked.
pub async fn handle(ctx: &TurnContext, batch: Vec<Item>) -> bool {
    let started = Instant::now();
    let Begun {
        session,
        deliveries,
        msgs,
        history,
        pause,
        mut acked,
    } = match Box::pin(begin(ctx, batch)).await {
        Ok(begun) => begun,
        Err(acked) => return acked,
    };
    let (Some(first_delivery), Some(first)) = (deliveries.first(), msgs.first()) else {
        return acked;
    };
    let failures_key = format!("turn:{}:{}", first.agent_id, first.message_sid);
    metrics::gauge!("wagate_turns_in_flight").increment(1.0);
    let turn = NewTurn {
        session: &session,
        msgs: &msgs,
        history: &history,
        pause: pause.as_ref(),
    };
    let result = process(ctx, first_delivery.as_ref(), &turn).await;
    metrics::gauge!("wagate_turns_in_flight").decrement(1.0);
    let attempt = match &result {
        Ok(_) => 0,
        Err(_) => ctx
            .store
            .count_failure(&failures_key)
            .await
            .unwrap_or_else(|_| first_delivery.attempt()),
    };
    let outcome = match result {
        Ok(outcome) => {
            for (delivery, msg) in deliveries.iter().zip(&msgs) {
                acked &= ack(delivery.as_ref(), msg).await;
            }
            outcome
        }
        Err(failure) => match failure.retry_delay(&ctx.retry, attempt) {
            Some(delay) => {
                let reason = &failure.reason;
                tracing::warn!(sid = %first.message_sid, attempt, ?delay, %reason, "turn failed, will retry");
                for delivery in &deliveries {
                    if let Err(e) = delivery.retry_in(delay).await {
                        tracing::warn!(error = %e, "could not schedule the retry; it comes back after the ack wait");
                    }
                }
                "retry"
            }
            None => {
                Box::pin(dead_letter(
                    ctx,
                    &deliveries,
                    &msgs,
                    failure.reason,
                    attempt,
                ))
                .await
            }
        },
    };
    // Failures are only ever counted before a redelivery, so a first attempt has none to clear.
    if outcome != "retry" && deliveries.iter().any(|d| d.attempt() > 1) {
        let _ = ctx.store.clear_failures(&failures_key).await;
    }
    tracing::debug!(sid = %first.message_sid, messages = msgs.len(), outcome, "turn finished");
    metrics::counter!("wagate_turns_total", "outcome" => outcome).increment(1);
    metrics::histogram!("wagate_turn_seconds").record(started.elapsed().as_secs_f64());
    acked && outcome != "retry"
}

/// A turn once begun: the messages that make it (none answered before, none a consent
/// keyword) with their deliveries, and the history and pause it begins with. Only this is held
/// while the agent thinks; [`begin`]'s own state is not.
struct Begun {
    session: SessionId,
    deliveries: Vec<Box<dyn Delivery>>,
    msgs: Vec<InboundMessage>,
    history: Vec<Turn>,
    pause: Option<Pause>,
    /// Whether every message settled in [`begin`] was acked.
    acked: bool,
}

/// Begins the turn of `batch`: records the lead's sightings and reads the session, republishes
/// the stored reply of messages answered before and settles consent keywords, acking those.
/// `Err` says whether every message was acked when no turn is left to run: `false` when the
/// session could not be read (every message comes back soon).
async fn begin(ctx: &TurnContext, batch: Vec<Item>) -> Result<Begun, bool> {
    let Some((_, first)) = batch.first() else {
        return Err(true);
    };
    let session = first.session_id();
    record_queue_wait(&batch);
    let sightings: Vec<LeadSighting<'_>> = batch
        .iter()
        .map(|(_, m)| LeadSighting {
            session: &session,
            message_sid: &m.message_sid,
            profile_name: m.profile_name.as_deref(),
            at: m.received_at,
        })
        .collect();
    let history_turns = history_turns(ctx, &first.agent_id).await;
    // Never closed, so the slot is always granted.
    let slot = ctx.begins.0.acquire().await;
    let start = ctx
        .store
        .begin_turn(&session, &sightings, history_turns)
        .await;
    drop(slot);
    drop(sightings);
    let TurnStart {
        completed,
        history,
        pause,
        new_lead,
    } = match start {
        Ok(start) => start,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the session; trying later");
            for (delivery, _) in &batch {
                let _ = delivery.retry_in(RETRY_SOON).await;
            }
            return Err(false);
        }
    };
    if new_lead {
        events::emit(&*ctx.bus, &ctx.directory, &first.agent_id, || {
            let data = serde_json::json!({
                "session_id": session.to_string(), "phone": first.from.user(),
                "profile_name": first.profile_name, "first_seen": first.received_at.unix_timestamp(),
            });
            Event::new(
                Kind::LeadCreated,
                &first.agent_id,
                &first.from,
                first.from.user(),
                data,
            )
        })
        .await;
    }
    // Messages whose turn was completed before (they were delivered again) only republish
    // their stored reply; the rest make the new turn.
    let mut deliveries = Vec::with_capacity(batch.len());
    let mut msgs = Vec::with_capacity(batch.len());
    let mut acked = true;
    for ((delivery, msg), done) in batch.into_iter().zip(completed) {
        match done {
            Some(done) => match publish_reply(ctx, &msg, &done).await {
                Ok(()) => acked &= ack(delivery.as_ref(), &msg).await,
                Err(_) => {
                    let _ = delivery.retry_in(RETRY_SOON).await;
                    acked = false;
                }
            },
            None => match consent(ctx, &session, &msg).await {
                Ok(Some(_)) => acked &= ack(delivery.as_ref(), &msg).await,
                Ok(None) => {
                    deliveries.push(delivery);
                    msgs.push(msg);
                }
                Err(e) => {
                    let reason = &e.reason;
                    tracing::warn!(sid = %msg.message_sid, %reason, "cannot record an opt-out or opt-in; trying later");
                    let _ = delivery.retry_in(RETRY_SOON).await;
                    acked = false;
                }
            },
        }
    }
    Ok(Begun {
        session,
        deliveries,
        msgs,
        history,
        pause,
        acked,
    })
}

/// Turns of history the agent of `agent_id` sees: its own limit, else the process's. The
/// agent comes from the directory's cache; when it cannot be had, the process's limit (the
/// turn itself then finds out what is wrong with the agent).
async fn history_turns(ctx: &TurnContext, agent_id: &wagate_core::domain::AgentId) -> usize {
    match ctx.directory.lookup(agent_id).await {
        Ok(Lookup::Found(c)) => c
            .agent
            .history_turns
            .map_or(ctx.history_window, |n| n as usize),
        _ => ctx.history_window,
    }
}

/// The latest turns of `history` that fit in `tokens` (about four characters each), so that a
/// conversation of long messages stays within the model's context; all of it without a limit.
fn within_tokens(history: &[Turn], tokens: Option<u32>) -> &[Turn] {
    let Some(tokens) = tokens else {
        return history;
    };
    let budget = u64::from(tokens) * 4;
    let mut used = 0u64;
    let kept = history
        .iter()
        .rev()
        .take_while(|t| {
            used += t.content.chars().count() as u64;
            used <= budget
        })
        .count();
    &history[history.len() - kept..]
}

/// How long each message waited between ingress's 200 and a worker taking it up, counted on
/// first deliveries only: a retry's wait is the back-off it was told to take, not queueing.
fn record_queue_wait(batch: &[Item]) {
    let now = OffsetDateTime::now_utc();
    for (delivery, msg) in batch {
        if delivery.attempt() <= 1 {
            let waited = (now - msg.received_at).as_seconds_f64().max(0.0);
            metrics::histogram!("wagate_queue_wait_seconds").record(waited);
        }
    }
}

/// How soon a message comes back after a failure that is not the turn's (the store could not
/// be read, a reply could not be republished).
const RETRY_SOON: std::time::Duration = std::time::Duration::from_millis(500);

/// Acks one delivery; false (and logged) when the ack could not be sent.
async fn ack(delivery: &dyn Delivery, msg: &InboundMessage) -> bool {
    match delivery.ack().await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(sid = %msg.message_sid, error = %e, "ack failed; the message will come again and republish its stored reply");
            false
        }
    }
}

/// Each message of a failed turn becomes a dead letter of its own (replaying one runs the agent
/// again on it).
async fn dead_letter(
    ctx: &TurnContext,
    deliveries: &[Box<dyn Delivery>],
    msgs: &[InboundMessage],
    reason: String,
    attempts: u64,
) -> &'static str {
    let mut outcome = "dead_letter";
    for (delivery, msg) in deliveries.iter().zip(msgs) {
        tracing::error!(sid = %msg.message_sid, agent = %msg.agent_id, attempts, %reason, "agent turn failed for good: dead letter");
        let letter = DeadLetter::agent(msg.clone(), reason.clone(), attempts);
        match ctx.bus.put_dead_letter(&letter).await {
            Ok(id) => {
                events::emit(&*ctx.bus, &ctx.directory, &letter.agent_id, || {
                    wagate_core::events::dead_letter_created(&letter, &id)
                })
                .await;
                ack(delivery.as_ref(), msg).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "could not store the dead letter; keeping the message");
                let _ = delivery.retry_in(std::time::Duration::from_secs(5)).await;
                outcome = "retry";
            }
        }
    }
    outcome
}

/// A turn to run: its messages (oldest first, all of one conversation, none completed yet),
/// and the history and pause read when it began.
struct NewTurn<'a> {
    session: &'a SessionId,
    msgs: &'a [InboundMessage],
    history: &'a [Turn],
    pause: Option<&'a Pause>,
}

/// Runs one turn; how it ended (`replied`, or `paused` when a person has the conversation).
async fn process(
    ctx: &TurnContext,
    delivery: &dyn Delivery,
    turn: &NewTurn<'_>,
) -> Result<&'static str, Failure> {
    let NewTurn {
        session,
        msgs,
        history,
        pause,
    } = *turn;
    let Some(last) = msgs.last() else {
        return Ok("replied");
    };
    let channel = match Box::pin(ctx.directory.lookup(&last.agent_id)).await {
        Ok(Lookup::Found(c)) => c,
        Ok(_) => {
            return Err(Failure::permanent(format!(
                "agent {} no longer exists",
                last.agent_id
            )));
        }
        Err(e) => return Err(Failure::transient(e)),
    };
    for m in msgs {
        Box::pin(events::emit(&*ctx.bus, &ctx.directory, &m.agent_id, || {
            let data = serde_json::json!({
                "session_id": session.to_string(), "phone": m.from.user(),
                "message_sid": m.message_sid.as_str(), "body": m.body,
                "profile_name": m.profile_name, "media": m.media.len(),
            });
            Event::new(
                Kind::MessageReceived,
                &m.agent_id,
                &m.from,
                m.message_sid.as_str(),
                data,
            )
        }))
        .await;
    }
    if let Some(pause) = pause
        && pause.holds(OffsetDateTime::now_utc(), channel.agent.handoff_idle())
    {
        Box::pin(record_for_the_person(
            ctx,
            session,
            msgs,
            pause,
            channel.agent.retention(),
        ))
        .await?;
        return Ok("paused");
    }
    // Held to the end of the turn: a turn done sooner shows no indicator.
    let _typing = ctx.typing.show(&channel, last.message_sid.as_str());
    let session_text = session.to_string();
    let mut media = Box::pin(ctx.media.fetch_for(&channel, msgs)).await;
    Box::pin(ctx.runner.transcribe(&channel.agent, &mut media)).await;
    let history = within_tokens(history, channel.agent.history_tokens);
    let earlier = match channel.agent.backend {
        wagate_core::agent::Backend::Openai { .. } => {
            Box::pin(ctx.media.earlier_images(&channel, history)).await
        }
        _ => Vec::new(),
    };
    let input = TurnInput {
        agent: &channel.agent,
        session_id: &session_text,
        history,
        messages: msgs,
        media: &media,
        earlier: &earlier,
    };
    let started = Instant::now();
    // The backend's call inside is boxed (`AgentRunner::reply`).
    let reply = with_keep_alive(delivery, std::pin::pin!(ctx.runner.reply(&input))).await;
    metrics::histogram!("wagate_agent_seconds").record(started.elapsed().as_secs_f64());
    let reply = reply?;
    let mut turns: Vec<Turn> = msgs
        .iter()
        .map(|m| Turn::new(Role::User, user_text(m, &media), m.received_at))
        .collect();
    if !reply.text.trim().is_empty() || !reply.media.is_empty() {
        // The history says what was sent, media as their links and the choices offered, so
        // that the agent knows what the user's answer picks from.
        let mut content = reply.text.clone();
        for url in &reply.media {
            if !content.is_empty() {
                content.push('\n');
            }
            content.push_str(&format!("[media: {url}]"));
        }
        if !reply.quick_replies.is_empty() {
            content.push_str(&format!(
                "\n[quick replies: {}]",
                reply.quick_replies.join(" | ")
            ));
        }
        turns.push(Turn::new(
            Role::Assistant,
            content,
            OffsetDateTime::now_utc(),
        ));
    }
    let completed = CompletedTurn {
        reply_id: OutboundReply::id_for_inbound(&msgs[0].message_sid),
        reply: reply.text,
        media: reply.media,
        handoff: reply.handoff,
        quick_replies: reply.quick_replies,
    };
    let keys: Vec<String> = msgs.iter().map(|m| m.message_sid.to_string()).collect();
    let stored = ctx
        .store
        .complete_turn(
            session,
            &keys,
            &turns,
            &completed,
            channel.agent.retention(),
        )
        .await?;
    Box::pin(publish_reply(ctx, last, &stored)).await?;
    Ok("replied")
}

/// While a person has the conversation, its messages go into the history (the person reads
/// them there, and the agent will see them when it takes the conversation back) and the turn
/// is completed with nothing to send, so a redelivery changes nothing.
async fn record_for_the_person(
    ctx: &TurnContext,
    session: &SessionId,
    msgs: &[InboundMessage],
    pause: &Pause,
    keep: std::time::Duration,
) -> Result<(), Failure> {
    let turns: Vec<Turn> = msgs
        .iter()
        .map(|m| Turn::new(Role::User, user_text(m, &[]), m.received_at))
        .collect();
    let completed = CompletedTurn {
        reply_id: OutboundReply::id_for_inbound(&msgs[0].message_sid),
        reply: String::new(),
        media: Vec::new(),
        handoff: false,
        quick_replies: Vec::new(),
    };
    let keys: Vec<String> = msgs.iter().map(|m| m.message_sid.to_string()).collect();
    ctx.store
        .complete_turn(session, &keys, &turns, &completed, keep)
        .await?;
    tracing::info!(session = %session, paused_by = %pause.by, messages = msgs.len(), "the conversation is with a person; recorded, no agent turn");
    Ok(())
}

/// Publishes the reply of a completed turn and, when the agent handed the conversation to a
/// person with it, pauses the conversation (again, for a redelivered message whose first
/// delivery died in between: the pause comes after the record, so it is never lost).
async fn publish_reply(
    ctx: &TurnContext,
    msg: &InboundMessage,
    done: &CompletedTurn,
) -> Result<(), Failure> {
    if done.handoff {
        let session = msg.session_id();
        ctx.store
            .set_pause(
                &session,
                Some(&Pause::new("agent", OffsetDateTime::now_utc())),
            )
            .await?;
        tracing::info!(session = %session, sid = %msg.message_sid, "the agent handed the conversation to a person; it stays paused until resumed or idle for the agent's handoff_resume_after_s");
        metrics::counter!("wagate_handoffs_total", "by" => "agent").increment(1);
        events::emit(&*ctx.bus, &ctx.directory, &msg.agent_id, || {
            let data = serde_json::json!({
                "session_id": session.to_string(), "phone": msg.from.user(), "by": "agent",
            });
            Event::new(
                Kind::ConversationHandoff,
                &msg.agent_id,
                &msg.from,
                &done.reply_id,
                data,
            )
        })
        .await;
    }
    let capped = cap_reply(&done.reply, MAX_REPLY_CHARS);
    if capped.is_some() {
        tracing::warn!(
            sid = %msg.message_sid,
            chars = done.reply.chars().count(),
            "the agent's reply is over {MAX_REPLY_CHARS} characters; cut at a word boundary"
        );
        metrics::counter!("wagate_replies_truncated_total").increment(1);
    }
    // With choices, the last part becomes the body of a quick-reply or list-picker content,
    // which holds less than a message.
    let limit = if done.quick_replies.is_empty() {
        MAX_BODY_UTF16
    } else {
        CONTENT_BODY_CHARS
    };
    let parts = split_reply(capped.as_deref().unwrap_or(&done.reply), limit);
    if parts.is_empty() && done.media.is_empty() {
        tracing::info!(sid = %msg.message_sid, "the agent had nothing to say");
        return Ok(());
    }
    let out = OutboundReply {
        id: done.reply_id.clone(),
        agent_id: msg.agent_id.clone(),
        to: msg.from.clone(),
        content: ReplyContent::Text { parts },
        created_at: OffsetDateTime::now_utc(),
        answers_received_at: Some(msg.received_at),
        media: done.media.clone(),
        quick_replies: done.quick_replies.clone(),
        traceparent: wagate_core::trace::traceparent(&tracing::Span::current()),
        callback_base: msg.callback_base.clone(),
        bulk: false,
    };
    bus::publish(&*ctx.bus, &out).await?;
    Ok(())
}
