//! Agent backends behind one call: given the conversation so far and the new message, produce
//! the reply. Failures say whether trying again can help.

mod echo;
mod openai;
mod webhook;

use std::{borrow::Cow, sync::Arc, time::Duration};

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use store::{Role, Turn};
use wagate_core::{
    agent::{Agent, Backend},
    crypto::{Keyring, SecretPurpose},
    envelope::InboundMessage,
    failure::Failure,
};

/// What an agent answered: text, and media for the user (public https URLs), choices for the
/// user to tap, and whether it hands the conversation to a person.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentReply {
    /// The reply text (may be empty).
    pub text: String,
    /// Media to send, in order.
    pub media: Vec<String>,
    /// The agent cannot help further: pause the conversation for a person.
    pub handoff: bool,
    /// Choices offered with the text (quick replies), in order.
    pub quick_replies: Vec<String>,
}

impl AgentReply {
    /// Text only.
    fn text(text: String) -> Self {
        Self {
            text,
            ..Self::default()
        }
    }
}

/// What a backend gets for one turn.
pub struct TurnInput<'a> {
    /// The agent.
    pub agent: &'a Agent,
    /// The session id text (`twilio_{agent}_{phone}`).
    pub session_id: &'a str,
    /// The most recent turns, oldest first, without the new message.
    pub history: &'a [Turn],
    /// The new message (or messages, for a burst handled as one turn).
    pub messages: &'a [InboundMessage],
    /// The images of `messages` fetched for a model that sees them, by `MediaUrl`.
    pub media: &'a [crate::media::Medium],
    /// Images of the history's last user turns, fetched again for a model that sees them.
    pub earlier: &'a [crate::media::Medium],
}

/// One message of the conversation as chat endpoints take it, `{"content": …, "role": …}`,
/// written straight into the request: the turns of the history are borrowed, not copied into a
/// JSON tree first.
#[derive(Serialize)]
struct ChatMessage<'a> {
    content: ChatContent<'a>,
    role: &'static str,
}

