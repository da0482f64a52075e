//! `POST /v1/agents/{agent_id}/messages`: a business-initiated message. Free text only inside
//! the 24-hour window (WhatsApp's rule; Twilio fails it with 63016 otherwise); a template
//! (`content_sid`) at any time; nothing to a user who opted out (Twilio fails it with 21610)
//! until they send START.
//!
//! A message with `"operator": "name"` is a person answering in the business's name: it goes
//! into the conversation's history as the business's turn with its author (so the agent knows
//! what was said when it takes over again), and it hands the conversation to that person
//! ([`super::handoff`]): the agent stays quiet while they talk.

use axum::{
    Json,
    body::Bytes,
    extract::{Path, State},
    http::StatusCode,
};
use serde::{Deserialize, Serialize};
use store::{CompletedTurn, Role, Turn};
use time::OffsetDateTime;
use utoipa::ToSchema;
use wagate_core::{
    domain::{ContentSid, PhoneNumber, SessionId, WhatsAppAddress},
    envelope::{MAX_MEDIA, OutboundReply, ReplyContent, is_public_media_url},
    text::{MAX_BODY_UTF16, MAX_REPLY_CHARS, split_reply},
    window::{refusal, template_refusal},
};

use super::{AgentPath, ApiError, ErrorBody, load_agent, parse_json};
use crate::AppState;

/// What `POST /v1/agents/{agent_id}/messages` (and the console's operator reply) asks for.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SendRequest {
    /// The user, in E.164 (`whatsapp:` before it is taken too).
    #[schema(pattern = r"^(whatsapp:)?\+[1-9][0-9]{1,14}$")]
    to: String,
    /// Free text (at most 16,000 characters), only inside the 24-hour window.
    #[schema(max_length = 16_000)]
    body: Option<String>,
    /// A template (`HX…`), at any time; not with `body` or `media`.
    #[schema(pattern = r"^HX[0-9a-fA-F]{32}$")]
    content_sid: Option<String>,
    /// The template's variables.
    #[schema(value_type = Option<Object>)]
    content_variables: Option<serde_json::Map<String, serde_json::Value>>,
    /// Public https URLs, sent with the text (one medium a message, the text with the first).
    #[serde(default)]
    #[schema(max_items = 10)]
    media: Vec<String>,
    /// A person answering in the business's name (1-100 characters): the message enters the
    /// history with this author, and the conversation is paused for them.
    #[schema(min_length = 1)]
    operator: Option<String>,
}

/// A message queued for sending.
#[derive(Serialize, ToSchema)]
pub struct Queued {
    /// The message's id in wagate (`api-…`).
    id: String,
    /// `queued`.
    status: String,
    /// How many WhatsApp messages it goes out as.
    parts: usize,
}

impl SendRequest {
    /// An operator's text to `to`: the console's reply.
    pub(crate) fn from_operator(to: String, body: String, operator: String) -> Self {
        Self {
            to,
            body: Some(body),
            content_sid: None,
            content_variables: None,
            media: Vec::new(),
            operator: Some(operator),
        }
    }
}

/// Send a message to a user: free text, media or a template
///
/// An admin send starts a trace of its own, which the sender continues.
#[utoipa::path(
    post,
    path = "/v1/agents/{agent_id}/messages",
    tag = "messages",
    operation_id = "send_message",
    params(AgentPath),
    request_body = SendRequest,
    responses(
        (status = 202, description = "Queued", body = Queued),
        (status = 404, description = "Unknown agent, or no channel", body = ErrorBody),
        (status = 409, description = "Not now: outside the 24-hour window (free text), the user opted out, or the channel is disabled", body = ErrorBody),
        (status = 422, description = "A value that is not acceptable", body = ErrorBody),
    ),
)]
#[tracing::instrument(name = "admin_send", skip_all, fields(trace_id = tracing::field::Empty))]
pub async fn send(
    State(state): State<AppState>,
    Path(AgentPath { agent_id: raw }): Path<AgentPath>,
    body: Bytes,
) -> Result<(StatusCode, Json<Queued>), ApiError> {
    let agent = load_agent(&state, &raw).await?;
    let req: SendRequest = parse_json(&body)?;
    let reply = queue(&state, &agent, req).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Queued {
            parts: reply.content.part_count(),
            id: reply.id,
            status: "queued".to_owned(),
        }),
    ))
}

