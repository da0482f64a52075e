//! One reply, start to finish. Parts go out in order, each behind a send guard keyed by the
//! reply id and part index, so a redelivered reply skips the parts that went out and a part is
//! posted to Twilio once. The guard's lease is short, so a dead sender's part is soon taken
//! over, and renewed while its holder works on it, so a live sender keeps it. Free-form text is
//! refused outside WhatsApp's 24-hour window, and everything to users who opted out
//! ([`wagate_core::window`]); a 21610 from Twilio records the opt-out.
//!
//! A reply with choices (quick replies) sends its last text part as a content made of the text
//! and the choices ([`crate::content`]), after any media and earlier parts. The content is
//! looked up or made once the part's guard is held, so a part already sent costs nothing; a
//! content the Content API refuses is sent as text with the choices listed, so the user still
//! gets the question.
//!
//! Here is the flow of one reply and its parts' guards; `plan` says what messages a reply
//! goes out as, `order` makes a part wait for the one before it, and `post` posts a part
//! and settles an ambiguous answer.

use std::{
    pin::{Pin, pin},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use bus::{Bus, Delivery};
use shared::{
    directory::{ChannelDirectory, Lookup, ResolvedChannel},
    dispatch::{Handler, with_keep_alive},
    events,
};
use store::{GuardState, Hold, Store};
use time::OffsetDateTime;
use tracing::Instrument;
use twilio::rest::{FailureClass, UNSUBSCRIBED, advice};
use wagate_core::{
    envelope::{DeadLetter, OutboundReply, ReplyContent},
    events::{Event, Kind},
    failure::Failure,
    retry::RetrySchedule,
    window::{Refusal, confirmation_refusal, refusal, template_refusal},
};

use crate::{
    content::ContentClient,
    pacing::{Pacer, Priority},
    twilio_client::{SendError, TwilioClient},
};

mod order;
mod plan;
mod post;
#[cfg(test)]
mod sizes;

use order::wait_until_sent;
use plan::{Post, Resolved, field, resolve_choices, single_part, text_posts};
use post::{Search, Sender, post, settle_ambiguous, simulate};

/// Longest `Retry-After` waited for inside one attempt; longer ones go back to the queue.
const MAX_INLINE_WAIT: Duration = Duration::from_secs(10);
/// Posts of one part inside one attempt (the first and the rate-limit retries).
const INLINE_POSTS: u32 = 4;

/// What a sender needs.
pub struct SendContext {
    /// Dead letters go here.
    pub bus: Arc<dyn Bus>,
    /// Window clock and send guards.
    pub store: Arc<dyn Store>,
    /// Channels with decrypted tokens.
    pub directory: Arc<ChannelDirectory>,
    /// The Messages API.
    pub client: TwilioClient,
    /// The Content API, for replies with choices.
    pub content: ContentClient,
    /// `WAGATE_PUBLIC_URL`, for the `StatusCallback` of each message; without it, the one the
    /// inbound message was verified at (`callback_base`).
    pub public_url: Option<String>,
    /// When to try a failed send again.
    pub retry: RetrySchedule,
    /// Time limit of one Twilio call.
    pub twilio_timeout: Duration,
    /// Lease of a part's send guard (`WAGATE_SEND_LEASE_MS`): how long a dead sender's part
    /// waits to be taken over. Renewed every third of it while the part is being sent.
    pub send_lease: Duration,
    /// Each sender number's pace, shared with the other sender processes.
    pub pacer: Pacer,
    /// Longest wait of a part for Twilio's report that the part before it was sent, on
    /// channels with `ordered_parts` (`WAGATE_PART_SENT_TIMEOUT_MS`).
    pub part_sent_timeout: Duration,
}

impl SendContext {
    fn inline_wait_cap(&self) -> Duration {
        MAX_INLINE_WAIT.min(self.twilio_timeout)
    }
}

/// Why a reply was not sent this time.
enum Stop {
    /// Not a failure: another sender holds a part; come back later without counting an attempt.
    Wait(Duration),
    /// A part failed.
    Failed(Failure),
}

impl From<Failure> for Stop {
    fn from(f: Failure) -> Self {
        Self::Failed(f)
    }
}

impl Handler<OutboundReply> for SendContext {
    async fn handle(&self, batch: Vec<(Box<dyn Delivery>, OutboundReply)>) -> bool {
        let mut finished = true;
        for (delivery, reply) in batch {
            let span =
                tracing::info_span!("send", id = %reply.id, trace_id = tracing::field::Empty);
            wagate_core::trace::continue_trace(&span, reply.traceparent.as_deref());
            finished &= self.send_one(delivery, reply).instrument(span).await;
        }
        finished
    }
}

impl SendContext {
    /// Sends one reply and settles its delivery; true when it was acknowledged.
    async fn send_one(&self, delivery: Box<dyn Delivery>, reply: OutboundReply) -> bool {
        let failures_key = format!("send:{}", reply.id);
        let result = with_keep_alive(delivery.as_ref(), pin!(send(self, &reply))).await;
        let attempt = match &result {
            Ok(()) | Err(Stop::Wait(_)) => 0,
            Err(_) => self
                .store
                .count_failure(&failures_key)
                .await
                .unwrap_or_else(|_| delivery.attempt()),
        };
        let mut acked = false;
        let outcome = match result {
            Ok(()) => {
                if let Some(received) = reply.answers_received_at {
                    let took = (OffsetDateTime::now_utc() - received).as_seconds_f64();
                    metrics::histogram!("wagate_reply_seconds").record(took.max(0.0));
                }
                match delivery.ack().await {
                    Ok(()) => acked = true,
                    Err(e) => {
                        tracing::warn!(id = %reply.id, error = %e, "ack failed; the send guard keeps the redelivery from posting again");
                    }
                }
                "sent"
            }
            Err(Stop::Wait(delay)) => {
                tracing::debug!(id = %reply.id, ?delay, "a part is held by another sender; waiting");
                let _ = delivery.retry_in(delay).await;
                "retry"
            }
            Err(Stop::Failed(failure)) => match failure.retry_delay(&self.retry, attempt) {
                Some(delay) => {
                    let reason = &failure.reason;
                    tracing::warn!(id = %reply.id, attempt, ?delay, %reason, "send failed, will retry");
                    let _ = delivery.retry_in(delay).await;
                    "retry"
                }
                None => dead_letter(self, delivery.as_ref(), &reply, failure, attempt).await,
            },
        };
        // Failures are only ever counted before a redelivery: a first attempt has none.
        if outcome != "retry" && delivery.attempt() > 1 {
            let _ = self.store.clear_failures(&failures_key).await;
        }
        metrics::counter!("wagate_replies_total", "outcome" => outcome).increment(1);
        acked || outcome == "dead_letter"
    }
}

async fn dead_letter(
    ctx: &SendContext,
    delivery: &dyn Delivery,
    reply: &OutboundReply,
    failure: Failure,
    attempts: u64,
) -> &'static str {
    let Failure { reason, code, .. } = failure;
    tracing::error!(id = %reply.id, agent = %reply.agent_id, attempts, %reason, "reply cannot be sent: dead letter");
    let letter = DeadLetter::send(reply.clone(), reason, code, attempts);
    match ctx.bus.put_dead_letter(&letter).await {
        Ok(id) => {
            events::emit(&*ctx.bus, &ctx.directory, &letter.agent_id, || {
                wagate_core::events::dead_letter_created(&letter, &id)
            })
            .await;
            let _ = delivery.ack().await;
            "dead_letter"
        }
        Err(e) => {
            tracing::error!(error = %e, "could not store the dead letter; keeping the reply");
            let _ = delivery.retry_in(Duration::from_secs(5)).await;
            "retry"
        }
    }
}

