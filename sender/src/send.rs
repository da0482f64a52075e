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

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use backon::{ExponentialBuilder, Retryable};
use bus::{Bus, Delivery};
use shared::{
    directory::{ChannelDirectory, Lookup, ResolvedChannel},
    dispatch::{Handler, with_keep_alive},
    events,
};
use store::{GuardState, Hold, Store};
use time::OffsetDateTime;
use tracing::Instrument;
use twilio::{
    rest::{FailureClass, UNSUBSCRIBED, advice},
    status::MessageStatus,
};
use wagate_core::{
    domain::MessageSid,
    envelope::{DeadLetter, OutboundReply, ReplyContent},
    events::{Event, Kind},
    failure::Failure,
    retry::RetrySchedule,
    window::{Refusal, confirmation_refusal, refusal, template_refusal},
};

use crate::{
    content::{Choices, ContentClient},
    pacing::{Pacer, Priority},
    twilio_client::{SendError, TwilioClient},
};

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
        let result = with_keep_alive(delivery.as_ref(), send(self, &reply)).await;
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
            if let Some(event) = wagate_core::events::dead_letter_created(&letter, &id) {
                events::emit(&*ctx.bus, &ctx.directory, event).await;
            }
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
        let work = async {
            if ordered && let Some(sid) = &previous {
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
        };
        previous = Some(renewing(ctx, &key, &hold, work).await?);
    }
    Ok(())
}

/// How often a waiting part looks for its predecessor's status at first, and at most: the
/// report usually comes within a second, and the wait doubles so that parts waiting on a
/// report that never comes cost the store a few reads a second each.
const FIRST_STATUS_POLL: Duration = Duration::from_millis(25);
const LAST_STATUS_POLL: Duration = Duration::from_millis(400);

/// Waits until Twilio reports the message `sid` sent, or any status after that (a failure
/// ends the wait too: nothing more will come before it), or for `part_sent_timeout`.
/// WhatsApp may deliver messages posted in quick succession out of order; Twilio hands them
/// to WhatsApp in order once each is `sent`. A store that cannot be read ends the wait only
/// at the timeout, as a lost report would.
async fn wait_until_sent(ctx: &SendContext, sid: &str) {
    let started = Instant::now();
    let deadline = started + ctx.part_sent_timeout;
    let mut poll = FIRST_STATUS_POLL;
    let reported = loop {
        match MessageSid::parse(sid) {
            Ok(parsed) => match ctx.store.status(&parsed).await {
                Ok(Some((status, _))) if status.rank() >= MessageStatus::Sent.rank() => break true,
                Ok(_) => {}
                Err(e) => tracing::debug!(sid, error = %e, "could not read a part's status"),
            },
            // Not Twilio's: no report will name it.
            Err(_) => break false,
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            tracing::info!(
                sid,
                "no report that the previous part was sent; sending the next one"
            );
            break false;
        }
        tokio::time::sleep(poll.min(left)).await;
        poll = (poll * 2).min(LAST_STATUS_POLL);
    };
    let outcome = if reported { "reported" } else { "timeout" };
    metrics::histogram!("wagate_part_order_wait_seconds", "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
}

/// One message of a reply, as planned before its guard is taken.
enum Post<'a> {
    /// Sent with these form fields (`Body`, `MediaUrl`, a template's).
    Fields(Vec<(&'static str, &'a str)>),
    /// The reply's last text with its choices, sent as a content ([`resolve_choices`]).
    Choices(Choices<'a>),
}

/// What the last message of a reply with choices goes out as.
enum Resolved {
    /// The content of its text and choices (`ContentSid`).
    Content(String),
    /// Text with the choices listed, when no content can be had.
    Text(String),
}

/// The content of `choices` in the channel's account: the cached one, else one made now and
/// cached. A refusal of the Content API (a 4xx: Twilio will not make this content) falls back
/// to text, logged; anything else fails the part for another attempt, as a failed post does.
/// In simulation mode there is no account, and the choices are recorded as text.
async fn resolve_choices(
    ctx: &SendContext,
    reply: &OutboundReply,
    channel: &ResolvedChannel,
    choices: &Choices<'_>,
) -> Result<Resolved, Failure> {
    if channel.channel.simulation {
        return Ok(Resolved::Text(choices.as_text()));
    }
    let account = &channel.channel.account_sid;
    let cache_key = choices.cache_key(account);
    if let Some(sid) = ctx
        .store
        .content_sid(&cache_key)
        .await
        .map_err(Failure::transient)?
    {
        return Ok(Resolved::Content(sid));
    }
    let attempt = || async {
        ctx.content
            .create(account, &channel.auth_token, choices, &cache_key)
            .await
    };
    let created = attempt
        .retry(inline_retries(ctx))
        .when(|e: &SendError| {
            e.class == FailureClass::RetryLater
                && e.retry_after.is_none_or(|d| d <= ctx.inline_wait_cap())
        })
        .adjust(|e: &SendError, planned| e.retry_after.or(planned))
        .await;
    match created {
        Ok(sid) => {
            tracing::info!(id = %reply.id, kind = choices.kind().as_str(), sid = %sid.as_str(), "made a content for the reply's choices");
            match ctx.store.cache_content_sid(&cache_key, sid.as_str()).await {
                Ok(stands) => Ok(Resolved::Content(stands)),
                Err(e) => {
                    // The content exists; the next reply with these choices makes another.
                    tracing::warn!(id = %reply.id, error = %e, "could not cache the content sid");
                    Ok(Resolved::Content(sid.as_str().to_owned()))
                }
            }
        }
        Err(e) if e.class == FailureClass::Permanent => {
            tracing::warn!(id = %reply.id, error = %e, "the Content API refused the reply's choices; sending them as text");
            Ok(Resolved::Text(choices.as_text()))
        }
        // A content made twice is only a duplicate, so an ambiguous answer is tried again too.
        Err(e) => {
            Err(Failure::transient(format!("Content API: {e}")).with_retry_after(e.retry_after))
        }
    }
}

/// The value of form field `name`.
fn field<'a>(fields: &[(&str, &'a str)], name: &str) -> Option<&'a str> {
    fields.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
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
    let data = serde_json::json!({
        "session_id": reply.session_id().to_string(), "phone": reply.to.user(),
        "sid": sid, "reply_id": reply.id, "part": index,
    });
    let event = Event::new(Kind::MessageSent, &reply.agent_id, &reply.to, sid, data);
    events::emit(&*ctx.bus, &ctx.directory, event).await;
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
    let data = serde_json::json!({
        "session_id": reply.session_id().to_string(), "phone": reply.to.user(),
        "opted_out": true, "by": "twilio",
    });
    let event = Event::new(
        Kind::OptoutChanged,
        &reply.agent_id,
        &reply.to,
        &reply.id,
        data,
    );
    events::emit(&*ctx.bus, &ctx.directory, event).await;
    Failure::permanent(format!("{e}: {}", Refusal::OptedOut.explain()))
        .with_code(Some(UNSUBSCRIBED))
}

