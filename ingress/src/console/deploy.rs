//! Deploy: an agent's WhatsApp channel on Twilio (Save & Enable, Disable, through the API's
//! own functions), the URLs to paste into Twilio, the steps for the sandbox and a production
//! number, and the channel's health as far as wagate can see it: the last message received,
//! the last failed send with Twilio's code, and the last webhook refused for its signature.

use askama::Template;
use axum::{
    Extension, Form, Router,
    extract::{Path, State},
    http::HeaderMap,
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use serde::Deserialize;
use wagate_core::envelope::Stage;

use super::{
    Layout, SignedIn,
    agents::{channel_state, secret},
    error_page, page, shown_time,
};
use crate::{
    AppState,
    admin::{ApiError, dead_letters, load_agent, whatsapp},
};

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/agents/{agent_id}/deploy", get(deploy).post(save_deploy))
        .route("/agents/{agent_id}/deploy/disable", post(disable))
}

/// The channel's latest trouble that wagate can see: the newest failed send of this agent
/// (a dead letter at the send stage).
struct SendError {
    at: String,
    reason: String,
    code: Option<u32>,
}

#[derive(Template)]
#[template(path = "deploy.html")]
struct DeployPage {
    layout: Layout,
    agent_id: String,
    account_sid: String,
    phone_number: String,
    /// Messages per second: the channel's rate in effect, or what was typed.
    mps: String,
    /// Whether a long reply's parts wait for each other: the channel's, or what was ticked.
    ordered_parts: bool,
    token_set: bool,
    status: &'static str,
    webhook_url: String,
    status_callback_url: String,
    last_inbound: Option<String>,
    last_send_error: Option<SendError>,
    last_signature_failure: Option<(String, String)>,
    error: Option<String>,
}

/// What a refused signature most likely means: Twilio called another URL than the one shown
/// (a proxy, or `WAGATE_PUBLIC_URL` unset or wrong), or else the Auth Token is not the
/// account's.
fn likely_cause(signed_url: &str, webhook_url: &str) -> String {
    let shown = webhook_url.split('#').next().unwrap_or(webhook_url);
    if signed_url == shown {
        "the Auth Token saved here is not the account's current one (it changes when it is rotated in the Twilio Console): enter it again".to_owned()
    } else {
        format!(
            "the signature was checked against {signed_url}, but the webhook URL is {shown}: set WAGATE_PUBLIC_URL to the public address that Twilio calls"
        )
    }
}

async fn deploy_page(
    state: &AppState,
    who: &SignedIn,
    raw: &str,
    headers: &HeaderMap,
    typed: Option<(&DeployForm, String)>,
) -> Result<Response, ApiError> {
    let agent = load_agent(state, raw).await?;
    let channel = state
        .store
        .channel(&agent.id)
        .await
        .map_err(ApiError::unavailable)?;
    let host = whatsapp::host(headers);
    // The URLs to paste into Twilio, the same whether or not a channel exists yet.
    let (webhook_url, status_callback_url) = whatsapp::webhook_urls(state, &agent.id, host);
    let real = channel.as_ref().filter(|c| !c.simulation);
    let (_, leads) = crate::admin::leads::of_agent(state, raw).await?;
    let last_inbound = leads.iter().map(|l| l.last_seen).max().map(shown_time);
    let filter = dead_letters::Filter::default();
    let last_send_error = dead_letters::matching(state, &filter)
        .await?
        .into_iter()
        .filter(|d| d.agent_id == agent.id && d.stage == Stage::Send)
        .max_by_key(|d| d.failed_at)
        .map(|d| SendError {
            at: shown_time(d.failed_at),
            reason: d.reason,
            code: d.code,
        });
    let last_signature_failure = state
        .store
        .signature_failure(&agent.id)
        .await
        .map_err(ApiError::unavailable)?
        .map(|f| (shown_time(f.at), likely_cause(&f.signed_url, &webhook_url)));
    let (account_sid, phone_number, mps, ordered_parts, error) = match typed {
        Some((form, error)) => (
            form.account_sid.clone(),
            form.phone_number.clone(),
            form.mps.clone(),
            form.ordered_parts.is_some(),
            Some(error),
        ),
        None => (
            real.map(|c| c.account_sid.to_string()).unwrap_or_default(),
            real.map(|c| c.phone_number.to_string()).unwrap_or_default(),
            real.map(|c| c.mps(state.sandbox_mps).to_string())
                .unwrap_or_default(),
            channel.as_ref().is_none_or(|c| c.ordered_parts),
            None,
        ),
    };
    Ok(page(&DeployPage {
        layout: Layout::new(format!("Deploy {}", agent.id), who),
        agent_id: agent.id.to_string(),
        account_sid,
        phone_number,
        mps,
        ordered_parts,
        token_set: real.is_some(),
        status: channel_state(channel.as_ref()),
        webhook_url,
        status_callback_url,
        last_inbound,
        last_send_error,
        last_signature_failure,
        error,
    }))
}

async fn deploy(
    State(state): State<AppState>,
    Extension(who): Extension<SignedIn>,
    Path(raw): Path<String>,
    headers: HeaderMap,
) -> Response {
    deploy_page(&state, &who, &raw, &headers, None)
        .await
        .unwrap_or_else(|e| error_page(&who, &e))
}

/// The Deploy form. An empty Auth Token keeps the stored one (for the same account), and empty
/// messages per second the stored rate (or the default). A browser sends a checkbox only when
/// it is ticked, so `ordered_parts` absent means off.
#[derive(Deserialize)]
struct DeployForm {
    account_sid: String,
    #[serde(default)]
    auth_token: String,
    phone_number: String,
    #[serde(default)]
    mps: String,
    ordered_parts: Option<String>,
}

/// Save & Enable: stores the channel, enabled and posting to Twilio (out of simulation).
async fn save_deploy(
    State(state): State<AppState>,
    Extension(who): Extension<SignedIn>,
    Path(raw): Path<String>,
    headers: HeaderMap,
    Form(form): Form<DeployForm>,
) -> Response {
    let mut request = whatsapp::ChannelRequest::basic(
        form.account_sid.trim().to_owned(),
        secret(&form.auth_token),
        form.phone_number.trim().to_owned(),
        false,
    );
    request.ordered_parts = Some(form.ordered_parts.is_some());
    let saved = match form.mps.trim() {
        "" => Ok(()),
        typed => typed
            .parse::<f64>()
            .map(|mps| request.mps = Some(mps))
            .map_err(|_| {
                ApiError::invalid("messages per second must be a number, such as 80 or 0.5")
            }),
    };
    let saved = match saved {
        Ok(()) => whatsapp::save(&state, &raw, request, whatsapp::host(&headers)).await,
        Err(e) => Err(e),
    };
    match saved {
        Ok(_) => Redirect::to(&format!("/agents/{raw}/deploy")).into_response(),
        Err(e) => {
            let status = e.status();
            let shown = deploy_page(
                &state,
                &who,
                &raw,
                &headers,
                Some((&form, e.message().to_owned())),
            )
            .await;
            let mut r = shown.unwrap_or_else(|e| error_page(&who, &e));
            *r.status_mut() = status;
            r
        }
    }
}

async fn disable(
    State(state): State<AppState>,
    Extension(who): Extension<SignedIn>,
    Path(raw): Path<String>,
    headers: HeaderMap,
) -> Response {
    match whatsapp::set_enabled(&state, &raw, whatsapp::host(&headers), false).await {
        Ok(_) => Redirect::to(&format!("/agents/{raw}/deploy")).into_response(),
        Err(e) => error_page(&who, &e),
    }
}
