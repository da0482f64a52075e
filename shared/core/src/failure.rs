//! The pipeline's one failure model. Every step that can fail (an agent call, a post to Twilio,
//! a store or bus operation) ends in a [`Failure`] saying whether the same work can succeed if
//! tried again. The role that owns the delivery decides from that alone: try again on its
//! schedule, never sooner than the other side asked, or dead-letter the message with the reason
//! and Twilio's error code. A reason is safe to log and to keep in a dead letter: it never holds
//! a secret or a message's text.

use std::{fmt, time::Duration};

use crate::retry::RetrySchedule;

/// Whether trying again can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Worth another attempt: a timeout, a rate limit, a 5xx, a backend that is down.
    Transient,
    /// Fails again as it is (bad credentials, a refused request, a closed 24-hour window): a
    /// dead letter at once, to be replayed once the cause is fixed.
    Permanent,
}

/// A step that failed, and what that means for the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Failure {
    /// Whether trying again can help.
    pub kind: Kind,
    /// What failed and why.
    pub reason: String,
    /// Twilio's error code, when Twilio said why (kept in the dead letter).
    pub code: Option<u32>,
    /// The earliest next attempt the other side asked for (`Retry-After`).
    pub retry_after: Option<Duration>,
}

impl Failure {
    /// A failure worth another attempt.
    pub fn transient(reason: impl fmt::Display) -> Self {
        Self::new(Kind::Transient, reason)
    }

    /// A failure that would happen again.
    pub fn permanent(reason: impl fmt::Display) -> Self {
        Self::new(Kind::Permanent, reason)
    }

    fn new(kind: Kind, reason: impl fmt::Display) -> Self {
        Self {
            kind,
            reason: reason.to_string(),
            code: None,
            retry_after: None,
        }
    }

    /// With Twilio's error code.
    #[must_use]
    pub fn with_code(mut self, code: Option<u32>) -> Self {
        self.code = code;
        self
    }

    /// With the wait the other side asked for.
    #[must_use]
    pub fn with_retry_after(mut self, after: Option<Duration>) -> Self {
        self.retry_after = after;
        self
    }

    /// How long to wait before attempt `attempt + 1`: the schedule's delay, or the asked-for
    /// wait when that is longer. `None` when the message goes to the dead letters instead: the
    /// failure is permanent, or the schedule has no attempts left.
    pub fn retry_delay(&self, schedule: &RetrySchedule, attempt: u64) -> Option<Duration> {
        match self.kind {
            Kind::Permanent => None,
            Kind::Transient => schedule
                .delay_after(attempt)
                .map(|delay| self.retry_after.map_or(delay, |asked| asked.max(delay))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule() -> RetrySchedule {
        RetrySchedule::new(vec![Duration::from_secs(1), Duration::from_secs(4)])
    }

    /// The schedule's delays carry ±20% jitter.
    fn within(delay: Option<Duration>, base: u64) -> bool {
        let base = Duration::from_secs(base);
        delay.is_some_and(|d| d >= base.mul_f64(0.8) && d <= base.mul_f64(1.2))
    }

    #[test]
    fn a_transient_failure_waits_the_schedule_or_longer_if_asked() {
        let f = Failure::transient("timeout");
        assert!(within(f.retry_delay(&schedule(), 1), 1));
        assert!(within(f.retry_delay(&schedule(), 2), 4));
        let asked = f.with_retry_after(Some(Duration::from_secs(2)));
        assert_eq!(
            asked.retry_delay(&schedule(), 1),
            Some(Duration::from_secs(2))
        );
        assert!(within(asked.retry_delay(&schedule(), 2), 4));
    }

    #[test]
    fn a_permanent_failure_or_an_exhausted_schedule_is_a_dead_letter() {
        let f = Failure::permanent("bad request").with_code(Some(21211));
        assert_eq!(f.retry_delay(&schedule(), 1), None);
        assert_eq!(f.code, Some(21211));
        let last = schedule().max_attempts();
        assert_eq!(Failure::transient("x").retry_delay(&schedule(), last), None);
    }
}
