//! The delivery of replies: the Twilio messages each reply's parts went out as, and the status
//! Twilio's callbacks reported for each. `GET /v1/agents/{agent_id}/messages/{sid}`, the
//! `status` and `sid` of the agent's messages in a session, and the console's transcript.
//!
//! The history stores what was said, not how it was sent, so a turn is matched to its parts
//! by time. The worker stores the agent's turn and then makes the reply, so each part of an
//! answer (an `in-…` reply, made with its `created_at`) belongs to the last of the agent's turns
//! stored before it. An operator's message (an `api-…` reply) is stored as a turn with its
//! author, stamped with the reply's `created_at`: its parts belong to the operator's turn of
//! that very time. Other admin sends are no turn of the history. An answer made again long
//! after its turn (its first publication lost, then its inbound message delivered again) would
//! be shown under a later turn; it is sent once all the same.

use axum::{
    Json,
    extract::{Path, State},
};
use serde::{Deserialize, Serialize};
use store::{Role, SentMessage, Turn};
use twilio::status::MessageStatus;
use utoipa::{IntoParams, ToSchema};
use wagate_core::domain::SessionId;

use super::{ApiError, ErrorBody, load_agent};
use crate::AppState;

/// One part of a reply as Twilio knows it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub(crate) struct PartDelivery {
    /// Twilio's message sid.
    pub(crate) sid: String,
    /// Its latest status; `queued` (Twilio's answer to the post) until a callback says more.
    pub(crate) status: MessageStatus,
    /// Twilio's error code of a failed or undelivered message.
    pub(crate) error_code: Option<u32>,
}

impl PartDelivery {
    fn of(sent: &SentMessage) -> Self {
        let (status, error_code) = sent.status.unwrap_or((MessageStatus::Queued, None));
        Self {
            sid: sent.sid.clone(),
            status,
            error_code,
        }
    }

    /// Whether the message will not reach the user.
    fn failed(&self) -> bool {
        matches!(
            self.status,
            MessageStatus::Failed | MessageStatus::Undelivered | MessageStatus::Canceled
        )
    }
}

/// The part whose status stands for the whole reply: the first that failed, else the one
/// least far along (a reply is delivered once all its parts are).
pub(crate) fn summary(parts: &[PartDelivery]) -> Option<&PartDelivery> {
    parts
        .iter()
        .find(|p| p.failed())
        .or_else(|| parts.iter().min_by_key(|p| p.status.rank()))
}

/// The reply a part belongs to, and its place in it: a part's id is its reply's id and
/// `-p<index>`, and a part replayed from a dead letter adds another `-p0` to its own.
fn reply_and_index(part_id: &str) -> (&str, usize) {
    let mut reply = part_id;
    let mut index = 0;
    while let Some((head, n)) = reply.rsplit_once("-p") {
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            break;
        }
        let Ok(n) = n.parse() else { break };
        reply = head;
        index = n;
    }
    (reply, index)
}

/// `sent` ordered as their replies were made, each reply's parts in order.
fn in_order(mut sent: Vec<SentMessage>) -> Vec<SentMessage> {
    sent.sort_by(|a, b| {
        let (ra, ia) = reply_and_index(&a.part.id);
        let (rb, ib) = reply_and_index(&b.part.id);
        (a.part.created_at, ra, ia, &a.sid).cmp(&(b.part.created_at, rb, ib, &b.sid))
    });
    sent
}

/// For each turn of `turns` (a session's history, oldest first): `None` for the user's, and
/// the parts sent for each of the business's (empty while none is out yet, and once the
/// records of its parts lapsed after [`store::GUARD_TTL`], which a history may outlive).
pub(crate) fn by_turn(turns: &[Turn], sent: Vec<SentMessage>) -> Vec<Option<Vec<PartDelivery>>> {
    let mut out: Vec<Option<Vec<PartDelivery>>> = turns
        .iter()
        .map(|t| (t.role == Role::Assistant).then(Vec::new))
        .collect();
    for part in in_order(sent) {
        let made = part.part.created_at;
        let owner = if part.part.id.starts_with("in-") {
            turns
                .iter()
                .rposition(|t| t.role == Role::Assistant && t.author.is_none() && t.at <= made)
        } else {
            turns
                .iter()
                .position(|t| t.role == Role::Assistant && t.author.is_some() && t.at == made)
        };
        if let Some(Some(parts)) = owner.and_then(|i| out.get_mut(i)) {
            parts.push(PartDelivery::of(&part));
        }
    }
    out
}

