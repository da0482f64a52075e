//! The Agents pages: the list and the agent form (create and edit). Saving goes through the
//! same function as the API's `PUT`, so validation and the sealing of secrets are the API's.
//! Secret fields are write-only: never shown or filled in, and left empty they keep what is
//! stored.

use askama::Template;
use axum::{
    Extension, Form, Router,
    extract::{Path, State},
    response::{IntoResponse, Redirect, Response},
    routing::get,
};
use secrecy::SecretString;
use serde::Deserialize;

use super::{Layout, SignedIn, error_page, page};
use crate::{
    AppState,
    admin::{
        ApiError,
        agents::{self, AgentRequest, BackendRequest},
        load_agent,
    },
};

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/agents", get(list).post(create))
        .route("/agents/new", get(new))
        .route("/agents/{agent_id}", get(show).post(update))
}

/// One row of the agent list.
struct AgentRow {
    id: String,
    name: String,
    backend: String,
    channel: &'static str,
}

#[derive(Template)]
#[template(path = "agents.html")]
struct AgentsPage {
    layout: Layout,
    agents: Vec<AgentRow>,
}

pub(super) fn channel_state(c: Option<&wagate_core::agent::WhatsAppChannel>) -> &'static str {
    match c {
        None => "not deployed",
        Some(c) if c.simulation => "simulation (Test chat)",
        Some(c) if c.enabled => "enabled",
        Some(_) => "disabled",
    }
}

fn backend_label(kind: &str) -> String {
    match kind {
        "echo" => "Echo",
        "openai" => "OpenAI-compatible",
        "webhook" => "Webhook",
        other => other,
    }
    .to_owned()
}

async fn list(State(state): State<AppState>, Extension(who): Extension<SignedIn>) -> Response {
    let rows = async {
        let mut rows = Vec::new();
        for a in state.store.agents().await.map_err(ApiError::unavailable)? {
            let channel = state
                .store
                .channel(&a.id)
                .await
                .map_err(ApiError::unavailable)?;
            let view = agents::backend_view(&a.backend);
            rows.push(AgentRow {
                id: a.id.to_string(),
                name: a.name,
                backend: backend_label(view["kind"].as_str().unwrap_or("")),
                channel: channel_state(channel.as_ref()),
            });
        }
        Ok::<_, ApiError>(rows)
    };
    match rows.await {
        Ok(agents) => page(&AgentsPage {
            layout: Layout::new("Agents", &who),
            agents,
        }),
        Err(e) => error_page(&who, &e),
    }
}

/// The agent form's fields as shown (never a secret; only whether one is stored).
#[derive(Default)]
struct AgentFields {
    id: String,
    name: String,
    kind: String,
    base_url: String,
    model: String,
    system_prompt: String,
    api_key_set: bool,
    webhook_url: String,
    secret_set: bool,
}

#[derive(Template)]
#[template(path = "agent_form.html")]
struct AgentFormPage {
    layout: Layout,
    /// True for New agent, false for an existing agent's page.
    creating: bool,
    agent: AgentFields,
    error: Option<String>,
}

async fn new(Extension(who): Extension<SignedIn>) -> Response {
    page(&AgentFormPage {
        layout: Layout::new("New agent", &who),
        creating: true,
        agent: AgentFields {
            kind: "echo".into(),
            ..AgentFields::default()
        },
        error: None,
    })
}

/// The agent form as posted. Empty secret fields mean "keep".
#[derive(Deserialize)]
struct AgentForm {
    #[serde(default)]
    agent_id: String,
    name: String,
    backend: String,
    #[serde(default)]
    base_url: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    api_key: String,
    #[serde(default)]
    system_prompt: String,
    #[serde(default)]
    webhook_url: String,
    #[serde(default)]
    secret: String,
}

