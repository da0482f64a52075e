//! The console's data lifecycle buttons: Forget conversation (a transcript), Erase (a lead's
//! row) and Delete agent (an agent's page). Each is a POST form with the session's CSRF token
//! and a confirmation, and runs the API's own function (`admin::lifecycle`), so what it removes
//! and keeps is what the API's `DELETE` calls do.

use axum::{
    Extension, Form, Router,
    extract::{Path, State},
    response::{IntoResponse, Redirect, Response},
    routing::post,
};
use serde::Deserialize;

use super::{SignedIn, error_page};
use crate::{
    AppState,
    admin::{ApiError, lifecycle, load_agent},
};

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/agents/{agent_id}/delete", post(delete_agent))
        .route("/agents/{agent_id}/leads/erase", post(erase_lead))
        .route(
            "/agents/{agent_id}/conversations/forget",
            post(forget_conversation),
        )
}

/// Whose data a form names.
#[derive(Deserialize)]
struct PhoneForm {
    phone: String,
}

async fn delete_agent(
    State(state): State<AppState>,
    Extension(who): Extension<SignedIn>,
    Path(raw): Path<String>,
) -> Response {
    let deleted = async {
        let agent = load_agent(&state, &raw).await?;
        lifecycle::delete(&state, &agent).await
    };
    match deleted.await {
        Ok(()) => Redirect::to("/agents").into_response(),
        Err(e) => error_page(&who, &e),
    }
}

async fn erase_lead(
    State(state): State<AppState>,
    Extension(who): Extension<SignedIn>,
    Path(raw): Path<String>,
    Form(form): Form<PhoneForm>,
) -> Response {
    let erased = async {
        let agent = load_agent(&state, &raw).await?;
        let session = lifecycle::session_of(&agent, &form.phone)?;
        lifecycle::erase_person(&state, &session).await?;
        Ok::<_, ApiError>(agent.id)
    };
    match erased.await {
        Ok(id) => Redirect::to(&format!("/agents/{id}/leads")).into_response(),
        Err(e) => error_page(&who, &e),
    }
}

async fn forget_conversation(
    State(state): State<AppState>,
    Extension(who): Extension<SignedIn>,
    Path(raw): Path<String>,
    Form(form): Form<PhoneForm>,
) -> Response {
    let forgotten = async {
        let agent = load_agent(&state, &raw).await?;
        let session = lifecycle::session_of(&agent, &form.phone)?;
        state
            .store
            .forget_session(&session)
            .await
            .map_err(ApiError::unavailable)?;
        Ok::<_, ApiError>(agent.id)
    };
    match forgotten.await {
        Ok(id) => Redirect::to(&format!(
            "/agents/{id}/conversations/{}",
            form.phone.replace('+', "%2B")
        ))
        .into_response(),
        Err(e) => error_page(&who, &e),
    }
}