/// The parts of each of `turns`, read from the store (see [`by_turn`]).
pub(crate) async fn of_session(
    state: &AppState,
    session: &SessionId,
    turns: &[Turn],
) -> Result<Vec<Option<Vec<PartDelivery>>>, ApiError> {
    let sent = state
        .store
        .sent_messages(session)
        .await
        .map_err(ApiError::unavailable)?;
    Ok(by_turn(turns, sent))
}

/// One of the agent's messages, and the delivery of every part of its reply: the answer of
/// `GET /v1/agents/{agent_id}/messages/{sid}`.
#[derive(Serialize, ToSchema)]
#[schema(as = Delivery)]
pub struct MessageView {
    /// Twilio's message sid.
    sid: String,
    /// The user, as `+…`.
    to: String,
    /// Its latest status (`queued` until a status callback says more).
    status: MessageStatus,
    /// Twilio's error code of a failed or undelivered message.
    error_code: Option<u32>,
    /// Every part of the reply this message is one of, in order (itself included).
    parts: Vec<PartDelivery>,
}

/// An agent and one of its messages.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct MessagePath {
    /// The agent's id: 1-64 of `A-Z a-z 0-9 _ -`.
    #[param(pattern = r"^[A-Za-z0-9_-]{1,64}$")]
    agent_id: String,
    /// Twilio's message sid (`SM…`/`MM…`), of any part of a reply.
    sid: String,
}

/// The delivery of one of the agent's messages and of every part of its reply
#[utoipa::path(
    get,
    path = "/v1/agents/{agent_id}/messages/{sid}",
    tag = "messages",
    operation_id = "get_message",
    params(MessagePath),
    responses(
        (status = 200, description = "The message and its reply's parts", body = MessageView),
        (status = 404, description = "Unknown agent, or a sid that is not the agent's", body = ErrorBody),
    ),
)]
pub async fn get(
    State(state): State<AppState>,
    Path(MessagePath {
        agent_id: raw_agent,
        sid,
    }): Path<MessagePath>,
) -> Result<Json<MessageView>, ApiError> {
    let agent = load_agent(&state, &raw_agent).await?;
    let unknown = || ApiError::not_found("Unknown message");
    let part = state
        .store
        .sent_part(&sid)
        .await
        .map_err(ApiError::unavailable)?
        .filter(|p| p.agent_id == agent.id)
        .ok_or_else(unknown)?;
    let session = part.session_id();
    let sent = in_order(
        state
            .store
            .sent_messages(&session)
            .await
            .map_err(ApiError::unavailable)?,
    );
    let (reply, _) = reply_and_index(&part.id);
    let parts: Vec<PartDelivery> = sent
        .iter()
        .filter(|s| reply_and_index(&s.part.id).0 == reply)
        .map(PartDelivery::of)
        .collect();
    let this = match parts.iter().find(|p| p.sid == sid) {
        Some(p) => p.clone(),
        // Sent before the session's index of parts was kept: its own records still say.
        None => {
            let status = match wagate_core::domain::MessageSid::parse(&sid) {
                Ok(parsed) => state
                    .store
                    .status(&parsed)
                    .await
                    .map_err(ApiError::unavailable)?,
                Err(_) => None,
            };
            let (status, error_code) = status.unwrap_or((MessageStatus::Queued, None));
            PartDelivery {
                sid: sid.clone(),
                status,
                error_code,
            }
        }
    };
    Ok(Json(MessageView {
        sid,
        to: part.to.user().to_owned(),
        status: this.status,
        error_code: this.error_code,
        parts: if parts.is_empty() { vec![this] } else { parts },
    }))
}

#[cfg(test)]
mod tests {
    use super::reply_and_index;

    #[test]
    fn a_parts_reply_and_index_come_from_its_id() {
        assert_eq!(reply_and_index("in-SM1-p2"), ("in-SM1", 2));
        assert_eq!(reply_and_index("in-SM1-p1-p0"), ("in-SM1", 1));
        assert_eq!(reply_and_index("api-x-pa"), ("api-x-pa", 0));
        assert_eq!(reply_and_index("in-SM-p"), ("in-SM-p", 0));
    }
}