fn non_empty(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

pub(super) fn secret(s: &str) -> Option<SecretString> {
    non_empty(s).map(SecretString::from)
}

impl AgentForm {
    fn request(&self) -> Result<AgentRequest, ApiError> {
        let backend = match self.backend.as_str() {
            "echo" => BackendRequest::Echo {},
            "openai" => BackendRequest::Openai {
                base_url: self.base_url.trim().to_owned(),
                model: self.model.trim().to_owned(),
                api_key: secret(&self.api_key),
                system_prompt: non_empty(&self.system_prompt),
                timeout_ms: None,
                transcription_model: wagate_core::agent::default_transcription_model(),
                tools: wagate_core::agent::default_tools(),
            },
            "webhook" => BackendRequest::Webhook {
                url: self.webhook_url.trim().to_owned(),
                secret: secret(&self.secret),
                timeout_ms: None,
                transcription: None,
            },
            _ => return Err(ApiError::invalid("choose a backend")),
        };
        Ok(AgentRequest {
            name: non_empty(&self.name),
            backend,
            handoff_resume_after_s: None,
            retention_days: None,
            history_turns: None,
            history_tokens: None,
            typing_indicator: None,
            events_url: None,
            events_secret: None,
        })
    }

    /// The form shown again after an error: what was typed, without the secrets.
    fn refill(&self, id: &str) -> AgentFields {
        AgentFields {
            id: id.to_owned(),
            name: self.name.clone(),
            kind: self.backend.clone(),
            base_url: self.base_url.clone(),
            model: self.model.clone(),
            system_prompt: self.system_prompt.clone(),
            api_key_set: false,
            webhook_url: self.webhook_url.clone(),
            secret_set: false,
        }
    }
}

fn form_error(
    who: &SignedIn,
    creating: bool,
    form: &AgentForm,
    id: &str,
    e: &ApiError,
) -> Response {
    let mut r = page(&AgentFormPage {
        layout: Layout::new(if creating { "New agent" } else { id }, who),
        creating,
        agent: form.refill(id),
        error: Some(e.message().to_owned()),
    });
    *r.status_mut() = e.status();
    r
}

async fn create(
    State(state): State<AppState>,
    Extension(who): Extension<SignedIn>,
    Form(form): Form<AgentForm>,
) -> Response {
    let id = form.agent_id.trim().to_owned();
    let result = async {
        if let Ok(parsed) = wagate_core::domain::AgentId::parse(&id)
            && state
                .store
                .agent(&parsed)
                .await
                .map_err(ApiError::unavailable)?
                .is_some()
        {
            return Err(ApiError::invalid(format!(
                "an agent '{id}' exists already: open it from the list to change it"
            )));
        }
        agents::save(&state, &id, form.request()?).await
    };
    match result.await {
        Ok(agent) => Redirect::to(&format!("/agents/{}", agent.id)).into_response(),
        Err(e) => form_error(&who, true, &form, &id, &e),
    }
}

async fn show(
    State(state): State<AppState>,
    Extension(who): Extension<SignedIn>,
    Path(raw): Path<String>,
) -> Response {
    let agent = match load_agent(&state, &raw).await {
        Ok(a) => a,
        Err(e) => return error_page(&who, &e),
    };
    let view = agents::backend_view(&agent.backend);
    let text = |k: &str| view[k].as_str().unwrap_or("").to_owned();
    let kind = text("kind");
    let fields = AgentFields {
        id: agent.id.to_string(),
        name: agent.name.clone(),
        base_url: if kind == "openai" {
            text("base_url")
        } else {
            String::new()
        },
        model: text("model"),
        system_prompt: text("system_prompt"),
        api_key_set: view["api_key_set"].as_bool().unwrap_or(false),
        webhook_url: if kind == "webhook" {
            text("url")
        } else {
            String::new()
        },
        secret_set: view["secret_set"].as_bool().unwrap_or(false),
        kind,
    };
    page(&AgentFormPage {
        layout: Layout::new(agent.id.to_string(), &who),
        creating: false,
        agent: fields,
        error: None,
    })
}

async fn update(
    State(state): State<AppState>,
    Extension(who): Extension<SignedIn>,
    Path(raw): Path<String>,
    Form(form): Form<AgentForm>,
) -> Response {
    let result = async {
        load_agent(&state, &raw).await?;
        agents::save(&state, &raw, form.request()?).await
    };
    match result.await {
        Ok(agent) => Redirect::to(&format!("/agents/{}", agent.id)).into_response(),
        Err(e) => form_error(&who, false, &form, &raw, &e),
    }
}
