//! Twilio's `X-Twilio-Signature`, computed and checked exactly as the official SDKs do.
//!
//! Why this exists: every webhook Twilio sends us (inbound WhatsApp messages, status callbacks)
//! must be authenticated before we act on it, and the only proof Twilio gives is this header:
//! `base64(HMAC-SHA1(auth_token, url + sorted params))`. Getting one byte of the signed string
//! wrong rejects every genuine request, so this module follows twilio-python 9.13.0's
//! `RequestValidator` (checked against it by `tests/signature_differential.rs`).
//!
//! Pitfalls handled here:
//! - **Sorting**: params are sorted by name in byte order (= Unicode code-point order, what Python's
//!   `sorted` does), not by locale and not by UTF-16 unit (which would put astral emoji before
//!   U+E000..U+FFFF).
//! - **Repeated keys**: for each name, its *distinct* values sorted, `name + value` appended for each
//!   (Python `sorted(set(values))`); identical duplicates count once.
//! - **Empty values** are part of the signed string (`Body=` on media-only messages).
//! - **Ports**: the signature may cover the URL with or without the port; like the SDKs we accept
//!   the URL as given, with its port removed, or with the scheme's default port (`:443` https,
//!   `:80` otherwise) added.
//! - **No URL normalisation**: the URL is only ever concatenated and cut as a string. Round-tripping
//!   through the `url` crate drops `:443` and re-encodes `'` as `%27`, which changes the signed
//!   bytes. Userinfo, IPv6 literals (`[::1]:8443`), URLs without a path and garbage strings are all
//!   handled without panicking.
//! - **Constant time**: signatures and body hashes are compared with `subtle`.
//!
//! Where this deliberately differs from twilio-python (only on URLs Twilio never signs):
//! Python's `remove_port` cuts the netloc at its first `:`, so for `https://user:pw@host:8443/x` it
//! tries `https://user/x` and for `https://[::1]:8443/x` it tries `https://[/x`; we remove just the
//! port. Python treats port `0` and an empty port (`host:`) as "no port" and appends `:443` after
//! them; we treat `host:0` as a port and `host:` as no port. Python normalises the URL before
//! signing (lower-cases the scheme, drops an empty `?`, `#` or trailing `;`) and raises on a
//! non-numeric port; we sign the characters we are given and, for an unparseable authority, only
//! try the URL as given.
//!
//! Callers must pass the URL exactly as Twilio requested it, without a fragment (Twilio never
//! signs `#rc=..` overrides) and without userinfo (Twilio drops `user:pass@` for messaging).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

/// base64(HMAC-SHA1(token, url + sorted params)).
///
/// This is the value Twilio puts in `X-Twilio-Signature` for the legacy (Auth Token) scheme, which
/// is what every webhook uses unless a SharedKey rule says otherwise. `url` is used verbatim (no
/// port handling: see [`verify_form`]); `params` are the decoded form fields, in any order, repeated
/// names allowed.
pub fn compute_signature(auth_token: &[u8], url: &str, params: &[(String, String)]) -> String {
    sign_sha1(auth_token, &string_to_sign(url, &params_suffix(params))).unwrap_or_default()
}

/// base64(HMAC-SHA256(secret, url + sorted params)).
///
/// Twilio's SharedKey signing (public beta, header `X-Twilio-Webhooks-Signature-Settings:
/// key=..,algorithm=HMAC_SHA256`) signs the same string as [`compute_signature`] with a
/// SharedKey secret and SHA-256; kept here so switching a webhook to it needs no new string code.
pub fn compute_signature_sha256(secret: &[u8], url: &str, params: &[(String, String)]) -> String {
    let message = string_to_sign(url, &params_suffix(params));
    Hmac::<Sha256>::new_from_slice(secret)
        .map(|mut mac| {
            mac.update(message.as_bytes());
            BASE64.encode(mac.finalize().into_bytes())
        })
        .unwrap_or_default()
}

