//! Twilio's Messages API: `POST /2010-04-01/Accounts/{AccountSid}/Messages.json`, form-encoded,
//! HTTP Basic auth with the account's SID and Auth Token. The base URL is configuration, so
//! tests point it at a local server that speaks the same wire format.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use twilio::rest::{ApiError, FailureClass, classify};
use wagate_core::{domain::AccountSid, failure::Failure};

/// A failed call, classified. Never carries the token.
#[derive(Debug, Clone)]
pub struct SendError {
    /// What to do about it.
    pub class: FailureClass,
    /// HTTP status, when there was an answer.
    pub http_status: Option<u16>,
    /// Twilio's error code.
    pub code: Option<u32>,
    /// Human text.
    pub message: String,
    /// Twilio's `Retry-After`, when given.
    pub retry_after: Option<Duration>,
}

impl SendError {
    /// The failure this answer is for the reply once it is settled that Twilio did not create
    /// the message: permanent for what Twilio will refuse again, otherwise worth another attempt,
    /// no sooner than Twilio's `Retry-After`. Twilio's code goes with it either way.
    pub fn failure(&self) -> Failure {
        let failure = match self.class {
            FailureClass::Permanent => Failure::permanent(self),
            FailureClass::RetryLater | FailureClass::Ambiguous => {
                Failure::transient(self).with_retry_after(self.retry_after)
            }
        };
        failure.with_code(self.code)
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            Some(code) => write!(f, "twilio {code}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// A created message.
#[derive(Debug, Clone, Deserialize)]
pub struct CreatedMessage {
    /// Twilio's message sid.
    pub sid: String,
    /// Initial status (`queued`, `accepted`).
    pub status: Option<String>,
}

/// A message as listed.
#[derive(Debug, Clone, Deserialize)]
pub struct ListedMessage {
    /// Twilio's message sid.
    pub sid: String,
    /// Its text.
    pub body: Option<String>,
    /// Recipient.
    pub to: Option<String>,
    /// Sender.
    pub from: Option<String>,
    /// The Messaging Service it went through, if any.
    #[serde(default)]
    pub messaging_service_sid: Option<String>,
    /// When Twilio created it (RFC 2822).
    pub date_created: Option<String>,
}

impl ListedMessage {
    /// `date_created` parsed.
    pub fn created(&self) -> Option<time::OffsetDateTime> {
        let raw = self.date_created.as_deref()?;
        time::OffsetDateTime::parse(raw, &time::format_description::well_known::Rfc2822).ok()
    }
}

#[derive(Deserialize)]
struct MessageList {
    messages: Vec<ListedMessage>,
}

/// A client of the Messages API.
#[derive(Clone)]
pub struct TwilioClient {
    http: reqwest::Client,
    /// Parsed once: a URL given as text is parsed again on every request, 8,000 instructions
    /// a time (docs/benchmarks.md, change 18).
    base: reqwest::Url,
}

/// Why a [`TwilioClient`] could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `WAGATE_TWILIO_API_BASE` cannot be the base of the API's paths.
    #[error("the Twilio API base {0:?} is not an http(s) URL")]
    Base(String),
    /// The HTTP client could not be set up (no TLS configuration).
    #[error("cannot set up the HTTP client for Twilio: {0}")]
    Http(#[source] reqwest::Error),
}

impl TwilioClient {
    /// A client of the API at `base` (e.g. `https://api.twilio.com`). Fails, saying why, when
    /// `base` cannot be the base of the API's paths or the HTTP client cannot be set up (a
    /// client without the settings would post without its timeouts).
    pub fn new(base: &str, timeout: Duration) -> Result<Self, ClientError> {
        let base = reqwest::Url::parse(base)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && !u.cannot_be_a_base())
            .ok_or_else(|| ClientError::Base(base.to_owned()))?;
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(256)
            .build()
            .map_err(ClientError::Http)?;
        Ok(Self { http, base })
    }

    fn messages_url(&self, account: &AccountSid) -> reqwest::Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend([
                "2010-04-01",
                "Accounts",
                account.as_str(),
                "Messages.json",
            ]);
        }
        url
    }