async fn send(ctx: &SendContext, reply: &OutboundReply) -> Result<(), Stop> {
    let channel = match ctx.directory.lookup(&reply.agent_id).await {
        Ok(Lookup::Found(c)) => c,
        Ok(_) => {
            let reason = format!("agent {} has no WhatsApp channel", reply.agent_id);
            return Err(Failure::permanent(reason).into());
        }
        Err(e) => return Err(Failure::transient(e).into()),
    };
    if !channel.channel.enabled {
        let reason = "WhatsApp not enabled for this agent; enable it and replay";
        return Err(Failure::permanent(reason).into());
    }
    let variables;
    let posts: Vec<Post<'_>> = match &reply.content {
        ReplyContent::Text { parts } => text_posts(parts, &reply.media, &reply.quick_replies),
        ReplyContent::Template {
            content_sid,
            variables: vars,
        } => {
            variables = serde_json::Value::Object(vars.clone()).to_string();
            vec![Post::Fields(vec![
                ("ContentSid", content_sid.as_str()),
                ("ContentVariables", variables.as_str()),
            ])]
        }
    };
    let callback = ctx
        .public_url
        .as_deref()
        .or(reply.callback_base.as_deref())
        .map(|base| format!("{base}/webhooks/twilio/whatsapp/{}/status", reply.agent_id));
    // Without a status callback (or with nothing posted to Twilio) no report can come.
    let ordered = channel.channel.ordered_parts
        && !channel.channel.simulation
        && callback.is_some()
        && !ctx.part_sent_timeout.is_zero();
    // The message sid of the part before the current one.
    let mut previous: Option<String> = None;
    for (index, post) in posts.iter().enumerate() {
        let key = format!("{}:{index}", reply.id);
        let (hold, taken_over) = match claim(ctx, reply, index, &key).await? {
            GuardState::Sent(sid) => {
                previous = Some(sid);
                continue;
            }
            GuardState::Busy => return Err(Stop::Wait(Duration::from_secs(1))),
            GuardState::Claimed(hold) => (hold, false),
            GuardState::Reclaimed(hold) => (hold, true),
        };
        let hold = Mutex::new(Some(hold));
        // Taken out of `previous`, which is set again from this part's answer while the
        // attempt, pinned here, still borrows what it read.
        let before = previous.take();
        let work = pin!(async {
            if ordered && let Some(sid) = &before {
                wait_until_sent(ctx, sid).await;
            }
            let (resolved, as_text);
            let (content, shown): (Vec<(&str, &str)>, Vec<&str>) = match post {
                Post::Fields(fields) => {
                    (fields.clone(), field(fields, "Body").into_iter().collect())
                }
                Post::Choices(choices) => {
                    resolved = match resolve_choices(ctx, reply, &channel, choices).await {
                        Ok(r) => r,
                        Err(f) => {
                            release(ctx, &key, &hold).await;
                            return Err(f);
                        }
                    };
                    let content = match &resolved {
                        Resolved::Content(sid) => vec![("ContentSid", sid.as_str())],
                        Resolved::Text(text) => vec![("Body", text.as_str())],
                    };
                    // A sender that died with this part may have sent it either way (its
                    // Content API call may have gone otherwise), so Twilio's list is searched
                    // for both: a content shows its body there.
                    as_text = choices.as_text();
                    (content, vec![choices.body, as_text.as_str()])
                }
            };
            let part = Part {
                key: &key,
                index,
                content: &content,
                shown: &shown,
                taken_over,
                hold: &hold,
                callback: callback.as_deref(),
            };
            send_part(ctx, reply, &channel, &part).await
        });
        previous = Some(renewing(ctx, &key, &hold, work).await?);
    }
    Ok(())
}

