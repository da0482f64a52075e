//! The console's session cookie, its CSRF token and the one-time sign-in ticket of `serve`.
//!
//! Sessions are stateless, so that any ingress process behind a load balancer accepts a cookie
//! that another one issued: a cookie is `<expiry>.<nonce>.<mac>`, where `mac` is HMAC-SHA256
//! over the expiry and nonce under the [`SessionKey`]. That key is derived from the master key
//! (which every process of a deployment shares) and bound to the admin token, so changing
//! `WAGATE_ADMIN_TOKEN` ends every session at once. The CSRF token of a session is another
//! HMAC over its nonce: forms carry it, and it is only valid with the cookie it was made for.
//!
//! Signing out removes the cookie from the browser. Being stateless, a copy of the cookie taken
//! before stays valid until it expires ([`SESSION_TTL`]); rotating the admin token revokes
//! every session immediately.

use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sha2::Sha256;
use time::{Duration, OffsetDateTime};
use wagate_core::crypto::Keyring;

/// How long a signed-in session lasts.
pub const SESSION_TTL: Duration = Duration::hours(8);
/// How long the sign-in link that `serve` prints at start can be used.
pub const TICKET_TTL: Duration = Duration::minutes(15);

/// The key that signs sessions, CSRF tokens and sign-in tickets.
pub struct SessionKey(SecretBox<[u8; 32]>);

/// A verified session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    nonce: String,
    /// When it stops being accepted.
    pub expires: OffsetDateTime,
}

impl SessionKey {
    /// The key of this deployment: derived from the master key, then keyed again by the admin
    /// token.
    pub fn new(keyring: &Keyring, admin_token: &SecretString) -> Self {
        let base = keyring.derive_key("console-session-v1");
        let mut mac = mac_with(base.expose_secret());
        mac.update(admin_token.expose_secret().as_bytes());
        Self(SecretBox::new(Box::new(mac.finalize().into_bytes().into())))
    }

