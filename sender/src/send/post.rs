//! Posting a part to Twilio (or, in simulation mode, to the conversation's outbox), retrying
//! rate limits in place, and settling an answer that left open whether Twilio made it.

use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use shared::directory::ResolvedChannel;
use time::OffsetDateTime;
use twilio::rest::FailureClass;
use wagate_core::{envelope::OutboundReply, failure::Failure};

use super::{INLINE_POSTS, Part, SendContext};
use crate::twilio_client::SendError;

/// Simulation mode: records the part in the conversation's outbox instead of posting it, and
/// answers like Twilio would, with a message sid, so the rest of the send path is the same.
pub(super) async fn simulate(
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
pub(super) async fn post(
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
pub(super) fn inline_retries(ctx: &SendContext) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(ctx.inline_wait_cap())
        .with_max_times(INLINE_POSTS as usize - 1)
        .with_jitter()
}

/// Where and since when to look for a part in Twilio's list.
pub(super) struct Search<'a> {
    /// The number it was sent from, or the Messaging Service that chose one.
    pub(super) from: &'a Sender,
    pub(super) to: &'a str,
    /// The earliest the part can have been posted.
    pub(super) since: OffsetDateTime,
}

/// Whom a message is sent from: the channel's number, or its Messaging Service
/// (`MessagingServiceSid` instead of `From`).
pub(super) enum Sender {
    Number(String),
    Service(String),
}

impl Sender {
    /// Its field of the Messages API's create.
    pub(super) fn field(&self) -> (&'static str, &str) {
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
pub(super) async fn settle_ambiguous(
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
