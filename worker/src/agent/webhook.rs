//! The business's own agent endpoint. The request is JSON, signed so the endpoint can check it
//! came from wagate: `X-Wagate-Timestamp: <unix seconds>` and
//! `X-Wagate-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`; the timestamp in
//! the signed text lets the endpoint refuse replays. The answer is `{"reply": "…"}`, and may
//! carry `"media": ["https://…"]` (up to 10; sent one a message, the first with the reply as
//! its caption), `"quick_replies": ["Yes", "No"]` (up to 10 choices for the user to tap,
//! offered with the reply: up to 3 as buttons of at most 20 characters, more as a list of items
//! of at most 24) and `"handoff": true` (the reply goes out, then the conversation waits for a
//! person).
//!
//! The request's `media` carries each medium of the turn's messages with its bytes in base64
//! (`url`, `content_type`, `size`, `data_base64`, or `error` when it could not be fetched), so
//! the endpoint needs no Twilio credentials; `WAGATE_MEDIA_MAX_BYTES` bounds each. With a
//! `transcription` endpoint on the agent, a voice note also carries its `transcript`.

use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::Value;
use sha2::Sha256;
use wagate_core::{
    domain::AgentId,
    envelope::{InboundMessage, MAX_MEDIA, MAX_QUICK_REPLIES, choice_chars, is_public_media_url},
};

use http::{
    HeaderName, HeaderValue,
    header::{AUTHORIZATION, CONTENT_TYPE},
};

use wagate_core::failure::Failure;

use transport::{Post, Transport};

use super::{
    ChatMessage, TurnInput, header_value, http_failure, send_failure, sensitive_header, user_text,
};

/// The request to the endpoint, written straight from the turn rather than built as a JSON tree
/// first: the inbound message's Twilio fields are copied through as they came.
#[derive(Serialize)]
struct AgentRequest<'a> {
    agent_id: &'a AgentId,
    from: Option<&'a str>,
    message: Option<&'a InboundMessage>,
    messages: Vec<ChatMessage<'a>>,
    /// The media of the turn's messages, each with its bytes (or why there are none).
    media: Vec<MediumView<'a>>,
    session_id: &'a str,
}

/// A medium as the endpoint gets it: Twilio's link (which needs the account's credentials), the
/// content type and size, and the bytes in base64; or, when it could not be fetched, `error`.
#[derive(Serialize)]
struct MediumView<'a> {
    url: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// A voice note's words, when the agent has a transcription endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    transcript: Option<&'a str>,
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
) -> Result<super::AgentReply, Failure> {
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
        media: input
            .media
            .iter()
            .map(|m| match &m.fetched {
                Ok(f) => MediumView {
                    url: &m.url,
                    content_type: Some(&f.content_type),
                    size: Some(f.bytes.len()),
                    data_base64: Some(base64::engine::general_purpose::STANDARD.encode(&f.bytes)),
                    error: None,
                    transcript: m.transcript.as_ref().and_then(|t| t.as_deref().ok()),
                },
                Err(e) => MediumView {
                    url: &m.url,
                    content_type: None,
                    size: None,
                    data_base64: None,
                    error: Some(e.to_string()),
                    transcript: None,
                },
            })
            .collect(),
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
    answer_of(&v)
}

/// Reads the endpoint's answer: `reply` (text) and `media` (public https URLs), at least one,
/// and the choices offered with the reply.
fn answer_of(v: &Value) -> Result<super::AgentReply, Failure> {
    let text = match v.get("reply") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            return Err(Failure::permanent(
                "the agent webhook's \"reply\" is not a string",
            ));
        }
    };
    let media = match v.get("media") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            if items.len() > MAX_MEDIA {
                return Err(Failure::permanent(format!(
                    "the agent webhook's \"media\" has more than {MAX_MEDIA} URLs"
                )));
            }
            items
                .iter()
                .map(|item| {
                    item.as_str()
                        .filter(|u| is_public_media_url(u))
                        .map(str::to_owned)
                        .ok_or_else(|| {
                            Failure::permanent(
                                "the agent webhook's \"media\" must be https URLs (Twilio fetches them)",
                            )
                        })
                })
                .collect::<Result<_, _>>()?
        }
        Some(_) => {
            return Err(Failure::permanent(
                "the agent webhook's \"media\" is not a list",
            ));
        }
    };
    let handoff = match v.get("handoff") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(Failure::permanent(
                "the agent webhook's \"handoff\" is not true or false",
            ));
        }
    };
    let quick_replies = quick_replies_of(v.get("quick_replies"), "the agent webhook's")?;
    if !quick_replies.is_empty() && text.as_deref().is_none_or(|t| t.trim().is_empty()) {
        return Err(Failure::permanent(
            "the agent webhook's \"quick_replies\" need a \"reply\": the text the choices answer",
        ));
    }
    if text.is_none() && media.is_empty() && !handoff {
        return Err(Failure::permanent(
            "the agent webhook's answer has neither a \"reply\" string nor \"media\" nor \"handoff\"",
        ));
    }
    Ok(super::AgentReply {
        text: text.unwrap_or_default(),
        media,
        handoff,
        quick_replies,
    })
}

