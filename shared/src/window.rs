//! WhatsApp's rule for free-form (non-template) messages: only within 24 hours of the user's
//! last message, and not to a user who opted out (Twilio 21610) since they last wrote. The admin
//! API refuses such a send up front and the sender checks again before posting; both ask here.

use time::{Duration, OffsetDateTime};

use crate::{
    domain::SessionId,
    store::{Store, StoreError, WindowClocks},
    twilio::rest::{OUTSIDE_WINDOW, UNSUBSCRIBED},
};

/// WhatsApp's customer-service window.
pub const CUSTOMER_SERVICE_WINDOW: Duration = Duration::hours(24);

/// Why free-form text may not go to a user now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The user has not written in the last 24 hours: only a template may go.
    OutsideWindow,
    /// The user opted out and has not written since.
    OptedOut,
}

impl Refusal {
    /// Twilio's code for the same refusal.
    pub fn code(self) -> u32 {
        match self {
            Self::OutsideWindow => OUTSIDE_WINDOW,
            Self::OptedOut => UNSUBSCRIBED,
        }
    }

    /// What it means and what to do, for API answers and dead letters.
    pub fn explain(self) -> &'static str {
        match self {
            Self::OutsideWindow => {
                "outside the 24-hour window: this user has not written in the last 24 hours, so WhatsApp only allows a template (send content_sid instead of body)"
            }
            Self::OptedOut => {
                "this user opted out (they sent STOP; Twilio 21610): no free-form messages until they write again"
            }
        }
    }
}

/// Whether free-form text to the user of `session` would be refused at `now`, and why.
pub async fn free_form_refusal(
    store: &dyn Store,
    session: &SessionId,
    now: OffsetDateTime,
) -> Result<Option<Refusal>, StoreError> {
    // Both asked at once: one round trip to the store instead of two.
    let (last_inbound, opted_out_at) =
        futures::try_join!(store.last_inbound(session), store.opted_out_at(session))?;
    Ok(refusal(
        WindowClocks {
            last_inbound,
            opted_out_at,
            opted_in_at: None,
        },
        now,
    ))
}

/// Whether free-form text would be refused at `now` to a user with these clocks, and why.
pub fn refusal(clocks: WindowClocks, now: OffsetDateTime) -> Option<Refusal> {
    let last = clocks.last_inbound;
    if last.is_none_or(|at| now - at >= CUSTOMER_SERVICE_WINDOW) {
        return Some(Refusal::OutsideWindow);
    }
    if clocks
        .opted_out_at
        .is_some_and(|out| last.is_none_or(|at| out >= at))
    {
        return Some(Refusal::OptedOut);
    }
    None
}