/// A message's content: text, or parts (text and images) for a model that sees images.
#[derive(Serialize)]
#[serde(untagged)]
enum ChatContent<'a> {
    Text(Cow<'a, str>),
    Parts(Vec<ContentPart<'a>>),
}

/// One part of a message's content, as OpenAI's Chat Completions API names them.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ContentPart<'a> {
    Text { text: &'a str },
    ImageUrl { image_url: ImageUrl<'a> },
    File { file: FilePart<'a> },
}

/// A file given inline: its name and its bytes as a `data:` URL.
#[derive(Serialize)]
struct FilePart<'a> {
    filename: &'a str,
    file_data: &'a str,
}

#[derive(Serialize)]
struct ImageUrl<'a> {
    url: &'a str,
}

impl<'a> ChatMessage<'a> {
    fn text(role: &'static str, text: impl Into<Cow<'a, str>>) -> Self {
        Self {
            content: ChatContent::Text(text.into()),
            role,
        }
    }

    /// A turn of the history. A business message a person wrote is the assistant's turn too
    /// (the user saw it from the business), its author left out: what matters to the model
    /// is what was said.
    fn turn(t: &'a Turn) -> Self {
        let role = match t.role {
            Role::User => "user",
            Role::Assistant => "assistant",
        };
        Self::text(role, t.content.as_str())
    }
}

/// Runs agent backends; holds the HTTP client they share.
#[derive(Clone)]
pub struct AgentRunner {
    http: Arc<transport::Transport>,
    /// For uploads (voice notes to transcription): multipart over HTTP/1.1, a few at a time.
    files: reqwest::Client,
    keyring: std::sync::Arc<Keyring>,
    default_timeout: Duration,
}

impl AgentRunner {
    /// A runner with `default_timeout` for backends that do not set their own, making up to
    /// `concurrency` agent calls at once (see [`transport`] for how they reach the hosts).
    /// Fails when the HTTP client cannot be set up (no TLS configuration), which a worker must
    /// say at start rather than at its first agent call.
    pub fn new(
        keyring: std::sync::Arc<Keyring>,
        default_timeout: Duration,
        concurrency: usize,
    ) -> anyhow::Result<Self> {
        let http = transport::Transport::new(concurrency, Duration::from_secs(10))
            .map_err(|e| anyhow::anyhow!("cannot set up the agent HTTP client: {e}"))?;
        let files = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| anyhow::anyhow!("cannot set up the upload HTTP client: {e}"))?;
        Ok(Self {
            http: Arc::new(http),
            files,
            keyring,
            default_timeout,
        })
    }

    /// Produces the reply of one turn. Each backend's call is boxed: a turn holds it for the
    /// agent's seconds, and boxed it takes its own backend's room only, not that of the largest
    /// (a webhook call does not carry room for an OpenAI call's tool rounds), nor the turn's.
    pub async fn reply(&self, input: &TurnInput<'_>) -> Result<AgentReply, Failure> {
        let id = &input.agent.id;
        match &input.agent.backend {
            Backend::Echo => Ok(AgentReply::text(echo::reply(input))),
            Backend::Openai {
                base_url,
                credentials,
                model,
                api_key,
                system_prompt,
                timeout_ms,
                tools,
                ..
            } => {
                let authorization =
                    self.openai_authorization(id, api_key.as_ref(), credentials.as_ref())?;
                let call = openai::Call {
                    http: &self.http,
                    base_url,
                    model,
                    authorization: authorization.as_ref(),
                    system_prompt: system_prompt.as_deref(),
                    timeout: self.timeout(*timeout_ms),
                    tools: *tools,
                };
                Box::pin(call.reply(input)).await
            }
            Backend::Webhook {
                url,
                credentials,
                secret,
                timeout_ms,
                ..
            } => {
                let secret = self
                    .keyring
                    .open(id, SecretPurpose::WebhookSecret, secret)
                    .map_err(Failure::permanent)?;
                let authorization = self.basic_authorization(id, credentials.as_ref())?;
                let endpoint = webhook::Endpoint {
                    url,
                    secret: &secret,
                    authorization: authorization.as_ref(),
                    timeout: self.timeout(*timeout_ms),
                };
                Box::pin(webhook::reply(&self.http, &endpoint, input)).await
            }
        }
    }

    /// Transcribes the voice notes among `media` with the agent's transcription model (an
    /// OpenAI-compatible agent's own endpoint, or a webhook agent's `transcription`), one
    /// after the other, into each medium's `transcript`: the user's words, for the history
    /// and the agent. Nothing for an agent that does not transcribe (`fetch_for` then left a
    /// notice, or the webhook gets the audio alone).
    pub async fn transcribe(&self, agent: &Agent, media: &mut [crate::media::Medium]) {
        let (base_url, model, api_key, credentials, timeout_ms) = match &agent.backend {
            Backend::Openai {
                base_url,
                credentials,
                api_key,
                transcription_model: Some(model),
                timeout_ms,
                ..
            } => (
                base_url,
                model,
                api_key.as_ref(),
                credentials.as_ref(),
                timeout_ms,
            ),
            Backend::Webhook {
                transcription: Some(t),
                timeout_ms,
                ..
            } => (&t.base_url, &t.model, t.api_key.as_ref(), None, timeout_ms),
            _ => return,
        };
        let is_audio =
            |m: &crate::media::Medium| m.kind == crate::media::Kind::Audio && m.fetched.is_ok();
        if !media.iter().any(is_audio) {
            return;
        }
        // Opened once for all of the turn's voice notes.
        let authorization = self.openai_authorization(&agent.id, api_key, credentials);
        for medium in media.iter_mut() {
            let (crate::media::Kind::Audio, Ok(audio)) = (medium.kind, &medium.fetched) else {
                continue;
            };
            let authorization = match &authorization {
                Ok(a) => a.as_ref(),
                Err(e) => {
                    medium.transcript = Some(Err(e.clone()));
                    continue;
                }
            };
            let call = openai::Transcription {
                http: &self.files,
                base_url,
                model,
                authorization,
                timeout: self.timeout(*timeout_ms),
            };
            medium.transcript = Some(call.text(audio).await);
        }
    }

    /// The `Authorization` of an OpenAI-compatible endpoint: its API key as a bearer token,
    /// else the credentials its URL was saved with.
    fn openai_authorization(
        &self,
        id: &wagate_core::domain::AgentId,
        api_key: Option<&wagate_core::crypto::SealedSecret>,
        credentials: Option<&wagate_core::crypto::SealedSecret>,
    ) -> Result<Option<SecretString>, Failure> {
        let bearer = api_key
            .map(|k| self.keyring.open(id, SecretPurpose::AgentApiKey, k))
            .transpose()
            .map_err(Failure::permanent)?
            .map(|k| SecretString::from(format!("Bearer {}", k.expose_secret())));
        match bearer {
            Some(b) => Ok(Some(b)),
            None => self.basic_authorization(id, credentials),
        }
    }

    /// The `Authorization` of HTTP Basic authentication for the credentials an agent URL was
    /// saved with.
    fn basic_authorization(
        &self,
        id: &wagate_core::domain::AgentId,
        credentials: Option<&wagate_core::crypto::SealedSecret>,
    ) -> Result<Option<SecretString>, Failure> {
        credentials
            .map(|c| {
                self.keyring
                    .open(id, SecretPurpose::UrlCredentials, c)
                    .map(|userinfo| wagate_core::redact::basic_authorization(&userinfo))
                    .map_err(Failure::permanent)
            })
            .transpose()
    }

    fn timeout(&self, per_agent_ms: Option<u64>) -> Duration {
        per_agent_ms.map_or(self.default_timeout, Duration::from_millis)
    }
}

