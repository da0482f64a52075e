//! `PUT/GET /v1/agents/{agent_id}`, `GET /v1/agents`.

use axum::{
    Json,
    body::Bytes,
    extract::{Path, Query, State},
};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use time::OffsetDateTime;
use utoipa::ToSchema;
use wagate_core::{
    agent::{Agent, Backend, EventsEndpoint},
    crypto::{SealedSecret, SecretPurpose},
    domain::AgentId,
    redact,
};

use super::{
    AgentPath, ApiError, ErrorBody, load_agent,
    page::{List, Page, PageQuery},
    parse_json,
};
use crate::AppState;

mod view;

pub use view::AgentView;
pub(crate) use view::backend_view;
use view::view;

/// What `PUT /v1/agents/{agent_id}` (and the console's agent form) asks for. A secret left out
/// keeps the one stored before.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AgentRequest {
    /// 1-200 characters; left out: what was stored before, else the id.
    #[schema(min_length = 1, max_length = 200)]
    pub(crate) name: Option<String>,
    pub(crate) backend: BackendRequest,
    /// Seconds a paused conversation waits for its person (1 to 2592000). Left out: what was
    /// stored before, else a day.
    #[schema(minimum = 1, maximum = 2_592_000)]
    pub(crate) handoff_resume_after_s: Option<u64>,
    /// Days a conversation's turns are kept (1 to 3650). Left out: what was stored before,
    /// else 90.
    #[schema(minimum = 1, maximum = 3650)]
    pub(crate) retention_days: Option<u32>,
    /// Left out: what was stored before (at first, the process's default); `0`: back to it.
    #[schema(maximum = 10_000)]
    pub(crate) history_turns: Option<u32>,
    /// Left out: what was stored before (at first, none); `0`: none.
    #[schema(maximum = 10_000_000)]
    pub(crate) history_tokens: Option<u32>,
    /// Left out: what was stored before, else on.
    pub(crate) typing_indicator: Option<bool>,
    /// The event webhook: left out keeps it, `""` removes it. A new URL needs
    /// `events_secret`; a secret left out keeps the one stored.
    #[schema(pattern = r"^$|^https?://", max_length = 2048)]
    pub(crate) events_url: Option<String>,
    /// A Standard Webhooks secret: `whsec_` and the base64 of 24-64 random bytes.
    #[schema(value_type = Option<String>, format = Password, pattern = r"^\s*whsec_")]
    pub(crate) events_secret: Option<SecretString>,
}

/// The longest a handed-off conversation may wait for its person: a month.
const MAX_HANDOFF_RESUME_AFTER_S: u64 = 30 * 86_400;

/// The backend part of an agent's `PUT`: its `kind` and that kind's settings.
#[derive(Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum BackendRequest {
    // A struct variant, so that `deny_unknown_fields` refuses `{"kind": "echo", "x": 1}` too.
    Echo {},
    Openai {
        /// The OpenAI-compatible API's base, e.g. `https://api.openai.com/v1`.
        #[schema(pattern = r"^https?://", max_length = 2048)]
        base_url: String,
        model: String,
        /// Left out: the one stored before.
        #[schema(value_type = Option<String>, format = Password)]
        api_key: Option<SecretString>,
        system_prompt: Option<String>,
        #[schema(minimum = 100, maximum = 600_000)]
        timeout_ms: Option<u64>,
        /// Left out: `whisper-1`; `null`: no transcription.
        #[serde(default = "wagate_core::agent::default_transcription_model")]
        transcription_model: Option<String>,
        /// Left out: on.
        #[serde(default = "wagate_core::agent::default_tools")]
        tools: bool,
    },
    Webhook {
        #[schema(pattern = r"^https?://", max_length = 2048)]
        url: String,
        /// At least 16 bytes; needed at first, left out later: the one stored before.
        #[schema(value_type = Option<String>, format = Password)]
        secret: Option<SecretString>,
        #[schema(minimum = 100, maximum = 600_000)]
        timeout_ms: Option<u64>,
        /// Left out: kept as stored; `null`: none.
        #[serde(default, deserialize_with = "present")]
        #[schema(value_type = Option<TranscriberRequest>)]
        transcription: Option<Option<TranscriberRequest>>,
    },
}

