//! `GET /v1/dead-letters`, `POST /v1/dead-letters/{id}/replay`, `POST /v1/dead-letters/replay`.
//! A replayed agent failure runs the agent again; a replayed send failure sends the stored
//! reply again without the agent. The send guard still holds, so parts that did go out are not
//! posted twice.

use axum::{
    Json,
    body::Bytes,
    extract::{Path, Query, State},
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use wagate_core::envelope::{DeadLetter, DeadMessage, Stage};

use super::{
    ApiError, ErrorBody,
    page::{self, List, PageRequest},
    parse_json,
};
use crate::AppState;

/// Which dead letters a list or bulk replay takes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    agent: Option<String>,
    stage: Option<Stage>,
    /// A substring of the reason, e.g. a Twilio code.
    reason: Option<String>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    since: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    until: Option<OffsetDateTime>,
}

/// The list's query: a [`Filter`] and a page ([`super::page`]). Its own struct, as serde
/// cannot flatten into a struct that refuses unknown fields; unknown parameters are refused
/// here too.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only the agent's.
    agent: Option<String>,
    /// Only those of this stage.
    stage: Option<Stage>,
    /// Only those whose reason has this text, e.g. a Twilio code.
    reason: Option<String>,
    /// Only those failed at or after this time (RFC 3339).
    #[serde(default, with = "time::serde::rfc3339::option")]
    since: Option<OffsetDateTime>,
    /// Only those failed at or before this time (RFC 3339).
    #[serde(default, with = "time::serde::rfc3339::option")]
    until: Option<OffsetDateTime>,
    /// With it, a page of at most this many (1-1000), by id.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
    /// The `next_cursor` of the page before (needs `limit`).
    cursor: Option<String>,
}

/// The ids a replay put back into their stage.
#[derive(Serialize, ToSchema)]
pub struct Replayed {
    replayed: Vec<String>,
}

/// A dead letter's id.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct LetterPath {
    /// The dead letter's id (from the list).
    id: String,
}

/// The name of the dead letters' list in their cursors.
pub(crate) const LIST: &str = "dead-letters";

/// A dead letter's sort key in pages: its id, which both buses hand out as a growing number
/// (an id that is not one sorts after them, by its text).
pub(crate) fn page_key(d: &DeadLetter) -> (u64, String) {
    (d.id.parse().unwrap_or(u64::MAX), d.id.clone())
}

impl Filter {
    fn matches(&self, d: &DeadLetter) -> bool {
        self.agent.as_ref().is_none_or(|a| d.agent_id.as_str() == a)
            && self.stage.is_none_or(|s| d.stage == s)
            && self
                .reason
                .as_ref()
                .is_none_or(|r| d.reason.contains(r.as_str()))
            && self.since.is_none_or(|t| d.failed_at >= t)
            && self.until.is_none_or(|t| d.failed_at <= t)
    }
}

/// Dead letters: those the filter takes, all or a page of them by id
#[utoipa::path(
    get,
    path = "/v1/dead-letters",
    tag = "dead-letters",
    operation_id = "list_dead_letters",
    params(ListQuery),
    responses(
        (status = 200, description = "The dead letters (an array), or a page of them with `limit`", body = List<DeadLetter>),
    ),
)]
pub async fn list(
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<List<DeadLetter>>, ApiError> {
    let request = PageRequest::parse(LIST, q.limit.as_deref(), q.cursor.as_deref())?;
    let filter = Filter {
        agent: q.agent,
        stage: q.stage,
        reason: q.reason,
        since: q.since,
        until: q.until,
    };
    let letters = matching(&state, &filter).await?;
    Ok(page::answer(LIST, request, letters, page_key))
}

/// The dead letters `filter` takes: the API's list and the console's Dead letters page.
pub(crate) async fn matching(
    state: &AppState,
    filter: &Filter,
) -> Result<Vec<DeadLetter>, ApiError> {
    let all = state
        .bus
        .dead_letters()
        .await
        .map_err(ApiError::unavailable)?;
    Ok(all.into_iter().filter(|d| filter.matches(d)).collect())
}

/// Publishes a dead letter's message back into its stage, then removes the letter.
async fn replay(state: &AppState, letter: &DeadLetter) -> Result<(), ApiError> {
    let dedupe = format!(
        "replay-{}-{}",
        letter.id,
        letter.failed_at.unix_timestamp_nanos()
    );
    match &letter.message {
        DeadMessage::Inbound(m) => bus::publish_as(&*state.bus, m.as_ref(), &dedupe).await,
        DeadMessage::Reply(r) => bus::publish_as(&*state.bus, r.as_ref(), &dedupe).await,
        DeadMessage::Event(e) => bus::publish_as(&*state.bus, e.as_ref(), &dedupe).await,
    }
    .map_err(ApiError::unavailable)?;
    state
        .bus
        .remove_dead_letter(&letter.id)
        .await
        .map_err(ApiError::unavailable)?;
    tracing::info!(id = %letter.id, stage = letter.stage.as_str(), "dead letter replayed");
    Ok(())
}

/// Replay a dead letter: run the agent again, or send the stored reply or event again
#[utoipa::path(
    post,
    path = "/v1/dead-letters/{id}/replay",
    tag = "dead-letters",
    operation_id = "replay_dead_letter",
    params(LetterPath),
    responses(
        (status = 200, description = "Replayed", body = Replayed),
        (status = 404, description = "No such dead letter", body = ErrorBody),
    ),
)]
pub async fn replay_one(
    State(state): State<AppState>,
    Path(LetterPath { id }): Path<LetterPath>,
) -> Result<Json<Replayed>, ApiError> {
    let id = replay_id(&state, &id).await?;
    Ok(Json(Replayed { replayed: vec![id] }))
}

