//! `PUT/GET /v1/agents/{agent_id}/whatsapp`, `POST …/enable`, `POST …/disable`: the agent's
//! Twilio WhatsApp deployment, and the webhook URL to paste into Twilio.

use axum::{
    Json,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, header},
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;
use wagate_core::{
    agent::{Consent, WhatsAppChannel},
    crypto::SecretPurpose,
    domain::{AccountSid, AgentId, PhoneNumber},
    window::{self, Keyword, MAX_KEYWORD_CHARS},
};

use super::{AgentPath, ApiError, ErrorBody, load_agent, parse_json};
use crate::AppState;

/// What `PUT /v1/agents/{agent_id}/whatsapp` (and the console's Deploy form) asks for. An Auth
/// Token left out keeps the one stored for the same account.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChannelRequest {
    /// `AC` and 32 hex digits.
    #[schema(pattern = r"^\s*AC[0-9a-fA-F]{32}\s*$")]
    pub(crate) account_sid: String,
    /// The account's Auth Token; left out: the one stored for the same account.
    #[schema(value_type = Option<String>, format = Password, pattern = r"^\s*[!-~]{16,256}\s*$")]
    pub(crate) auth_token: Option<SecretString>,
    /// The WhatsApp sender's number, in E.164.
    #[schema(pattern = r"^(whatsapp:)?\+[1-9][0-9]{1,14}$")]
    pub(crate) phone_number: String,
    pub(crate) enabled: Option<bool>,
    pub(crate) simulation: Option<bool>,
    /// The opt-out settings: each left out keeps what was stored before (Twilio's defaults
    /// at first).
    pub(crate) optout_keywords: Option<Vec<String>>,
    pub(crate) optin_keywords: Option<Vec<String>>,
    pub(crate) optout_reply: Option<String>,
    pub(crate) optin_reply: Option<String>,
    /// The Sandbox's join words (`join <words>` or just the words); left out keeps what was
    /// stored, `""` removes it.
    pub(crate) sandbox_join_code: Option<String>,
    /// `MG` and 32 hex digits; left out keeps what was stored, `""` removes it.
    pub(crate) messaging_service_sid: Option<String>,
    /// Messages per second of this sender; left out keeps what was stored (at first the
    /// default: 80, or the Sandbox's rate on its number).
    pub(crate) mps: Option<f64>,
    /// Whether a long reply's next part waits for Twilio to report the previous one sent;
    /// left out keeps what was stored (at first on).
    pub(crate) ordered_parts: Option<bool>,
}

/// A rate as given: a number of messages per second within what a channel may set.
fn rate(mps: f64) -> Result<f64, ApiError> {
    use wagate_core::agent::{MAX_MPS, MIN_MPS};
    if (MIN_MPS..=MAX_MPS).contains(&mps) {
        Ok(mps)
    } else {
        Err(ApiError::invalid(format!(
            "mps is messages per second, from {MIN_MPS:.4} (one a minute) to {MAX_MPS}"
        )))
    }
}

/// A Messaging Service sid as given, or `None` for an empty one.
fn service_sid(raw: &str) -> Result<Option<String>, ApiError> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(None);
    }
    let fine =
        raw.len() == 34 && raw.starts_with("MG") && raw[2..].chars().all(|c| c.is_ascii_hexdigit());
    if !fine {
        return Err(ApiError::invalid(
            "messaging_service_sid is MG and 32 hex digits (Twilio Console, Messaging, Services)",
        ));
    }
    Ok(Some(raw.to_owned()))
}

/// The words of a Sandbox join code as given (`join ancient-pencil`, or `ancient-pencil`), or
/// `None` for an empty one.
fn join_words(raw: &str) -> Result<Option<String>, ApiError> {
    let raw = raw.trim();
    let words = raw
        .strip_prefix("join ")
        .or_else(|| raw.strip_prefix("JOIN "))
        .unwrap_or(raw)
        .trim();
    if words.is_empty() {
        return Ok(None);
    }
    let fine = words.len() <= 64
        && words
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == ' ');
    if !fine {
        return Err(ApiError::invalid(
            "sandbox_join_code is the Sandbox's words, as \"join ancient-pencil\" (letters, digits and hyphens)",
        ));
    }
    Ok(Some(words.to_owned()))
}