    /// Creates a message from form fields (`To`, `From`, `Body` or `ContentSid`, …).
    pub async fn create(
        &self,
        account: &AccountSid,
        token: &SecretString,
        form: &[(&str, &str)],
    ) -> Result<CreatedMessage, SendError> {
        let response = self
            .http
            .post(self.messages_url(account))
            .basic_auth(account.as_str(), Some(token.expose_secret()))
            .form(form)
            .send()
            .await
            .map_err(transport_error)?;
        let status = response.status().as_u16();
        let retry_after = retry_after(&response);
        let body = response.bytes().await.map_err(transport_error)?;
        if (200..300).contains(&status) {
            return serde_json::from_slice(&body).map_err(|_| SendError {
                class: FailureClass::Ambiguous,
                http_status: Some(status),
                code: None,
                message: "Twilio answered success with a body that is not a message".into(),
                retry_after: None,
            });
        }
        Err(refused(status, &body, retry_after))
    }

    /// The most recent messages to `to` (from `from`, when the sender is a number rather than
    /// a Messaging Service, which picks its number itself), newest first: used after an
    /// ambiguous create to find out whether Twilio made the message.
    pub async fn recent(
        &self,
        account: &AccountSid,
        token: &SecretString,
        from: Option<&str>,
        to: &str,
    ) -> Result<Vec<ListedMessage>, SendError> {
        let mut query = vec![("To", to), ("PageSize", "50")];
        if let Some(from) = from {
            query.push(("From", from));
        }
        let response = self
            .http
            .get(self.messages_url(account))
            .basic_auth(account.as_str(), Some(token.expose_secret()))
            .query(&query)
            .send()
            .await
            .map_err(transport_error)?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(SendError {
                class: FailureClass::Ambiguous,
                http_status: Some(status),
                code: None,
                message: format!("listing messages answered HTTP {status}"),
                retry_after: None,
            });
        }
        let list: MessageList = response.json().await.map_err(transport_error)?;
        Ok(list.messages)
    }
}

/// Twilio's `Retry-After`, when it gave one in seconds.
pub(crate) fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// The failure an answer other than success is, read from Twilio's error JSON when there is one.
pub(crate) fn refused(status: u16, body: &[u8], retry_after: Option<Duration>) -> SendError {
    let api: Option<ApiError> = serde_json::from_slice(body).ok();
    let code = api.as_ref().and_then(|a| a.code);
    SendError {
        class: classify(status, code),
        http_status: Some(status),
        code,
        message: api
            .and_then(|a| a.message)
            .unwrap_or_else(|| format!("HTTP {status}")),
        retry_after,
    }
}

pub(crate) fn transport_error(e: reqwest::Error) -> SendError {
    // A request that never reached Twilio is safe to repeat; one that may have (timeout while
    // waiting for the answer, a dropped connection) is ambiguous.
    let class = if e.is_connect() {
        FailureClass::RetryLater
    } else {
        FailureClass::Ambiguous
    };
    let mut message = e.to_string();
    if let Some(url) = e.url() {
        message = message.replace(url.as_str(), "<twilio>");
    }
    SendError {
        class,
        http_status: None,
        code: None,
        message: format!("Twilio unreachable: {message}"),
        retry_after: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account() -> AccountSid {
        AccountSid::parse(&format!("AC{}", "0f".repeat(16))).expect("a valid SID")
    }

    #[test]
    fn the_messages_url_follows_the_base_with_or_without_a_path_or_slash() {
        let sid = account();
        for (base, expected) in [
            (
                "https://api.twilio.com",
                "https://api.twilio.com/2010-04-01",
            ),
            (
                "https://api.twilio.com/",
                "https://api.twilio.com/2010-04-01",
            ),
            (
                "http://127.0.0.1:8080/twilio",
                "http://127.0.0.1:8080/twilio/2010-04-01",
            ),
            (
                "http://127.0.0.1:8080/twilio/",
                "http://127.0.0.1:8080/twilio/2010-04-01",
            ),
        ] {
            let client = TwilioClient::new(base, Duration::from_secs(1)).expect("a usable base");
            assert_eq!(
                client.messages_url(&sid).as_str(),
                format!("{expected}/Accounts/{sid}/Messages.json"),
                "base {base}"
            );
        }
    }

    #[test]
    fn a_base_that_cannot_hold_the_api_paths_is_refused_with_the_reason() {
        for base in [
            "api.twilio.com",
            "mailto:ops@example.com",
            "ftp://example.com",
            "http://",
        ] {
            let e = TwilioClient::new(base, Duration::from_secs(1))
                .err()
                .unwrap_or_else(|| panic!("{base} was accepted"));
            assert!(e.to_string().contains("not an http(s) URL"), "{base}: {e}");
        }
    }
}
