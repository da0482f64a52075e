//! Dead letters: what could not be answered or sent, with the user's phone and Twilio's error
//! code, and their replay (one, or all after a confirmation), through the API's functions.
//! Newest first, a page at a time, paged as the API pages (its cursors, in reverse).

use askama::Template;
use axum::{
    Extension, Form, Router,
    extract::State,
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use serde::Deserialize;
use wagate_core::envelope::{DeadLetter, DeadMessage};

use super::{Layout, SignedIn, error_page, shown_time};
use crate::{
    AppState,
    admin::{
        ApiError,
        dead_letters::{self, Filter, ReplayRequest},
        page::PageRequest,
    },
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
    /// Dead letters in all (Replay all replays them all, not this page's).
    total: usize,
    /// The link to the next (older) page.
    older: Option<String>,
    /// Whether this is a later page (a link back to the newest).
    later_page: bool,
    replayed: Option<usize>,
}

#[derive(Deserialize)]
struct ListQuery {
    replayed: Option<usize>,
    cursor: Option<String>,
}

/// Dead letters per page, newest first.
const PAGE_SIZE: &str = "25";

async fn list(
    State(state): State<AppState>,
    Extension(who): Extension<SignedIn>,
    axum::extract::Query(q): axum::extract::Query<ListQuery>,
) -> Response {
    let found = async {
        // Newest first: pages by the API's key, reversed.
        let request = PageRequest::parse(dead_letters::LIST, Some(PAGE_SIZE), q.cursor.as_deref())?
            .ok_or_else(|| ApiError::unavailable("a page request without a limit"))?;
        let all = dead_letters::matching(&state, &Filter::default()).await?;
        let total = all.len();
        let page = request.take(dead_letters::LIST, all, |d| {
            std::cmp::Reverse(dead_letters::page_key(d))
        });
        Ok::<_, ApiError>((total, page))
    };
    match found.await {
        Ok((total, page)) => super::page(&DeadLettersPage {
            layout: Layout::new("Dead letters", &who),
            letters: page
                .items
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
            total,
            older: page
                .next_cursor
                .map(|c| format!("/dead-letters?cursor={c}")),
            later_page: q.cursor.is_some_and(|c| !c.is_empty()),
            replayed: q.replayed,
        }),
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