/// Reads `quick_replies`: up to [`MAX_QUICK_REPLIES`] distinct, non-empty strings, each short
/// enough for what they become (a button's title, or a list's item). WhatsApp would refuse
/// anything else, and an answer the agent will give again is better refused with the reason
/// than cut into something the agent did not say.
pub(super) fn quick_replies_of(v: Option<&Value>, from: &str) -> Result<Vec<String>, Failure> {
    let items = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(Failure::permanent(format!(
                "{from} \"quick_replies\" is not a list"
            )));
        }
    };
    if items.len() > MAX_QUICK_REPLIES {
        return Err(Failure::permanent(format!(
            "{from} \"quick_replies\" has more than {MAX_QUICK_REPLIES} choices"
        )));
    }
    let longest = choice_chars(items.len());
    let mut choices: Vec<String> = Vec::with_capacity(items.len());
    for item in items {
        let choice = item.as_str().map(str::trim).unwrap_or_default();
        if choice.is_empty() {
            return Err(Failure::permanent(format!(
                "{from} \"quick_replies\" must be non-empty strings"
            )));
        }
        if choice.chars().count() > longest {
            // Named by its start: the reason goes into logs and dead letters.
            let start: String = choice.chars().take(longest).collect();
            return Err(Failure::permanent(format!(
                "{from} quick reply \"{start}…\" is over {longest} characters (WhatsApp's limit for {} choices)",
                items.len()
            )));
        }
        if choices.iter().any(|c| c == choice) {
            return Err(Failure::permanent(format!(
                "{from} quick reply {choice:?} is offered twice"
            )));
        }
        choices.push(choice.to_owned());
    }
    Ok(choices)
}

fn sign(secret: &SecretString, timestamp: &str, body: &[u8]) -> Result<String, Failure> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose_secret().as_bytes())
        .map_err(|_| Failure::permanent("bad webhook secret"))?;
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::answer_of;

    fn refused(answer: serde_json::Value) -> String {
        let failure = answer_of(&answer).expect_err("refused");
        assert_eq!(
            failure.kind,
            wagate_core::failure::Kind::Permanent,
            "{}",
            failure.reason
        );
        failure.reason
    }

    #[test]
    fn quick_replies_come_with_the_reply_trimmed_and_in_order() {
        let reply = answer_of(&json!({"reply": "Sure?", "quick_replies": [" Yes", "No "]}))
            .expect("an answer");
        assert_eq!(reply.quick_replies, ["Yes", "No"]);
        let plain = answer_of(&json!({"reply": "Hi", "quick_replies": null})).expect("an answer");
        assert!(plain.quick_replies.is_empty());
    }

    #[test]
    fn choices_wider_than_a_button_fit_a_list_of_more_than_three() {
        let item = "Twenty-four characters!!";
        assert_eq!(item.chars().count(), 24);
        let reason = refused(json!({"reply": "Pick", "quick_replies": [item, "b"]}));
        assert!(reason.contains("over 20 characters"), "{reason}");
        let four = json!({"reply": "Pick", "quick_replies": [item, "b", "c", "d"]});
        assert_eq!(answer_of(&four).expect("an answer").quick_replies.len(), 4);
        let wider = format!("{item}!");
        let reason = refused(json!({"reply": "Pick", "quick_replies": [wider, "b", "c", "d"]}));
        assert!(reason.contains("over 24 characters"), "{reason}");
    }

    #[test]
    fn bad_quick_replies_are_refused_with_the_reason() {
        let eleven: Vec<String> = (0..11).map(|i| format!("c{i}")).collect();
        for (answer, why) in [
            (
                json!({"reply": "Pick", "quick_replies": "Yes"}),
                "is not a list",
            ),
            (
                json!({"reply": "Pick", "quick_replies": eleven}),
                "more than 10",
            ),
            (
                json!({"reply": "Pick", "quick_replies": ["Yes", 2]}),
                "non-empty strings",
            ),
            (
                json!({"reply": "Pick", "quick_replies": ["Yes", "  "]}),
                "non-empty strings",
            ),
            (
                json!({"reply": "Pick", "quick_replies": ["Yes", "Yes"]}),
                "offered twice",
            ),
            (
                json!({"quick_replies": ["Yes"], "handoff": true}),
                "need a \"reply\"",
            ),
            (
                json!({"reply": " ", "quick_replies": ["Yes"]}),
                "need a \"reply\"",
            ),
        ] {
            let reason = refused(answer.clone());
            assert!(reason.contains(why), "{answer}: {reason}");
        }
    }
}
