//! WhatsApp's rules for what may go to a user: free-form (non-template) text only within 24
//! hours of the user's last message; nothing at all, templates included, to a user who opted out
//! (they sent STOP, or Twilio refused with 21610) until they opt back in with START or UNSTOP.
//! Writing anything else does not end an opt-out, because Twilio keeps refusing with 21610 until
//! then. The admin API refuses such a send up front and the sender checks again before posting;
//! both ask here.

use time::{Duration, OffsetDateTime};

use crate::agent::Consent;

/// Twilio's code of a send refused because the 24-hour window is closed.
pub const OUTSIDE_WINDOW: u32 = 63016;
/// Twilio's code of a send refused because the user opted out (sent STOP).
pub const UNSUBSCRIBED: u32 = 21610;

/// The clocks of WhatsApp's rules for what may be sent to a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WindowClocks {
    /// When the user last wrote.
    pub last_inbound: Option<OffsetDateTime>,
    /// When the user last opted out.
    pub opted_out_at: Option<OffsetDateTime>,
    /// When the user last opted back in (START, YES, UNSTOP).
    pub opted_in_at: Option<OffsetDateTime>,
}

/// WhatsApp's customer-service window.
pub const CUSTOMER_SERVICE_WINDOW: Duration = Duration::hours(24);

/// Twilio's default opt-out keywords: an inbound message that is one of them opts the user out.
pub const OPT_OUT_KEYWORDS: [&str; 6] = ["STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"];
/// Twilio's default opt-in keywords: a user who opted out is back in with one of them. A "yes"
/// from a user who never opted out changes nothing.
pub const OPT_IN_KEYWORDS: [&str; 3] = ["START", "YES", "UNSTOP"];
/// What a user who opted out is told, unless the channel says otherwise.
pub const OPT_OUT_REPLY: &str = "You have been unsubscribed and will get no more messages from us. Reply START to subscribe again.";
/// What a user who opted back in is told, unless the channel says otherwise.
pub const OPT_IN_REPLY: &str = "You have been subscribed again. Reply STOP to unsubscribe.";
/// The longest keyword: a message longer than this is never one, and is not compared.
pub const MAX_KEYWORD_CHARS: usize = 30;

/// What an inbound message says about the user's consent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyword {
    /// STOP and the like: no more messages.
    OptOut,
    /// START, YES or UNSTOP: messages again.
    OptIn,
}

impl Keyword {
    /// The keyword `body` is under `consent`, ignoring case and surrounding whitespace; `None`
    /// for any other text, which leaves the user's consent as it was.
    pub fn of(body: &str, consent: &Consent) -> Option<Self> {
        let word = body.trim();
        // Four bytes hold any character: longer text is no keyword, and is not compared.
        if word.is_empty() || word.len() > MAX_KEYWORD_CHARS * 4 {
            return None;
        }
        let is = |keywords: Vec<&str>| keywords.iter().any(|k| k.eq_ignore_ascii_case(word));
        if is(optout_keywords(consent)) {
            Some(Self::OptOut)
        } else if is(optin_keywords(consent)) {
            Some(Self::OptIn)
        } else {
            None
        }
    }

    /// What the user is told when this keyword took effect (`None`: nothing).
    pub fn confirmation(self, consent: &Consent) -> Option<&str> {
        let reply = match self {
            Self::OptOut => consent.optout_reply.as_deref().unwrap_or(OPT_OUT_REPLY),
            Self::OptIn => consent.optin_reply.as_deref().unwrap_or(OPT_IN_REPLY),
        };
        (!reply.trim().is_empty()).then_some(reply)
    }
}

/// The opt-out keywords in effect on a channel.
pub fn optout_keywords(consent: &Consent) -> Vec<&str> {
    match &consent.optout_keywords {
        Some(own) => own.iter().map(String::as_str).collect(),
        None => OPT_OUT_KEYWORDS.to_vec(),
    }
}

/// The opt-in keywords in effect on a channel.
pub fn optin_keywords(consent: &Consent) -> Vec<&str> {
    match &consent.optin_keywords {
        Some(own) => own.iter().map(String::as_str).collect(),
        None => OPT_IN_KEYWORDS.to_vec(),
    }
}

/// Why a message may not go to a user now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The user has not written in the last 24 hours: only a template may go.
    OutsideWindow,
    /// The user opted out and has not opted back in.
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
                "this user opted out (they sent STOP, or Twilio refused with 21610): no messages, templates included, until they send START"
            }
        }
    }
}

/// Whether the user opted out and has not opted back in since. An opt-in at the very same
/// millisecond does not count: when unsure, send nothing.
pub fn opted_out(clocks: WindowClocks) -> bool {
    clocks
        .opted_out_at
        .is_some_and(|out| clocks.opted_in_at.is_none_or(|back| out >= back))
}

