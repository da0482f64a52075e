//! Twilio REST API answers: the error JSON and what each failure means for a sender.

use serde::Deserialize;

/// Twilio's error body: `{"code": 21211, "message": "…", "more_info": "…", "status": 400}`.
#[derive(Debug, Clone, Deserialize)]
pub struct ApiError {
    /// Twilio's error code.
    pub code: Option<u32>,
    /// Human text.
    pub message: Option<String>,
    /// Link to the error's page.
    pub more_info: Option<String>,
    /// HTTP status, repeated.
    pub status: Option<u16>,
}

/// What Twilio's answer to a create says about the message. Not a second failure model: besides
/// [`wagate_core::failure`]'s question (can trying again help?) it answers whether the message may
/// exist, which a sender settles from Twilio's list before it either counts the part sent or
/// turns the answer into a [`wagate_core::failure::Failure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// Not processed by Twilio; safe to send again after a pause (429, 20429, 63017, 63018, 63038).
    RetryLater,
    /// Twilio may or may not have created the message (5xx, timeouts after sending).
    Ambiguous,
    /// Will never succeed as is; becomes a dead letter with the code.
    Permanent,
}

/// Classifies an HTTP status and Twilio error code.
pub fn classify(http_status: u16, code: Option<u32>) -> FailureClass {
    match code {
        Some(20429 | 63017 | 63018 | 63038) => return FailureClass::RetryLater,
        Some(20500) => return FailureClass::Ambiguous,
        _ => {}
    }
    match http_status {
        429 => FailureClass::RetryLater,
        500..=599 => FailureClass::Ambiguous,
        _ => FailureClass::Permanent,
    }
}

/// What to do about a send Twilio refused with `code`, for dead letters and the console: the
/// common WhatsApp failures, in the business's terms. `join_code` is the channel's Sandbox join
/// code, when known.
pub fn advice(code: u32, join_code: Option<&str>) -> Option<String> {
    let text = match code {
        63015 => match join_code {
            Some(words) => format!(
                "this phone has not joined the Twilio Sandbox: from WhatsApp, send \"join {words}\" to +1 415 523 8886, then replay"
            ),
            None => "this phone has not joined the Twilio Sandbox: from WhatsApp, send \"join <your sandbox's two words>\" (Twilio Console, Messaging, Try it out, WhatsApp) to +1 415 523 8886, then replay".to_owned(),
        },
        63016 => "outside the 24-hour window: the user has not written in the last 24 hours, so only an approved template (content_sid) can reach them".to_owned(),
        63018 => "the sender's rate limit was exceeded: send more slowly (lower the channel's mps), then replay".to_owned(),
        63024 => "not a valid WhatsApp recipient: check the number, with its country code, and that it uses WhatsApp".to_owned(),
        21211 => "the \"To\" number is not a valid phone number: check it, with its country code".to_owned(),
        21610 => "the user opted out: nothing reaches them until they send START".to_owned(),
        20003 => "Twilio refused the credentials: save the account's current Auth Token on the agent's Deploy page (PUT /v1/agents/{id}/whatsapp), then replay".to_owned(),
        _ => return None,
    };
    Some(text)
}

/// The codes of WhatsApp's two refusals, kept with the rules they enforce.
pub use wagate_core::window::{OUTSIDE_WINDOW, UNSUBSCRIBED};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(classify(429, Some(20429)), FailureClass::RetryLater);
        assert_eq!(classify(400, Some(63018)), FailureClass::RetryLater);
        assert_eq!(classify(500, Some(20500)), FailureClass::Ambiguous);
        assert_eq!(classify(503, None), FailureClass::Ambiguous);
        for code in [21211, 21610, 21617, 63016, 20003] {
            assert_eq!(classify(400, Some(code)), FailureClass::Permanent);
        }
        assert_eq!(classify(401, Some(20003)), FailureClass::Permanent);
    }

    #[test]
    fn advice_names_the_join_code_when_known() {
        assert!(
            advice(63015, Some("ancient-pencil"))
                .unwrap()
                .contains("join ancient-pencil")
        );
        assert!(advice(63015, None).unwrap().contains("join <"));
        for code in [63016, 63018, 63024, 21211, 21610, 20003] {
            assert!(advice(code, None).is_some(), "{code}");
        }
        assert_eq!(advice(30008, None), None);
    }
}
