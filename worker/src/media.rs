//! Inbound media (photos, voice notes, documents). Twilio's `MediaUrl` is on its API host and
//! needs the account's credentials, so a model given the bare link could never open it. The
//! worker fetches each medium itself, with HTTP Basic auth (Account SID and Auth Token), and
//! only from the origin of `WAGATE_TWILIO_API_BASE`: the Auth Token must never reach a host a
//! webhook's sender chose. Twilio answers with a redirect to its media CDN, followed without
//! the credentials. Each fetch has a size limit (`WAGATE_MEDIA_MAX_BYTES`) and a time limit,
//! and what cannot be fetched reaches the agent as a notice, never as a failed turn: the user's
//! words still get an answer.

use std::time::Duration;

use base64::Engine;
use reqwest::{StatusCode, Url, header};
use secrecy::{ExposeSecret, SecretString};

/// The one document type models are given: OpenAI's Chat Completions takes PDFs as file parts.
const PDF: &str = "application/pdf";

/// Redirects followed after Twilio's API (it sends one, to the CDN).
const MAX_REDIRECTS: usize = 3;

/// Why a medium was not fetched; the text is what the agent is told, so it holds no URL's
/// query or credentials.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MediaError {
    /// Not a URL on the Twilio API's origin: not fetched at all.
    #[error("was not fetched: it is not on Twilio's API host")]
    ForeignHost,
    /// Not a URL.
    #[error("was not fetched: its URL is malformed")]
    Malformed,
    /// Over `WAGATE_MEDIA_MAX_BYTES`.
    #[error("is too large (over {0} bytes)")]
    TooLarge(u64),
    /// Twilio or its CDN answered with an error.
    #[error("could not be fetched: Twilio answered HTTP {0}")]
    Status(u16),
    /// A redirect that leaves HTTPS, has no location, or one redirect too many.
    #[error("could not be fetched: Twilio's redirect could not be followed")]
    Redirect,
    /// Declared an image or audio, served as something else.
    #[error("is not what Twilio declared (the server sent {0})")]
    Unexpected(String),
    /// A kind of file the agent's model cannot read (only PDFs are given to models).
    #[error("is a {0} file, which this agent cannot read")]
    Unsupported(String),
    /// Audio for an agent whose transcription is turned off.
    #[error("was not transcribed: this agent has no transcription model")]
    NotTranscribed,
    /// No answer in time, or the connection failed.
    #[error("could not be downloaded: {0}")]
    Transfer(String),
}

/// A fetched medium.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The content type the server gave (without parameters), else the one Twilio declared.
    pub content_type: String,
    /// The bytes (shared with the cache of recent images).
    pub bytes: bytes::Bytes,
}

impl Fetched {
    /// As a `data:` URL, the way OpenAI-compatible models take an image inline.
    pub fn data_url(&self) -> String {
        let encoded = base64::engine::general_purpose::STANDARD.encode(&self.bytes);
        format!("data:{};base64,{encoded}", self.content_type)
    }
}

/// What a medium is to the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A photo or sticker: shown to the model inline.
    Image,
    /// A voice note or audio file: transcribed.
    Audio,
    /// A PDF: given to the model as a file part.
    Document,
    /// A shared contact (a vCard): read as structured text.
    Contact,
    /// Anything else (a document, a video, a contact card): passed on to a webhook agent.
    Other,
}

/// A medium of the turn's messages and what fetching it gave.
#[derive(Debug)]
pub struct Medium {
    /// Its `MediaUrl`, as the message has it.
    pub url: String,
    /// Image or audio.
    pub kind: Kind,
    /// The medium, or why the agent gets a notice instead.
    pub fetched: Result<Fetched, MediaError>,
    /// For audio, once transcribed: the words, or why there are none.
    pub transcript: Option<Result<String, wagate_core::failure::Failure>>,
}

impl Medium {
    /// How the medium reads in the user's turn (the history and the model's text): a voice
    /// note as its transcript, marked as one; anything the agent cannot have as a notice.
    /// `None` for an image shown to the model inline.
    pub fn as_text(&self) -> Option<String> {
        match (&self.kind, &self.fetched, &self.transcript) {
            (Kind::Audio, _, Some(Ok(words))) => Some(format!("[voice note] {words}")),
            (Kind::Audio, _, Some(Err(why))) => Some(format!(
                "[the user sent a voice note; it could not be transcribed: {why}]"
            )),
            (Kind::Audio, Err(e), None) => Some(format!("[the user sent a voice note; it {e}]")),
            (Kind::Image, Err(e), _) => Some(format!("[the user sent an image; it {e}]")),
            (Kind::Contact, Ok(card), _) => Some(contact_text(card)),
            (Kind::Contact, Err(e), _) => Some(format!("[the user shared a contact; it {e}]")),
            (Kind::Document | Kind::Other, Err(e), _) => {
                Some(format!("[the user sent a file; it {e}]"))
            }
            (Kind::Image | Kind::Document | Kind::Other, Ok(_), _) | (Kind::Audio, Ok(_), None) => {
                None
            }
        }
    }
}