/// Whether free-form text would be refused at `now` to a user with these clocks, and why. An
/// opt-out is named first: a template would not get past it.
pub fn refusal(clocks: WindowClocks, now: OffsetDateTime) -> Option<Refusal> {
    if opted_out(clocks) {
        return Some(Refusal::OptedOut);
    }
    let last = clocks.last_inbound;
    last.is_none_or(|at| now - at >= CUSTOMER_SERVICE_WINDOW)
        .then_some(Refusal::OutsideWindow)
}

/// Whether the confirmation of an opt-out or opt-in would be refused at `now`: only outside the
/// window (the user just wrote, so rarely), never for the opt-out it confirms.
pub fn confirmation_refusal(clocks: WindowClocks, now: OffsetDateTime) -> Option<Refusal> {
    refusal(
        WindowClocks {
            opted_out_at: None,
            ..clocks
        },
        now,
    )
}

/// Whether a template would be refused to a user with these clocks: only an opt-out stops one.
pub fn template_refusal(clocks: WindowClocks) -> Option<Refusal> {
    opted_out(clocks).then_some(Refusal::OptedOut)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_700_000_000 + secs).expect("a valid time")
    }

    #[test]
    fn keywords_ignore_case_and_surrounding_whitespace_only() {
        for stop in [
            "STOP",
            "stop",
            " Stop\n",
            "stopall",
            "UNSUBSCRIBE",
            "cancel",
            "End",
            "quit",
        ] {
            assert_eq!(
                Keyword::of(stop, &Consent::default()),
                Some(Keyword::OptOut),
                "{stop:?}"
            );
        }
        for start in ["START", " start ", "Unstop", "yes", "YES\n"] {
            assert_eq!(
                Keyword::of(start, &Consent::default()),
                Some(Keyword::OptIn),
                "{start:?}"
            );
        }
        for other in [
            "please stop",
            "stop!",
            "s top",
            "",
            "starting",
            "yes please",
        ] {
            assert_eq!(Keyword::of(other, &Consent::default()), None, "{other:?}");
        }
    }

    #[test]
    fn a_channels_own_keywords_replace_the_defaults_and_an_empty_reply_is_none() {
        let own = Consent {
            optout_keywords: Some(vec!["ALTO".into(), "baja".into()]),
            optin_keywords: Some(vec!["Alta".into()]),
            optout_reply: Some(" ".into()),
            optin_reply: Some("Bienvenido".into()),
        };
        assert_eq!(Keyword::of(" alto ", &own), Some(Keyword::OptOut));
        assert_eq!(Keyword::of("BAJA", &own), Some(Keyword::OptOut));
        assert_eq!(Keyword::of("ALTA", &own), Some(Keyword::OptIn));
        assert_eq!(Keyword::of("STOP", &own), None, "the defaults are replaced");
        assert_eq!(Keyword::OptOut.confirmation(&own), None);
        assert_eq!(Keyword::OptIn.confirmation(&own), Some("Bienvenido"));
        assert_eq!(
            Keyword::OptOut.confirmation(&Consent::default()),
            Some(OPT_OUT_REPLY)
        );
    }

    #[test]
    fn an_opt_out_lasts_until_an_opt_in_not_until_the_user_writes() {
        let now = at(100);
        let written = WindowClocks {
            last_inbound: Some(at(90)),
            opted_out_at: Some(at(50)),
            opted_in_at: None,
        };
        assert_eq!(refusal(written, now), Some(Refusal::OptedOut));
        assert_eq!(template_refusal(written), Some(Refusal::OptedOut));
        let back = WindowClocks {
            opted_in_at: Some(at(60)),
            ..written
        };
        assert_eq!(refusal(back, now), None);
        assert_eq!(template_refusal(back), None);
        let out_again = WindowClocks {
            opted_out_at: Some(at(70)),
            ..back
        };
        assert_eq!(refusal(out_again, now), Some(Refusal::OptedOut));
        let same_instant = WindowClocks {
            opted_in_at: Some(at(70)),
            ..out_again
        };
        assert!(opted_out(same_instant), "when unsure, send nothing");
    }

    #[test]
    fn templates_go_outside_the_window_and_free_text_does_not() {
        let old = WindowClocks {
            last_inbound: Some(at(0)),
            ..WindowClocks::default()
        };
        let now = at(0) + CUSTOMER_SERVICE_WINDOW;
        assert_eq!(refusal(old, now), Some(Refusal::OutsideWindow));
        assert_eq!(template_refusal(old), None);
        assert_eq!(
            refusal(WindowClocks::default(), now),
            Some(Refusal::OutsideWindow)
        );
        assert_eq!(refusal(old, now - Duration::seconds(1)), None);
    }
}