/// The text of a user turn as kept in the session: the body, then one line per attachment
/// (a voice note as its transcript, a medium that could not be had as a notice, others as
/// their type and link), location or button, so the history says what the user sent.
pub fn user_text(m: &InboundMessage, fetched: &[crate::media::Medium]) -> String {
    let mut lines = Vec::new();
    if !m.body.is_empty() {
        lines.push(m.body.clone());
    }
    for media in &m.media {
        lines.push(medium_text(media, fetched));
    }
    if let Some(l) = &m.location {
        let name = l.label.as_deref().or(l.address.as_deref()).unwrap_or("");
        lines.push(
            format!("[location: {},{} {name}]", l.latitude, l.longitude)
                .trim_end()
                .to_owned(),
        );
    }
    if let Some(b) = &m.button
        && m.body.is_empty()
    {
        lines.push(format!(
            "[button: {}]",
            b.text.as_deref().or(b.payload.as_deref()).unwrap_or("")
        ));
    }
    lines.join("\n")
}

/// The line a medium is in the user's turn: a voice note's transcript, a notice for what the
/// agent cannot have, else its type and link.
fn medium_text(media: &wagate_core::envelope::Media, fetched: &[crate::media::Medium]) -> String {
    let heard = fetched
        .iter()
        .find(|f| f.url == media.url)
        .and_then(crate::media::Medium::as_text);
    heard.unwrap_or_else(|| {
        format!(
            "[{}: {}]",
            media.content_type.as_deref().unwrap_or("media"),
            media.url
        )
    })
}

/// Classifies an HTTP failure of a backend.
fn http_failure(backend: &str, answer: &transport::Answer) -> Failure {
    let snippet: String = String::from_utf8_lossy(&answer.body)
        .chars()
        .take(200)
        .collect();
    let status = answer.status;
    let text = format!("{backend} answered HTTP {}: {snippet}", status.as_u16());
    if status.as_u16() == 429 || status.as_u16() == 408 || status.is_server_error() {
        Failure::transient(text)
    } else {
        Failure::permanent(text)
    }
}

/// A header value made of text wagate composed; a byte HTTP does not allow is a bad setting.
fn header_value(text: String) -> Result<http::HeaderValue, Failure> {
    http::HeaderValue::try_from(text)
        .map_err(|_| Failure::permanent("a header value holds a byte HTTP does not allow"))
}

/// A header value that holds a secret: marked sensitive, so that HTTP/2's header compression
/// leaves it out of its table and debug output does not show it.
fn sensitive_header(secret: &SecretString) -> Result<http::HeaderValue, Failure> {
    let mut value = header_value(secret.expose_secret().to_owned())?;
    value.set_sensitive(true);
    Ok(value)
}

fn send_failure(backend: &str, e: &transport::CallError) -> Failure {
    match e {
        transport::CallError::TooLarge => Failure::permanent(format!("{backend} {e}")),
        transport::CallError::Timeout | transport::CallError::Unreachable(_) => {
            Failure::transient(format!("{backend} {e}"))
        }
    }
}
