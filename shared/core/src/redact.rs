//! Credentials inside URLs. Operators write passwords into URLs (`nats://user:pass@host`,
//! `redis://:pass@host`, an agent's `https://user:pass@host/hook`), so every URL wagate prints,
//! logs or returns goes through [`url`] first, and an agent URL's credentials are taken out and
//! sealed like any other secret ([`split_userinfo`]) before the URL is stored.

use base64::Engine;
use percent_encoding::percent_decode_str;
use secrecy::{ExposeSecret, SecretString};

/// What replaces the userinfo of a URL when it is shown; given back in place of the userinfo,
/// it stands for the credentials already stored.
pub const MASK: &str = "***";

/// `text` with the userinfo of every URL in it masked; `text` may be one URL or a
/// comma-separated list of them (as `WAGATE_NATS_URL` is), and need not parse as a URL at all:
/// a malformed URL in a start-up error must not leak its password either.
pub fn url(text: &str) -> String {
    text.split(',').map(one).collect::<Vec<_>>().join(",")
}

/// `text`, free text such as a client library's error, with the userinfo of every URL in it
/// masked. Unlike [`url`] it looks only after a scheme's `://`, and an authority also ends at
/// whitespace, quotes, brackets and commas.
pub fn text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, after) = rest.split_at(i + 3);
        out.push_str(head);
        let len = after
            .find(|c: char| {
                matches!(
                    c,
                    '/' | '?' | '#' | ')' | '(' | '"' | '\'' | ',' | '<' | '>'
                ) || c.is_whitespace()
            })
            .unwrap_or(after.len());
        match after[..len].rfind('@') {
            Some(at) => {
                out.push_str(MASK);
                out.push_str(&after[at..len]);
            }
            None => out.push_str(&after[..len]),
        }
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

fn one(item: &str) -> String {
    match userinfo_range(item) {
        Some((start, end)) => format!("{}{MASK}{}", &item[..start], &item[end..]),
        None => item.to_owned(),
    }
}

/// Where the userinfo of `url` lies (without its `@`): between the scheme's `//` (or the start,
/// for the scheme-less `user:pass@host:4222` that NATS accepts) and the last `@` of the
/// authority, which ends at the first `/`, `?` or `#`.
fn userinfo_range(url: &str) -> Option<(usize, usize)> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let authority_len = url[start..]
        .find(['/', '?', '#'])
        .unwrap_or(url.len() - start);
    let at = url[start..start + authority_len].rfind('@')?;
    Some((start, start + at))
}

/// How a URL whose credentials were taken out is shown: with [`MASK`] where they were, so the
/// reader sees that some are set.
pub fn masked(bare: &str) -> String {
    match bare.find("://") {
        Some(i) => format!("{}{MASK}@{}", &bare[..i + 3], &bare[i + 3..]),
        None => format!("{MASK}@{bare}"),
    }
}

/// `url` without its userinfo, and the userinfo (still percent-encoded) if it had one.
pub fn split_userinfo(url: &str) -> (String, Option<SecretString>) {
    match userinfo_range(url) {
        Some((start, end)) => (
            format!("{}{}", &url[..start], &url[end + 1..]),
            Some(SecretString::from(url[start..end].to_owned())),
        ),
        None => (url.to_owned(), None),
    }
}

/// The user and password of a URL's userinfo, percent-decoded; no password when the userinfo
/// has no `:` (a NATS token is written so).
pub fn decode_userinfo(userinfo: &SecretString) -> (SecretString, Option<SecretString>) {
    let decode =
        |text: &str| SecretString::from(percent_decode_str(text).decode_utf8_lossy().into_owned());
    let raw = userinfo.expose_secret();
    match raw.split_once(':') {
        Some((user, password)) => (decode(user), Some(decode(password))),
        None => (decode(raw), None),
    }
}

/// The `Authorization` value of HTTP Basic authentication (RFC 7617) for a URL's userinfo,
/// as browsers and HTTP clients send it.
pub fn basic_authorization(userinfo: &SecretString) -> SecretString {
    let (user, password) = decode_userinfo(userinfo);
    let pair = format!(
        "{}:{}",
        user.expose_secret(),
        password.as_ref().map_or("", |p| p.expose_secret())
    );
    SecretString::from(format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_masked_wherever_a_url_carries_one() {
        for (input, shown) in [
            ("nats://u:p@h:4222", "nats://***@h:4222"),
            (
                "redis://:secret@127.0.0.1:6379/0",
                "redis://***@127.0.0.1:6379/0",
            ),
            ("nats://token@h", "nats://***@h"),
            ("u:p@h:4222", "***@h:4222"),
            (
                "nats://a:b@h1,nats://h2,nats://c:d@h3",
                "nats://***@h1,nats://h2,nats://***@h3",
            ),
            (
                "https://u:p@@x@host/a@b?c=@d#@e",
                "https://***@host/a@b?c=@d#@e",
            ),
            ("https://host/path?email=a@b", "https://host/path?email=a@b"),
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("", ""),
            ("not a url at all: pass@word", "***@word"),
        ] {
            assert_eq!(url(input), shown, "{input}");
        }
    }

    #[test]
    fn free_text_has_every_url_masked() {
        assert_eq!(
            text(
                "error sending request for url (http://u:p@h:1/v1/x): refused; see https://a@b.c/?q=x@y and mailto:x@y"
            ),
            "error sending request for url (http://***@h:1/v1/x): refused; see https://***@b.c/?q=x@y and mailto:x@y"
        );
        assert_eq!(
            text("at \"redis://:pw@h\", nats://t@h2"),
            "at \"redis://***@h\", nats://***@h2"
        );
        assert_eq!(text("no url here: a@b"), "no url here: a@b");
        assert_eq!(text("ends with scheme://"), "ends with scheme://");
    }

    #[test]
    fn an_agent_url_loses_its_credentials_to_a_basic_authorization() {
        let (bare, userinfo) = split_userinfo("https://bot%40acme:p%3Ass@agent.example/hook?x=1");
        assert_eq!(bare, "https://agent.example/hook?x=1");
        let auth = basic_authorization(&userinfo.expect("userinfo"));
        let expected = base64::engine::general_purpose::STANDARD.encode("bot@acme:p:ss");
        assert_eq!(auth.expose_secret(), format!("Basic {expected}"));
        assert_eq!(masked(&bare), "https://***@agent.example/hook?x=1");
        let (bare, userinfo) = split_userinfo("https://agent.example/hook");
        assert_eq!(bare, "https://agent.example/hook");
        assert!(userinfo.is_none());
    }
}
