//! How the API shows an agent: secrets only as "is set", URLs without their credentials.

use serde::Serialize;
use time::OffsetDateTime;
use utoipa::ToSchema;
use wagate_core::{
    agent::{Agent, Backend},
    crypto::SealedSecret,
    domain::AgentId,
    redact,
};

use super::super::{ApiError, whatsapp::ChannelView};
use crate::AppState;

/// An agent as the API shows it: secrets only as "is set".
#[derive(Serialize, ToSchema)]
pub struct AgentView {
    #[schema(value_type = String)]
    id: AgentId,
    name: String,
    backend: BackendView,
    whatsapp: Option<ChannelView>,
    handoff_resume_after_s: u64,
    retention_days: u32,
    history_turns: Option<u32>,
    history_tokens: Option<u32>,
    typing_indicator: bool,
    events_url: Option<String>,
    events_secret_set: bool,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    updated_at: OffsetDateTime,
}

/// A backend as the API shows it: secrets only as "is set", URLs without their credentials.
#[derive(Serialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum BackendView {
    Echo {},
    Openai {
        base_url: String,
        model: String,
        api_key_set: bool,
        credentials_set: bool,
        system_prompt: Option<String>,
        timeout_ms: Option<u64>,
        transcription_model: Option<String>,
        tools: bool,
    },
    Webhook {
        url: String,
        secret_set: bool,
        credentials_set: bool,
        timeout_ms: Option<u64>,
        transcription: Option<TranscriberView>,
    },
}

/// A webhook agent's transcription endpoint as shown.
#[derive(Serialize, ToSchema)]
pub(crate) struct TranscriberView {
    base_url: String,
    model: String,
    api_key_set: bool,
}

impl BackendView {
    fn of(b: &Backend) -> Self {
        match b {
            Backend::Echo => Self::Echo {},
            Backend::Openai {
                base_url,
                credentials,
                model,
                api_key,
                system_prompt,
                timeout_ms,
                transcription_model,
                tools,
            } => Self::Openai {
                base_url: shown_url(base_url, credentials.as_ref()),
                model: model.clone(),
                api_key_set: api_key.is_some(),
                credentials_set: credentials.is_some(),
                system_prompt: system_prompt.clone(),
                timeout_ms: *timeout_ms,
                transcription_model: transcription_model.clone(),
                tools: *tools,
            },
            Backend::Webhook {
                url,
                credentials,
                timeout_ms,
                transcription,
                ..
            } => Self::Webhook {
                url: shown_url(url, credentials.as_ref()),
                secret_set: true,
                credentials_set: credentials.is_some(),
                timeout_ms: *timeout_ms,
                transcription: transcription.as_ref().map(|t| TranscriberView {
                    base_url: redact::url(&t.base_url),
                    model: t.model.clone(),
                    api_key_set: t.api_key.is_some(),
                }),
            },
        }
    }
}

/// A backend as the console shows it: the API's view, as JSON.
pub(crate) fn backend_view(b: &Backend) -> serde_json::Value {
    serde_json::to_value(BackendView::of(b)).unwrap_or_default()
}

pub(super) async fn view(state: &AppState, agent: Agent) -> Result<AgentView, ApiError> {
    let channel = state
        .store
        .channel(&agent.id)
        .await
        .map_err(ApiError::unavailable)?;
    Ok(AgentView {
        whatsapp: channel.map(|c| ChannelView::new(state, &agent.id, &c, None)),
        backend: BackendView::of(&agent.backend),
        handoff_resume_after_s: agent.handoff_resume_after_s,
        retention_days: agent.retention_days,
        history_turns: agent.history_turns,
        history_tokens: agent.history_tokens,
        typing_indicator: agent.typing_indicator,
        events_url: agent.events.as_ref().map(|e| redact::url(&e.url)),
        events_secret_set: agent.events.is_some(),
        id: agent.id,
        name: agent.name,
        created_at: agent.created_at,
        updated_at: agent.updated_at,
    })
}

/// A stored agent URL as the views show it: never with credentials.
fn shown_url(url: &str, credentials: Option<&SealedSecret>) -> String {
    match credentials {
        Some(_) => redact::masked(url),
        // Agents saved before credentials were split off may still hold them in the URL.
        None => redact::url(url),
    }
}