/// Most bytes of recent images kept for later turns ([`MediaFetcher::earlier_images`]).
const RECENT_BYTES: u64 = 32 * 1024 * 1024;
/// How long a recent image is kept: a conversation about a photo happens in minutes.
const RECENT_FOR: Duration = Duration::from_secs(600);
/// Turns of history searched for earlier images, and images shown again at most: a photo
/// from long ago is talked about by its description, not looked at again.
const EARLIER_TURNS: usize = 6;
const EARLIER_IMAGES: usize = 4;

/// Fetches inbound media from Twilio.
pub struct MediaFetcher {
    client: reqwest::Client,
    api: Url,
    max_bytes: u64,
    timeout: Duration,
    /// Images fetched lately, by `MediaUrl`, so that the next turns show them to the model
    /// again without asking Twilio (the history keeps only their links).
    recent: moka::sync::Cache<String, Fetched>,
}

impl MediaFetcher {
    /// A fetcher for media on `api_base`'s origin, of at most `max_bytes`, each fetch within
    /// `timeout`. Redirects are followed by hand, so that the credentials go to the API host
    /// and nowhere else.
    pub fn new(api_base: &str, max_bytes: u64, timeout: Duration) -> anyhow::Result<Self> {
        let api = Url::parse(api_base)
            .map_err(|e| anyhow::anyhow!("WAGATE_TWILIO_API_BASE is not a URL: {e}"))?;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| anyhow::anyhow!("cannot set up the media HTTP client: {e}"))?;
        let recent = moka::sync::Cache::builder()
            .max_capacity(RECENT_BYTES)
            .weigher(|_, f: &Fetched| u32::try_from(f.bytes.len()).unwrap_or(u32::MAX))
            .time_to_live(RECENT_FOR)
            .build();
        Ok(Self {
            client,
            api,
            max_bytes,
            timeout,
            recent,
        })
    }

    /// The images of the last user turns of `history` (as `user_text` wrote them: a line
    /// `[image/…: <MediaUrl>]`), fetched again for a model that should still see them: from
    /// the recent images when there, else from Twilio. An image that cannot be had is left
    /// out: the turn keeps its line.
    pub async fn earlier_images(
        &self,
        channel: &shared::directory::ResolvedChannel,
        history: &[store::Turn],
    ) -> Vec<Medium> {
        let urls: Vec<&str> = history
            .iter()
            .rev()
            .take(EARLIER_TURNS)
            .filter(|t| t.role == store::Role::User)
            .flat_map(|t| t.content.lines().filter_map(image_link))
            .take(EARLIER_IMAGES)
            .collect();
        let mut out = Vec::with_capacity(urls.len());
        for url in urls {
            let fetched = match self.recent.get(url) {
                Some(f) => f,
                None => match self
                    .fetch(
                        url,
                        None,
                        channel.channel.account_sid.as_str(),
                        &channel.auth_token,
                    )
                    .await
                {
                    Ok(f) if f.content_type.starts_with("image/") => {
                        self.recent.insert(url.to_owned(), f.clone());
                        f
                    }
                    _ => continue,
                },
            };
            out.push(Medium {
                url: url.to_owned(),
                kind: Kind::Image,
                fetched: Ok(fetched),
                transcript: None,
            });
        }
        out
    }

    /// Fetches the media of `msgs` an agent can use, with the channel's credentials, one after
    /// the other (a message has at most ten): for an OpenAI-compatible agent its images (its
    /// model sees them), PDFs (given as files) and voice notes (its transcription model,
    /// unless turned off, hears them), any other file becoming a notice; for a webhook agent
    /// every medium, passed on in its request. The echo agent gets nothing fetched: it keeps
    /// the text lines of `user_text`.
    pub async fn fetch_for(
        &self,
        channel: &shared::directory::ResolvedChannel,
        msgs: &[wagate_core::envelope::InboundMessage],
    ) -> Vec<Medium> {
        let (openai, transcription_model) = match &channel.agent.backend {
            wagate_core::agent::Backend::Openai {
                transcription_model,
                ..
            } => (true, transcription_model.as_ref()),
            wagate_core::agent::Backend::Webhook { .. } => (false, None),
            wagate_core::agent::Backend::Echo => return Vec::new(),
        };
        let mut out = Vec::new();
        for media in msgs.iter().flat_map(|m| &m.media) {
            let declared = media.content_type.as_deref();
            let kind = match declared.and_then(|c| c.split('/').next()) {
                Some("image") => Kind::Image,
                Some("audio") => Kind::Audio,
                _ if declared == Some(PDF) => Kind::Document,
                _ if declared.is_some_and(is_vcard) => Kind::Contact,
                _ => Kind::Other,
            };
            let refused = match kind {
                Kind::Audio if openai && transcription_model.is_none() => {
                    Some(MediaError::NotTranscribed)
                }
                Kind::Other if openai => Some(MediaError::Unsupported(
                    declared.unwrap_or("unknown").to_owned(),
                )),
                _ => None,
            };
            if let Some(refused) = refused {
                out.push(Medium {
                    url: media.url.clone(),
                    kind,
                    fetched: Err(refused),
                    transcript: None,
                });
                continue;
            }
            let fetched = self
                .fetch(
                    &media.url,
                    declared,
                    channel.channel.account_sid.as_str(),
                    &channel.auth_token,
                )
                .await
                .and_then(|f| {
                    // The model is told what it is; a server that says otherwise is not
                    // believed to have sent it.
                    let expected = match kind {
                        Kind::Image => "image/",
                        Kind::Audio => "audio/",
                        Kind::Document => PDF,
                        Kind::Contact | Kind::Other => "",
                    };
                    if f.content_type.starts_with(expected) {
                        Ok(f)
                    } else {
                        Err(MediaError::Unexpected(f.content_type))
                    }
                });
            match &fetched {
                Ok(f) if kind == Kind::Image => self.recent.insert(media.url.clone(), f.clone()),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "an inbound medium reaches the agent as a notice");
                }
            }
            out.push(Medium {
                url: media.url.clone(),
                kind,
                fetched,
                transcript: None,
            });
        }
        out
    }

    /// Fetches `url` with the account's credentials; `declared` is Twilio's
    /// `MediaContentType{N}`, used when the server gives none.
    pub async fn fetch(
        &self,
        url: &str,
        declared: Option<&str>,
        account_sid: &str,
        auth_token: &SecretString,
    ) -> Result<Fetched, MediaError> {
        let url = Url::parse(url).map_err(|_| MediaError::Malformed)?;
        if url.origin() != self.api.origin() {
            tracing::warn!(
                host = url.host_str().unwrap_or(""),
                "a MediaUrl not on Twilio's API host was not fetched"
            );
            return Err(MediaError::ForeignHost);
        }
        tokio::time::timeout(
            self.timeout,
            self.fetch_from_api(url, declared, account_sid, auth_token),
        )
        .await
        .map_err(|_| MediaError::Transfer(format!("no answer within {:?}", self.timeout)))?
    }

    async fn fetch_from_api(
        &self,
        url: Url,
        declared: Option<&str>,
        account_sid: &str,
        auth_token: &SecretString,
    ) -> Result<Fetched, MediaError> {
        let mut response = self
            .client
            .get(url)
            .basic_auth(account_sid, Some(auth_token.expose_secret()))
            .send()
            .await
            .map_err(transfer)?;
        let mut redirects = 0;
        while response.status().is_redirection() {
            redirects += 1;
            let next = response
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| response.url().join(l).ok())
                .filter(|next| next.scheme() == "https" || next.scheme() == self.api.scheme())
                .filter(|_| redirects <= MAX_REDIRECTS)
                .ok_or(MediaError::Redirect)?;
            // Without credentials: the CDN's URL is signed, and it is not Twilio's API.
            response = self.client.get(next).send().await.map_err(transfer)?;
        }
        if response.status() != StatusCode::OK {
            return Err(MediaError::Status(response.status().as_u16()));
        }
        if response
            .content_length()
            .is_some_and(|n| n > self.max_bytes)
        {
            return Err(MediaError::TooLarge(self.max_bytes));
        }
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .or(declared)
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().to_ascii_lowercase())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "application/octet-stream".to_owned());
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transfer)? {
            if (bytes.len() + chunk.len()) as u64 > self.max_bytes {
                return Err(MediaError::TooLarge(self.max_bytes));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Fetched {
            content_type,
            bytes: bytes.into(),
        })
    }
}

