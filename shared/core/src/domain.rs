//! Identifiers of the domain, each parsed once at the edge so the rest of the code never
//! re-checks them: a value of these types is valid by construction.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a value from outside was refused; the text is shown to the caller as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(pub String);

macro_rules! string_newtype_serde {
    ($ty:ident) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(d)?;
                $ty::parse(&raw).map_err(serde::de::Error::custom)
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }
    };
}

/// An agent's id: 1–64 of `[A-Za-z0-9_-]`, so it is safe in URLs, NATS subjects and Redis keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentId(String);

impl AgentId {
    /// Parses an agent id as it arrives in a URL path or an admin request.
    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        let ok = (1..=64).contains(&raw.len())
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(InvalidValue(
                "agent id must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'".into(),
            ))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
string_newtype_serde!(AgentId);

/// A phone number in E.164: `+`, a non-zero digit, at most 15 digits in all.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PhoneNumber(String);

impl PhoneNumber {
    /// Parses an E.164 number; spaces, dashes, dots and brackets that people type are not accepted,
    /// so that one user always has one spelling (and one session, one lead).
    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        let digits = raw.strip_prefix('+').unwrap_or("");
        let ok = (2..=15).contains(&digits.len())
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !digits.starts_with('0');
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(InvalidValue(format!(
                "'{}' is not an E.164 phone number (e.g. +14155551234)",
                truncate_for_message(raw)
            )))
        }
    }

    /// The number with its leading `+`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
string_newtype_serde!(PhoneNumber);

/// A WhatsApp address as Twilio writes it in `From`/`To`: `whatsapp:` and then, almost always,
/// an E.164 number. The full address is kept as Twilio sent it, so replies go back to exactly
/// the address that wrote, also for ids that are not phone numbers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WhatsAppAddress {
    raw: String,
    phone: Option<PhoneNumber>,
}

const WHATSAPP_PREFIX: &str = "whatsapp:";

impl WhatsAppAddress {
    /// Parses `whatsapp:<id>`; the id must be non-empty, printable and without whitespace.
    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        let id = raw.strip_prefix(WHATSAPP_PREFIX).ok_or_else(|| {
            InvalidValue(format!(
                "'{}' is not a WhatsApp address (expected whatsapp:+<number>)",
                truncate_for_message(raw)
            ))
        })?;
        if id.is_empty()
            || id.len() > 128
            || id.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(InvalidValue(format!(
                "'{}' is not a WhatsApp address (expected whatsapp:+<number>)",
                truncate_for_message(raw)
            )));
        }
        Ok(Self {
            raw: raw.to_owned(),
            phone: PhoneNumber::parse(id).ok(),
        })
    }

    /// The address of a phone number on WhatsApp.
    pub fn from_phone(phone: &PhoneNumber) -> Self {
        Self {
            raw: format!("{WHATSAPP_PREFIX}{}", phone.as_str()),
            phone: Some(phone.clone()),
        }
    }

    /// The address exactly as Twilio sent it.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The E.164 number, when the address is one.
    pub fn phone(&self) -> Option<&PhoneNumber> {
        self.phone.as_ref()
    }

    /// The user part after `whatsapp:`: the phone number for phone addresses, else the raw id.
    /// This is what names a conversation (`twilio_{agent}_{user}`).
    pub fn user(&self) -> &str {
        &self.raw[WHATSAPP_PREFIX.len()..]
    }
}
string_newtype_serde!(WhatsAppAddress);

/// Twilio's id of one message: `SM`/`MM` and 32 hex digits (34 characters).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MessageSid(String);

impl MessageSid {
    /// Parses a message sid as Twilio sends it.
    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        let ok = raw.len() == 34
            && raw.is_ascii()
            && raw[2..].bytes().all(|b| b.is_ascii_alphanumeric())
            && raw.as_bytes()[0].is_ascii_uppercase()
            && raw.as_bytes()[1].is_ascii_uppercase();
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(InvalidValue(format!(
                "'{}' is not a Twilio MessageSid (34 characters, e.g. SM…)",
                truncate_for_message(raw)
            )))
        }
    }

    /// The sid as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
string_newtype_serde!(MessageSid);

/// A Twilio Account SID: `AC` and 32 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AccountSid(String);

impl AccountSid {
    /// Parses an account sid as typed by an operator or sent by Twilio.
    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        if is_sid(raw, "AC") {
            Ok(Self(raw.to_owned()))
        } else {
            Err(InvalidValue(
                "account_sid must be AC followed by 32 hex digits (see the Twilio Console)".into(),
            ))
        }
    }

    /// The sid as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
string_newtype_serde!(AccountSid);

/// A Content API template sid: `HX` and 32 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContentSid(String);

impl ContentSid {
    /// Parses a template sid.
    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        if is_sid(raw, "HX") {
            Ok(Self(raw.to_owned()))
        } else {
            Err(InvalidValue(
                "content_sid must be HX followed by 32 hex digits (a Twilio Content template)"
                    .into(),
            ))
        }
    }

    /// The sid as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
