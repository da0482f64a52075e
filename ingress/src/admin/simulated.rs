//! `GET /v1/agents/{agent_id}/whatsapp/simulated/{phone}`: the replies that simulation mode
//! recorded for a user instead of posting them to Twilio (the console's Test chat reads them
//! too).

use axum::{
    Json,
    extract::{Path, Query, State},
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, ErrorBody, PersonPath, load_agent, whatsapp::parse_phone};
use crate::AppState;

/// Query of the simulated outbox.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct OutboxQuery {
    /// Only the messages after this index (0: all).
    #[serde(default)]
    after: u64,
}

/// The simulated outbox of a user.
#[derive(Serialize, ToSchema)]
pub struct Outbox {
    messages: Vec<SimulatedView>,
}

/// A message the sender recorded instead of posting it to Twilio.
#[derive(Serialize, ToSchema)]
pub struct SimulatedView {
    /// Its position in the conversation's outbox, from 1.
    index: u64,
    /// What would have been posted as `Body` (or a template's sid and variables).
    body: String,
    /// When it was recorded.
    #[serde(with = "time::serde::rfc3339")]
    at: OffsetDateTime,
}

impl From<store::SimulatedMessage> for SimulatedView {
    /// Every field named, as [`super::leads::LeadView`] does.
    fn from(m: store::SimulatedMessage) -> Self {
        let store::SimulatedMessage { index, body, at } = m;
        Self { index, body, at }
    }
}

/// The replies recorded for a user instead of being posted (simulation mode)
#[utoipa::path(
    get,
    path = "/v1/agents/{agent_id}/whatsapp/simulated/{phone}",
    tag = "whatsapp",
    operation_id = "simulated_outbox",
    params(PersonPath, OutboxQuery),
    responses(
        (status = 200, description = "The replies after index `after`", body = Outbox),
        (status = 404, description = "Unknown agent", body = ErrorBody),
        (status = 422, description = "`phone` is not a phone number", body = ErrorBody),
    ),
)]
pub async fn simulated(
    State(state): State<AppState>,
    Path(PersonPath {
        agent_id: raw,
        phone: raw_phone,
    }): Path<PersonPath>,
    Query(q): Query<OutboxQuery>,
) -> Result<Json<Outbox>, ApiError> {
    let messages = simulated_after(&state, &raw, &raw_phone, q.after).await?;
    Ok(Json(Outbox {
        messages: messages.into_iter().map(SimulatedView::from).collect(),
    }))
}

/// The replies recorded for a simulated user after index `after`: the API's outbox and the
/// console's Test chat.
pub(crate) async fn simulated_after(
    state: &AppState,
    raw: &str,
    raw_phone: &str,
    after: u64,
) -> Result<Vec<store::SimulatedMessage>, ApiError> {
    let agent = load_agent(state, raw).await?;
    let phone = parse_phone(&raw_phone.replace(' ', "+"))?;
    let session = wagate_core::domain::SessionId::for_phone(&agent.id, &phone);
    state
        .store
        .simulated(&session, after)
        .await
        .map_err(ApiError::unavailable)
}
