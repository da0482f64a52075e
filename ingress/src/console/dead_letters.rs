//! Dead letters: what could not be answered or sent, with the user's phone and Twilio's error
//! code, and their replay (one, or all after a confirmation), through the API's functions.

use askama::Template;
use axum::{
    Extension, Form, Router,
    extract::State,
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use serde::Deserialize;
use shared::envelope::{DeadLetter, DeadMessage};

use super::{Layout, SignedIn, error_page, page, shown_time};
use crate::{
    AppState,
    admin::dead_letters::{self, Filter, ReplayRequest},
};

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/dead-letters", get(list))
        .route("/dead-letters/replay", post(replay_one))
        .route("/dead-letters/replay-all", post(replay_all))
}

struct LetterRow {
    id: String,
    agent_id: String,
    phone: String,
    stage: &'static str,
    reason: String,
    code: Option<u32>,
    attempts: u64,
    failed_at: String,
}

/// The user a dead letter is about: who wrote, or whom the reply was for.
fn phone_of(d: &DeadLetter) -> String {
    match &d.message {
        DeadMessage::Inbound(m) => m.from.to_string(),
        DeadMessage::Reply(r) => r.to.to_string(),
        DeadMessage::Event(e) => e.user.to_string(),
    }
    .trim_start_matches("whatsapp:")
    .to_owned()
}

#[derive(Template)]
#[template(path = "dead_letters.html")]
struct DeadLettersPage {
    layout: Layout,
    letters: Vec<LetterRow>,
    replayed: Option<usize>,
}

#[derive(Deserialize)]
struct ListQuery {
    replayed: Option<usize>,
}

async fn list(
    State(state): State<AppState>,
    Extension(who): Extension<SignedIn>,
    axum::extract::Query(q): axum::extract::Query<ListQuery>,
) -> Response {
    match dead_letters::matching(&state, &Filter::default()).await {
        Ok(mut all) => {
            all.sort_by_key(|d| std::cmp::Reverse(d.failed_at));
            page(&DeadLettersPage {
                layout: Layout::new("Dead letters", &who),
                letters: all
                    .iter()
                    .map(|d| LetterRow {
                        id: d.id.clone(),
                        agent_id: d.agent_id.to_string(),
                        phone: phone_of(d),
                        stage: d.stage.as_str(),
                        reason: d.reason.clone(),
                        code: d.code,
                        attempts: d.attempts,
                        failed_at: shown_time(d.failed_at),
                    })
                    .collect(),
                replayed: q.replayed,
            })
        }
        Err(e) => error_page(&who, &e),
    }
}

#[derive(Deserialize)]
struct ReplayForm {
    id: String,
}

async fn replay_one(
    State(state): State<AppState>,
    Extension(who): Extension<SignedIn>,
    Form(form): Form<ReplayForm>,
) -> Response {
    match dead_letters::replay_id(&state, &form.id).await {
        Ok(_) => Redirect::to("/dead-letters?replayed=1").into_response(),
        Err(e) => error_page(&who, &e),
    }
}

/// Replay all: `{"all": true}` as the API takes it. The page asks for a confirmation first.
async fn replay_all(
    State(state): State<AppState>,
    Extension(who): Extension<SignedIn>,
) -> Response {
    match dead_letters::replay_scope(&state, ReplayRequest::all()).await {
        Ok(ids) => Redirect::to(&format!("/dead-letters?replayed={}", ids.len())).into_response(),
        Err(e) => error_page(&who, &e),
    }
}
