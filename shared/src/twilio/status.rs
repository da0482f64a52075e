//! Twilio's message status callbacks. They arrive in any order, so a status only replaces one
//! that comes earlier in a message's life: a late `sent` never overwrites `delivered` or `read`.

use serde::{Deserialize, Serialize};

use super::form::first;
use crate::domain::{InvalidValue, MessageSid};

/// The life of an outbound message, as Twilio reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageStatus {
    /// Accepted by a Messaging Service.
    Accepted,
    /// Scheduled for later.
    Scheduled,
    /// Waiting to be sent.
    Queued,
    /// Being sent.
    Sending,
    /// Handed to WhatsApp.
    Sent,
    /// On the user's phone.
    Delivered,
    /// Seen by the user.
    Read,
    /// Could not be delivered.
    Undelivered,
    /// Could not be sent.
    Failed,
    /// Canceled before sending.
    Canceled,
}

impl MessageStatus {
    /// Parses Twilio's `MessageStatus` value.
    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "accepted" => Self::Accepted,
            "scheduled" => Self::Scheduled,
            "queued" => Self::Queued,
            "sending" => Self::Sending,
            "sent" => Self::Sent,
            "delivered" => Self::Delivered,
            "read" => Self::Read,
            "undelivered" => Self::Undelivered,
            "failed" => Self::Failed,
            "canceled" => Self::Canceled,
            _ => return None,
        })
    }

    /// Position in a message's life; a status replaces the stored one only if it ranks higher.
    /// Failures rank above `sent` (they end the life) but below `delivered`/`read`, which prove
    /// the message arrived whatever a stray failure says.
    pub fn rank(self) -> u8 {
        match self {
            Self::Accepted | Self::Scheduled => 1,
            Self::Queued => 2,
            Self::Sending => 3,
            Self::Sent => 4,
            Self::Undelivered | Self::Failed | Self::Canceled => 5,
            Self::Delivered => 6,
            Self::Read => 7,
        }
    }

    /// Its wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Scheduled => "scheduled",
            Self::Queued => "queued",
            Self::Sending => "sending",
            Self::Sent => "sent",
            Self::Delivered => "delivered",
            Self::Read => "read",
            Self::Undelivered => "undelivered",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
        }
    }
}

/// One status callback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusUpdate {
    /// The outbound message it is about.
    pub message_sid: MessageSid,
    /// Its new status.
    pub status: MessageStatus,
    /// Twilio's error code on failures.
    pub error_code: Option<u32>,
    /// The recipient, when sent.
    pub to: Option<String>,
}

/// Reads a status callback form.
pub fn parse_status(fields: &[(String, String)]) -> Result<StatusUpdate, InvalidValue> {
    let sid = first(fields, "MessageSid")
        .or_else(|| first(fields, "SmsSid"))
        .ok_or_else(|| InvalidValue("missing MessageSid".into()))?;
    let raw = first(fields, "MessageStatus")
        .or_else(|| first(fields, "SmsStatus"))
        .ok_or_else(|| InvalidValue("missing MessageStatus".into()))?;
    let status = MessageStatus::parse(raw).ok_or_else(|| {
        InvalidValue(format!(
            "unknown MessageStatus '{}'",
            crate::domain::truncate_for_message(raw)
        ))
    })?;
    Ok(StatusUpdate {
        message_sid: MessageSid::parse(sid)?,
        status,
        error_code: first(fields, "ErrorCode").and_then(|c| c.parse().ok()),
        to: first(fields, "To").map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_sent_ranks_below_delivered() {
        assert!(MessageStatus::Sent.rank() < MessageStatus::Delivered.rank());
        assert!(MessageStatus::Delivered.rank() < MessageStatus::Read.rank());
        assert!(MessageStatus::Failed.rank() > MessageStatus::Sent.rank());
    }
}
