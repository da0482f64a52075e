//! Test chat: the operator plays a WhatsApp user and talks to the agent through the real
//! pipeline (bus, worker, agent, sender), without Twilio. As `wagate chat` does, it needs the
//! channel in simulation mode, where the sender records replies in wagate instead of posting
//! them; an agent without a channel gets a simulated one. A channel that posts to Twilio is
//! left alone: the page says so instead of sending anything.
//!
//! A message is published to the bus as ingress publishes a verified webhook; replies are read
//! from the simulated outbox, which the page's script polls (`/chat/replies?after=N`).

use std::time::Duration;

use askama::Template;
use axum::{
    Extension, Form, Json, Router,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Redirect, Response},
    routing::get,
};
use serde::Deserialize;
use store::{Role, Turn};
use time::OffsetDateTime;
use twilio::inbound::parse_inbound;
use wagate_core::agent::Agent;

use super::{Layout, SignedIn, error_page, page};
use crate::{
    AppState,
    admin::{ApiError, load_agent, sessions, simulated, whatsapp},
};

/// The WhatsApp user that Test chat plays (a number of the range reserved for fiction).
pub(crate) const TEST_USER: &str = "+15555550100";
const TEST_USER_NAME: &str = "Test chat";
/// The sender number of a simulated channel: Twilio's sandbox, as `wagate chat` uses.
const SIMULATED_NUMBER: &str = "+14155238886";

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/agents/{agent_id}/chat", get(show).post(send))
        .route("/agents/{agent_id}/chat/replies", get(replies))
}

struct Line {
    mine: bool,
    text: String,
    at: String,
}

#[derive(Template)]
#[template(path = "chat.html")]
struct ChatPage {
    layout: Layout,
    agent_id: String,
    posts_to_twilio: bool,
    lines: Vec<Line>,
    /// The last outbox index shown; the script asks for what comes after it.
    after: u64,
    user: &'static str,
}

fn line(t: &Turn) -> Line {
    Line {
        mine: t.role == Role::User,
        text: t.content.clone(),
        at: super::shown_time(t.at),
    }
}

async fn chat_page(state: &AppState, who: &SignedIn, raw: &str) -> Result<Response, ApiError> {
    let agent = load_agent(state, raw).await?;
    let channel = state
        .store
        .channel(&agent.id)
        .await
        .map_err(ApiError::unavailable)?;
    let posts_to_twilio = channel.as_ref().is_some_and(|c| !c.simulation);
    let (_, turns) = sessions::transcript(state, raw, TEST_USER).await?;
    let after = if posts_to_twilio {
        0
    } else {
        simulated::simulated_after(state, raw, TEST_USER, 0)
            .await?
            .last()
            .map_or(0, |m| m.index)
    };
    Ok(page(&ChatPage {
        layout: Layout::new(format!("Test chat with {}", agent.id), who),
        agent_id: agent.id.to_string(),
        posts_to_twilio,
        lines: turns.iter().map(line).collect(),
        after,
        user: TEST_USER,
    }))
}

async fn show(
    State(state): State<AppState>,
    Extension(who): Extension<SignedIn>,
    Path(raw): Path<String>,
) -> Response {
    chat_page(&state, &who, &raw)
        .await
        .unwrap_or_else(|e| error_page(&who, &e))
}

#[derive(Deserialize)]
struct SendForm {
    message: String,
}

/// Gives the agent a simulated channel if it has none; refuses one that posts to Twilio.
async fn simulated_channel(state: &AppState, agent: &Agent) -> Result<String, ApiError> {
    let channel = state
        .store
        .channel(&agent.id)
        .await
        .map_err(ApiError::unavailable)?;
    match channel {
        Some(c) if c.simulation => Ok(c.phone_number.to_string()),
        Some(_) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "this agent posts to Twilio: Test chat works before it is deployed, or with its channel in simulation mode",
        )),
        None => {
            // Nobody outside wagate signs with this token: messages are published directly.
            let token = uuid::Uuid::new_v4().simple().to_string();
            let request = whatsapp::ChannelRequest::basic(
                format!("AC{}", "0".repeat(32)),
                Some(token.into()),
                SIMULATED_NUMBER.to_owned(),
                true,
            );
            whatsapp::save(state, agent.id.as_str(), request, None).await?;
            Ok(SIMULATED_NUMBER.to_owned())
        }
    }
}

/// Publishes the message as ingress publishes a verified webhook.
async fn publish(
    state: &AppState,
    agent: &Agent,
    number: &str,
    body: &str,
) -> Result<(), ApiError> {
    if body.trim().is_empty() {
        return Err(ApiError::invalid("write a message first"));
    }
    let sid = format!("SM{}", uuid::Uuid::new_v4().simple());
    let fields: Vec<(String, String)> = [
        ("MessageSid", sid.as_str()),
        ("AccountSid", &format!("AC{}", "0".repeat(32))),
        ("From", &format!("whatsapp:{TEST_USER}")),
        ("To", &format!("whatsapp:{number}")),
        ("Body", body),
        ("ProfileName", TEST_USER_NAME),
        ("WaId", TEST_USER.trim_start_matches('+')),
        ("NumMedia", "0"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    let message = parse_inbound(&agent.id, &fields, OffsetDateTime::now_utc())
        .map_err(|e| ApiError::invalid(e.0))?;
    tokio::time::timeout(Duration::from_secs(5), bus::publish(&*state.bus, &message))
        .await
        .map_err(|_| ApiError::unavailable("publishing a test chat message timed out"))?
        .map_err(ApiError::unavailable)?;
    Ok(())
}

fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json"))
}

async fn send(
    State(state): State<AppState>,
    Extension(who): Extension<SignedIn>,
    Path(raw): Path<String>,
    headers: HeaderMap,
    Form(form): Form<SendForm>,
) -> Response {
    let result = async {
        let agent = load_agent(&state, &raw).await?;
        let number = simulated_channel(&state, &agent).await?;
        publish(&state, &agent, &number, &form.message).await
    };
    match (result.await, wants_json(&headers)) {
        (Ok(()), true) => StatusCode::ACCEPTED.into_response(),
        (Ok(()), false) => Redirect::to(&format!("/agents/{raw}/chat")).into_response(),
        (Err(e), true) => e.into_response(),
        (Err(e), false) => error_page(&who, &e),
    }
}

#[derive(Deserialize)]
struct RepliesQuery {
    #[serde(default)]
    after: u64,
}

/// The agent's replies to the test user after outbox index `after`, as JSON for the script.
async fn replies(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    Query(q): Query<RepliesQuery>,
) -> Response {
    match simulated::simulated_after(&state, &raw, TEST_USER, q.after).await {
        Ok(messages) => Json(serde_json::json!({
            "messages": messages.iter().map(|m| serde_json::json!({
                "index": m.index, "body": m.body, "at": super::shown_time(m.at),
            })).collect::<Vec<_>>()
        }))
        .into_response(),
        Err(e) => e.into_response(),
    }
}
