//! Consent keywords: a message that is an opt-out keyword (STOP and the like, as Twilio's, or
//! the channel's own) or an opt-in keyword records what it says and is confirmed instead of
//! running a turn ([`crate::turn`] asks each new message here first).

use shared::{directory::Lookup, events};
use time::OffsetDateTime;
use wagate_core::{
    domain::SessionId,
    envelope::{InboundMessage, OutboundReply, ReplyContent},
    events::{Event, Kind},
    failure::Failure,
    text::{MAX_BODY_UTF16, split_reply},
    window::{self, Keyword, MAX_KEYWORD_CHARS},
};

use crate::turn::TurnContext;

/// Records what an opt-out or opt-in keyword (the channel's, or Twilio's defaults) says, at
/// the time the message was received (so a redelivery changes nothing), and publishes its
/// confirmation. Returns the keyword when it took effect: the message then runs no turn. An
/// opt-in keyword from a user who has not opted out is an ordinary answer ("yes") and runs
/// one.
pub(crate) async fn consent(
    ctx: &TurnContext,
    session: &SessionId,
    msg: &InboundMessage,
) -> Result<Option<Keyword>, Failure> {
    if msg.body.trim().is_empty() || msg.body.len() > MAX_KEYWORD_CHARS * 4 {
        return Ok(None);
    }
    let channel = match ctx.directory.lookup(&msg.agent_id).await {
        Ok(Lookup::Found(c)) => c,
        // The turn finds out, and says so in its dead letter.
        Ok(_) => return Ok(None),
        Err(e) => return Err(Failure::transient(e)),
    };
    let settings = &channel.channel.consent;
    let Some(keyword) = Keyword::of(&msg.body, settings) else {
        return Ok(None);
    };
    match keyword {
        Keyword::OptOut => {
            tracing::info!(sid = %msg.message_sid, agent = %msg.agent_id, "the user opted out; nothing more goes to them until they opt back in");
            ctx.store.opt_out(session, msg.received_at).await?;
        }
        Keyword::OptIn => {
            let clocks = store::window_clocks(ctx.store.as_ref(), session).await?;
            // This message's own opt-in, recorded by a delivery that died before it was acked.
            let this_one = clocks
                .opted_in_at
                .is_some_and(|at| (at - msg.received_at).abs() < time::Duration::milliseconds(1));
            if !window::opted_out(clocks) && !this_one {
                return Ok(None);
            }
            tracing::info!(sid = %msg.message_sid, agent = %msg.agent_id, "the user opted back in");
            ctx.store.opt_in(session, msg.received_at).await?;
        }
    }
    events::emit(&*ctx.bus, &ctx.directory, &msg.agent_id, || {
        let data = serde_json::json!({
            "session_id": session.to_string(), "phone": msg.from.user(),
            "opted_out": keyword == Keyword::OptOut, "by": "keyword",
        });
        Event::new(
            Kind::OptoutChanged,
            &msg.agent_id,
            &msg.from,
            msg.message_sid.as_str(),
            data,
        )
    })
    .await;
    if let Some(text) = keyword.confirmation(settings) {
        let confirmation = OutboundReply {
            id: OutboundReply::id_for_confirmation(&msg.message_sid),
            agent_id: msg.agent_id.clone(),
            to: msg.from.clone(),
            content: ReplyContent::Text {
                parts: split_reply(text, MAX_BODY_UTF16),
            },
            created_at: OffsetDateTime::now_utc(),
            answers_received_at: Some(msg.received_at),
            media: Vec::new(),
            quick_replies: Vec::new(),
            traceparent: wagate_core::trace::traceparent(&tracing::Span::current()),
            callback_base: msg.callback_base.clone(),
            bulk: false,
        };
        bus::publish(&*ctx.bus, &confirmation).await?;
    }
    Ok(Some(keyword))
}
