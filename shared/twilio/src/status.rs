//! Twilio's message status callbacks. They arrive in any order, so a status only replaces one
//! that comes earlier in a message's life: a late `sent` never overwrites `delivered` or `read`.

use serde::{Deserialize, Serialize};

use super::form::first;
use wagate_core::domain::{InvalidValue, MessageSid};

/// The life of an outbound message, as Twilio reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// Delivered to some of its recipients (Twilio's Messaging Services).
    PartiallyDelivered,
    /// A status this version does not know (Twilio adds some now and then). It is recorded
    /// and acknowledged like the others, so that Twilio does not retry it, and ranks lowest: it
    /// never replaces a status whose meaning is known.
    #[serde(other)]
    Other,
}

impl MessageStatus {
    /// Parses Twilio's `MessageStatus` value; a name it does not know is [`Self::Other`].
    pub fn parse(raw: &str) -> Self {
        match raw {
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
            "partially_delivered" => Self::PartiallyDelivered,
            _ => Self::Other,
        }
    }

    /// Position in a message's life; a status replaces the stored one only if it ranks higher.
    /// Failures rank above `sent` (they end the life) but below `delivered`/`read`, which prove
    /// the message arrived whatever a stray failure says.
    pub fn rank(self) -> u8 {
        match self {
            Self::Other => 0,
            Self::Accepted | Self::Scheduled => 1,
            Self::Queued => 2,
            Self::Sending => 3,
            Self::Sent => 4,
            Self::Undelivered | Self::Failed | Self::Canceled => 5,
            Self::Delivered | Self::PartiallyDelivered => 6,
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
            Self::PartiallyDelivered => "partially_delivered",
            Self::Other => "other",
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
    let status = MessageStatus::parse(raw);
    if status == MessageStatus::Other {
        tracing::info!(
            status = ?wagate_core::domain::truncate_for_message(raw),
            "a status callback with a status this version does not know; recorded as other"
        );
    }
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
    fn every_status_twilio_sends_parses_and_unknown_ones_rank_lowest() {
        for name in [
            "accepted",
            "scheduled",
            "queued",
            "sending",
            "sent",
            "delivered",
            "read",
            "undelivered",
            "failed",
            "canceled",
            "partially_delivered",
        ] {
            assert_eq!(MessageStatus::parse(name).as_str(), name);
        }
        let future = MessageStatus::parse("teleported");
        assert_eq!(future, MessageStatus::Other);
        assert!(future.rank() < MessageStatus::Accepted.rank());
        let fields = |status: &str| {
            vec![
                ("MessageSid".to_owned(), format!("SM{}", "a".repeat(32))),
                ("MessageStatus".to_owned(), status.to_owned()),
            ]
        };
        assert_eq!(
            parse_status(&fields("teleported")).unwrap().status,
            MessageStatus::Other
        );
        let stored: MessageStatus = serde_json::from_str("\"teleported\"").unwrap();
        assert_eq!(stored, MessageStatus::Other);
    }

    #[test]
    fn late_sent_ranks_below_delivered() {
        assert!(MessageStatus::Sent.rank() < MessageStatus::Delivered.rank());
        assert!(MessageStatus::Delivered.rank() < MessageStatus::Read.rank());
        assert!(MessageStatus::Failed.rank() > MessageStatus::Sent.rank());
    }
}
