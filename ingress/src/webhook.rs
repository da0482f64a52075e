//! Twilio's webhooks. An inbound message is answered 200 only once JetStream (or the embedded
//! bus) has stored it: a 200 means the message is safe. The agent never runs here.

use std::time::{Duration, Instant};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, OriginalUri, Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use secrecy::ExposeSecret;
use shared::{
    directory::{Lookup, ResolvedChannel},
    events,
};
use time::OffsetDateTime;
use twilio::{
    form,
    inbound::parse_inbound,
    rest, signature,
    status::{MessageStatus, StatusUpdate, parse_status},
};
use wagate_core::{
    domain::{AgentId, WhatsAppAddress},
    envelope::{DeadLetter, InboundMessage},
    events::{Event, Kind},
};

use crate::{
    AppState,
    signed_url::{origin, signed_url},
};

/// Largest webhook body accepted; Twilio's forms are a few KiB.
pub const MAX_BODY: usize = 64 * 1024;
/// How long ingress waits for the bus to store a message before answering 503 (Twilio retries).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
const EMPTY_TWIML: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response></Response>";

/// The webhook routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/webhooks/twilio/whatsapp/{agent_id}", post(inbound))
        .route("/webhooks/twilio/whatsapp/{agent_id}/status", post(status))
        .layer(DefaultBodyLimit::max(MAX_BODY))
}

fn plain(status: StatusCode, text: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        text.into(),
    )
        .into_response()
}

fn outcome(kind: &'static str, result: &'static str) {
    metrics::counter!("wagate_webhooks_total", "kind" => kind, "outcome" => result).increment(1);
}

/// Counts a message status Twilio reported for the first time, failures by Twilio's error code
/// (a finite set Twilio documents, so the label cannot grow without bound; only Twilio's
/// signed callbacks reach here).
fn count_status(update: &StatusUpdate) {
    let code = update.error_code.map(|c| c.to_string()).unwrap_or_default();
    metrics::counter!(
        "wagate_message_status_total",
        "status" => update.status.as_str(),
        "error_code" => code
    )
    .increment(1);
}

/// What a verified webhook carries.
struct Verified {
    channel: std::sync::Arc<ResolvedChannel>,
    agent_id: AgentId,
    fields: Vec<(String, String)>,
    /// Without `WAGATE_PUBLIC_URL`: the scheme and host of the URL the signature was verified
    /// against. Twilio signed that URL, so unlike a bare `Host` header it is proof of where
    /// Twilio reaches this ingress, and status callbacks of the reply can be sent there.
    callback_base: Option<String>,
}

/// The checks both webhooks share: known agent, parseable body, valid signature.
async fn verify(
    state: &AppState,
    kind: &'static str,
    raw_agent: &str,
    headers: &HeaderMap,
    uri: &axum::http::Uri,
    body: &[u8],
) -> Result<Verified, Response> {
    let Ok(agent_id) = AgentId::parse(raw_agent) else {
        outcome(kind, "unknown_agent");
        return Err(plain(StatusCode::NOT_FOUND, "Unknown agent"));
    };
    let channel = match state.directory.lookup(&agent_id).await {
        Ok(Lookup::Found(c)) => c,
        Ok(Lookup::UnknownAgent | Lookup::NoChannel) => {
            outcome(kind, "unknown_agent");
            return Err(plain(StatusCode::NOT_FOUND, "Unknown agent"));
        }
        Err(e) => {
            tracing::error!(agent = %agent_id, error = %e, "cannot load the agent's channel");
            outcome(kind, "unavailable");
            return Err(plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "Temporarily unavailable",
            ));
        }
    };
    // Twilio's message and status webhooks are always forms; anything else is not from it.
    if !is_form(headers) {
        outcome(kind, "bad_request");
        return Err(plain(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/x-www-form-urlencoded",
        ));
    }
    let fields = form::parse(body).map_err(|e| {
        outcome(kind, "bad_request");
        plain(StatusCode::BAD_REQUEST, format!("not a form body: {e}"))
    })?;
    let Some(signature) = headers
        .get("x-twilio-signature")
        .and_then(|v| v.to_str().ok())
    else {
        tracing::warn!(agent = %agent_id, "webhook without X-Twilio-Signature");
        outcome(kind, "unauthorized");
        return Err(plain(StatusCode::UNAUTHORIZED, "Unauthorized"));
    };
    let url = signed_url(state.public_url.as_deref(), headers, uri).unwrap_or_default();
    let token = channel.auth_token.expose_secret().as_bytes();
    let valid = signature::verify_form(token, &url, &fields, signature);
    if !valid {
        tracing::warn!(
            agent = %agent_id, signed_url = %wagate_core::redact::text(&url),
            "X-Twilio-Signature does not match: check the Auth Token, and that WAGATE_PUBLIC_URL is the URL configured in Twilio"
        );
        state
            .console
            .note_signature_failure(&state.store, &agent_id, &url);
        outcome(kind, "unauthorized");
        return Err(plain(StatusCode::UNAUTHORIZED, "Unauthorized"));
    }
    let callback_base = match state.public_url {
        Some(_) => None,
        None => Some(origin(&url).to_owned()),
    };
    Ok(Verified {
        channel,
        agent_id,
        fields,
        callback_base,
    })
}

