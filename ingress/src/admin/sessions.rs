//! `GET /v1/agents/{agent_id}/sessions/{phone}`: the whole conversation, the business's
//! messages with how they were delivered, and whether a person has it ([`super::handoff`]).

use axum::{
    Json,
    extract::{Path, State},
};
use serde::Serialize;
use shared::{domain::SessionId, store::Turn, twilio::status::MessageStatus};
use time::OffsetDateTime;

use super::{
    ApiError,
    delivery::{self, PartDelivery},
    handoff::PauseView,
    load_agent,
};
use crate::AppState;

#[derive(Serialize)]
pub struct SessionView {
    session_id: String,
    messages: Vec<MessageView>,
    #[serde(flatten)]
    state: PauseView,
}

/// A turn, and for the business's: how its reply went out.
#[derive(Serialize)]
struct MessageView {
    #[serde(flatten)]
    turn: Turn,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    delivery: Option<DeliveryView>,
}

/// The delivery of one reply: its first message's sid, and the status that stands for all its
/// parts ([`delivery::summary`]); both `null` until the first part is out. Each part's sid and
/// status are the answer of `GET …/messages/{sid}`.
#[derive(Serialize)]
struct DeliveryView {
    status: Option<MessageStatus>,
    sid: Option<String>,
}

impl DeliveryView {
    fn of(parts: &[PartDelivery]) -> Self {
        Self {
            status: delivery::summary(parts).map(|p| p.status),
            sid: parts.first().map(|p| p.sid.clone()),
        }
    }
}

pub async fn get(
    State(state): State<AppState>,
    Path((raw_agent, raw_phone)): Path<(String, String)>,
) -> Result<Json<SessionView>, ApiError> {
    let agent = load_agent(&state, &raw_agent).await?;
    let (session, turns) = transcript(&state, &raw_agent, &raw_phone).await?;
    let deliveries = delivery::of_session(&state, &session, &turns).await?;
    let pause = state
        .store
        .pause(&session)
        .await
        .map_err(ApiError::unavailable)?;
    let messages = turns
        .into_iter()
        .zip(deliveries)
        .map(|(turn, parts)| MessageView {
            turn,
            delivery: parts.as_deref().map(DeliveryView::of),
        })
        .collect();
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
