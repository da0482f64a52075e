//! The admin API: JSON in and out, `Authorization: Bearer $WAGATE_ADMIN_TOKEN` on every call,
//! errors as `{"error": "…"}`. No answer ever carries an Auth Token, API key or secret.

pub(crate) mod agents;
pub(crate) mod dead_letters;
pub(crate) mod delivery;
pub(crate) mod handoff;
pub(crate) mod leads;
pub(crate) mod lifecycle;
pub(crate) mod messages;
pub(crate) mod page;
pub(crate) mod sessions;
pub(crate) mod whatsapp;

use axum::{
    Json, Router,
    extract::{Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{delete, get, post, put},
};
use secrecy::ExposeSecret;
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq;

use crate::AppState;

/// The `/v1` routes, behind the bearer check.
pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/v1/agents", get(agents::list))
        .route(
            "/v1/agents/{agent_id}",
            put(agents::put)
                .get(agents::get)
                .delete(lifecycle::delete_agent),
        )
        .route(
            "/v1/agents/{agent_id}/whatsapp",
            put(whatsapp::put).get(whatsapp::get),
        )
        .route(
            "/v1/agents/{agent_id}/whatsapp/enable",
            post(whatsapp::enable),
        )
        .route(
            "/v1/agents/{agent_id}/whatsapp/disable",
            post(whatsapp::disable),
        )
        .route(
            "/v1/agents/{agent_id}/whatsapp/simulated/{phone}",
            get(whatsapp::simulated),
        )
        .route("/v1/agents/{agent_id}/leads", get(leads::list))
        .route(
            "/v1/agents/{agent_id}/leads/{phone}",
            delete(lifecycle::erase_lead),
        )
        .route(
            "/v1/agents/{agent_id}/sessions/{phone}",
            get(sessions::get).delete(lifecycle::forget_session),
        )
        .route(
            "/v1/agents/{agent_id}/sessions/{phone}/pause",
            post(handoff::pause),
        )
        .route(
            "/v1/agents/{agent_id}/sessions/{phone}/resume",
            post(handoff::resume),
        )
        .route("/v1/agents/{agent_id}/messages", post(messages::send))
        .route("/v1/agents/{agent_id}/messages/{sid}", get(delivery::get))
        .route("/v1/dead-letters", get(dead_letters::list))
        .route("/v1/dead-letters/replay", post(dead_letters::replay_many))
        .route(
            "/v1/dead-letters/{id}/replay",
            post(dead_letters::replay_one),
        )
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(axum::extract::DefaultBodyLimit::max(256 * 1024))
        // `layer`, not `route_layer`: the fallback is behind the token too, so an unknown path
        // answers 401 to a caller without it and the API's shape cannot be probed.
        .layer(middleware::from_fn_with_state(state, require_token))
        .layer(middleware::map_response(json_errors))
}

/// Errors that axum produces itself (a path or query that does not parse, a body over the
/// limit, a method a route does not take) come as plain text; the API promises JSON errors.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let body = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body);
    let message = match text.trim() {
        "" => status.canonical_reason().unwrap_or("error").to_owned(),
        t => t.to_owned(),
    };
    ApiError::new(status, message).into_response()
}

/// Whether `given` is the admin token, compared in constant time so that the time taken says
/// nothing about how much of a guess was right. False when the admin API is disabled.
pub(crate) fn is_admin_token(state: &AppState, given: &str) -> bool {
    state.admin_token.as_ref().is_some_and(|expected| {
        bool::from(given.as_bytes().ct_eq(expected.expose_secret().as_bytes()))
    })
}

async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if state.admin_token.is_none() {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "the admin API is disabled: set WAGATE_ADMIN_TOKEN",
        )
        .into_response();
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if is_admin_token(&state, given) {
        next.run(request).await
    } else {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "Unauthorized: send Authorization: Bearer $WAGATE_ADMIN_TOKEN",
        )
        .into_response()
    }
}

/// An error answer: status and `{"error": "…"}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    /// Any status.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// Its status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// What it says (never a secret).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// 422: well-formed JSON with a value that is not acceptable.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }

    /// 503: a dependency failed; the details go to the log, not to the caller.
    pub fn unavailable(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "admin call failed");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily unavailable, try again",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

/// Parses a JSON body; malformed JSON or a wrong shape is a 400 naming the problem.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

/// An agent id from the path of a call that reads (404 when invalid: it cannot exist).
pub fn existing_agent_id(raw: &str) -> Result<shared::domain::AgentId, ApiError> {
    shared::domain::AgentId::parse(raw).map_err(|_| ApiError::not_found("Unknown agent"))
}

/// The agent, or 404.
pub async fn load_agent(state: &AppState, raw: &str) -> Result<shared::agent::Agent, ApiError> {
    let id = existing_agent_id(raw)?;
    state
        .store
        .agent(&id)
        .await
        .map_err(ApiError::unavailable)?
        .ok_or_else(|| ApiError::not_found("Unknown agent"))
}