string_newtype_serde!(ContentSid);

fn is_sid(raw: &str, prefix: &str) -> bool {
    raw.len() == 34 && raw.starts_with(prefix) && raw[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// One conversation: an agent and one WhatsApp user. Its text form is the session id
/// `twilio_{agent_id}_{phone}` that the product promises.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionId {
    agent: AgentId,
    user: String,
}

impl SessionId {
    /// The session of `user` (as in [`WhatsAppAddress::user`]) with `agent`.
    pub fn new(agent: &AgentId, address: &WhatsAppAddress) -> Self {
        Self {
            agent: agent.clone(),
            user: address.user().to_owned(),
        }
    }

    /// The session of a phone number with an agent.
    pub fn for_phone(agent: &AgentId, phone: &PhoneNumber) -> Self {
        Self {
            agent: agent.clone(),
            user: phone.as_str().to_owned(),
        }
    }

    /// The agent of this conversation.
    pub fn agent(&self) -> &AgentId {
        &self.agent
    }

    /// The user part of the id (an E.164 number for phone users).
    pub fn user(&self) -> &str {
        &self.user
    }

    /// A token naming the conversation that is safe inside a NATS subject or a Redis key
    /// (no `.`, `*`, `>` or whitespace): the digits of a phone number, else a hash of the id.
    pub fn subject_token(&self) -> String {
        match self.user.strip_prefix('+') {
            Some(d) if d.bytes().all(|b| b.is_ascii_digit()) => d.to_owned(),
            _ => {
                use sha2::Digest;
                let digest = sha2::Sha256::digest(self.user.as_bytes());
                format!("h{}", hex::encode(&digest[..12]))
            }
        }
    }
}

impl fmt::Display for SessionId {
    /// Written piece by piece: it is part of several store keys per message, and a nested
    /// `write!` costs a formatting pass of its own each time.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("twilio_")?;
        f.write_str(self.agent.as_str())?;
        f.write_str("_")?;
        f.write_str(&self.user)
    }
}

/// Shortens outside input before echoing it in an error, so a huge value cannot blow up a
/// response or a log line.
pub fn truncate_for_message(raw: &str) -> String {
    const MAX: usize = 40;
    match raw.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &raw[..i]),
        None => raw.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_ids() {
        assert!(AgentId::parse("demo_bot-1").is_ok());
        assert!(AgentId::parse("").is_err());
        assert!(AgentId::parse(&"a".repeat(65)).is_err());
        assert!(AgentId::parse("a.b").is_err());
        assert!(AgentId::parse("a/b").is_err());
    }

    #[test]
    fn phones() {
        assert!(PhoneNumber::parse("+14155551234").is_ok());
        assert!(PhoneNumber::parse("14155551234").is_err());
        assert!(PhoneNumber::parse("+0415").is_err());
        assert!(PhoneNumber::parse("+1 415 555").is_err());
        assert!(PhoneNumber::parse("+1234567890123456").is_err());
        assert!(PhoneNumber::parse("+").is_err());
    }

    #[test]
    fn whatsapp_addresses_keep_non_phone_ids() {
        let a = WhatsAppAddress::parse("whatsapp:+14155551234").unwrap();
        assert_eq!(a.phone().unwrap().as_str(), "+14155551234");
        let b = WhatsAppAddress::parse("whatsapp:BR.12ab").unwrap();
        assert!(b.phone().is_none());
        assert_eq!(b.user(), "BR.12ab");
        assert!(WhatsAppAddress::parse("+14155551234").is_err());
        assert!(WhatsAppAddress::parse("whatsapp:").is_err());
        assert!(WhatsAppAddress::parse("whatsapp:a b").is_err());
    }

    #[test]
    fn session_ids() {
        let agent = AgentId::parse("demo").unwrap();
        let a = WhatsAppAddress::parse("whatsapp:+14155551234").unwrap();
        let s = SessionId::new(&agent, &a);
        assert_eq!(s.to_string(), "twilio_demo_+14155551234");
        assert_eq!(s.subject_token(), "14155551234");
        let odd = SessionId::new(&agent, &WhatsAppAddress::parse("whatsapp:x.y*z").unwrap());
        let t = odd.subject_token();
        assert!(t.starts_with('h') && !t.contains(['.', '*', '>']));
    }

    #[test]
    fn sids() {
        assert!(AccountSid::parse(&format!("AC{}", "a".repeat(32))).is_ok());
        assert!(AccountSid::parse(&format!("AC{}", "g".repeat(32))).is_err());
        assert!(MessageSid::parse(&format!("SM{}", "0".repeat(32))).is_ok());
        assert!(MessageSid::parse("SM1").is_err());
        assert!(MessageSid::parse(&format!("SM{}é", "0".repeat(30))).is_err());
        assert!(ContentSid::parse(&format!("HX{}", "b".repeat(32))).is_ok());
    }
}