/// Runs `work` (one part's attempt) while renewing the part's guard every third of the lease,
/// so that a live sender keeps its part however long Twilio takes. A renewal that finds the
/// guard taken over (this sender could not reach the store for a whole lease) is logged: the
/// new holder looks in Twilio's list before posting, which is all that can still be done.
async fn renewing<T>(
    ctx: &SendContext,
    key: &str,
    held: &Mutex<Option<Hold>>,
    work: impl Future<Output = T>,
) -> T {
    let period = ctx.send_lease / 3;
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(work);
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

/// The messages of a text reply: one per medium (WhatsApp takes one medium a message), the first
/// with the reply's first part as its caption, then the remaining parts as text. With choices,
/// the last part goes last of all, as the content that carries them (a content has no medium,
/// so the choices are on the last message whatever came before).
fn text_posts<'a>(
    parts: &'a [String],
    media: &'a [String],
    choices: &'a [String],
) -> Vec<Post<'a>> {
    let (text, last) = match parts.split_last() {
        Some((last, before)) if !choices.is_empty() => (before, Some(last)),
        _ => (parts, None),
    };
    let mut posts: Vec<Vec<(&'static str, &'a str)>> = media
        .iter()
        .map(|url| vec![("MediaUrl", url.as_str())])
        .collect();
    let mut text = text.iter();
    if let Some(first) = posts.first_mut()
        && let Some(caption) = text.next()
    {
        first.insert(0, ("Body", caption.as_str()));
    }
    posts.extend(text.map(|p| vec![("Body", p.as_str())]));
    let mut posts: Vec<Post<'a>> = posts.into_iter().map(Post::Fields).collect();
    if let Some(body) = last {
        posts.push(Post::Choices(Choices { body, choices }));
    }
    posts
}

/// Part `index` of `reply` as a reply of its own, with an id of its own so that replaying it
/// (after Twilio reported it failed) is not stopped by the original part's send guard.
fn single_part(reply: &OutboundReply, index: usize) -> OutboundReply {
    let (content, media, quick_replies) = match &reply.content {
        ReplyContent::Text { parts } => {
            match text_posts(parts, &reply.media, &reply.quick_replies)
                .into_iter()
                .nth(index)
            {
                Some(Post::Choices(choices)) => (
                    ReplyContent::Text {
                        parts: vec![choices.body.to_owned()],
                    },
                    Vec::new(),
                    choices.choices.to_vec(),
                ),
                post => {
                    let post = match post {
                        Some(Post::Fields(fields)) => fields,
                        _ => Vec::new(),
                    };
                    let field = |name: &str| {
                        post.iter()
                            .filter(|(k, _)| *k == name)
                            .map(|(_, v)| (*v).to_owned())
                            .collect::<Vec<String>>()
                    };
                    (
                        ReplyContent::Text {
                            parts: field("Body"),
                        },
                        field("MediaUrl"),
                        Vec::new(),
                    )
                }
            }
        }
        template @ ReplyContent::Template { .. } => (template.clone(), Vec::new(), Vec::new()),
    };
    OutboundReply {
        id: format!("{}-p{index}", reply.id),
        content,
        media,
        quick_replies,
        ..reply.clone()
    }
}

