//! `GET /v1/agents/{agent_id}/sessions/{phone}`: the whole conversation, the business's
//! messages with how they were delivered, and whether a person has it ([`super::handoff`]).

use axum::{
    Json,
    extract::{Path, State},
};
use serde::Serialize;
use store::{Role, Turn};
use time::OffsetDateTime;
use twilio::status::MessageStatus;
use utoipa::ToSchema;
use wagate_core::domain::SessionId;

use super::{
    ApiError, ErrorBody, PersonPath,
    delivery::{self, PartDelivery},
    handoff::PauseView,
    load_agent,
};
use crate::AppState;

/// A conversation.
#[derive(Serialize, ToSchema)]
pub struct SessionView {
    /// `twilio_{agent_id}_{phone}`.
    session_id: String,
    /// Every turn, oldest first.
    messages: Vec<MessageView>,
    #[serde(flatten)]
    state: PauseView,
}

/// A turn, and for the business's: how its reply went out.
#[derive(Serialize, ToSchema)]
#[schema(as = SessionMessage)]
pub struct MessageView {
    /// Who said it: `user`, or `assistant` for the business (the agent, or a person: `author`).
    #[schema(value_type = String, pattern = "^(user|assistant)$")]
    role: Role,
    /// What was said.
    content: String,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    at: OffsetDateTime,
    /// The person who wrote a business message in its name (an operator), if not the agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    author: Option<String>,
    /// The business's messages only: the status that stands for all the parts of its reply
    /// (`GET …/messages/{sid}` has each); null until the first part is out.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<MessageStatus>)]
    status: Option<Option<MessageStatus>>,
    /// The business's messages only: Twilio's sid of the reply's first message; null until it
    /// is out.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    sid: Option<Option<String>>,
}

impl MessageView {
    /// `turn` with the delivery of its reply (`None` for the user's turns). Every field of the
    /// turn is named: a field added to [`Turn`] does not compile here until the API says
    /// whether it shows it.
    fn new(turn: Turn, parts: Option<&[PartDelivery]>) -> Self {
        let Turn {
            role,
            content,
            at,
            author,
        } = turn;
        Self {
            role,
            content,
            at,
            author,
            status: parts.map(|p| delivery::summary(p).map(|p| p.status)),
            sid: parts.map(|p| p.first().map(|p| p.sid.clone())),
        }
    }
}

/// A conversation: every turn, the delivery of the business's, and whether a person has it
#[utoipa::path(
    get,
    path = "/v1/agents/{agent_id}/sessions/{phone}",
    tag = "people",
    operation_id = "get_session",
    params(PersonPath),
    responses(
        (status = 200, description = "The conversation (empty when there is none)", body = SessionView),
        (status = 404, description = "Unknown agent", body = ErrorBody),
        (status = 422, description = "`phone` is not a phone number", body = ErrorBody),
    ),
)]
pub async fn get(
    State(state): State<AppState>,
    Path(PersonPath {
        agent_id: raw_agent,
        phone: raw_phone,
    }): Path<PersonPath>,
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
        .map(|(turn, parts)| MessageView::new(turn, parts.as_deref()))
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
