//! Twilio's Content API, for the choices an agent offers with a reply (quick replies): `POST
//! {base}/v1/Content` with a JSON body, HTTP Basic auth with the account's SID and Auth Token,
//! answered `201` with the content's sid (`HX…`). WhatsApp shows choices only in a message
//! sent as such a content (`ContentSid`), so each distinct question with its choices is made
//! into a content once (a few buttons as `twilio/quick-reply`, more as a `twilio/list-picker`)
//! and its sid cached in the store for every sender to reuse.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use twilio::rest::FailureClass;
use wagate_core::{
    domain::{AccountSid, ContentSid},
    envelope::MAX_QUICK_REPLY_BUTTONS,
};

use crate::twilio_client::{ClientError, SendError, refused, retry_after, transport_error};

/// The text of a list picker's button, which opens the list.
const LIST_BUTTON: &str = "Choose";

/// What the choices become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Up to [`MAX_QUICK_REPLY_BUTTONS`] buttons under the text.
    QuickReply,
    /// A button that opens a list of up to ten items.
    ListPicker,
}

impl Kind {
    /// The kind for `count` choices.
    pub fn of(count: usize) -> Self {
        if count <= MAX_QUICK_REPLY_BUTTONS {
            Self::QuickReply
        } else {
            Self::ListPicker
        }
    }

    /// Twilio's name of the content type.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QuickReply => "twilio/quick-reply",
            Self::ListPicker => "twilio/list-picker",
        }
    }
}

/// One content to make: the reply's text and its choices.
pub struct Choices<'a> {
    /// The text the choices answer (the content's `body`).
    pub body: &'a str,
    /// The choices, in order; each is also its own id, so a tap comes back with the choice
    /// itself as `ButtonPayload`.
    pub choices: &'a [String],
}

impl Choices<'_> {
    /// What the choices become.
    pub fn kind(&self) -> Kind {
        Kind::of(self.choices.len())
    }

    /// The key the content's sid is cached under: a hash of the account, the kind, the text and
    /// the choices, so that the same question in the same account finds the same content and
    /// anything else does not.
    pub fn cache_key(&self, account: &AccountSid) -> String {
        let identity = json!([
            account.as_str(),
            self.kind().as_str(),
            self.body,
            self.choices
        ]);
        hex::encode(Sha256::digest(identity.to_string().as_bytes()))
    }

    /// The body of the create request, as Twilio's `ContentCreateRequest`. The friendly name
    /// (not shown to the user) carries the cache key, to find a content again in the console.
    fn request(&self, cache_key: &str) -> Value {
        let short = cache_key.get(..16).unwrap_or(cache_key);
        let types = match self.kind() {
            Kind::QuickReply => json!({
                "twilio/quick-reply": {
                    "body": self.body,
                    "actions": self
                        .choices
                        .iter()
                        .map(|c| json!({"title": c, "id": c}))
                        .collect::<Vec<_>>(),
                }
            }),
            Kind::ListPicker => json!({
                "twilio/list-picker": {
                    "body": self.body,
                    "button": LIST_BUTTON,
                    "items": self
                        .choices
                        .iter()
                        .map(|c| json!({"id": c, "item": c}))
                        .collect::<Vec<_>>(),
                }
            }),
        };
        json!({
            "friendly_name": format!("wagate_choices_{short}"),
            "language": "en",
            "types": types,
        })
    }

    /// The choices as plain text after the body, one numbered line each: what is sent when no
    /// content could be made, so the user still gets the question and what to answer.
    pub fn as_text(&self) -> String {
        let mut text = self.body.to_owned();
        text.push('\n');
        for (n, choice) in self.choices.iter().enumerate() {
            text.push_str(&format!("\n{}. {choice}", n + 1));
        }
        text
    }
}

#[derive(Deserialize)]
struct Created {
    sid: String,
}

/// A client of the Content API.
#[derive(Clone)]
pub struct ContentClient {
    http: reqwest::Client,
    /// `{base}/v1/Content`, parsed once.
    url: reqwest::Url,
}

