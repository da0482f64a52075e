//! Any OpenAI-compatible Chat Completions endpoint (OpenAI, Azure-style gateways, vLLM, Ollama,
//! llama.cpp): system prompt, the recent history, the new message with its images as image
//! parts.
//!
//! The model is offered three tools (OpenAI's function calling, which those servers copy),
//! unless the agent turns them off: `handoff_to_human` hands the conversation to a person, as a
//! webhook agent's `"handoff": true` does, `send_media` sends public https URLs with the reply,
//! as a webhook agent's `"media"` does, and `offer_quick_replies` gives the user choices to
//! tap, as a webhook agent's `"quick_replies"` does. A call is answered with a `tool` message saying
//! what was done, and the model asked again, so that it writes the words that go with it; the
//! last round offers no tools, so a turn makes at most [`TOOL_ROUNDS`] + 1 requests.

use std::{sync::LazyLock, time::Duration};

use secrecy::SecretString;
use serde::Serialize;
use serde_json::Value;

use http::{
    HeaderValue,
    header::{AUTHORIZATION, CONTENT_TYPE},
};

use store::Role;
use wagate_core::{
    envelope::{MAX_MEDIA, is_public_media_url},
    failure::Failure,
};

use crate::media::{Fetched, Kind};

use transport::{Post, Transport};

use super::{
    AgentReply, ChatContent, ChatMessage, ContentPart, FilePart, ImageUrl, TurnInput, http_failure,
    medium_text, send_failure, sensitive_header, user_text,
};

/// Rounds of tool calls a turn may take before the model must answer in words.
const TOOL_ROUNDS: usize = 2;

/// The tools offered, as Chat Completions' `tools` takes them.
static TOOLS: LazyLock<Value> = LazyLock::new(|| {
    serde_json::json!([
        {
            "type": "function",
            "function": {
                "name": "handoff_to_human",
                "description": "Hand this conversation to a person at the business, when you cannot help or the user asks for a person. A person then answers in this chat, and you stop answering until the conversation is given back to you.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "reason": {"type": "string", "description": "Why, in a few words, for the person who takes over."}
                    },
                },
            },
        },
        {
            "type": "function",
            "function": {
                "name": "offer_quick_replies",
                "description": "Offer the user choices to tap, answering the question your reply asks: up to 3 become buttons (20 characters each at most), 4 to 10 a list (24 characters each).",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "choices": {"type": "array", "items": {"type": "string"}, "maxItems": 10}
                    },
                    "required": ["choices"],
                },
            },
        },
        {
            "type": "function",
            "function": {
                "name": "send_media",
                "description": "Send images, documents, audio or video to the user with your reply, each by a public https URL.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "urls": {"type": "array", "items": {"type": "string"}, "maxItems": MAX_MEDIA}
                    },
                    "required": ["urls"],
                },
            },
        },
    ])
});

/// A Chat Completions request.
#[derive(Serialize)]
struct ChatRequest<'a> {
    messages: &'a [Message<'a>],
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<&'a Value>,
}

/// A message of the request: one of the conversation, or one of this turn's tool rounds (the
/// model's message with its calls, as it sent it, and the answers to them).
#[derive(Serialize)]
#[serde(untagged)]
enum Message<'a> {
    Chat(ChatMessage<'a>),
    Round(Value),
}

pub struct Call<'a> {
    pub http: &'a Transport,
    pub base_url: &'a str,
    pub model: &'a str,
    /// The whole `Authorization` value: `Bearer <api key>`, or Basic for a URL's credentials.
    pub authorization: Option<&'a SecretString>,
    pub system_prompt: Option<&'a str>,
    pub timeout: Duration,
    /// Whether the model is offered [`TOOLS`].
    pub tools: bool,
}

