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
            .map(|m| {
                let part = match &m.fetched {
                    Ok(f) => Ok(f.data_url()),
                    Err(e) => Err(format!("[the user sent an image; it {e}]")),
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
                ChatMessage::text("user", user_text(m))
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