/// Replays the dead letter `id` (404 when there is none); its id.
pub(crate) async fn replay_id(state: &AppState, id: &str) -> Result<String, ApiError> {
    let letter = state
        .bus
        .dead_letter(id)
        .await
        .map_err(ApiError::unavailable)?
        .ok_or_else(|| ApiError::not_found("no such dead letter"))?;
    replay(state, &letter).await?;
    Ok(letter.id)
}

/// What a bulk replay takes. It must say so explicitly: `{"all": true}`, `{"ids": [...]}`, or
/// at least one filter (`stage`, `agent`, `reason`, `since`, `until`). An empty body or `{}`
/// is refused, so that a careless call cannot push every dead letter back at once.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// Every dead letter.
    #[serde(default)]
    all: bool,
    /// These (not empty).
    ids: Option<Vec<String>>,
    /// Only the agent's.
    agent: Option<String>,
    /// Only those of this stage.
    stage: Option<Stage>,
    /// Only those whose reason has this text.
    reason: Option<String>,
    /// Only those failed at or after this time.
    #[serde(default, with = "time::serde::rfc3339::option")]
    since: Option<OffsetDateTime>,
    /// Only those failed at or before this time.
    #[serde(default, with = "time::serde::rfc3339::option")]
    until: Option<OffsetDateTime>,
}

impl ReplayRequest {
    /// Every dead letter: `{"all": true}`.
    pub(crate) fn all() -> Self {
        Self {
            all: true,
            ..Self::default()
        }
    }

    /// The filter it names, and the ids it is limited to; 400 when it names nothing.
    fn scope(self) -> Result<(Filter, Option<Vec<String>>), ApiError> {
        let filter = Filter {
            agent: self.agent,
            stage: self.stage,
            reason: self.reason,
            since: self.since,
            until: self.until,
        };
        let filtered = filter.agent.is_some()
            || filter.stage.is_some()
            || filter.reason.is_some()
            || filter.since.is_some()
            || filter.until.is_some();
        if self.ids.as_ref().is_some_and(Vec::is_empty) {
            return Err(ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "\"ids\" is empty: name the dead letters to replay",
            ));
        }
        if !self.all && self.ids.is_none() && !filtered {
            return Err(ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "say which dead letters to replay: {\"all\": true}, {\"ids\": [...]} or a filter such as {\"stage\": \"send\"}",
            ));
        }
        Ok((filter, self.ids))
    }
}

/// Replay the dead letters a request names
///
/// It must name them: `{"all": true}`, `{"ids": [...]}` or a filter; an empty body or `{}` is 400.
#[utoipa::path(
    post,
    path = "/v1/dead-letters/replay",
    tag = "dead-letters",
    operation_id = "replay_dead_letters",
    request_body = ReplayRequest,
    responses(
        (status = 200, description = "The ids replayed", body = Replayed),
        (status = 400, description = "No body, or one that names nothing", body = ErrorBody),
    ),
)]
pub async fn replay_many(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Json<Replayed>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "a body is required: {\"all\": true}, {\"ids\": [...]} or a filter such as {\"stage\": \"send\"}",
        ));
    }
    let request = parse_json::<ReplayRequest>(&body)?;
    let replayed = replay_scope(&state, request).await?;
    Ok(Json(Replayed { replayed }))
}

/// Replays what `request` names; the ids replayed. The console's Replay all sends
/// `{"all": true}`.
pub(crate) async fn replay_scope(
    state: &AppState,
    request: ReplayRequest,
) -> Result<Vec<String>, ApiError> {
    let (filter, ids) = request.scope()?;
    let all = matching(state, &filter).await?;
    let mut replayed = Vec::new();
    let chosen = all
        .iter()
        .filter(|d| ids.as_ref().is_none_or(|ids| ids.contains(&d.id)));
    for letter in chosen {
        replay(state, letter).await?;
        replayed.push(letter.id.clone());
    }
    Ok(replayed)
}
