//! Any OpenAI-compatible Chat Completions endpoint (OpenAI, Azure-style gateways, vLLM, Ollama,
//! llama.cpp): system prompt, the recent history, the new message with its images as image
//! parts.

use std::time::Duration;

use secrecy::SecretString;
use serde::Serialize;
use serde_json::Value;

use http::{
    HeaderValue,
    header::{AUTHORIZATION, CONTENT_TYPE},
};

use shared::failure::Failure;

use crate::media::{Fetched, Kind};

use super::{
    ChatContent, ChatMessage, ContentPart, ImageUrl, TurnInput, http_failure, send_failure,
    sensitive_header,
    transport::{Post, Transport},
    user_text,
};

/// A Chat Completions request.
#[derive(Serialize)]
struct ChatRequest<'a> {
    messages: Vec<ChatMessage<'a>>,
    model: &'a str,
}

pub struct Call<'a> {
    pub http: &'a Transport,
    pub base_url: &'a str,
    pub model: &'a str,
    /// The whole `Authorization` value: `Bearer <api key>`, or Basic for a URL's credentials.
    pub authorization: Option<&'a SecretString>,
    pub system_prompt: Option<&'a str>,
    pub timeout: Duration,
}

impl Call<'_> {
    pub async fn reply(&self, input: &TurnInput<'_>) -> Result<String, Failure> {
        let mut messages = Vec::with_capacity(input.history.len() + 1 + input.messages.len());
        if let Some(p) = self.system_prompt.filter(|p| !p.is_empty()) {
            messages.push(ChatMessage::text("system", p));
        }
        messages.extend(input.history.iter().map(ChatMessage::turn));
        // Each fetched image inline as a data URL (a model cannot open Twilio's link, which
        // needs the account's credentials); one that could not be fetched as a notice.
        let inline: Vec<(&str, Result<String, String>)> = input
            .media
            .iter()
            .filter(|m| m.kind == Kind::Image)
            .map(|m| {
                let part = match &m.fetched {
                    Ok(f) => Ok(f.data_url()),
                    Err(_) => Err(m.as_text().unwrap_or_default()),
                };
                (m.url.as_str(), part)
            })
            .collect();
        for m in input.messages {
            let mut parts: Vec<ContentPart<'_>> = m
                .media
                .iter()
                .filter_map(|x| inline.iter().find(|(url, _)| *url == x.url))
                .map(|(_, part)| match part {
                    Ok(data_url) => ContentPart::ImageUrl {
                        image_url: ImageUrl { url: data_url },
                    },
                    Err(notice) => ContentPart::Text { text: notice },
                })
                .collect();
            messages.push(if parts.is_empty() {
                ChatMessage::text("user", user_text(m, input.media))
            } else {
                if !m.body.is_empty() {
                    parts.insert(0, ContentPart::Text { text: &m.body });
                }
                ChatMessage {
                    content: ChatContent::Parts(parts),
                    role: "user",
                }
            });
        }
        // The request holds only the encoded body while the model thinks.
        let body = serde_json::to_vec(&ChatRequest {
            messages,
            model: self.model,
        })
        .map_err(Failure::permanent)?;
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
        let v: Value = serde_json::from_slice(&answer.body).map_err(|_| {
            Failure::permanent("the model endpoint answered something that is not JSON")
        })?;
        v.pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| {
                Failure::permanent("the model endpoint's answer has no choices[0].message.content")
            })
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
    /// The words of `audio`, or why there are none (said to the agent, so no secrets).
    pub async fn text(&self, audio: &Fetched) -> Result<String, String> {
        let extension = audio
            .content_type
            .split('/')
            .nth(1)
            .and_then(|s| s.split(['+', ';']).next())
            .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric()))
            .unwrap_or("bin");
        let file = reqwest::multipart::Part::bytes(audio.bytes.clone())
            .file_name(format!("voice-note.{extension}"))
            .mime_str(&audio.content_type)
            .map_err(|_| "its content type is not a MIME type".to_owned())?;
        let form = reqwest::multipart::Form::new()
            .text("model", self.model.to_owned())
            .part("file", file);
        let mut request = self
            .http
            .post(format!("{}/audio/transcriptions", self.base_url))
            .multipart(form)
            .timeout(self.timeout);
        if let Some(authorization) = self.authorization {
            request = request.header(
                AUTHORIZATION,
                super::sensitive_header(authorization).map_err(|f| f.reason)?,
            );
        }
        let answer = request.send().await.map_err(|e| {
            if e.is_timeout() {
                "the transcription endpoint did not answer in time".to_owned()
            } else {
                "the transcription endpoint could not be reached".to_owned()
            }
        })?;
        let status = answer.status();
        if !status.is_success() {
            return Err(format!(
                "the transcription endpoint answered HTTP {}",
                status.as_u16()
            ));
        }
        let v: Value = answer.json().await.map_err(|_| {
            "the transcription endpoint answered something that is not JSON".to_owned()
        })?;
        v.get("text")
            .and_then(Value::as_str)
            .map(|t| t.trim().to_owned())
            .ok_or_else(|| "the transcription endpoint's answer has no text".to_owned())
    }
}
