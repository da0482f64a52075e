//! The data lifecycle: `DELETE /v1/agents/{agent_id}/sessions/{phone}` forgets a conversation,
//! `DELETE /v1/agents/{agent_id}/leads/{phone}` erases a person, `DELETE /v1/agents/{agent_id}`
//! removes an agent with all its data. Each answers 204, also when there was nothing left to
//! delete (an agent that is gone: 204 while anything of it was left), so that a call repeated
//! after a timeout or a crash finishes the job.
//!
//! What each keeps and why is said at [`store::Conversations::forget_session`] and
//! [`store::Conversations::erase_user`]. Messages still queued on the bus when the call is made
//! (a reply being sent, a turn being run) are not reached: they may store a little again once
//! handled, and a second call erases that. JetStream erases a removed dead letter securely
//! (overwritten on disk); the work queues drop acknowledged messages as soon as they are acked.
//! An erasure or deletion ends, once all of its deletions are made, with one
//! [`store::Conversations::purge_erased`], which in embedded mode rewrites the data file (redb
//! leaves deleted bytes in it otherwise): the call answers once that is durable.

use axum::{
    extract::{Path, State},
    http::StatusCode,
};
use wagate_core::{
    agent::Agent,
    domain::{AgentId, PhoneNumber, SessionId, WhatsAppAddress},
    envelope::{DeadLetter, DeadMessage},
};

use super::{AgentPath, ApiError, ErrorBody, PersonPath, existing_agent_id, load_agent};
use crate::AppState;

/// Forget a conversation: its history and simulated outbox
///
/// The lead, the 24-hour window and the opt-out stay. 204 also when there was nothing to forget.
#[utoipa::path(
    delete,
    path = "/v1/agents/{agent_id}/sessions/{phone}",
    tag = "people",
    operation_id = "forget_session",
    params(PersonPath),
    responses(
        (status = 204, description = "Forgotten"),
        (status = 404, description = "Unknown agent", body = ErrorBody),
        (status = 422, description = "`phone` is not a phone number", body = ErrorBody),
    ),
)]
pub async fn forget_session(
    State(state): State<AppState>,
    Path(PersonPath {
        agent_id: raw_agent,
        phone: raw_phone,
    }): Path<PersonPath>,
) -> Result<StatusCode, ApiError> {
    let agent = load_agent(&state, &raw_agent).await?;
    let session = session_of(&agent, &raw_phone)?;
    state
        .store
        .forget_session(&session)
        .await
        .map_err(ApiError::unavailable)?;
    tracing::info!(agent = %agent.id, "conversation forgotten");
    Ok(StatusCode::NO_CONTENT)
}

/// Erase a person: lead, history, records, opt-out, and their dead letters
///
/// For a data protection request. 204 also when there was nothing left to erase.
#[utoipa::path(
    delete,
    path = "/v1/agents/{agent_id}/leads/{phone}",
    tag = "people",
    operation_id = "erase_lead",
    params(PersonPath),
    responses(
        (status = 204, description = "Erased"),
        (status = 404, description = "Unknown agent", body = ErrorBody),
        (status = 422, description = "`phone` is not a phone number", body = ErrorBody),
    ),
)]
pub async fn erase_lead(
    State(state): State<AppState>,
    Path(PersonPath {
        agent_id: raw_agent,
        phone: raw_phone,
    }): Path<PersonPath>,
) -> Result<StatusCode, ApiError> {
    let agent = load_agent(&state, &raw_agent).await?;
    let session = session_of(&agent, &raw_phone)?;
    erase_person(&state, &session).await?;
    tracing::info!(agent = %agent.id, "person erased");
    Ok(StatusCode::NO_CONTENT)
}

/// 204 when the agent was deleted; for an agent that is gone, 204 while something of it was
/// still left (a message in flight at the deletion may have stored a lead and a dead letter
/// after it), swept now, and 404 once nothing is.
#[utoipa::path(
    delete,
    path = "/v1/agents/{agent_id}",
    tag = "agents",
    operation_id = "delete_agent",
    summary = "Delete an agent, its channel and all its data",
    params(AgentPath),
    responses(
        (status = 204, description = "Deleted (or what was left of it erased)"),
        (status = 404, description = "Unknown agent, nothing of it left", body = ErrorBody),
    ),
)]
pub async fn delete_agent(
    State(state): State<AppState>,
    Path(AgentPath {
        agent_id: raw_agent,
    }): Path<AgentPath>,
) -> Result<StatusCode, ApiError> {
    let id = existing_agent_id(&raw_agent)?;
    let found = state
        .store
        .agent(&id)
        .await
        .map_err(ApiError::unavailable)?;
    if let Some(agent) = found {
        delete(&state, &agent).await?;
        return Ok(StatusCode::NO_CONTENT);
    }
    if sweep(&state, &id).await? == 0 {
        return Err(ApiError::not_found("Unknown agent"));
    }
    purge(&state).await?;
    tracing::info!(agent = %id, "what was left of a deleted agent was erased");
    Ok(StatusCode::NO_CONTENT)
}

