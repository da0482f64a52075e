//! `PUT/GET /v1/agents/{agent_id}/whatsapp`, `POST …/enable`, `POST …/disable`: the agent's
//! Twilio WhatsApp deployment, and the webhook URL to paste into Twilio.

use axum::{
    Json,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, header},
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use shared::{
    agent::WhatsAppChannel,
    crypto::SecretPurpose,
    domain::{AccountSid, AgentId, PhoneNumber},
};
use time::OffsetDateTime;

use super::{ApiError, load_agent, parse_json};
use crate::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelRequest {
    account_sid: String,
    auth_token: Option<SecretString>,
    phone_number: String,
    enabled: Option<bool>,
    simulation: Option<bool>,
}

/// Twilio's connection overrides, as a URL fragment (Twilio does not sign it): retry up to 3
/// times on connection failures, timeouts and 5xx answers (ingress answers 503 when it cannot
/// keep a message), instead of Twilio's default of one retry on connection failures only.
/// 4xx answers are final and not retried.
pub const TWILIO_RETRIES: &str = "#rc=3&rp=ct,rt,5xx";

/// A channel as the API shows it: never the token.
#[derive(Serialize)]
pub struct ChannelView {
    enabled: bool,
    account_sid: AccountSid,
    phone_number: PhoneNumber,
    webhook_url: String,
    status_callback_url: String,
    simulation: bool,
}

impl ChannelView {
    /// The view of `channel`; `host` is the Host of the admin request, used for the webhook URL
    /// only when no public URL is configured.
    pub fn new(
        state: &AppState,
        id: &AgentId,
        channel: &WhatsAppChannel,
        host: Option<&str>,
    ) -> Self {
        let base = webhook_base(state, host);
        Self {
            enabled: channel.enabled,
            account_sid: channel.account_sid.clone(),
            phone_number: channel.phone_number.clone(),
            webhook_url: format!("{base}/webhooks/twilio/whatsapp/{id}{TWILIO_RETRIES}"),
            status_callback_url: format!("{base}/webhooks/twilio/whatsapp/{id}/status"),
            simulation: channel.simulation,
        }
    }
}

fn webhook_base(state: &AppState, host: Option<&str>) -> String {
    if let Some(public) = &state.public_url {
        return public.to_string();
    }
    let hostname = host
        .and_then(|h| h.rsplit_once(':').map_or(Some(h), |(name, _)| Some(name)))
        .filter(|h| !h.is_empty())
        .unwrap_or("127.0.0.1");
    format!("http://{hostname}:{}", state.webhook_port)
}

fn host(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::HOST).and_then(|v| v.to_str().ok())
}

fn parse_phone(raw: &str) -> Result<PhoneNumber, ApiError> {
    let raw = raw.strip_prefix("whatsapp:").unwrap_or(raw);
    PhoneNumber::parse(raw).map_err(|e| ApiError::invalid(format!("phone_number: {}", e.0)))
}

pub async fn put(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<ChannelView>, ApiError> {
    let agent = load_agent(&state, &raw).await?;
    let req: ChannelRequest = parse_json(&body)?;
    let account_sid =
        AccountSid::parse(req.account_sid.trim()).map_err(|e| ApiError::invalid(e.0))?;
    let phone_number = parse_phone(&req.phone_number)?;
    let existing = state
        .store
        .channel(&agent.id)
        .await
        .map_err(ApiError::unavailable)?;
    let auth_token = match (req.auth_token, &existing) {
        (Some(t), _) => {
            let t = t.expose_secret().trim();
            if t.len() < 16 || t.len() > 256 || !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ApiError::invalid(
                    "auth_token must be the account's Auth Token (32 characters, from the Twilio Console)",
                ));
            }
            state.keyring.seal(
                &agent.id,
                SecretPurpose::TwilioAuthToken,
                &SecretString::from(t.to_owned()),
            )
        }
        (None, Some(c)) if c.account_sid == account_sid => c.auth_token.clone(),
        (None, _) => return Err(ApiError::invalid("auth_token is required")),
    };
    let channel = WhatsAppChannel {
        account_sid,
        auth_token,
        phone_number,
        simulation: req
            .simulation
            .or(existing.as_ref().map(|c| c.simulation))
            .unwrap_or(false),
        enabled: req
            .enabled
            .or(existing.as_ref().map(|c| c.enabled))
            .unwrap_or(true),
        updated_at: OffsetDateTime::now_utc(),
    };
    state
        .store
        .put_channel(&agent.id, &channel)
        .await
        .map_err(ApiError::unavailable)?;
    state.directory.forget(&agent.id);
    tracing::info!(agent = %agent.id, enabled = channel.enabled, "WhatsApp channel saved");
    Ok(Json(ChannelView::new(
        &state,
        &agent.id,
        &channel,
        host(&headers),
    )))
}

pub async fn get(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    headers: HeaderMap,
) -> Result<Json<ChannelView>, ApiError> {
    let agent = load_agent(&state, &raw).await?;
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
    Ok(Json(ChannelView::new(
        &state,
        &agent.id,
        &channel,
        host(&headers),
    )))
}

/// Query of the simulated outbox.
#[derive(Deserialize)]
pub struct OutboxQuery {
    #[serde(default)]
    after: u64,
}

/// `GET /v1/agents/{agent_id}/whatsapp/simulated/{phone}?after=N`: the replies the sender
/// recorded for this user instead of posting them (simulation mode), after index `after`.
pub async fn simulated(
    State(state): State<AppState>,
    Path((raw, raw_phone)): Path<(String, String)>,
    Query(q): Query<OutboxQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let agent = load_agent(&state, &raw).await?;
    let phone = parse_phone(&raw_phone.replace(' ', "+"))?;
    let session = shared::domain::SessionId::for_phone(&agent.id, &phone);
    let messages = state
        .store
        .simulated(&session, q.after)
        .await
        .map_err(ApiError::unavailable)?;
    Ok(Json(serde_json::json!({ "messages": messages })))
}

async fn set_enabled(
    state: AppState,
    raw: String,
    headers: HeaderMap,
    enabled: bool,
) -> Result<Json<ChannelView>, ApiError> {
    let agent = load_agent(&state, &raw).await?;
    let mut channel = state
        .store
        .channel(&agent.id)
        .await
        .map_err(ApiError::unavailable)?
        .ok_or_else(|| {
            ApiError::not_found(
                "this agent has no WhatsApp channel: PUT /v1/agents/{agent_id}/whatsapp first",
            )
        })?;
    channel.enabled = enabled;
    channel.updated_at = OffsetDateTime::now_utc();
    state
        .store
        .put_channel(&agent.id, &channel)
        .await
        .map_err(ApiError::unavailable)?;
    state.directory.forget(&agent.id);
    tracing::info!(agent = %agent.id, enabled, "WhatsApp channel switched");
    Ok(Json(ChannelView::new(
        &state,
        &agent.id,
        &channel,
        host(&headers),
    )))
}

pub async fn enable(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    headers: HeaderMap,
) -> Result<Json<ChannelView>, ApiError> {
    set_enabled(state, raw, headers, true).await
}

pub async fn disable(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    headers: HeaderMap,
) -> Result<Json<ChannelView>, ApiError> {
    set_enabled(state, raw, headers, false).await
}