/// Gives the guard `key` back, if this sender still holds it.
async fn release(ctx: &SendContext, key: &str, hold: &Mutex<Option<Hold>>) {
    let hold = *hold.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(hold) = hold {
        let _ = ctx.store.release_send(key, hold).await;
    }
}

/// One part of a reply, its guard held.
struct Part<'a> {
    /// The send guard's key.
    key: &'a str,
    index: usize,
    /// The form fields of its content (`Body`, or a content's).
    content: &'a [(&'a str, &'a str)],
    /// The texts Twilio's list may show for it, to find it there after an ambiguous answer;
    /// none for a template, whose text is not known here.
    shown: &'a [&'a str],
    /// Taken over from a sender whose lease ran out, which may have posted it.
    taken_over: bool,
    /// This sender's hold on the guard as last renewed; `None` once it lapsed.
    hold: &'a Mutex<Option<Hold>>,
    /// Where Twilio reports the message's status.
    callback: Option<&'a str>,
}

impl Part<'_> {
    /// Gives the guard back, if this sender still holds it.
    async fn release(&self, ctx: &SendContext) {
        release(ctx, self.key, self.hold).await;
    }
}

/// Posts one part whose guard this sender holds, and records it; on failure the guard is given
/// back (or, for an ambiguous answer Twilio's list could not settle, given back for a retry).
/// Returns the message's sid.
async fn send_part(
    ctx: &SendContext,
    reply: &OutboundReply,
    channel: &ResolvedChannel,
    part: &Part<'_>,
) -> Result<String, Failure> {
    let from = match &channel.channel.messaging_service_sid {
        Some(service) => Sender::Service(service.clone()),
        None => Sender::Number(format!("whatsapp:{}", channel.channel.phone_number)),
    };
    let to = reply.to.as_str();
    let single = single_part(reply, part.index);
    if part.taken_over {
        // The sender that held this part died; it may have posted it first. Not "within the
        // last lease": the reply comes back only after the bus's ack wait, and may wait longer
        // in a backlog, so the dead sender's post can be any age. It cannot be older than the
        // message the reply answers (a reply republished from its stored turn has a new
        // `created_at`, not a new inbound time), and a message of an earlier reply with the
        // same text either predates it or is recorded as that reply's part (which
        // `settle_ambiguous` skips).
        let search = Search {
            from: &from,
            to,
            since: reply.answers_received_at.unwrap_or(reply.created_at),
        };
        if let Some(sid) = settle_ambiguous(ctx, channel, &search, part, &single).await? {
            tracing::info!(id = %reply.id, part = part.index, sid = %sid, "a dead sender had posted this part");
            metrics::counter!("wagate_send_ambiguous_total", "resolution" => "found").increment(1);
            sent_event(ctx, reply, part.index, &sid).await;
            return Ok(sid);
        }
    }
    let mut form = vec![("To", to), from.field()];
    form.extend(part.content.iter().copied());
    if let Some(cb) = part.callback {
        form.push(("StatusCallback", cb));
    }
    // A simulated part goes nowhere near Twilio, so it waits for no slot.
    if !channel.channel.simulation
        && let Err(e) = ctx
            .pacer
            .wait_turn(&channel.channel, Priority::of(reply))
            .await
    {
        part.release(ctx).await;
        return Err(Failure::transient(e));
    }
    let started = OffsetDateTime::now_utc();
    let posted = if channel.channel.simulation {
        simulate(ctx, reply, part.content).await
    } else {
        post(ctx, channel, &form).await
    };
    let e = match posted {
        Ok(sid) => {
            tracing::debug!(id = %reply.id, part = part.index, sid = %sid, "posted to Twilio");
            record_sent(ctx, part.key, &sid, &single).await?;
            sent_event(ctx, reply, part.index, &sid).await;
            return Ok(sid);
        }
        Err(e) => e,
    };
    if e.class == FailureClass::Ambiguous {
        let search = Search {
            from: &from,
            to,
            since: started,
        };
        if let Some(sid) = settle_ambiguous(ctx, channel, &search, part, &single).await? {
            tracing::info!(id = %reply.id, part = part.index, sid = %sid, "ambiguous answer settled: Twilio has the message");
            metrics::counter!("wagate_send_ambiguous_total", "resolution" => "found").increment(1);
            sent_event(ctx, reply, part.index, &sid).await;
            return Ok(sid);
        }
        metrics::counter!("wagate_send_ambiguous_total", "resolution" => "not_found").increment(1);
        part.release(ctx).await;
        return Err(Failure::transient(e));
    }
    part.release(ctx).await;
    if e.code == Some(UNSUBSCRIBED) {
        return Err(opted_out_at_twilio(ctx, reply, &e).await);
    }
    let mut failure = e.failure();
    let join_code = channel.channel.sandbox_join_code.as_deref();
    if let Some(advice) = e.code.and_then(|code| advice(code, join_code)) {
        failure.reason = format!("{}; what to do: {advice}", failure.reason);
    }
    Err(failure)
}