/// A webhook agent's transcription endpoint as asked for; an `api_key` left out keeps the one
/// stored.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TranscriberRequest {
    #[schema(pattern = r"^https?://", max_length = 2048)]
    base_url: String,
    #[serde(default = "whisper")]
    model: String,
    #[schema(value_type = Option<String>, format = Password)]
    api_key: Option<SecretString>,
}

fn whisper() -> String {
    "whisper-1".to_owned()
}

/// A field that was given, `null` included (`Some(None)`), told apart from one left out
/// (`None`, through `#[serde(default)]`).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

fn check_url(field: &str, url: &str) -> Result<(), ApiError> {
    let ok = (url.starts_with("https://") || url.starts_with("http://"))
        && url.len() <= 2048
        && !url.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!("{field} must be an http(s) URL")))
    }
}

/// An agent URL as stored: without its `user:password`, which is sealed on its own so that it
/// is encrypted at rest and never shown back (the views show `***` in its place). A URL given
/// back with `***` as its userinfo keeps the credentials stored before.
fn seal_credentials(
    state: &AppState,
    id: &AgentId,
    url: &str,
    previous: Option<&SealedSecret>,
) -> Result<(String, Option<SealedSecret>), ApiError> {
    let (bare, userinfo) = redact::split_userinfo(url);
    let sealed = match userinfo {
        None => None,
        Some(u) if u.expose_secret() == redact::MASK => {
            Some(previous.cloned().ok_or_else(|| {
                ApiError::invalid("the URL's *** stands for stored credentials, and there are none")
            })?)
        }
        Some(u) => Some(state.keyring.seal(id, SecretPurpose::UrlCredentials, &u)),
    };
    Ok((bare, sealed))
}

/// The agent's event webhook after a save: `url` and `secret` as asked over `stored`. A
/// secret is a Standard Webhooks one: `whsec_` and the base64 of 24 to 64 random bytes.
fn events_endpoint(
    state: &AppState,
    id: &AgentId,
    url: Option<String>,
    secret: Option<SecretString>,
    stored: Option<EventsEndpoint>,
) -> Result<Option<EventsEndpoint>, ApiError> {
    let secret = secret
        .map(|s| {
            match wagate_core::events::secret_key(s.expose_secret()) {
                Some(_) => Ok(state.keyring.seal(id, SecretPurpose::EventsSecret, &s)),
                None => Err(ApiError::invalid(
                    "events_secret must be a Standard Webhooks secret: whsec_ and the base64 of 24-64 random bytes",
                )),
            }
        })
        .transpose()?;
    match (url, stored) {
        (Some(url), _) if url.is_empty() => Ok(None),
        (Some(url), stored) => {
            check_url("events_url", &url)?;
            let secret = secret
                .or(stored.map(|s| s.secret))
                .ok_or_else(|| ApiError::invalid("an events_url needs an events_secret"))?;
            Ok(Some(EventsEndpoint { url, secret }))
        }
        (None, Some(stored)) => Ok(Some(EventsEndpoint {
            secret: secret.unwrap_or(stored.secret),
            url: stored.url,
        })),
        (None, None) if secret.is_some() => Err(ApiError::invalid(
            "an events_secret goes with an events_url",
        )),
        (None, None) => Ok(None),
    }
}

fn check_timeout(t: Option<u64>) -> Result<(), ApiError> {
    match t {
        Some(ms) if !(100..=600_000).contains(&ms) => Err(ApiError::invalid(
            "timeout_ms must be between 100 and 600000",
        )),
        _ => Ok(()),
    }
}

/// Create or change an agent
///
/// A secret left out keeps the one stored before.
#[utoipa::path(
    put,
    path = "/v1/agents/{agent_id}",
    tag = "agents",
    operation_id = "put_agent",
    params(AgentPath),
    request_body = AgentRequest,
    responses(
        (status = 200, description = "The agent as stored", body = AgentView),
        (status = 422, description = "A value that is not acceptable (the id too)", body = ErrorBody),
    ),
)]
pub async fn put(
    State(state): State<AppState>,
    Path(AgentPath { agent_id: raw }): Path<AgentPath>,
    body: Bytes,
) -> Result<Json<AgentView>, ApiError> {
    let req: AgentRequest = parse_json(&body)?;
    let agent = save(&state, &raw, req).await?;
    Ok(Json(view(&state, agent).await?))
}

