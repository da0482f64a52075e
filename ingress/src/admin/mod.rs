//! The admin API: JSON in and out, `Authorization: Bearer $WAGATE_ADMIN_TOKEN` on every call,
//! errors as `{"error": "…"}`. No answer ever carries an Auth Token, API key or secret.

pub(crate) mod agents;
pub(crate) mod dead_letters;
pub(crate) mod delivery;
pub(crate) mod handoff;
pub(crate) mod leads;
pub(crate) mod lifecycle;
pub(crate) mod messages;
pub mod openapi;
pub(crate) mod page;
pub(crate) mod sessions;
pub(crate) mod simulated;
pub(crate) mod whatsapp;

use axum::{
    Json, Router,
    extract::{Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use subtle::ConstantTimeEq;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::AppState;

/// The `/v1` routes and their OpenAPI description, made together from the handlers'
/// `#[utoipa::path]` attributes: a route cannot be served without being described, nor
/// described without being served. Every route of the API is added here, through `routes!`.
pub(crate) fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::base())
        .routes(routes!(agents::list))
        .routes(routes!(agents::put, agents::get, lifecycle::delete_agent))
        .routes(routes!(whatsapp::put, whatsapp::get))
        .routes(routes!(whatsapp::enable))
        .routes(routes!(whatsapp::disable))
        .routes(routes!(simulated::simulated))
        .routes(routes!(leads::list))
        .routes(routes!(lifecycle::erase_lead))
        .routes(routes!(sessions::get, lifecycle::forget_session))
        .routes(routes!(handoff::pause))
        .routes(routes!(handoff::resume))
        .routes(routes!(messages::send))
        .routes(routes!(delivery::get))
        .routes(routes!(dead_letters::list))
        .routes(routes!(dead_letters::replay_many))
        .routes(routes!(dead_letters::replay_one))
        .routes(routes!(openapi::document))
}

/// The `/v1` routes, behind the bearer check.
pub fn routes(state: AppState) -> Router<AppState> {
    let (router, _) = api().split_for_parts();
    router
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        // `layer`, not `route_layer`: the fallback is behind the token too, so an unknown path
        // answers 401 to a caller without it and the API's shape cannot be probed.
        .layer(middleware::from_fn_with_state(state, require_token))
        .layer(middleware::map_response(json_errors))
}

/// The largest request body (413 above); the description's 413 answers say it from here.
pub(crate) const MAX_BODY: usize = 256 * 1024;

/// The agent of a call's path.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct AgentPath {
    /// The agent's id: 1-64 of `A-Z a-z 0-9 _ -`. Any other is unknown (404; 422 when creating).
    #[param(pattern = r"^[A-Za-z0-9_-]{1,64}$")]
    pub(crate) agent_id: String,
}

/// An agent and one of its users.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct PersonPath {
    /// The agent's id: 1-64 of `A-Z a-z 0-9 _ -`.
    #[param(pattern = r"^[A-Za-z0-9_-]{1,64}$")]
    pub(crate) agent_id: String,
    /// The user's number in E.164 (`+` URL-encoded as `%2B`, or a space for it; `whatsapp:`
    /// before it is taken too). Another text is 422.
    #[param(
        example = "+14155550100",
        pattern = r"^(whatsapp:)?[+ ][1-9][0-9]{1,14}$"
    )]
    pub(crate) phone: String,
}

/// The JSON of every error answer.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for a person to read; never a secret.
    pub error: String,
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
            Json(ErrorBody {
                error: self.message,
            }),
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
pub fn existing_agent_id(raw: &str) -> Result<wagate_core::domain::AgentId, ApiError> {
    wagate_core::domain::AgentId::parse(raw).map_err(|_| ApiError::not_found("Unknown agent"))
}

/// The agent, or 404.
pub async fn load_agent(
    state: &AppState,
    raw: &str,
) -> Result<wagate_core::agent::Agent, ApiError> {
    let id = existing_agent_id(raw)?;
    state
        .store
        .agent(&id)
        .await
        .map_err(ApiError::unavailable)?
        .ok_or_else(|| ApiError::not_found("Unknown agent"))
}
