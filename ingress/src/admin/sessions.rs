//! `GET /v1/agents/{agent_id}/sessions/{phone}`: the whole conversation.

use axum::{
    Json,
    extract::{Path, State},
};
use serde::Serialize;
use shared::{
    domain::{PhoneNumber, SessionId},
    store::Turn,
};

use super::{ApiError, load_agent};
use crate::AppState;

#[derive(Serialize)]
pub struct SessionView {
    session_id: String,
    messages: Vec<Turn>,
}

pub async fn get(
    State(state): State<AppState>,
    Path((raw_agent, raw_phone)): Path<(String, String)>,
) -> Result<Json<SessionView>, ApiError> {
    let (session, messages) = transcript(&state, &raw_agent, &raw_phone).await?;
    Ok(Json(SessionView {
        session_id: session.to_string(),
        messages,
    }))
}

/// The whole conversation of an agent with a user: the API's session and the console's
/// transcript.
pub(crate) async fn transcript(
    state: &AppState,
    raw_agent: &str,
    raw_phone: &str,
) -> Result<(SessionId, Vec<Turn>), ApiError> {
    let agent = load_agent(state, raw_agent).await?;
    let raw_phone = raw_phone.strip_prefix("whatsapp:").unwrap_or(raw_phone);
    // A `+` typed unencoded in a URL path stays `+`, but some clients send a space for it.
    let phone =
        PhoneNumber::parse(&raw_phone.replace(' ', "+")).map_err(|e| ApiError::invalid(e.0))?;
    let session = SessionId::for_phone(&agent.id, &phone);
    let messages = state
        .store
        .history(&session, usize::MAX)
        .await
        .map_err(ApiError::unavailable)?;
    Ok((session, messages))
}