/// Checks and queues a business-initiated message of `agent` (an operator's is also recorded
/// and pauses the conversation); the reply as queued.
pub(crate) async fn queue(
    state: &AppState,
    agent: &wagate_core::agent::Agent,
    req: SendRequest,
) -> Result<OutboundReply, ApiError> {
    let operator = req
        .operator
        .as_deref()
        .map(super::handoff::operator_name)
        .transpose()?;
    if req.media.len() > MAX_MEDIA {
        return Err(ApiError::invalid(format!(
            "media takes at most {MAX_MEDIA} URLs"
        )));
    }
    if let Some(bad) = req.media.iter().find(|u| !is_public_media_url(u)) {
        return Err(ApiError::invalid(format!(
            "media must be https URLs that Twilio can fetch: {}",
            wagate_core::redact::url(bad)
        )));
    }
    let raw_to = req.to.strip_prefix("whatsapp:").unwrap_or(&req.to);
    let to = PhoneNumber::parse(raw_to).map_err(|e| ApiError::invalid(format!("to: {}", e.0)))?;
    let channel = super::whatsapp::existing_channel(state, &agent.id).await?;
    if !channel.enabled {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "WhatsApp not enabled: POST /v1/agents/{agent_id}/whatsapp/enable",
        ));
    }
    let session = SessionId::for_phone(&agent.id, &to);
    let content = match (req.body, req.content_sid) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "give either body or content_sid, not both",
            ));
        }
        (None, None) if req.media.is_empty() => {
            return Err(ApiError::invalid(
                "give body (free text) or content_sid (a template)",
            ));
        }
        (None, None) => ReplyContent::Text { parts: Vec::new() },
        (Some(text), None) => {
            if req.content_variables.is_some() {
                return Err(ApiError::invalid("content_variables go with content_sid"));
            }
            let chars = text.chars().count();
            if chars > MAX_REPLY_CHARS {
                return Err(ApiError::invalid(format!(
                    "body is {chars} characters; at most {MAX_REPLY_CHARS} go in one call"
                )));
            }
            let parts = split_reply(&text, MAX_BODY_UTF16);
            if parts.is_empty() && req.media.is_empty() {
                return Err(ApiError::invalid("body must not be empty"));
            }
            ReplyContent::Text { parts }
        }
        (None, Some(_)) if !req.media.is_empty() => {
            return Err(ApiError::invalid(
                "media go with body: a template carries its own",
            ));
        }
        (None, Some(sid)) => ReplyContent::Template {
            content_sid: ContentSid::parse(&sid).map_err(|e| ApiError::invalid(e.0))?,
            variables: req.content_variables.unwrap_or_default(),
        },
    };
    let clocks = store::window_clocks(state.store.as_ref(), &session)
        .await
        .map_err(ApiError::unavailable)?;
    let refused = match content {
        ReplyContent::Text { .. } => refusal(clocks, OffsetDateTime::now_utc()),
        ReplyContent::Template { .. } => template_refusal(clocks),
    };
    if let Some(refused) = refused {
        return Err(ApiError::new(StatusCode::CONFLICT, refused.explain()));
    }
    let reply = OutboundReply {
        id: format!("api-{}", uuid::Uuid::new_v4().simple()),
        agent_id: agent.id.clone(),
        to: WhatsAppAddress::from_phone(&to),
        content,
        created_at: OffsetDateTime::now_utc(),
        answers_received_at: None,
        media: req.media,
        quick_replies: Vec::new(),
        traceparent: {
            let span = tracing::Span::current();
            wagate_core::trace::record_trace_id(&span);
            wagate_core::trace::traceparent(&span)
        },
        callback_base: None,
        // An operator answers a live conversation; every other admin send is bulk.
        bulk: operator.is_none(),
    };
    bus::publish(&*state.bus, &reply)
        .await
        .map_err(ApiError::unavailable)?;
    tracing::info!(agent = %agent.id, id = %reply.id, parts = reply.content.part_count(), "message queued");
    if let Some(operator) = operator {
        by_a_person(state, agent, &session, &reply, operator).await?;
    }
    Ok(reply)
}

/// What an operator's message leaves behind once it is queued: the business's turn in the
/// history, with its author, and the conversation paused for that person. Recorded under the
/// message's id as a completed turn, so that it is erased with the person like every turn.
async fn by_a_person(
    state: &AppState,
    agent: &wagate_core::agent::Agent,
    session: &SessionId,
    reply: &OutboundReply,
    operator: String,
) -> Result<(), ApiError> {
    let now = OffsetDateTime::now_utc();
    let mut content = match &reply.content {
        ReplyContent::Text { parts } => parts.concat(),
        ReplyContent::Template { content_sid, .. } => format!("[template {content_sid}]"),
    };
    for url in &reply.media {
        if !content.is_empty() {
            content.push('\n');
        }
        content.push_str(&format!("[media: {url}]"));
    }
    // Stamped with the reply's creation, which its sent parts carry: that is how the session
    // finds the operator's message's delivery (`delivery::by_turn`).
    let mut turn = Turn::new(Role::Assistant, content, reply.created_at);
    turn.author = Some(operator.clone());
    let record = CompletedTurn {
        reply_id: reply.id.clone(),
        reply: String::new(),
        media: Vec::new(),
        handoff: false,
        quick_replies: Vec::new(),
    };
    state
        .store
        .complete_turn(
            session,
            std::slice::from_ref(&reply.id),
            &[turn],
            &record,
            agent.retention(),
        )
        .await
        .map_err(ApiError::unavailable)?;
    super::handoff::pause_for(state, agent, session, &operator, now).await?;
    Ok(())
}