impl Call<'_> {
    pub async fn reply(&self, input: &TurnInput<'_>) -> Result<AgentReply, Failure> {
        let mut messages = Vec::with_capacity(input.history.len() + 1 + input.messages.len());
        if let Some(p) = self.system_prompt.filter(|p| !p.is_empty()) {
            messages.push(Message::Chat(ChatMessage::text("system", p)));
        }
        // The user's turns of the history with the images they showed, fetched again (the
        // history keeps only their links).
        let earlier: Vec<(&str, String)> = input
            .earlier
            .iter()
            .filter_map(|m| Some((m.url.as_str(), m.fetched.as_ref().ok()?.data_url())))
            .collect();
        messages.extend(input.history.iter().map(|t| {
            let shown: Vec<&str> = earlier
                .iter()
                .filter(|(url, _)| t.role == Role::User && t.content.contains(url))
                .map(|(_, data)| data.as_str())
                .collect();
            if shown.is_empty() {
                return Message::Chat(ChatMessage::turn(t));
            }
            let mut parts = vec![ContentPart::Text { text: &t.content }];
            parts.extend(shown.into_iter().map(|url| ContentPart::ImageUrl {
                image_url: ImageUrl { url },
            }));
            Message::Chat(ChatMessage {
                content: ChatContent::Parts(parts),
                role: "user",
            })
        }));
        // Each fetched image and PDF inline as a data URL (a model cannot open Twilio's link,
        // which needs the account's credentials); any other medium as its line of the user's
        // turn (a transcript, or a notice).
        let inline: Vec<(&str, Kind, String)> = input
            .media
            .iter()
            .filter(|m| matches!(m.kind, Kind::Image | Kind::Document))
            .filter_map(|m| Some((m.url.as_str(), m.kind, m.fetched.as_ref().ok()?.data_url())))
            .collect();
        let lines: Vec<Vec<String>> = input
            .messages
            .iter()
            .map(|m| {
                m.media
                    .iter()
                    .map(|x| medium_text(x, input.media))
                    .collect()
            })
            .collect();
        for (m, lines) in input.messages.iter().zip(&lines) {
            let shown =
                |x: &wagate_core::envelope::Media| inline.iter().find(|(url, ..)| *url == x.url);
            if !m.media.iter().any(|x| shown(x).is_some()) {
                messages.push(Message::Chat(ChatMessage::text(
                    "user",
                    user_text(m, input.media),
                )));
                continue;
            }
            let mut parts = Vec::with_capacity(m.media.len() + 1);
            if !m.body.is_empty() {
                parts.push(ContentPart::Text { text: &m.body });
            }
            for (x, line) in m.media.iter().zip(lines) {
                parts.push(match shown(x) {
                    Some((_, Kind::Document, data)) => ContentPart::File {
                        file: FilePart {
                            filename: "document.pdf",
                            file_data: data,
                        },
                    },
                    Some((_, _, data)) => ContentPart::ImageUrl {
                        image_url: ImageUrl { url: data },
                    },
                    None => ContentPart::Text { text: line },
                });
            }
            messages.push(Message::Chat(ChatMessage {
                content: ChatContent::Parts(parts),
                role: "user",
            }));
        }
        let mut reply = AgentReply::default();
        for round in 0..=TOOL_ROUNDS {
            let tools = (self.tools && round < TOOL_ROUNDS).then_some(&*TOOLS);
            let body = serde_json::to_vec(&ChatRequest {
                messages: &messages,
                model: self.model,
                tools,
            })
            .map_err(Failure::permanent)?;
            let mut answer = self.complete(body).await?;
            let Some(message) = answer.pointer_mut("/choices/0/message").map(Value::take) else {
                return Err(Failure::permanent(
                    "the model endpoint's answer has no choices[0].message",
                ));
            };
            let calls = message
                .get("tool_calls")
                .and_then(Value::as_array)
                .filter(|c| !c.is_empty() && tools.is_some());
            let Some(calls) = calls else {
                return match message.get("content").and_then(Value::as_str) {
                    Some(text) => {
                        reply.text = text.to_owned();
                        Ok(finished(reply))
                    }
                    // The words may have come before, with a tool call the model made.
                    None if reply.handoff || !reply.media.is_empty() => Ok(finished(reply)),
                    None => Err(Failure::permanent(
                        "the model endpoint's answer has no choices[0].message.content",
                    )),
                };
            };
            let results = calls
                .iter()
                .map(|call| run_tool(call, &mut reply))
                .collect::<Result<Vec<_>, _>>()?;
            let content = message.get("content").cloned().unwrap_or(Value::Null);
            if let Some(text) = content.as_str() {
                reply.text = text.to_owned();
            }
            // Sent back as the request takes it: the model's words and calls, none of the
            // answer-only fields (refusal, annotations) that some servers refuse in a request.
            messages.push(Message::Round(serde_json::json!({
                "role": "assistant", "content": content, "tool_calls": calls,
            })));
            messages.extend(results.into_iter().map(Message::Round));
        }
        Ok(finished(reply))
    }

    /// One Chat Completions request; the request holds only the encoded body while the model
    /// thinks.
    async fn complete(&self, body: Vec<u8>) -> Result<Value, Failure> {
        let mut headers = vec![(CONTENT_TYPE, HeaderValue::from_static("application/json"))];
        if let Some(authorization) = self.authorization {
            headers.push((AUTHORIZATION, sensitive_header(authorization)?));
        }
        let url = format!("{}/chat/completions", self.base_url);
        let answer = self
            .http
            .post(Post {
                url: &url,
                headers,
                body: body.into(),
                timeout: self.timeout,
            })
            .await
            .map_err(|e| send_failure("the model endpoint", &e))?;
        if !answer.status.is_success() {
            return Err(http_failure("the model endpoint", &answer));
        }
        serde_json::from_slice(&answer.body).map_err(|_| {
            Failure::permanent("the model endpoint answered something that is not JSON")
        })
    }
}

/// The reply as it goes out: choices offered without words to answer are dropped (a quick
/// reply needs the question it answers), and said so in the log.
fn finished(mut reply: AgentReply) -> AgentReply {
    if !reply.quick_replies.is_empty() && reply.text.trim().is_empty() {
        tracing::warn!(
            "the model offered quick replies without a reply to go with them; sent without them"
        );
        reply.quick_replies.clear();
    }
    reply
}