/// Why a failure reported by status callback could not be acted on (Twilio retries the
/// callback).
#[derive(Debug, thiserror::Error)]
enum ActError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Bus(#[from] bus::BusError),
}

/// What a failure reported by status callback changes: an opted-out user (21610) gets no more
/// messages until they send START; any other failure becomes a dead letter holding the part
/// that failed, so it can be replayed (after a template, or once the user wrote).
async fn act_on_failure(state: &AppState, update: &StatusUpdate) -> Result<(), ActError> {
    if !matches!(
        update.status,
        MessageStatus::Failed | MessageStatus::Undelivered
    ) {
        return Ok(());
    }
    // Twilio can report a failure before the sender has recorded the part it posted (the
    // record follows Twilio's answer), so look again briefly before deciding it is not ours.
    let mut part = None;
    for _ in 0..10 {
        part = state.store.sent_part(update.message_sid.as_str()).await?;
        if part.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let Some(part) = part else {
        tracing::info!(sid = %update.message_sid, "a failure was reported for a message wagate did not send");
        return Ok(());
    };
    if update.error_code == Some(rest::UNSUBSCRIBED) {
        tracing::warn!(agent = %part.agent_id, "the user opted out (21610); nothing more goes to them until they send START");
        // Stamped when the reply was made, not when the callback came: Twilio may report the
        // failure after the user has sent START, and that START must still count.
        return state
            .store
            .opt_out(&part.session_id(), part.created_at)
            .await
            .map_err(ActError::from);
    }
    let reason = match update.error_code {
        Some(rest::OUTSIDE_WINDOW) => "outside the 24-hour window (Twilio 63016): the user has not written in the last 24 hours; send a template (content_sid)".to_owned(),
        Some(code) => format!("Twilio reported the message {} with error {code}", update.status.as_str()),
        None => format!("Twilio reported the message {}", update.status.as_str()),
    };
    let letter = DeadLetter::send(part, reason, update.error_code, 1);
    let id = state.bus.put_dead_letter(&letter).await?;
    events::emit(&*state.bus, &state.directory, &letter.agent_id, || {
        wagate_core::events::dead_letter_created(&letter, &id)
    })
    .await;
    Ok(())
}

/// Raises `message.delivered`, `message.read` or `message.failed` for a status newly recorded
/// (the others, queued and sent, say nothing `message.sent` did not).
async fn status_event(state: &AppState, agent_id: &AgentId, update: &StatusUpdate) {
    let kind = match update.status {
        MessageStatus::Delivered => Kind::MessageDelivered,
        MessageStatus::Read => Kind::MessageRead,
        MessageStatus::Failed | MessageStatus::Undelivered => Kind::MessageFailed,
        _ => return,
    };
    let Some(to) = update
        .to
        .as_deref()
        .and_then(|to| WhatsAppAddress::parse(to).ok())
    else {
        return;
    };
    events::emit(&*state.bus, &state.directory, agent_id, || {
        let data = serde_json::json!({
            "sid": update.message_sid.as_str(), "phone": to.user(),
            "status": update.status.as_str(), "error_code": update.error_code,
        });
        Event::new(kind, agent_id, &to, update.message_sid.as_str(), data)
    })
    .await;
}

/// Whether the request says it carries a form (`application/x-www-form-urlencoded`, any
/// parameters such as a charset after it).
fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

#[tracing::instrument(
    name = "inbound_webhook",
    skip_all,
    fields(agent = %raw_agent, trace_id = tracing::field::Empty)
)]
async fn inbound(
    State(state): State<AppState>,
    Path(raw_agent): Path<String>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let v = match verify(&state, "inbound", &raw_agent, &headers, &uri, &body).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    if !v.channel.channel.enabled {
        tracing::warn!(agent = %v.agent_id, "inbound message refused: the agent's WhatsApp channel is disabled");
        outcome("inbound", "disabled");
        return plain(StatusCode::FORBIDDEN, "WhatsApp not enabled");
    }
    let message = match parse_inbound(&v.agent_id, &v.fields, OffsetDateTime::now_utc()) {
        Ok(m) => {
            // The message's trace starts here; every role continues it (wagate_core::trace).
            let span = tracing::Span::current();
            wagate_core::trace::record_trace_id(&span);
            InboundMessage {
                callback_base: v.callback_base,
                traceparent: wagate_core::trace::traceparent(&span),
                ..m
            }
        }
        Err(e) => {
            outcome("inbound", "bad_request");
            return plain(StatusCode::BAD_REQUEST, e.0);
        }
    };
    let publish = bus::publish(&*state.bus, &message);
    match tokio::time::timeout(PUBLISH_TIMEOUT, publish).await {
        Ok(Ok(published)) => {
            let duplicate = matches!(published, bus::Published::Duplicate);
            if duplicate {
                // Twilio repeated a MessageSid the bus still remembers: answered 200, stored
                // once. Counted so that retries (and the bus dropping them) can be seen.
                metrics::counter!("wagate_inbound_duplicates_total").increment(1);
            }
            tracing::debug!(sid = %message.message_sid, duplicate, "inbound message accepted");
            outcome("inbound", "accepted");
            metrics::histogram!("wagate_webhook_seconds").record(started.elapsed().as_secs_f64());
            ([(header::CONTENT_TYPE, "text/xml")], EMPTY_TWIML).into_response()
        }
        Ok(Err(e)) => {
            tracing::error!(sid = %message.message_sid, error = %e, "could not queue an inbound message; Twilio will retry");
            outcome("inbound", "unavailable");
            plain(StatusCode::SERVICE_UNAVAILABLE, "Temporarily unavailable")
        }
        Err(_) => {
            tracing::error!(sid = %message.message_sid, "queueing an inbound message timed out; Twilio will retry");
            outcome("inbound", "unavailable");
            plain(StatusCode::SERVICE_UNAVAILABLE, "Temporarily unavailable")
        }
    }
}