/// Validates and stores an agent (created or changed), sealing the secrets it is given: what
/// the API's `PUT` and the console's agent form both do.
pub(crate) async fn save(
    state: &AppState,
    raw: &str,
    req: AgentRequest,
) -> Result<Agent, ApiError> {
    let id = AgentId::parse(raw).map_err(|e| ApiError::invalid(e.0))?;
    let existing = state
        .store
        .agent(&id)
        .await
        .map_err(ApiError::unavailable)?;
    let name = req
        .name
        .or_else(|| existing.as_ref().map(|a| a.name.clone()))
        .unwrap_or_else(|| id.to_string());
    if name.trim().is_empty() || name.chars().count() > 200 {
        return Err(ApiError::invalid("name must be 1-200 characters"));
    }
    let handoff_resume_after_s = match req.handoff_resume_after_s {
        Some(s) if !(1..=MAX_HANDOFF_RESUME_AFTER_S).contains(&s) => {
            return Err(ApiError::invalid(format!(
                "handoff_resume_after_s must be between 1 and {MAX_HANDOFF_RESUME_AFTER_S} (30 days)"
            )));
        }
        Some(s) => s,
        None => existing
            .as_ref()
            .map_or_else(wagate_core::agent::default_handoff_resume_after_s, |a| {
                a.handoff_resume_after_s
            }),
    };
    let retention_days = match req.retention_days {
        Some(d) if !(1..=3650).contains(&d) => {
            return Err(ApiError::invalid(
                "retention_days must be between 1 and 3650",
            ));
        }
        Some(d) => d,
        None => existing
            .as_ref()
            .map_or_else(wagate_core::agent::default_retention_days, |a| {
                a.retention_days
            }),
    };
    let limit = |field: &str, asked: Option<u32>, stored: Option<u32>, most: u32| match asked {
        Some(0) => Ok(None),
        Some(n) if n > most => Err(ApiError::invalid(format!(
            "{field} must be at most {most} (0: no limit of the agent's own)"
        ))),
        Some(n) => Ok(Some(n)),
        None => Ok(stored),
    };
    let history_turns = limit(
        "history_turns",
        req.history_turns,
        existing.as_ref().and_then(|a| a.history_turns),
        10_000,
    )?;
    let history_tokens = limit(
        "history_tokens",
        req.history_tokens,
        existing.as_ref().and_then(|a| a.history_tokens),
        10_000_000,
    )?;
    let events = events_endpoint(
        state,
        &id,
        req.events_url,
        req.events_secret,
        existing.as_ref().and_then(|a| a.events.clone()),
    )?;
    let previous = existing.as_ref().map(|a| &a.backend);
    let backend = match req.backend {
        BackendRequest::Echo {} => Backend::Echo,
        BackendRequest::Openai {
            base_url,
            model,
            api_key,
            system_prompt,
            timeout_ms,
            transcription_model,
            tools,
        } => {
            check_url("base_url", &base_url)?;
            if model.trim().is_empty() {
                return Err(ApiError::invalid("model must not be empty"));
            }
            if transcription_model
                .as_deref()
                .is_some_and(|m| m.trim().is_empty())
            {
                return Err(ApiError::invalid(
                    "transcription_model must not be empty: give a model, or null for none",
                ));
            }
            check_timeout(timeout_ms)?;
            let api_key = match api_key {
                Some(k) => Some(state.keyring.seal(&id, SecretPurpose::AgentApiKey, &k)),
                None => match previous {
                    Some(Backend::Openai { api_key, .. }) => api_key.clone(),
                    _ => None,
                },
            };
            let before = match previous {
                Some(Backend::Openai { credentials, .. }) => credentials.as_ref(),
                _ => None,
            };
            let (base_url, credentials) = seal_credentials(state, &id, &base_url, before)?;
            if api_key.is_some() && credentials.is_some() {
                return Err(ApiError::invalid(
                    "give the endpoint either an api_key or credentials in base_url, not both: both would be sent as Authorization",
                ));
            }
            Backend::Openai {
                base_url: base_url.trim_end_matches('/').to_owned(),
                credentials,
                model,
                api_key,
                system_prompt,
                timeout_ms,
                transcription_model,
                tools,
            }
        }
        BackendRequest::Webhook {
            url,
            secret,
            timeout_ms,
            transcription,
        } => {
            check_url("url", &url)?;
            check_timeout(timeout_ms)?;
            let secret = match (secret, previous) {
                (Some(s), _) => {
                    if s.expose_secret().len() < 16 {
                        return Err(ApiError::invalid("secret must be at least 16 characters"));
                    }
                    state.keyring.seal(&id, SecretPurpose::WebhookSecret, &s)
                }
                (None, Some(Backend::Webhook { secret, .. })) => secret.clone(),
                (None, _) => return Err(ApiError::invalid("a webhook backend needs a secret")),
            };
            let before = match previous {
                Some(Backend::Webhook { credentials, .. }) => credentials.as_ref(),
                _ => None,
            };
            let (url, credentials) = seal_credentials(state, &id, &url, before)?;
            let stored = match previous {
                Some(Backend::Webhook { transcription, .. }) => transcription.clone(),
                _ => None,
            };
            let transcription = match transcription {
                None => stored,
                Some(None) => None,
                Some(Some(t)) => {
                    check_url("transcription.base_url", &t.base_url)?;
                    if t.model.trim().is_empty() {
                        return Err(ApiError::invalid("transcription.model must not be empty"));
                    }
                    let api_key = match t.api_key {
                        Some(k) => Some(state.keyring.seal(&id, SecretPurpose::AgentApiKey, &k)),
                        None => stored.and_then(|s| s.api_key),
                    };
                    Some(wagate_core::agent::Transcriber {
                        base_url: t.base_url.trim_end_matches('/').to_owned(),
                        model: t.model,
                        api_key,
                    })
                }
            };
            Backend::Webhook {
                url,
                credentials,
                secret,
                timeout_ms,
                transcription,
            }
        }
    };
    let now = OffsetDateTime::now_utc();
    let agent = Agent {
        id: id.clone(),
        name,
        backend,
        handoff_resume_after_s,
        retention_days,
        history_turns,
        history_tokens,
        typing_indicator: req
            .typing_indicator
            .or(existing.as_ref().map(|a| a.typing_indicator))
            .unwrap_or_else(wagate_core::agent::default_typing_indicator),
        events,
        created_at: existing.map_or(now, |a| a.created_at),
        updated_at: now,
    };
    state
        .store
        .put_agent(&agent)
        .await
        .map_err(ApiError::unavailable)?;
    state.directory.forget(&id);
    tracing::info!(agent = %id, "agent saved");
    Ok(agent)
}

