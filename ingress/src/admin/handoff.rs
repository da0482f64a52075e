//! Human handoff: `POST /v1/agents/{agent_id}/sessions/{phone}/pause` hands a conversation to a
//! person, `…/resume` gives it back to the agent. While a conversation is paused its messages
//! are recorded and no agent runs; an operator's message (`POST /v1/agents/{agent_id}/messages`
//! with `"operator"`) pauses it too and restarts its idle clock, and a pause lapses once the
//! person has been silent for the agent's `handoff_resume_after_s`, so a conversation nobody
//! picked up goes back to the agent rather than staying unanswered.

use axum::{
    Json,
    body::Bytes,
    extract::{Path, State},
};
use serde::{Deserialize, Serialize};
use shared::events;
use store::Pause;
use time::OffsetDateTime;
use utoipa::ToSchema;
use wagate_core::{
    agent::Agent,
    domain::SessionId,
    events::{Event, Kind},
};

use super::{ApiError, ErrorBody, PersonPath, load_agent, parse_json};
use crate::AppState;

/// Whether a conversation is with a person, as the API shows it (flattened into the session).
#[derive(Serialize, Default, ToSchema)]
pub struct PauseView {
    /// Whether a person has the conversation (no agent runs).
    paused: bool,
    /// Who paused it: an operator's name, `api`, or `agent` (a handoff).
    #[serde(skip_serializing_if = "Option::is_none")]
    paused_by: Option<String>,
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    paused_since: Option<OffsetDateTime>,
    /// When the agent takes the conversation back unless the person writes again.
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    resumes_at: Option<OffsetDateTime>,
}

impl PauseView {
    /// The state of a conversation with `pause` stored, at `now`: a lapsed pause is no pause.
    pub fn new(agent: &Agent, pause: Option<&Pause>, now: OffsetDateTime) -> Self {
        match pause {
            Some(p) if p.holds(now, agent.handoff_idle()) => Self {
                paused: true,
                paused_by: Some(p.by.clone()),
                paused_since: Some(p.since),
                resumes_at: p.lapses_at(agent.handoff_idle()),
            },
            _ => Self::default(),
        }
    }
}

/// The answer of pause and resume.
#[derive(Serialize, ToSchema)]
pub struct SessionState {
    /// `twilio_{agent_id}_{phone}`.
    session_id: String,
    #[serde(flatten)]
    state: PauseView,
}

/// What a pause may say; the body may also be empty.
#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PauseRequest {
    /// The person taking over (1-100 characters); left out: `api`.
    #[schema(min_length = 1)]
    operator: Option<String>,
}

/// Checks an operator's name as given: what the history and the console show as the author.
pub(crate) fn operator_name(raw: &str) -> Result<String, ApiError> {
    let name = raw.trim();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "operator must be 1-100 characters, without control characters",
        ));
    }
    Ok(name.to_owned())
}

/// Pauses `session` for `by` at `now`: a pause that still holds keeps its start, and every call
/// restarts the idle clock. Returns the pause that now stands.
pub(crate) async fn pause_for(
    state: &AppState,
    agent: &Agent,
    session: &SessionId,
    by: &str,
    now: OffsetDateTime,
) -> Result<Pause, ApiError> {
    let before = state
        .store
        .pause(session)
        .await
        .map_err(ApiError::unavailable)?
        .filter(|p| p.holds(now, agent.handoff_idle()));
    let mut pause = Pause::new(by, now);
    if let Some(before) = &before {
        pause.since = before.since;
    }
    state
        .store
        .set_pause(session, Some(&pause))
        .await
        .map_err(ApiError::unavailable)?;
    if before.is_none() {
        tracing::info!(agent = %agent.id, by, "conversation handed to a person");
        metrics::counter!("wagate_handoffs_total", "by" => "operator").increment(1);
        let user =
            wagate_core::domain::WhatsAppAddress::parse(&format!("whatsapp:{}", session.user()))
                .map_err(|e| ApiError::invalid(e.0))?;
        events::emit(&*state.bus, &state.directory, &agent.id, || {
            let data = serde_json::json!({
                "session_id": session.to_string(), "phone": session.user(), "by": by,
            });
            let about = format!("{}_{}", session.user(), now.unix_timestamp_nanos());
            Event::new(Kind::ConversationHandoff, &agent.id, &user, &about, data)
        })
        .await;
    }
    Ok(pause)
}

/// Hand a conversation to a person: the user's messages are recorded, no agent runs
#[utoipa::path(
    post,
    path = "/v1/agents/{agent_id}/sessions/{phone}/pause",
    tag = "people",
    operation_id = "pause_session",
    params(PersonPath),
    request_body(content = Option<PauseRequest>, description = "Optional: `{\"operator\": \"Grace\"}`"),
    responses(
        (status = 200, description = "The conversation's state", body = SessionState),
        (status = 404, description = "Unknown agent", body = ErrorBody),
        (status = 422, description = "`phone` is not a phone number, or a bad `operator`", body = ErrorBody),
    ),
)]
pub async fn pause(
    State(state): State<AppState>,
    Path(PersonPath {
        agent_id: raw_agent,
        phone: raw_phone,
    }): Path<PersonPath>,
    body: Bytes,
) -> Result<Json<SessionState>, ApiError> {
    let agent = load_agent(&state, &raw_agent).await?;
    let session = super::lifecycle::session_of(&agent, &raw_phone)?;
    let req: PauseRequest = if body.iter().all(u8::is_ascii_whitespace) {
        PauseRequest::default()
    } else {
        parse_json(&body)?
    };
    let by = match &req.operator {
        Some(name) => operator_name(name)?,
        None => "api".to_owned(),
    };
    let now = OffsetDateTime::now_utc();
    let pause = pause_for(&state, &agent, &session, &by, now).await?;
    Ok(Json(SessionState {
        session_id: session.to_string(),
        state: PauseView::new(&agent, Some(&pause), now),
    }))
}

/// Give a conversation back to the agent
#[utoipa::path(
    post,
    path = "/v1/agents/{agent_id}/sessions/{phone}/resume",
    tag = "people",
    operation_id = "resume_session",
    params(PersonPath),
    responses(
        (status = 200, description = "The conversation's state", body = SessionState),
        (status = 404, description = "Unknown agent", body = ErrorBody),
        (status = 422, description = "`phone` is not a phone number", body = ErrorBody),
    ),
)]
pub async fn resume(
    State(state): State<AppState>,
    Path(PersonPath {
        agent_id: raw_agent,
        phone: raw_phone,
    }): Path<PersonPath>,
) -> Result<Json<SessionState>, ApiError> {
    let agent = load_agent(&state, &raw_agent).await?;
    let session = super::lifecycle::session_of(&agent, &raw_phone)?;
    resume_session(&state, &agent, &session).await?;
    Ok(Json(SessionState {
        session_id: session.to_string(),
        state: PauseView::default(),
    }))
}

/// Gives `session` back to the agent: the API's resume and the console's.
pub(crate) async fn resume_session(
    state: &AppState,
    agent: &Agent,
    session: &SessionId,
) -> Result<(), ApiError> {
    state
        .store
        .set_pause(session, None)
        .await
        .map_err(ApiError::unavailable)?;
    tracing::info!(agent = %agent.id, "conversation given back to the agent");
    Ok(())
}