#[tracing::instrument(name = "status_callback", skip_all, fields(agent = %raw_agent))]
async fn status(
    State(state): State<AppState>,
    Path(raw_agent): Path<String>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let v = match verify(&state, "status", &raw_agent, &headers, &uri, &body).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let update = match parse_status(&v.fields) {
        Ok(u) => u,
        Err(e) => {
            outcome("status", "bad_request");
            return plain(StatusCode::BAD_REQUEST, e.0);
        }
    };
    // Act on a failure before recording it: if acting fails, the 503 makes Twilio retry, and
    // the retry must still find the failure unrecorded (a rare duplicate dead letter beats a
    // lost one).
    let already = match state.store.status(&update.message_sid).await {
        Ok(current) => current.is_some_and(|(s, _)| s.rank() >= update.status.rank()),
        Err(e) => {
            tracing::error!(error = %e, "could not read a message status; Twilio will retry");
            outcome("status", "unavailable");
            return plain(StatusCode::SERVICE_UNAVAILABLE, "Temporarily unavailable");
        }
    };
    if !already && let Err(e) = act_on_failure(&state, &update).await {
        tracing::error!(error = %e, "could not act on a failed message; Twilio will retry the callback");
        outcome("status", "unavailable");
        return plain(StatusCode::SERVICE_UNAVAILABLE, "Temporarily unavailable");
    }
    match state.store.record_status(&update).await {
        Ok(applied) => {
            if applied {
                count_status(&update);
                status_event(&state, &v.agent_id, &update).await;
            }
            tracing::debug!(sid = %update.message_sid, status = update.status.as_str(), error_code = ?update.error_code, applied, "status callback");
            outcome("status", "accepted");
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "could not store a status callback; Twilio will retry");
            outcome("status", "unavailable");
            plain(StatusCode::SERVICE_UNAVAILABLE, "Temporarily unavailable")
        }
    }
}
