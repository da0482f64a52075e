//! The business's own agent endpoint. The request is JSON, signed so the endpoint can check it
//! came from wagate: `X-Wagate-Timestamp: <unix seconds>` and
//! `X-Wagate-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`; the timestamp in
//! the signed text lets the endpoint refuse replays. The answer is `{"reply": "…"}`.

use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::Value;
use sha2::Sha256;
use shared::{domain::AgentId, envelope::InboundMessage};

use http::{
    HeaderName, HeaderValue,
    header::{AUTHORIZATION, CONTENT_TYPE},
};

use shared::failure::Failure;

use super::{
    ChatMessage, TurnInput, header_value, http_failure, send_failure, sensitive_header,
    transport::{Post, Transport},
    user_text,
};

/// The request to the endpoint, written straight from the turn rather than built as a JSON tree
/// first: the inbound message's Twilio fields are copied through as they came.
#[derive(Serialize)]
struct AgentRequest<'a> {
    agent_id: &'a AgentId,
    from: Option<&'a str>,
    message: Option<&'a InboundMessage>,
    messages: Vec<ChatMessage<'a>>,
    session_id: &'a str,
}

/// Where and how to call the endpoint.
pub struct Endpoint<'a> {
    /// Its URL, without credentials.
    pub url: &'a str,
    /// The signing secret.
    pub secret: &'a SecretString,
    /// HTTP Basic authentication, when the URL was saved with credentials.
    pub authorization: Option<&'a SecretString>,
    /// For the whole call.
    pub timeout: Duration,
}

pub async fn reply(
    http: &Transport,
    endpoint: &Endpoint<'_>,
    input: &TurnInput<'_>,
) -> Result<String, Failure> {
    let messages = input
        .history
        .iter()
        .map(ChatMessage::turn)
        .chain(
            input
                .messages
                .iter()
                .map(|m| ChatMessage::text("user", user_text(m, input.media))),
        )
        .collect();
    let last = input.messages.last();
    // Only the encoded bytes live on while the agent thinks: with thousands of slow turns in
    // flight, keeping the JSON tree as well cost megabytes (docs/benchmarks.md, P3).
    let body = serde_json::to_vec(&AgentRequest {
        agent_id: &input.agent.id,
        from: last.map(|m| m.from.as_str()),
        message: last,
        messages,
        session_id: input.session_id,
    })
    .map_err(Failure::permanent)?;
    let timestamp = time::OffsetDateTime::now_utc().unix_timestamp().to_string();
    let signature = sign(endpoint.secret, &timestamp, &body)?;
    let mut headers = vec![
        (CONTENT_TYPE, HeaderValue::from_static("application/json")),
        (
            HeaderName::from_static("x-wagate-timestamp"),
            header_value(timestamp)?,
        ),
        (
            HeaderName::from_static("x-wagate-signature"),
            header_value(format!("v1={signature}"))?,
        ),
    ];
    if let Some(authorization) = endpoint.authorization {
        headers.push((AUTHORIZATION, sensitive_header(authorization)?));
    }
    let answer = http
        .post(Post {
            url: endpoint.url,
            headers,
            body: body.into(),
            timeout: endpoint.timeout,
        })
        .await
        .map_err(|e| send_failure("the agent webhook", &e))?;
    if !answer.status.is_success() {
        return Err(http_failure("the agent webhook", &answer));
    }
    let v: Value = serde_json::from_slice(&answer.body)
        .map_err(|_| Failure::permanent("the agent webhook answered something that is not JSON"))?;
    v.get("reply")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| Failure::permanent("the agent webhook's answer has no \"reply\" string"))
}

fn sign(secret: &SecretString, timestamp: &str, body: &[u8]) -> Result<String, Failure> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose_secret().as_bytes())
        .map_err(|_| Failure::permanent("bad webhook secret"))?;
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(hex::encode(mac.finalize().into_bytes()))
}
