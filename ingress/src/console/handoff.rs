//! The console's human handoff, on a transcript: **Take over** pauses the conversation for the
//! person at the console, **Send reply** sends their message in the business's name (which
//! pauses it too), **Give back to the agent** resumes it. Each is a POST form with the
//! session's CSRF token and runs the API's own functions (`admin::handoff`,
//! `admin::messages`), so the console does exactly what the admin API does.

use axum::{
    Extension, Form, Router,
    extract::{Path, State},
    response::{IntoResponse, Redirect, Response},
    routing::post,
};
use serde::Deserialize;
use time::OffsetDateTime;

use super::{SignedIn, error_page};
use crate::{
    AppState,
    admin::{ApiError, handoff, lifecycle, load_agent, messages},
};

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/agents/{agent_id}/conversations/pause", post(take_over))
        .route("/agents/{agent_id}/conversations/resume", post(give_back))
        .route("/agents/{agent_id}/conversations/reply", post(reply))
}

/// A handoff form: whose conversation, who is at the console, and for a reply its text.
#[derive(Deserialize)]
struct HandoffForm {
    phone: String,
    #[serde(default)]
    operator: String,
    #[serde(default)]
    body: String,
}

impl HandoffForm {
    /// Who is at the console: the name they gave, else "console".
    fn operator(&self) -> Result<String, ApiError> {
        match self.operator.trim() {
            "" => Ok("console".to_owned()),
            name => handoff::operator_name(name),
        }
    }

    /// The transcript to go back to.
    fn back(&self, agent: &str) -> Redirect {
        let phone: String = form_urlencoded::byte_serialize(self.phone.as_bytes()).collect();
        Redirect::to(&format!("/agents/{agent}/conversations/{phone}"))
    }
}

async fn take_over(
    State(state): State<AppState>,
    Extension(who): Extension<SignedIn>,
    Path(raw): Path<String>,
    Form(form): Form<HandoffForm>,
) -> Response {
    let paused = async {
        let agent = load_agent(&state, &raw).await?;
        let session = lifecycle::session_of(&agent, &form.phone)?;
        let by = form.operator()?;
        handoff::pause_for(&state, &agent, &session, &by, OffsetDateTime::now_utc()).await
    };
    match paused.await {
        Ok(_) => form.back(&raw).into_response(),
        Err(e) => error_page(&who, &e),
    }
}

async fn give_back(
    State(state): State<AppState>,
    Extension(who): Extension<SignedIn>,
    Path(raw): Path<String>,
    Form(form): Form<HandoffForm>,
) -> Response {
    let resumed = async {
        let agent = load_agent(&state, &raw).await?;
        let session = lifecycle::session_of(&agent, &form.phone)?;
        handoff::resume_session(&state, &agent, &session).await
    };
    match resumed.await {
        Ok(()) => form.back(&raw).into_response(),
        Err(e) => error_page(&who, &e),
    }
}

async fn reply(
    State(state): State<AppState>,
    Extension(who): Extension<SignedIn>,
    Path(raw): Path<String>,
    Form(form): Form<HandoffForm>,
) -> Response {
    let sent = async {
        let agent = load_agent(&state, &raw).await?;
        let request = messages::SendRequest::from_operator(
            form.phone.clone(),
            form.body.clone(),
            form.operator()?,
        );
        messages::queue(&state, &agent, request).await
    };
    match sent.await {
        Ok(_) => form.back(&raw).into_response(),
        Err(e) => error_page(&who, &e),
    }
}