/// Checks a form-encoded webhook: accepts the signature of `url` as given, with its port removed,
/// or with the default port (`:443` https / `:80` otherwise) added, as the SDKs do.
///
/// Why three URLs: Twilio's signers disagree on ports (messaging over HTTPS keeps a configured
/// port, voice drops it) and a server behind a proxy cannot tell whether `:443` was in the
/// configured URL, so the SDKs try both forms and so do we. `params` must be *every* form field received (Twilio adds fields without
/// notice). Comparison is constant-time; never panics, whatever the input.
pub fn verify_form(
    auth_token: &[u8],
    url: &str,
    params: &[(String, String)],
    signature: &str,
) -> bool {
    let suffix = params_suffix(params);
    // The URL as configured is what Twilio signs in the common case, so it is tried alone
    // first: one HMAC per webhook. Each comparison is constant-time; stopping after a match
    // tells a caller only that its signature was valid, which the answer says anyway.
    if bool::from(signature_matches(
        auth_token,
        &string_to_sign(url, &suffix),
        signature,
    )) {
        return true;
    }
    let [_, without_port, with_port] = url_candidates(url);
    let mut ok = Choice::from(0);
    for candidate in [without_port, with_port].iter().flatten() {
        ok |= signature_matches(auth_token, &string_to_sign(candidate, &suffix), signature);
    }
    ok.into()
}

/// The JSON-body variant: `url` carries `bodySHA256` (lowercase hex SHA-256 of the raw body) in its
/// query; the signature is over the URL with no params, and the body hash must match (constant
/// time).
///
/// Why: for `application/json` webhooks Twilio cannot sign form fields, so it signs the body's hash
/// through the URL instead. Both the signature (with the same port leniency as [`verify_form`]) and
/// the hash must match; a URL without a non-empty `bodySHA256` is rejected. The hash is read like
/// Python's `parse_qs(query)["bodySHA256"][0]`: first non-empty value, `+` and `%XX` decoded.
pub fn verify_json(auth_token: &[u8], url: &str, raw_body: &[u8], signature: &str) -> bool {
    let expected = hex::encode(Sha256::digest(raw_body));
    let body_ok = match body_sha256_param(url) {
        Some(given) => given.as_slice().ct_eq(expected.as_bytes()),
        None => Choice::from(0),
    };
    let signature_ok = Choice::from(u8::from(verify_form(auth_token, url, &[], signature)));
    (body_ok & signature_ok).into()
}

/// The part appended after the URL: `name + value` for each distinct (name, value) pair, sorted by
/// name then value, both in byte order (equal to code-point order for UTF-8).
fn params_suffix(params: &[(String, String)]) -> String {
    let mut pairs: Vec<(&str, &str)> = params
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    pairs.sort_unstable();
    pairs.dedup();
    let len = pairs.iter().fold(0usize, |acc, (name, value)| {
        acc.saturating_add(name.len()).saturating_add(value.len())
    });
    let mut suffix = String::with_capacity(len);
    for (name, value) in pairs {
        suffix.push_str(name);
        suffix.push_str(value);
    }
    suffix
}

fn string_to_sign(url: &str, suffix: &str) -> String {
    let mut message = String::with_capacity(url.len().saturating_add(suffix.len()));
    message.push_str(url);
    message.push_str(suffix);
    message
}

/// `None` is unreachable (HMAC accepts keys of any length) but is kept as a value so that no
/// input can make this module panic.
fn sign_sha1(key: &[u8], message: &str) -> Option<String> {
    let mut mac = Hmac::<Sha1>::new_from_slice(key).ok()?;
    mac.update(message.as_bytes());
    Some(BASE64.encode(mac.finalize().into_bytes()))
}

fn signature_matches(key: &[u8], message: &str, signature: &str) -> Choice {
    match sign_sha1(key, message) {
        Some(expected) => expected.as_bytes().ct_eq(signature.as_bytes()),
        None => Choice::from(0),
    }
}

/// A URL cut around its port: `head` is `scheme://[userinfo@]host`, `tail` is path, query and
/// fragment, verbatim.
struct PortSplit<'a> {
    head: &'a str,
    port: Port,
    tail: &'a str,
    default_port: &'static str,
}

enum Port {
    /// No `:` after the host.
    Absent,
    /// `host:` with nothing after the colon (RFC 3986: same as no port).
    Empty,
    /// One or more ASCII digits (leading zeros allowed) worth at most 65535, as Python's `.port`.
    Number,
}

/// The URLs whose signature [`verify_form`] accepts: as given, port removed, default port added.
/// The last two are `None` when the authority cannot be parsed (then only the URL as given counts).
fn url_candidates(url: &str) -> [Option<String>; 3] {
    let Some(split) = split_port(url) else {
        return [Some(url.to_owned()), None, None];
    };
    let (without_port, with_port) = match split.port {
        // The URL as given already is the form without a port.
        Port::Absent => (None, Some(with_default_port(&split))),
        Port::Empty => (
            Some([split.head, split.tail].concat()),
            Some(with_default_port(&split)),
        ),
        // The URL as given already is the form with a port.
        Port::Number => (Some([split.head, split.tail].concat()), None),
    };
    [Some(url.to_owned()), without_port, with_port]
}

