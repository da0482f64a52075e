//! `POST /v1/agents/{agent_id}/messages`: a business-initiated message. Free text only inside
//! the 24-hour window (WhatsApp's rule; Twilio fails it with 63016 otherwise); a template
//! (`content_sid`) at any time; nothing to a user who opted out (Twilio fails it with 21610)
//! until they send START.

use axum::{
    Json,
    body::Bytes,
    extract::{Path, State},
    http::StatusCode,
};
use serde::Deserialize;
use shared::{
    bus,
    domain::{ContentSid, PhoneNumber, SessionId, WhatsAppAddress},
    envelope::{OutboundReply, ReplyContent},
    text::{MAX_BODY_UTF16, MAX_REPLY_CHARS, split_reply},
    window::{self, refusal, template_refusal},
};
use time::OffsetDateTime;

use super::{ApiError, load_agent, parse_json};
use crate::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendRequest {
    to: String,
    body: Option<String>,
    content_sid: Option<String>,
    content_variables: Option<serde_json::Map<String, serde_json::Value>>,
}

/// An admin send starts a trace of its own, which the sender continues.
#[tracing::instrument(name = "admin_send", skip_all, fields(trace_id = tracing::field::Empty))]
pub async fn send(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let agent = load_agent(&state, &raw).await?;
    let req: SendRequest = parse_json(&body)?;
    let raw_to = req.to.strip_prefix("whatsapp:").unwrap_or(&req.to);
    let to = PhoneNumber::parse(raw_to).map_err(|e| ApiError::invalid(format!("to: {}", e.0)))?;
    let channel = state
        .store
        .channel(&agent.id)
        .await
        .map_err(ApiError::unavailable)?
        .ok_or_else(|| {
            ApiError::not_found(
                "this agent has no WhatsApp channel: PUT /v1/agents/{agent_id}/whatsapp first",
            )
        })?;
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
        (None, None) => {
            return Err(ApiError::invalid(
                "give body (free text) or content_sid (a template)",
            ));
        }
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
            if parts.is_empty() {
                return Err(ApiError::invalid("body must not be empty"));
            }
            ReplyContent::Text { parts }
        }
        (None, Some(sid)) => ReplyContent::Template {
            content_sid: ContentSid::parse(&sid).map_err(|e| ApiError::invalid(e.0))?,
            variables: req.content_variables.unwrap_or_default(),
        },
    };
    let clocks = window::clocks(state.store.as_ref(), &session)
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
        media: Vec::new(),
        traceparent: {
            let span = tracing::Span::current();
            shared::trace::record_trace_id(&span);
            shared::trace::traceparent(&span)
        },
        callback_base: None,
    };
    bus::publish(&*state.bus, &reply)
        .await
        .map_err(ApiError::unavailable)?;
    tracing::info!(agent = %agent.id, id = %reply.id, parts = reply.content.part_count(), "message queued");
    Ok((
        StatusCode::ACCEPTED,
        Json(
            serde_json::json!({"id": reply.id, "status": "queued", "parts": reply.content.part_count()}),
        ),
    ))
}