/// The conversation of `agent` with the user `raw_phone` names (E.164, with or without
/// `whatsapp:`); 422 when it is not a phone number.
pub(crate) fn session_of(agent: &Agent, raw_phone: &str) -> Result<SessionId, ApiError> {
    let raw_phone = raw_phone.strip_prefix("whatsapp:").unwrap_or(raw_phone);
    // A `+` typed unencoded in a URL path stays `+`, but some clients send a space for it.
    let phone =
        PhoneNumber::parse(&raw_phone.replace(' ', "+")).map_err(|e| ApiError::invalid(e.0))?;
    Ok(SessionId::for_phone(&agent.id, &phone))
}

/// Erases the user of `session` ([`erase_records`]) and leaves nothing of what was deleted in
/// the store's files ([`purge`]).
pub(crate) async fn erase_person(state: &AppState, session: &SessionId) -> Result<(), ApiError> {
    erase_records(state, session).await?;
    purge(state).await
}

/// Deletes what is stored about the user of `session`: their dead letters first (the bus),
/// then everything the store holds about them. A dead letter is the person's when the message
/// it keeps came from them or was going to them.
async fn erase_records(state: &AppState, session: &SessionId) -> Result<(), ApiError> {
    remove_dead_letters(state, |d| dead_letter_session(d) == *session).await?;
    state
        .store
        .erase_user(session)
        .await
        .map_err(ApiError::unavailable)
}

/// Makes what was deleted unreadable from the store's files; once per call, after all of its
/// deletions, because in embedded mode it rewrites the whole file.
async fn purge(state: &AppState) -> Result<(), ApiError> {
    state
        .store
        .purge_erased()
        .await
        .map_err(ApiError::unavailable)
}

/// Deletes `agent` and everything stored for it. Its people are erased before the agent goes
/// (an agent whose erasure failed half-way is still there to delete again, with its leads to
/// find), and once more after: a message taken in between, before the channel was gone, may
/// have made a new lead.
pub(crate) async fn delete(state: &AppState, agent: &Agent) -> Result<(), ApiError> {
    sweep(state, &agent.id).await?;
    state
        .store
        .delete_agent(&agent.id)
        .await
        .map_err(ApiError::unavailable)?;
    erase_leads(state, &agent.id).await?;
    purge(state).await?;
    tracing::info!(agent = %agent.id, "agent deleted");
    Ok(())
}

/// Erases every lead of the agent `id` and removes its dead letters; how many there were.
async fn sweep(state: &AppState, id: &AgentId) -> Result<usize, ApiError> {
    let leads = erase_leads(state, id).await?;
    let letters = remove_dead_letters(state, |d| d.agent_id == *id).await?;
    Ok(leads + letters)
}

/// Erases every lead of the agent `id` ([`erase_records`]); how many there were.
async fn erase_leads(state: &AppState, id: &AgentId) -> Result<usize, ApiError> {
    let leads = state.store.leads(id).await.map_err(ApiError::unavailable)?;
    let found = leads.len();
    for lead in leads {
        // A lead is named by the user part of the address its messages came from (a phone
        // number, or another WhatsApp id), so the address rebuilt from it names its session.
        let Ok(address) = WhatsAppAddress::parse(&format!("whatsapp:{}", lead.phone)) else {
            tracing::warn!(agent = %id, "a lead whose number is not an address was kept");
            continue;
        };
        erase_records(state, &SessionId::new(id, &address)).await?;
    }
    Ok(found)
}

/// The conversation a dead letter belongs to.
fn dead_letter_session(letter: &DeadLetter) -> SessionId {
    match &letter.message {
        DeadMessage::Inbound(m) => m.session_id(),
        DeadMessage::Reply(r) => r.session_id(),
        DeadMessage::Event(e) => bus::Envelope::session_id(e.as_ref()),
    }
}

/// Removes the dead letters `whose` picks; how many there were.
async fn remove_dead_letters(
    state: &AppState,
    whose: impl Fn(&DeadLetter) -> bool,
) -> Result<usize, ApiError> {
    let letters = state
        .bus
        .dead_letters()
        .await
        .map_err(ApiError::unavailable)?;
    let mut removed = 0;
    for letter in letters.iter().filter(|d| whose(d)) {
        state
            .bus
            .remove_dead_letter(&letter.id)
            .await
            .map_err(ApiError::unavailable)?;
        removed += 1;
    }
    Ok(removed)
}