/// Most keywords of each kind a channel may have.
const MAX_KEYWORDS: usize = 20;

impl ChannelRequest {
    /// A request for the channel's account, number and switches, every other setting left
    /// as stored: what the console's forms ask.
    pub(crate) fn basic(
        account_sid: String,
        auth_token: Option<SecretString>,
        phone_number: String,
        simulation: bool,
    ) -> Self {
        Self {
            account_sid,
            auth_token,
            phone_number,
            enabled: Some(true),
            simulation: Some(simulation),
            optout_keywords: None,
            optin_keywords: None,
            optout_reply: None,
            optin_reply: None,
            sandbox_join_code: None,
            messaging_service_sid: None,
            mps: None,
            ordered_parts: None,
        }
    }

    /// The opt-out settings to store: what was asked over what was stored, checked.
    fn consent(&mut self, stored: Consent) -> Result<Consent, ApiError> {
        let keywords = |field: &str, words: Option<Vec<String>>| {
            words
                .map(|words| {
                    if words.len() > MAX_KEYWORDS {
                        return Err(ApiError::invalid(format!(
                            "{field} takes at most {MAX_KEYWORDS} words"
                        )));
                    }
                    words
                        .into_iter()
                        .map(|w| {
                            let w = w.trim().to_owned();
                            let fine = !w.is_empty()
                                && w.chars().count() <= MAX_KEYWORD_CHARS
                                && w.chars().all(char::is_alphanumeric);
                            fine.then_some(w).ok_or_else(|| {
                                ApiError::invalid(format!(
                                    "{field}: each keyword is one word of 1-{MAX_KEYWORD_CHARS} letters or digits"
                                ))
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()
        };
        let reply = |field: &str, text: Option<String>| match text {
            Some(t) if t.chars().count() > 1600 => Err(ApiError::invalid(format!(
                "{field} is at most 1600 characters (empty: no confirmation)"
            ))),
            other => Ok(other),
        };
        let consent = Consent {
            optout_keywords: keywords("optout_keywords", self.optout_keywords.take())?
                .or(stored.optout_keywords),
            optin_keywords: keywords("optin_keywords", self.optin_keywords.take())?
                .or(stored.optin_keywords),
            optout_reply: reply("optout_reply", self.optout_reply.take())?.or(stored.optout_reply),
            optin_reply: reply("optin_reply", self.optin_reply.take())?.or(stored.optin_reply),
        };
        let optout = window::optout_keywords(&consent);
        if let Some(both) = window::optin_keywords(&consent)
            .into_iter()
            .find(|w| optout.iter().any(|o| o.eq_ignore_ascii_case(w)))
        {
            return Err(ApiError::invalid(format!(
                "{both} cannot both opt out and opt in"
            )));
        }
        Ok(consent)
    }
}

/// A channel's opt-out settings as the API shows them: the ones in effect.
#[derive(Serialize, ToSchema)]
pub struct ConsentView {
    optout_keywords: Vec<String>,
    optin_keywords: Vec<String>,
    optout_reply: String,
    optin_reply: String,
}

impl ConsentView {
    fn new(consent: &Consent) -> Self {
        let owned = |words: Vec<&str>| words.into_iter().map(str::to_owned).collect();
        Self {
            optout_keywords: owned(window::optout_keywords(consent)),
            optin_keywords: owned(window::optin_keywords(consent)),
            optout_reply: Keyword::OptOut
                .confirmation(consent)
                .unwrap_or_default()
                .to_owned(),
            optin_reply: Keyword::OptIn
                .confirmation(consent)
                .unwrap_or_default()
                .to_owned(),
        }
    }
}

/// Twilio's connection overrides, as a URL fragment (Twilio does not sign it): retry up to 3
/// times on connection failures, timeouts and 5xx answers (ingress answers 503 when it cannot
/// keep a message), instead of Twilio's default of one retry on connection failures only.
/// 4xx answers are final and not retried.
pub const TWILIO_RETRIES: &str = "#rc=3&rp=ct,rt,5xx";

/// A channel as the API shows it: never the token.
#[derive(Serialize, ToSchema)]
pub struct ChannelView {
    pub(crate) enabled: bool,
    #[schema(value_type = String)]
    pub(crate) account_sid: AccountSid,
    #[schema(value_type = String)]
    pub(crate) phone_number: PhoneNumber,
    pub(crate) webhook_url: String,
    pub(crate) status_callback_url: String,
    pub(crate) simulation: bool,
    #[serde(flatten)]
    pub(crate) consent: ConsentView,
    /// On the Twilio Sandbox's number.
    pub(crate) sandbox: bool,
    pub(crate) sandbox_join_code: Option<String>,
    pub(crate) messaging_service_sid: Option<String>,
    /// The messages per second it sends at (its own, or the default in effect).
    pub(crate) mps: f64,
    /// Whether a long reply's next part waits for Twilio to report the previous one sent.
    pub(crate) ordered_parts: bool,
    /// The channel's last sends that failed for good (the channel's own answers only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) last_errors: Option<Vec<ChannelError>>,
}

/// A send of the channel that failed for good: one of its dead letters, as the channel's
/// answer shows it (the reason says what to do, from `twilio::rest::advice`).
#[derive(Serialize, ToSchema)]
pub struct ChannelError {
    #[serde(with = "time::serde::rfc3339")]
    at: OffsetDateTime,
    code: Option<u32>,
    reason: String,
    phone: String,
    dead_letter_id: String,
}

/// How many of a channel's errors its answer shows.
const LAST_ERRORS: usize = 5;

/// The API's answer of a channel call: `view` with the channel's last errors.
async fn answer(
    state: &AppState,
    raw: &str,
    view: ChannelView,
) -> Result<Json<ChannelView>, ApiError> {
    let agent = load_agent(state, raw).await?;
    Ok(Json(with_last_errors(state, &agent.id, view).await?))
}

/// `view` with the agent's last errors: its newest send-stage dead letters.
async fn with_last_errors(
    state: &AppState,
    agent: &AgentId,
    mut view: ChannelView,
) -> Result<ChannelView, ApiError> {
    let filter = super::dead_letters::Filter::default();
    let mut letters: Vec<_> = super::dead_letters::matching(state, &filter)
        .await?
        .into_iter()
        .filter(|d| &d.agent_id == agent && d.stage == wagate_core::envelope::Stage::Send)
        .collect();
    letters.sort_by_key(|d| std::cmp::Reverse(d.failed_at));
    view.last_errors = Some(
        letters
            .into_iter()
            .take(LAST_ERRORS)
            .filter_map(|d| {
                let phone = match &d.message {
                    wagate_core::envelope::DeadMessage::Reply(r) => r.to.user().to_owned(),
                    _ => return None,
                };
                Some(ChannelError {
                    at: d.failed_at,
                    code: d.code,
                    reason: d.reason,
                    phone,
                    dead_letter_id: d.id,
                })
            })
            .collect(),
    );
    Ok(view)
}

impl ChannelView {
    /// The view of `channel`; `host` is the Host of the admin request, used for the webhook URL
    /// only when no public URL is configured.
    pub fn new(
        state: &AppState,
        id: &AgentId,
        channel: &WhatsAppChannel,
        host: Option<&str>,
    ) -> Self {
        let (webhook_url, status_callback_url) = webhook_urls(state, id, host);
        Self {
            enabled: channel.enabled,
            account_sid: channel.account_sid.clone(),
            phone_number: channel.phone_number.clone(),
            webhook_url,
            status_callback_url,
            simulation: channel.simulation,
            consent: ConsentView::new(&channel.consent),
            sandbox: channel.is_sandbox(),
            sandbox_join_code: channel.sandbox_join_code.clone(),
            messaging_service_sid: channel.messaging_service_sid.clone(),
            mps: channel.mps(state.sandbox_mps),
            ordered_parts: channel.ordered_parts,
            last_errors: None,
        }
    }
}

/// The agent's webhook URL (with Twilio's retry overrides) and status callback URL, to paste
/// into Twilio; `host` as in [`ChannelView::new`].
pub(crate) fn webhook_urls(state: &AppState, id: &AgentId, host: Option<&str>) -> (String, String) {
    let base = webhook_base(state, host);
    (
        format!("{base}/webhooks/twilio/whatsapp/{id}{TWILIO_RETRIES}"),
        format!("{base}/webhooks/twilio/whatsapp/{id}/status"),
    )
}

fn webhook_base(state: &AppState, host: Option<&str>) -> String {
    if let Some(public) = &state.public_url {
        return public.to_string();
    }
    let hostname = host
        .and_then(|h| h.rsplit_once(':').map_or(Some(h), |(name, _)| Some(name)))
        .filter(|h| !h.is_empty())
        .unwrap_or("127.0.0.1");
    format!("http://{hostname}:{}", state.webhook_port)
}

/// The Host of an admin request.
pub(crate) fn host(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::HOST).and_then(|v| v.to_str().ok())
}

/// A user's or sender's number as given (`whatsapp:` prefix allowed).
pub(crate) fn parse_phone(raw: &str) -> Result<PhoneNumber, ApiError> {
    let raw = raw.strip_prefix("whatsapp:").unwrap_or(raw);
    PhoneNumber::parse(raw).map_err(|e| ApiError::invalid(format!("phone_number: {}", e.0)))
}

/// Deploy an agent on WhatsApp: its Twilio account, number and settings
///
/// The answer's `webhook_url` goes into Twilio.
#[utoipa::path(
    put,
    path = "/v1/agents/{agent_id}/whatsapp",
    tag = "whatsapp",
    operation_id = "put_channel",
    params(AgentPath),
    request_body = ChannelRequest,
    responses(
        (status = 200, description = "The channel as stored", body = ChannelView),
        (status = 404, description = "Unknown agent", body = ErrorBody),
        (status = 422, description = "A value that is not acceptable", body = ErrorBody),
    ),
)]
pub async fn put(
    State(state): State<AppState>,
    Path(AgentPath { agent_id: raw }): Path<AgentPath>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<ChannelView>, ApiError> {
    let req: ChannelRequest = parse_json(&body)?;
    let view = save(&state, &raw, req, host(&headers)).await?;
    answer(&state, &raw, view).await
}

/// Validates and stores an agent's channel, sealing the Auth Token: what the API's `PUT` and
/// the console's Deploy form both do.
pub(crate) async fn save(
    state: &AppState,
    raw: &str,
    mut req: ChannelRequest,
    host: Option<&str>,
) -> Result<ChannelView, ApiError> {
    let agent = load_agent(state, raw).await?;
    let account_sid =
        AccountSid::parse(req.account_sid.trim()).map_err(|e| ApiError::invalid(e.0))?;
    let phone_number = parse_phone(&req.phone_number)?;
    let existing = state
        .store
        .channel(&agent.id)
        .await
        .map_err(ApiError::unavailable)?;
    let consent = req.consent(
        existing
            .as_ref()
            .map(|c| c.consent.clone())
            .unwrap_or_default(),
    )?;
    let auth_token = match (req.auth_token, &existing) {
        (Some(t), _) => {
            let t = t.expose_secret().trim();
            if t.len() < 16 || t.len() > 256 || !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ApiError::invalid(
                    "auth_token must be the account's Auth Token (32 characters, from the Twilio Console)",
                ));
            }
            state.keyring.seal(
                &agent.id,
                SecretPurpose::TwilioAuthToken,
                &SecretString::from(t.to_owned()),
            )
        }
        (None, Some(c)) if c.account_sid == account_sid => c.auth_token.clone(),
        (None, _) => return Err(ApiError::invalid("auth_token is required")),
    };
    let channel = WhatsAppChannel {
        account_sid,
        auth_token,
        phone_number,
        simulation: req
            .simulation
            .or(existing.as_ref().map(|c| c.simulation))
            .unwrap_or(false),
        enabled: req
            .enabled
            .or(existing.as_ref().map(|c| c.enabled))
            .unwrap_or(true),
        consent,
        sandbox_join_code: match req.sandbox_join_code.as_deref() {
            Some(raw) => join_words(raw)?,
            None => existing.as_ref().and_then(|c| c.sandbox_join_code.clone()),
        },
        messaging_service_sid: match req.messaging_service_sid.as_deref() {
            Some(raw) => service_sid(raw)?,
            None => existing
                .as_ref()
                .and_then(|c| c.messaging_service_sid.clone()),
        },
        mps: match req.mps {
            Some(mps) => Some(rate(mps)?),
            None => existing.as_ref().and_then(|c| c.mps),
        },
        ordered_parts: req
            .ordered_parts
            .or(existing.as_ref().map(|c| c.ordered_parts))
            .unwrap_or(true),
        updated_at: OffsetDateTime::now_utc(),
    };
    state
        .store
        .put_channel(&agent.id, &channel)
        .await
        .map_err(ApiError::unavailable)?;
    state.directory.forget(&agent.id);
    tracing::info!(agent = %agent.id, enabled = channel.enabled, "WhatsApp channel saved");
    Ok(ChannelView::new(state, &agent.id, &channel, host))
}

/// An agent's WhatsApp channel
#[utoipa::path(
    get,
    path = "/v1/agents/{agent_id}/whatsapp",
    tag = "whatsapp",
    operation_id = "get_channel",
    params(AgentPath),
    responses(
        (status = 200, description = "The channel", body = ChannelView),
        (status = 404, description = "Unknown agent, or no channel yet", body = ErrorBody),
    ),
)]
pub async fn get(
    State(state): State<AppState>,
    Path(AgentPath { agent_id: raw }): Path<AgentPath>,
    headers: HeaderMap,
) -> Result<Json<ChannelView>, ApiError> {
    let agent = load_agent(&state, &raw).await?;
    let channel = existing_channel(&state, &agent.id).await?;
    let view = ChannelView::new(&state, &agent.id, &channel, host(&headers));
    Ok(Json(with_last_errors(&state, &agent.id, view).await?))
}