/// An agent
#[utoipa::path(
    get,
    path = "/v1/agents/{agent_id}",
    tag = "agents",
    operation_id = "get_agent",
    params(AgentPath),
    responses(
        (status = 200, description = "The agent", body = AgentView),
        (status = 404, description = "Unknown agent", body = ErrorBody),
    ),
)]
pub async fn get(
    State(state): State<AppState>,
    Path(AgentPath { agent_id: raw }): Path<AgentPath>,
) -> Result<Json<AgentView>, ApiError> {
    let agent = load_agent(&state, &raw).await?;
    Ok(Json(view(&state, agent).await?))
}

/// Every agent, or a page of them by id
#[utoipa::path(
    get,
    path = "/v1/agents",
    tag = "agents",
    operation_id = "list_agents",
    params(PageQuery),
    responses(
        (status = 200, description = "Every agent (an array), or a page of them with `limit`", body = List<AgentView>),
    ),
)]
pub async fn list(
    State(state): State<AppState>,
    Query(q): Query<PageQuery>,
) -> Result<Json<List<AgentView>>, ApiError> {
    let request = q.request::<String>("agents")?;
    let agents = state.store.agents().await.map_err(ApiError::unavailable)?;
    let id = |a: &Agent| a.id.to_string();
    // The page is taken before the views are made: each view reads the agent's channel.
    let (agents, next_cursor) = match &request {
        Some(r) => {
            let page = r.take("agents", agents, id);
            (page.items, Some(page.next_cursor))
        }
        None => (agents, None),
    };
    let mut out = Vec::with_capacity(agents.len());
    for a in agents {
        out.push(view(&state, a).await?);
    }
    Ok(Json(match next_cursor {
        Some(next_cursor) => List::Page(Page {
            items: out,
            next_cursor,
        }),
        None => List::All(out),
    }))
}