    fn sign(&self, kind: &str, body: &str) -> String {
        let mut mac = mac_with(self.0.expose_secret());
        mac.update(kind.as_bytes());
        mac.update(b"|");
        mac.update(body.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Constant-time check of a hex MAC.
    fn verify(&self, kind: &str, body: &str, given_hex: &str) -> bool {
        let Ok(given) = hex::decode(given_hex) else {
            return false;
        };
        let mut mac = mac_with(self.0.expose_secret());
        mac.update(kind.as_bytes());
        mac.update(b"|");
        mac.update(body.as_bytes());
        mac.verify_slice(&given).is_ok()
    }

    /// A `<expiry>.<nonce>.<mac>` token of `kind` that expires `ttl` from `now`.
    fn issue(&self, kind: &str, now: OffsetDateTime, ttl: Duration) -> String {
        let body = format!(
            "{}.{}",
            (now + ttl).unix_timestamp(),
            uuid::Uuid::new_v4().simple()
        );
        let mac = self.sign(kind, &body);
        format!("{body}.{mac}")
    }

    /// The expiry and nonce of a token of `kind` whose MAC holds and that has not expired.
    fn open(&self, kind: &str, token: &str, now: OffsetDateTime) -> Option<Session> {
        let (body, mac) = token.rsplit_once('.')?;
        if !self.verify(kind, body, mac) {
            return None;
        }
        let (expires, nonce) = body.split_once('.')?;
        let expires = OffsetDateTime::from_unix_timestamp(expires.parse().ok()?).ok()?;
        (now < expires).then(|| Session {
            nonce: nonce.to_owned(),
            expires,
        })
    }

    /// A new session cookie value.
    pub fn new_session(&self, now: OffsetDateTime) -> String {
        self.issue("session", now, SESSION_TTL)
    }

    /// The session of a cookie value, if it is genuine and current.
    pub fn session(&self, cookie: &str, now: OffsetDateTime) -> Option<Session> {
        self.open("session", cookie, now)
    }

    /// The CSRF token that forms of `session` carry.
    pub fn csrf_token(&self, session: &Session) -> String {
        self.sign("csrf", &session.nonce)
    }

    /// Whether `token` is the CSRF token of `session`.
    pub fn check_csrf(&self, session: &Session, token: &str) -> bool {
        self.verify("csrf", &session.nonce, token)
    }

    /// A sign-in ticket for the link `serve` prints; single use is enforced by the caller
    /// ([`super::UsedTickets`]).
    pub fn new_ticket(&self, now: OffsetDateTime) -> String {
        self.issue("ticket", now, TICKET_TTL)
    }

    /// The ticket's nonce, if it is genuine and current.
    pub fn ticket(&self, ticket: &str, now: OffsetDateTime) -> Option<String> {
        self.open("ticket", ticket, now).map(|s| s.nonce)
    }
}

fn mac_with(key: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length; this cannot fail.
    <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyring() -> Keyring {
        Keyring::from_base64(&Keyring::generate_key(), &[]).unwrap()
    }

    fn token(t: &str) -> SecretString {
        SecretString::from(t.to_owned())
    }

    #[test]
    fn a_session_opens_on_another_process_with_the_same_keys() {
        let ring = keyring();
        let now = OffsetDateTime::now_utc();
        let one = SessionKey::new(&ring, &token("admin-token-0123456789"));
        let other = SessionKey::new(&ring, &token("admin-token-0123456789"));
        let cookie = one.new_session(now);
        let session = other.session(&cookie, now).expect("accepted elsewhere");
        assert!(other.check_csrf(&session, &one.csrf_token(&session)));
    }

    #[test]
    fn tampered_cookies_are_refused() {
        let ring = keyring();
        let now = OffsetDateTime::now_utc();
        let key = SessionKey::new(&ring, &token("admin-token-0123456789"));
        let cookie = key.new_session(now);
        let (expires, rest) = cookie.split_once('.').unwrap();
        let later = format!("{}.{rest}", expires.parse::<i64>().unwrap() + 86_400);
        assert!(key.session(&later, now).is_none(), "a pushed-back expiry");
        let mut flipped = cookie.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).unwrap();
        assert!(key.session(&flipped, now).is_none(), "a changed MAC");
        for junk in [
            "",
            ".",
            "..",
            "a.b.c",
            "1.2",
            "99999999999.x.zz",
            "\u{ff}.é.ü",
        ] {
            assert!(key.session(junk, now).is_none(), "{junk:?}");
        }
        // A ticket is not a session, nor the other way round.
        let ticket = key.new_ticket(now);
        assert!(key.session(&ticket, now).is_none());
        assert!(key.ticket(&cookie, now).is_none());
        assert!(key.ticket(&ticket, now).is_some());
    }

    #[test]
    fn expired_cookies_and_tickets_are_refused() {
        let ring = keyring();
        let now = OffsetDateTime::now_utc();
        let key = SessionKey::new(&ring, &token("admin-token-0123456789"));
        let cookie = key.new_session(now);
        assert!(
            key.session(&cookie, now + SESSION_TTL - Duration::SECOND)
                .is_some()
        );
        assert!(key.session(&cookie, now + SESSION_TTL).is_none());
        let ticket = key.new_ticket(now);
        assert!(key.ticket(&ticket, now + TICKET_TTL).is_none());
    }

    #[test]
    fn another_master_key_or_admin_token_refuses_the_cookie() {
        let now = OffsetDateTime::now_utc();
        let ring = keyring();
        let key = SessionKey::new(&ring, &token("admin-token-0123456789"));
        let cookie = key.new_session(now);
        let other_master = SessionKey::new(&keyring(), &token("admin-token-0123456789"));
        assert!(other_master.session(&cookie, now).is_none());
        let rotated = SessionKey::new(&ring, &token("admin-token-rotated-000"));
        assert!(rotated.session(&cookie, now).is_none());
    }

    #[test]
    fn csrf_tokens_belong_to_their_session() {
        let now = OffsetDateTime::now_utc();
        let key = SessionKey::new(&keyring(), &token("admin-token-0123456789"));
        let a = key.session(&key.new_session(now), now).unwrap();
        let b = key.session(&key.new_session(now), now).unwrap();
        let token_a = key.csrf_token(&a);
        assert!(key.check_csrf(&a, &token_a));
        assert!(!key.check_csrf(&b, &token_a), "another session's token");
        assert!(!key.check_csrf(&a, ""));
        assert!(!key.check_csrf(&a, "not hex"));
        assert!(!key.check_csrf(&a, &token_a[..10]));
    }
}