fn with_default_port(split: &PortSplit<'_>) -> String {
    [split.head, ":", split.default_port, split.tail].concat()
}

/// Finds the port of `scheme://[userinfo@]host[:port][/path][?query][#fragment]` by string
/// surgery only. `None` if there is no `scheme://`, if the host is an unterminated or malformed
/// IPv6 literal, or if the port is not a number in 0..=65535.
fn split_port(url: &str) -> Option<PortSplit<'_>> {
    let (scheme, rest) = url.split_once(':')?;
    if !is_scheme(scheme) {
        return None;
    }
    let after_slashes = rest.strip_prefix("//")?;
    // The authority ends at the first '/', '?' or '#' (Python's `_splitnetloc` delimiters).
    let authority_len = after_slashes
        .find(['/', '?', '#'])
        .unwrap_or(after_slashes.len());
    let (authority, tail) = after_slashes.split_at_checked(authority_len)?;
    // Userinfo ends at the last '@' (Python: `netloc.rpartition('@')`).
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host_port)| host_port);
    let (host, port) = if let Some(bracketed) = host_port.strip_prefix('[') {
        let (literal, after) = bracketed.split_once(']')?;
        let port = if after.is_empty() {
            None
        } else {
            Some(after.strip_prefix(':')?)
        };
        if literal.contains('[') {
            return None;
        }
        let host_len = literal.len().checked_add(2)?;
        (host_port.get(..host_len)?, port)
    } else {
        if host_port.contains(['[', ']']) {
            return None;
        }
        match host_port.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        }
    };
    let port = match port {
        None => Port::Absent,
        Some("") => Port::Empty,
        Some(digits) if is_port_number(digits) => Port::Number,
        Some(_) => return None,
    };
    // head = everything up to the end of the host: "scheme" + "://" + userinfo@ + host.
    let userinfo_len = authority.len().checked_sub(host_port.len())?;
    let head_len = scheme
        .len()
        .checked_add(3)?
        .checked_add(userinfo_len)?
        .checked_add(host.len())?;
    let default_port = if scheme.eq_ignore_ascii_case("https") {
        "443"
    } else {
        "80"
    };
    Some(PortSplit {
        head: url.get(..head_len)?,
        port,
        tail,
        default_port,
    })
}

/// Python's `urlsplit` scheme rule: an ASCII letter, then letters, digits, `+`, `-` or `.`.
fn is_scheme(scheme: &str) -> bool {
    let mut chars = scheme.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// Python's `.port`: ASCII digits (leading zeros allowed) with a value of at most 65535.
fn is_port_number(digits: &str) -> bool {
    !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && digits
            .bytes()
            .try_fold(0u32, |acc, b| {
                acc.checked_mul(10)?
                    .checked_add(u32::from(b - b'0'))
                    .filter(|&value| value <= 65_535)
            })
            .is_some()
}

/// First non-empty `bodySHA256` value of the URL's query, decoded like Python's `parse_qs`
/// (`+` is a space, `%XX` a byte); the query runs from the first `?` to the first `#`.
fn body_sha256_param(url: &str) -> Option<Vec<u8>> {
    let without_fragment = url.split_once('#').map_or(url, |(before, _)| before);
    let (_, query) = without_fragment.split_once('?')?;
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .filter(|(_, value)| !value.is_empty())
        .find(|(name, _)| form_decode(name) == b"bodySHA256")
        .map(|(_, value)| form_decode(value))
}

/// `unquote(s.replace('+', ' '))` on bytes: invalid `%` escapes are kept as they are.
fn form_decode(input: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut bytes = input.bytes();
    while let Some(byte) = bytes.next() {
        match byte {
            b'+' => out.push(b' '),
            b'%' => {
                let mut lookahead = bytes.clone();
                let high = lookahead.next().and_then(hex_value);
                let low = lookahead.next().and_then(hex_value);
                match (high, low) {
                    (Some(high), Some(low)) => {
                        out.push((high << 4) | low);
                        bytes = lookahead;
                    }
                    _ => out.push(b'%'),
                }
            }
            other => out.push(other),
        }
    }
    out
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
