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
/// [`crate::failure`]'s question (can trying again help?) it answers whether the message may
/// exist, which a sender settles from Twilio's list before it either counts the part sent or
/// turns the answer into a [`crate::failure::Failure`].
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

/// The code of a closed 24-hour window.
pub const OUTSIDE_WINDOW: u32 = 63016;
/// The code of a user who opted out (sent STOP).
pub const UNSUBSCRIBED: u32 = 21610;

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
}
