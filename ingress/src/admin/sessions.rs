//! `GET /v1/agents/{agent_id}/sessions/{phone}`: the whole conversation, and whether a person
//! has it ([`super::handoff`]).

use axum::{
    Json,
    extract::{Path, State},
};
use serde::Serialize;
use shared::{domain::SessionId, store::Turn};
use time::OffsetDateTime;

use super::{ApiError, handoff::PauseView, load_agent};
use crate::AppState;

#[derive(Serialize)]
pub struct SessionView {
    session_id: String,
    messages: Vec<Turn>,
    #[serde(flatten)]
    state: PauseView,
}

pub async fn get(
    State(state): State<AppState>,
    Path((raw_agent, raw_phone)): Path<(String, String)>,
) -> Result<Json<SessionView>, ApiError> {
    let agent = load_agent(&state, &raw_agent).await?;
    let (session, messages) = transcript(&state, &raw_agent, &raw_phone).await?;
    let pause = state
        .store
        .pause(&session)
        .await
        .map_err(ApiError::unavailable)?;
    Ok(Json(SessionView {
        session_id: session.to_string(),
        messages,
        state: PauseView::new(&agent, pause.as_ref(), OffsetDateTime::now_utc()),
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
    let session = super::lifecycle::session_of(&agent, raw_phone)?;
    let messages = state
        .store
        .history(&session, usize::MAX)
        .await
        .map_err(ApiError::unavailable)?;
    Ok((session, messages))
}