/// Raises `message.sent` for part `index` of `reply`, which Twilio has as `sid` (its id: the
/// same message found again raises the same event).
async fn sent_event(ctx: &SendContext, reply: &OutboundReply, index: usize, sid: &str) {
    events::emit(&*ctx.bus, &ctx.directory, &reply.agent_id, || {
        let data = serde_json::json!({
            "session_id": reply.session_id().to_string(), "phone": reply.to.user(),
            "sid": sid, "reply_id": reply.id, "part": index,
        });
        Event::new(Kind::MessageSent, &reply.agent_id, &reply.to, sid, data)
    })
    .await;
}

/// Twilio refused the part because the user opted out (21610): records the opt-out, so nothing
/// more is posted to them until they send START, and fails the reply for good. If the opt-out
/// cannot be recorded, the reply is tried again later, which records it then.
async fn opted_out_at_twilio(ctx: &SendContext, reply: &OutboundReply, e: &SendError) -> Failure {
    tracing::warn!(id = %reply.id, agent = %reply.agent_id, "the user opted out (21610); nothing more goes to them until they send START");
    if let Err(store) = ctx
        .store
        .opt_out(&reply.session_id(), OffsetDateTime::now_utc())
        .await
    {
        return Failure::transient(format!(
            "{e}; and the opt-out could not be recorded: {store}"
        ));
    }
    events::emit(&*ctx.bus, &ctx.directory, &reply.agent_id, || {
        let data = serde_json::json!({
            "session_id": reply.session_id().to_string(), "phone": reply.to.user(),
            "opted_out": true, "by": "twilio",
        });
        Event::new(
            Kind::OptoutChanged,
            &reply.agent_id,
            &reply.to,
            &reply.id,
            data,
        )
    })
    .await;
    Failure::permanent(format!("{e}: {}", Refusal::OptedOut.explain()))
        .with_code(Some(UNSUBSCRIBED))
}