/// Whether a content type is a vCard's (WhatsApp's shared contacts).
fn is_vcard(content_type: &str) -> bool {
    let t = content_type.split(';').next().unwrap_or("").trim();
    t.eq_ignore_ascii_case("text/vcard") || t.eq_ignore_ascii_case("text/x-vcard")
}

/// A vCard as the user's turn reads it: `[contact: <name>, <phone>, <email>, <organisation>]`
/// per card, from its `FN` (or `N`), `TEL`, `EMAIL` and `ORG` properties (folded lines
/// unfolded, parameters dropped). What is not a vCard says so.
fn contact_text(card: &Fetched) -> String {
    let text = String::from_utf8_lossy(&card.bytes);
    let unfolded = text.replace("\r\n ", "").replace("\n ", "");
    let mut cards = Vec::new();
    let (mut full_name, mut name, mut rest) = (None, None, Vec::new());
    for line in unfolded.lines() {
        let Some((property, value)) = line.split_once(':') else {
            continue;
        };
        let property = property
            .split(';')
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        let value = value.replace("\\,", ",").replace(';', " ");
        let value = value.split_whitespace().collect::<Vec<_>>().join(" ");
        match property.as_str() {
            "BEGIN" => (full_name, name, rest) = (None, None, Vec::new()),
            "END" => {
                let fields: Vec<String> = full_name
                    .take()
                    .or(name.take())
                    .into_iter()
                    .chain(rest.drain(..))
                    .collect();
                if !fields.is_empty() {
                    cards.push(format!("[contact: {}]", fields.join(", ")));
                }
            }
            _ if value.is_empty() => {}
            "FN" => full_name = Some(value),
            "N" => name = Some(value),
            "TEL" | "EMAIL" | "ORG" => rest.push(value),
            _ => {}
        }
    }
    if cards.is_empty() {
        "[the user shared a contact that could not be read]".to_owned()
    } else {
        cards.join("\n")
    }
}