/// Simulation mode: records the part in the conversation's outbox instead of posting it, and
/// answers like Twilio would, with a message sid, so the rest of the send path is the same.
async fn simulate(
    ctx: &SendContext,
    reply: &OutboundReply,
    content: &[(&str, &str)],
) -> Result<String, SendError> {
    let text = match content {
        [("Body", body)] => (*body).to_owned(),
        fields => fields
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
    };
    ctx.store
        .record_simulated(&reply.session_id(), &text, OffsetDateTime::now_utc())
        .await
        .map_err(|e| SendError {
            class: FailureClass::RetryLater,
            http_status: None,
            code: None,
            message: e.to_string(),
            retry_after: None,
        })?;
    Ok(format!("SM{}", uuid::Uuid::new_v4().simple()))
}

/// Posts one message, retrying rate limits in place (honouring `Retry-After`) a few times.
async fn post(
    ctx: &SendContext,
    channel: &ResolvedChannel,
    form: &[(&str, &str)],
) -> Result<String, SendError> {
    let attempt = || async {
        let started = Instant::now();
        let answer = ctx
            .client
            .create(&channel.channel.account_sid, &channel.auth_token, form)
            .await;
        metrics::histogram!("wagate_twilio_request_seconds")
            .record(started.elapsed().as_secs_f64());
        answer
    };
    attempt
        .retry(inline_retries(ctx))
        .when(|e: &SendError| {
            e.class == FailureClass::RetryLater
                && e.retry_after.is_none_or(|d| d <= ctx.inline_wait_cap())
        })
        .adjust(|e: &SendError, planned| e.retry_after.or(planned))
        .notify(|e: &SendError, wait| {
            metrics::counter!("wagate_twilio_rate_limited_total").increment(1);
            tracing::info!(error = %e, ?wait, "Twilio asks to slow down");
        })
        .await
        .map(|m| m.sid)
}

/// How a Twilio call is retried in place after a rate limit.
fn inline_retries(ctx: &SendContext) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(ctx.inline_wait_cap())
        .with_max_times(INLINE_POSTS as usize - 1)
        .with_jitter()
}

/// Where and since when to look for a part in Twilio's list.
struct Search<'a> {
    /// The number it was sent from, or the Messaging Service that chose one.
    from: &'a Sender,
    to: &'a str,
    /// The earliest the part can have been posted.
    since: OffsetDateTime,
}

/// Whom a message is sent from: the channel's number, or its Messaging Service
/// (`MessagingServiceSid` instead of `From`).
enum Sender {
    Number(String),
    Service(String),
}

impl Sender {
    /// Its field of the Messages API's create.
    fn field(&self) -> (&'static str, &str) {
        match self {
            Self::Number(from) => ("From", from),
            Self::Service(sid) => ("MessagingServiceSid", sid),
        }
    }
}

/// After an answer that does not say whether Twilio created the part, looks for it among the
/// conversation's recent messages, and records the one found as this part's. Only a message
/// that is evidence of this very part counts: from and to the same numbers, with the part's
/// text, created since the attempt began, and not recorded as another part (a reply that says
/// "OK" twice must not settle its second "OK" on the first). Twilio's `date_created` has
/// whole seconds, so the attempt's start is truncated to its second; a message of another part
/// in that same second is told apart by its record. `None` when there is no such message or it
/// cannot be told (a template's text is not in the list). An error when a message was found
/// but could not be recorded: then the guard is kept, to lapse, and whoever takes the part
/// next looks again rather than posting it.
async fn settle_ambiguous(
    ctx: &SendContext,
    channel: &ResolvedChannel,
    search: &Search<'_>,
    part: &Part<'_>,
    single: &OutboundReply,
) -> Result<Option<String>, Failure> {
    if part.shown.is_empty() {
        return Ok(None);
    }
    let since = search.since.replace_nanosecond(0).unwrap_or(search.since);
    let list = match ctx
        .client
        .recent(
            &channel.channel.account_sid,
            &channel.auth_token,
            match search.from {
                Sender::Number(from) => Some(from.as_str()),
                Sender::Service(_) => None,
            },
            search.to,
        )
        .await
    {
        Ok(list) => list,
        Err(e) => {
            tracing::warn!(error = %e, "could not list messages to settle an ambiguous send");
            return Ok(None);
        }
    };
    // Newest first from Twilio; the oldest match is the one nearest the attempt.
    let candidates = list.into_iter().rev().filter(|m| {
        m.body.as_deref().is_some_and(|b| part.shown.contains(&b))
            && m.to.as_deref() == Some(search.to)
            && match search.from {
                Sender::Number(from) => m.from.as_deref() == Some(from.as_str()),
                Sender::Service(sid) => m.messaging_service_sid.as_deref() == Some(sid.as_str()),
            }
            && m.created().is_some_and(|at| at >= since)
    });
    for m in candidates {
        let ours = ctx
            .store
            .settle_sent(part.key, &m.sid, single)
            .await
            .map_err(Failure::transient)?;
        if ours {
            return Ok(Some(m.sid));
        }
    }
    Ok(None)
}