/// Does what one tool call asks, into `reply`, and returns the `tool` message that tells the
/// model how it went. A call wagate cannot read is told to the model, not failed: it can try
/// again or answer without it.
fn run_tool(call: &Value, reply: &mut AgentReply) -> Result<Value, Failure> {
    let id = call
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| Failure::permanent("the model endpoint's tool call has no id"))?;
    let name = call.pointer("/function/name").and_then(Value::as_str);
    let arguments: Option<Value> = call
        .pointer("/function/arguments")
        .and_then(Value::as_str)
        .and_then(|a| serde_json::from_str(a).ok());
    let outcome = match name {
        Some("handoff_to_human") => {
            reply.handoff = true;
            "Done: a person at the business takes this conversation over. Tell the user, in a few words, that a person will answer here.".to_owned()
        }
        Some("send_media") => send_media(arguments.as_ref(), reply),
        Some("offer_quick_replies") => {
            let choices = arguments.as_ref().and_then(|a| a.get("choices"));
            match super::webhook::quick_replies_of(choices, "the tool's") {
                Ok(choices) if !choices.is_empty() => {
                    let offered = format!("Done: the user can tap {}.", choices.join(", "));
                    reply.quick_replies = choices;
                    offered
                }
                Ok(_) => "Not offered: give {\"choices\": [\"…\"]}.".to_owned(),
                Err(e) => format!("Not offered: {}.", e.reason),
            }
        }
        Some(other) => format!("There is no tool named {other:?}."),
        None => "The call names no tool.".to_owned(),
    };
    Ok(serde_json::json!({"role": "tool", "tool_call_id": id, "content": outcome}))
}

/// `send_media`: the URLs Twilio can fetch go with the reply, up to [`MAX_MEDIA`] in all.
fn send_media(arguments: Option<&Value>, reply: &mut AgentReply) -> String {
    let Some(urls) = arguments
        .and_then(|a| a.get("urls"))
        .and_then(Value::as_array)
    else {
        return "Not sent: give {\"urls\": [\"https://…\"]}.".to_owned();
    };
    let mut refused = 0;
    let mut added = 0;
    for url in urls.iter().map(|u| u.as_str().unwrap_or_default()) {
        if is_public_media_url(url) && reply.media.len() < MAX_MEDIA {
            reply.media.push(url.to_owned());
            added += 1;
        } else {
            refused += 1;
        }
    }
    match refused {
        0 => format!("Done: {added} will be sent with your reply."),
        _ => format!(
            "{added} will be sent with your reply; {refused} not: only public https URLs, at most {MAX_MEDIA} in all."
        ),
    }
}

/// A voice note to text: `POST {base_url}/audio/transcriptions`, multipart, as OpenAI's audio
/// API (and the servers that copy it: whisper.cpp, faster-whisper, vLLM) take it.
pub struct Transcription<'a> {
    pub http: &'a reqwest::Client,
    pub base_url: &'a str,
    pub model: &'a str,
    pub authorization: Option<&'a SecretString>,
    pub timeout: Duration,
}

impl Transcription<'_> {
    /// The words of `audio`, or why there are none (said to the agent, so no secrets; the
    /// turn goes on either way, so whether trying again could help is only informative).
    pub async fn text(&self, audio: &Fetched) -> Result<String, Failure> {
        let extension = audio
            .content_type
            .split('/')
            .nth(1)
            .and_then(|s| s.split(['+', ';']).next())
            .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric()))
            .unwrap_or("bin");
        let file = reqwest::multipart::Part::bytes(audio.bytes.to_vec())
            .file_name(format!("voice-note.{extension}"))
            .mime_str(&audio.content_type)
            .map_err(|_| Failure::permanent("its content type is not a MIME type"))?;
        let form = reqwest::multipart::Form::new()
            .text("model", self.model.to_owned())
            .part("file", file);
        let mut request = self
            .http
            .post(format!("{}/audio/transcriptions", self.base_url))
            .multipart(form)
            .timeout(self.timeout);
        if let Some(authorization) = self.authorization {
            request = request.header(AUTHORIZATION, super::sensitive_header(authorization)?);
        }
        let answer = request.send().await.map_err(|e| {
            Failure::transient(if e.is_timeout() {
                "the transcription endpoint did not answer in time"
            } else {
                "the transcription endpoint could not be reached"
            })
        })?;
        let status = answer.status();
        if !status.is_success() {
            return Err(Failure::permanent(format!(
                "the transcription endpoint answered HTTP {}",
                status.as_u16()
            )));
        }
        let v: Value = answer.json().await.map_err(|_| {
            Failure::permanent("the transcription endpoint answered something that is not JSON")
        })?;
        v.get("text")
            .and_then(Value::as_str)
            .map(|t| t.trim().to_owned())
            .ok_or_else(|| Failure::permanent("the transcription endpoint's answer has no text"))
    }
}