impl ContentClient {
    /// A client of the API at `base` (e.g. `https://content.twilio.com`), each call within
    /// `timeout`. Fails, saying why, when `base` cannot be the base of the API's paths or the
    /// HTTP client cannot be set up.
    pub fn new(base: &str, timeout: Duration) -> Result<Self, ClientError> {
        let mut url = reqwest::Url::parse(base)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && !u.cannot_be_a_base())
            .ok_or_else(|| ClientError::Base(base.to_owned()))?;
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(["v1", "Content"]);
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(ClientError::Http)?;
        Ok(Self { http, url })
    }

    /// Makes a content of `choices` in `account`; its sid. A content made twice (after an
    /// answer that was lost) is only a duplicate in the account, so every failure but a refusal
    /// is worth another try.
    pub async fn create(
        &self,
        account: &AccountSid,
        token: &SecretString,
        choices: &Choices<'_>,
        cache_key: &str,
    ) -> Result<ContentSid, SendError> {
        let response = self
            .http
            .post(self.url.clone())
            .basic_auth(account.as_str(), Some(token.expose_secret()))
            .json(&choices.request(cache_key))
            .send()
            .await
            .map_err(transport_error)?;
        let status = response.status().as_u16();
        let retry_after = retry_after(&response);
        let body = response.bytes().await.map_err(transport_error)?;
        if !(200..300).contains(&status) {
            return Err(refused(status, &body, retry_after));
        }
        serde_json::from_slice::<Created>(&body)
            .ok()
            .and_then(|c| ContentSid::parse(&c.sid).ok())
            .ok_or_else(|| SendError {
                class: FailureClass::Ambiguous,
                http_status: Some(status),
                code: None,
                message: "the Content API answered success without a content sid".into(),
                retry_after: None,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choices(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("Option {i}")).collect()
    }

    #[test]
    fn a_few_choices_are_buttons_and_more_a_list() {
        let few = choices(3);
        let request = Choices {
            body: "Pick one",
            choices: &few,
        }
        .request("0123456789abcdef0123");
        let buttons = &request["types"]["twilio/quick-reply"];
        assert_eq!(buttons["body"], "Pick one");
        assert_eq!(
            buttons["actions"][2],
            json!({"title": "Option 3", "id": "Option 3"})
        );
        assert_eq!(request["friendly_name"], "wagate_choices_0123456789abcdef");
        assert_eq!(request["language"], "en");

        let many = choices(4);
        let request = Choices {
            body: "Pick one",
            choices: &many,
        }
        .request("k");
        let list = &request["types"]["twilio/list-picker"];
        assert_eq!(list["button"], LIST_BUTTON);
        assert_eq!(
            list["items"][3],
            json!({"id": "Option 4", "item": "Option 4"})
        );
    }

    #[test]
    fn the_cache_key_tells_apart_accounts_texts_and_choices() {
        let account = AccountSid::parse(&format!("AC{}", "0f".repeat(16))).expect("a SID");
        let other = AccountSid::parse(&format!("AC{}", "1e".repeat(16))).expect("a SID");
        let yes_no = vec!["Yes".to_owned(), "No".to_owned()];
        let no_yes = vec!["No".to_owned(), "Yes".to_owned()];
        let key = |account: &AccountSid, body: &str, choices: &[String]| {
            Choices { body, choices }.cache_key(account)
        };
        let base = key(&account, "Sure?", &yes_no);
        assert_eq!(base, key(&account, "Sure?", &yes_no));
        assert_ne!(base, key(&other, "Sure?", &yes_no));
        assert_ne!(base, key(&account, "Sure?!", &yes_no));
        assert_ne!(base, key(&account, "Sure?", &no_yes));
    }

    #[test]
    fn the_text_fallback_lists_the_choices_after_the_body() {
        let yes_no = vec!["Yes".to_owned(), "No".to_owned()];
        let text = Choices {
            body: "Sure?",
            choices: &yes_no,
        }
        .as_text();
        assert_eq!(text, "Sure?\n\n1. Yes\n2. No");
    }
}