/// Runs `work` (one part's attempt) while renewing the part's guard every third of the lease,
/// so that a live sender keeps its part however long Twilio takes. A renewal that finds the
/// guard taken over (this sender could not reach the store for a whole lease) is logged: the
/// new holder looks in Twilio's list before posting, which is all that can still be done.
/// `work` is pinned by the caller, as [`with_keep_alive`]'s is, so that it is held once.
async fn renewing<F: Future>(
    ctx: &SendContext,
    key: &str,
    held: &Mutex<Option<Hold>>,
    mut work: Pin<&mut F>,
) -> F::Output {
    let period = ctx.send_lease / 3;
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let hold = *held.lock().unwrap_or_else(PoisonError::into_inner);
        tokio::select! {
            out = &mut work => return out,
            _ = ticker.tick(), if hold.is_some() => {
                let Some(hold) = hold else { continue };
                let renewed = match ctx.store.renew_send(key, hold, ctx.send_lease).await {
                    Ok(Some(renewed)) => Some(renewed),
                    Ok(None) => {
                        tracing::warn!(key, "a send guard lapsed while its part was being sent; another sender may take it over");
                        None
                    }
                    Err(e) => {
                        tracing::warn!(key, error = %e, "could not renew a send guard; trying again");
                        Some(hold)
                    }
                };
                *held.lock().unwrap_or_else(PoisonError::into_inner) = renewed;
            }
        }
    }
}

/// Takes the guard of part `index`. Before the first part, the window clocks are read in the
/// same round trip and a send WhatsApp would refuse (free-form text outside the window,
/// anything to a user who opted out) stops here (the guard given back), before anything is
/// posted.
async fn claim(
    ctx: &SendContext,
    reply: &OutboundReply,
    index: usize,
    key: &str,
) -> Result<GuardState, Failure> {
    if index > 0 {
        return ctx
            .store
            .claim_send(key, ctx.send_lease)
            .await
            .map_err(Failure::transient);
    }
    let (state, clocks) = ctx
        .store
        .claim_send_with_clocks(&reply.session_id(), key, ctx.send_lease)
        .await
        .map_err(Failure::transient)?;
    let refused = match reply.content {
        _ if reply.confirms_consent() => confirmation_refusal(clocks, OffsetDateTime::now_utc()),
        ReplyContent::Text { .. } => refusal(clocks, OffsetDateTime::now_utc()),
        ReplyContent::Template { .. } => template_refusal(clocks),
    };
    let Some(refusal) = refused else {
        return Ok(state);
    };
    // A part taken over from a dead sender keeps its lapsed guard, so whoever takes it next
    // still looks in Twilio's list first.
    if let GuardState::Claimed(hold) = state {
        let _ = ctx.store.release_send(key, hold).await;
    }
    Err(Failure::permanent(refusal.explain()).with_code(Some(refusal.code())))
}

/// Records a posted part. Twilio has the message now, so this must not give up on a blip:
/// it is retried across a store reconnect. If it still fails, the guard's lease runs out and
/// the next sender finds the message in Twilio's list instead of posting it again.
async fn record_sent(
    ctx: &SendContext,
    key: &str,
    sid: &str,
    part: &OutboundReply,
) -> Result<(), Failure> {
    let mut wait = Duration::from_millis(100);
    for _ in 0..6 {
        match ctx.store.mark_sent(key, sid, part).await {
            Ok(()) => return Ok(()),
            Err(e) => tracing::warn!(error = %e, "could not record a sent part yet; retrying"),
        }
        tokio::time::sleep(wait).await;
        wait *= 2;
    }
    ctx.store
        .mark_sent(key, sid, part)
        .await
        .map_err(Failure::transient)
}