/// The `MediaUrl` of a line `[image/…: <url>]` of a user's turn.
fn image_link(line: &str) -> Option<&str> {
    let (kind, url) = line
        .strip_prefix('[')?
        .strip_suffix(']')?
        .split_once(": ")?;
    kind.starts_with("image/").then_some(url)
}

/// A transfer error, without the URL (which reqwest's text includes).
fn transfer(e: reqwest::Error) -> MediaError {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "the transfer failed"
    };
    MediaError::Transfer(what.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_url_off_the_api_origin_is_refused_before_any_request() {
        let f = MediaFetcher::new("https://api.twilio.com", 1024, Duration::from_secs(1)).unwrap();
        let token = SecretString::from("token");
        for url in [
            "https://evil.example/2010-04-01/Accounts/AC1/Messages/MM1/Media/ME1",
            "http://api.twilio.com/2010-04-01/x",
            "https://api.twilio.com:8443/x",
            "https://api.twilio.com.evil.example/x",
        ] {
            let got = f.fetch(url, None, "AC1", &token).await;
            assert_eq!(got, Err(MediaError::ForeignHost), "{url}");
        }
        assert_eq!(
            f.fetch("not a url", None, "AC1", &token).await,
            Err(MediaError::Malformed)
        );
    }

    #[test]
    fn a_shared_contact_reads_as_its_name_phone_email_and_organisation() {
        let card = Fetched {
            content_type: "text/vcard".into(),
            bytes: "BEGIN:VCARD\r\nVERSION:3.0\r\nN:Lovelace;Ada;;;\r\nFN:Ada Lovelace\r\nORG:Analytical\r\n  Engines\r\nTEL;type=CELL;waid=14155550100:+1 415-555-0100\r\nEMAIL;type=INTERNET:ada@example.com\r\nEND:VCARD\r\nBEGIN:VCARD\r\nN:Babbage;Charles\r\nEND:VCARD\r\n"
                .as_bytes()
                .to_vec()
                .into(),
        };
        assert_eq!(
            contact_text(&card),
            "[contact: Ada Lovelace, Analytical Engines, +1 415-555-0100, ada@example.com]\n[contact: Babbage Charles]"
        );
        let junk = Fetched {
            content_type: "text/vcard".into(),
            bytes: b"\xff\xfe not a card".to_vec().into(),
        };
        assert_eq!(
            contact_text(&junk),
            "[the user shared a contact that could not be read]"
        );
        assert!(is_vcard("text/x-vcard; charset=utf-8"));
    }

    #[test]
    fn a_data_url_carries_the_type_and_the_bytes() {
        let f = Fetched {
            content_type: "image/png".into(),
            bytes: vec![1, 2, 3].into(),
        };
        assert_eq!(f.data_url(), "data:image/png;base64,AQID");
    }
}