/// The agent's channel, or the 404 that tells the caller to set one up first.
pub(crate) async fn existing_channel(
    state: &AppState,
    agent: &AgentId,
) -> Result<WhatsAppChannel, ApiError> {
    state
        .store
        .channel(agent)
        .await
        .map_err(ApiError::unavailable)?
        .ok_or_else(|| {
            ApiError::not_found(
                "this agent has no WhatsApp channel: PUT /v1/agents/{agent_id}/whatsapp first",
            )
        })
}

/// Switches an agent's channel on or off: the API's enable/disable and the console's Disable.
pub(crate) async fn set_enabled(
    state: &AppState,
    raw: &str,
    host: Option<&str>,
    enabled: bool,
) -> Result<ChannelView, ApiError> {
    let agent = load_agent(state, raw).await?;
    let mut channel = existing_channel(state, &agent.id).await?;
    channel.enabled = enabled;
    channel.updated_at = OffsetDateTime::now_utc();
    state
        .store
        .put_channel(&agent.id, &channel)
        .await
        .map_err(ApiError::unavailable)?;
    state.directory.forget(&agent.id);
    tracing::info!(agent = %agent.id, enabled, "WhatsApp channel switched");
    Ok(ChannelView::new(state, &agent.id, &channel, host))
}

/// Switch an agent's channel on
#[utoipa::path(
    post,
    path = "/v1/agents/{agent_id}/whatsapp/enable",
    tag = "whatsapp",
    operation_id = "enable_channel",
    params(AgentPath),
    responses(
        (status = 200, description = "The channel", body = ChannelView),
        (status = 404, description = "Unknown agent, or no channel yet", body = ErrorBody),
    ),
)]
pub async fn enable(
    State(state): State<AppState>,
    Path(AgentPath { agent_id: raw }): Path<AgentPath>,
    headers: HeaderMap,
) -> Result<Json<ChannelView>, ApiError> {
    let view = set_enabled(&state, &raw, host(&headers), true).await?;
    answer(&state, &raw, view).await
}

/// Switch an agent's channel off: its webhook answers 403 until it is enabled again
#[utoipa::path(
    post,
    path = "/v1/agents/{agent_id}/whatsapp/disable",
    tag = "whatsapp",
    operation_id = "disable_channel",
    params(AgentPath),
    responses(
        (status = 200, description = "The channel", body = ChannelView),
        (status = 404, description = "Unknown agent, or no channel yet", body = ErrorBody),
    ),
)]
pub async fn disable(
    State(state): State<AppState>,
    Path(AgentPath { agent_id: raw }): Path<AgentPath>,
    headers: HeaderMap,
) -> Result<Json<ChannelView>, ApiError> {
    let view = set_enabled(&state, &raw, host(&headers), false).await?;
    answer(&state, &raw, view).await
}
