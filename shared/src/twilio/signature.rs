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
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    const TOKEN: &[u8] = b"12345";
    const BASE_URL: &str = "https://mycompany.com/myapp.php?foo=1&bar=2";

    /// V1 params (twilio-python / twilio-node SDK tests).
    fn v1_params() -> Vec<(String, String)> {
        p(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
            ("Caller", "+14158675309"),
        ])
    }

    const V8_TOKEN: &[u8] = b"0123456789abcdef0123456789abcdef";
    const V8_URL: &str = "https://gateway.example.com/twilio/whatsapp/inbound";

    /// V8 form body, decoded (WhatsApp-shaped inbound message).
    fn v8_params(body: Option<&str>) -> Vec<(String, String)> {
        let mut params = p(&[
            ("SmsMessageSid", "SM0123456789abcdef0123456789abcdef"),
            ("NumMedia", "0"),
            ("ProfileName", "Alice"),
            ("MessageType", "text"),
            ("SmsSid", "SM0123456789abcdef0123456789abcdef"),
            ("WaId", "14155550100"),
            ("SmsStatus", "received"),
            ("To", "whatsapp:+14155238886"),
            ("NumSegments", "1"),
            ("ReferralNumMedia", "0"),
            ("MessageSid", "SM0123456789abcdef0123456789abcdef"),
            ("AccountSid", "AC00000000000000000000000000000000"),
            ("From", "whatsapp:+14155550100"),
            ("ApiVersion", "2010-04-01"),
        ]);
        if let Some(body) = body {
            params.push(("Body".to_owned(), body.to_owned()));
        }
        params
    }

    fn candidates(url: &str) -> Vec<String> {
        url_candidates(url).into_iter().flatten().collect()
    }

    #[test]
    fn v1_sdk_vector() {
        let params = v1_params();
        assert_eq!(
            string_to_sign(BASE_URL, &params_suffix(&params)),
            "https://mycompany.com/myapp.php?foo=1&bar=2CallSidCA1234567890ABCDECaller+14158675309Digits1234From+14158675309To+18005551212"
        );
        assert_eq!(
            compute_signature(TOKEN, BASE_URL, &params),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        );
        assert!(verify_form(
            TOKEN,
            BASE_URL,
            &params,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
    }

    #[test]
    fn v2_https_with_port_443() {
        let params = v1_params();
        let url_443 = "https://mycompany.com:443/myapp.php?foo=1&bar=2";
        assert_eq!(
            compute_signature(TOKEN, url_443, &params),
            "kvajT1Ptam85bY51eRf/AJRuM3w="
        );
        // Signed with :443, received without: add_port.
        assert!(verify_form(
            TOKEN,
            BASE_URL,
            &params,
            "kvajT1Ptam85bY51eRf/AJRuM3w="
        ));
        // Signed without, received with :443: remove_port.
        assert!(verify_form(
            TOKEN,
            url_443,
            &params,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
        assert!(verify_form(
            TOKEN,
            url_443,
            &params,
            "kvajT1Ptam85bY51eRf/AJRuM3w="
        ));
    }

    #[test]
    fn v3_http_with_port_80() {
        let params = v1_params();
        let url_80 = "http://mycompany.com:80/myapp.php?foo=1&bar=2";
        let url_plain = "http://mycompany.com/myapp.php?foo=1&bar=2";
        assert_eq!(
            compute_signature(TOKEN, url_80, &params),
            "0ZXoZLH/DfblKGATFgpif+LLRf4="
        );
        assert!(verify_form(
            TOKEN,
            url_plain,
            &params,
            "0ZXoZLH/DfblKGATFgpif+LLRf4="
        ));
        assert!(verify_form(
            TOKEN,
            url_80,
            &params,
            "0ZXoZLH/DfblKGATFgpif+LLRf4="
        ));
        // The https signature is not valid for an http URL.
        assert!(!verify_form(
            TOKEN,
            url_plain,
            &params,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
    }

    #[test]
    fn v4_http_with_port_1234() {
        let params = v1_params();
        let url_1234 = "http://mycompany.com:1234/myapp.php?foo=1&bar=2";
        assert_eq!(
            compute_signature(TOKEN, url_1234, &params),
            "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="
        );
        assert!(verify_form(
            TOKEN,
            url_1234,
            &params,
            "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="
        ));
        // twilio-python test_validation_removes_port_on_https: a non-default port is removed too.
        assert!(verify_form(
            TOKEN,
            "https://mycompany.com:1234/myapp.php?foo=1&bar=2",
            &params,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
        // But a port is never swapped for another one.
        assert!(!verify_form(
            TOKEN,
            "http://mycompany.com:1235/myapp.php?foo=1&bar=2",
            &params,
            "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="
        ));
    }

    #[test]
    fn v5_repeated_keys_sorted_and_deduplicated() {
        let params = p(&[
            ("Sid", "CA123"),
            ("SidAccount", "AC123"),
            ("Digits", "5678"),
            ("Digits", "1234"),
        ]);
        assert_eq!(
            string_to_sign(BASE_URL, &params_suffix(&params)),
            "https://mycompany.com/myapp.php?foo=1&bar=2Digits1234Digits5678SidCA123SidAccountAC123"
        );
        assert_eq!(
            compute_signature(TOKEN, BASE_URL, &params),
            "IK+Dwps556ElfBT0I3Rgjkr1wJU="
        );
        let with_duplicate = p(&[
            ("Sid", "CA123"),
            ("SidAccount", "AC123"),
            ("Digits", "5678"),
            ("Digits", "1234"),
            ("Digits", "1234"),
        ]);
        assert_eq!(
            compute_signature(TOKEN, BASE_URL, &with_duplicate),
            "IK+Dwps556ElfBT0I3Rgjkr1wJU="
        );
        assert!(verify_form(
            TOKEN,
            BASE_URL,
            &with_duplicate,
            "IK+Dwps556ElfBT0I3Rgjkr1wJU="
        ));
    }

    #[test]
    fn neg_vector_is_what_skipping_dedup_would_give() {
        // The "neg" vector: Digits=[5678,1234,1234] signed without de-duplication.
        let not_deduplicated = "https://mycompany.com/myapp.php?foo=1&bar=2Digits1234Digits1234Digits5678SidCA123SidAccountAC123";
        assert_eq!(
            sign_sha1(TOKEN, not_deduplicated).as_deref(),
            Some("tM//N+MVWOh7+ol2z8YCNxSY0Eg=")
        );
        let with_duplicate = p(&[
            ("Sid", "CA123"),
            ("SidAccount", "AC123"),
            ("Digits", "5678"),
            ("Digits", "1234"),
            ("Digits", "1234"),
        ]);
        assert_ne!(
            compute_signature(TOKEN, BASE_URL, &with_duplicate),
            "tM//N+MVWOh7+ol2z8YCNxSY0Eg="
        );
        assert!(!verify_form(
            TOKEN,
            BASE_URL,
            &with_duplicate,
            "tM//N+MVWOh7+ol2z8YCNxSY0Eg="
        ));
    }

    #[test]
    fn v6_json_body() {
        let body = br#"{"property": "value", "boolean": true}"#;
        let hash = "0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620";
        assert_eq!(hex::encode(Sha256::digest(body)), hash);
        let url = format!("{BASE_URL}&bodySHA256={hash}");
        let signature = "a9nBmqA0ju/hNViExpshrM61xv4=";
        assert_eq!(compute_signature(TOKEN, &url, &[]), signature);
        assert!(verify_json(TOKEN, &url, body, signature));
        // Port leniency applies here too.
        let url_443 = format!("https://mycompany.com:443/myapp.php?foo=1&bar=2&bodySHA256={hash}");
        assert!(verify_json(TOKEN, &url_443, body, signature));
        // Tampered body, wrong signature, missing or uppercase hash: rejected.
        assert!(!verify_json(
            TOKEN,
            &url,
            br#"{"property": "value", "boolean": false}"#,
            signature
        ));
        assert!(!verify_json(
            TOKEN,
            &url,
            body,
            "a9nBmqA0ju/hNViExpshrM61xv5="
        ));
        assert!(!verify_json(
            TOKEN,
            BASE_URL,
            body,
            "zYQTYrRWXE7LtzbG4PfP7/bkkGo="
        ));
        let upper = format!("{BASE_URL}&bodySHA256={}", hash.to_uppercase());
        let upper_sig = compute_signature(TOKEN, &upper, &[]);
        assert!(!verify_json(TOKEN, &upper, body, &upper_sig));
    }

    #[test]
    fn v6b_empty_json_body() {
        let hash = "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
        assert_eq!(hex::encode(Sha256::digest(b"{}")), hash);
        let url = format!("{BASE_URL}&bodySHA256={hash}");
        // signature_vectors.json lists Ldidvp.. for the URL without a port, but that is the
        // signature of the `:443` form (twilio-python 9.13.0 computes rw/jVvi.. for the URL as
        // listed, and its `validate` accepts Ldidvp.. only through `add_port`).
        let url_443 = format!("https://mycompany.com:443/myapp.php?foo=1&bar=2&bodySHA256={hash}");
        assert_eq!(
            compute_signature(TOKEN, &url, &[]),
            "rw/jVviOgicj2+kHZULvebnA4ag="
        );
        assert_eq!(
            compute_signature(TOKEN, &url_443, &[]),
            "Ldidvp12m26NI7eqEvxnEpkd9Hc="
        );
        for signature in [
            "Ldidvp12m26NI7eqEvxnEpkd9Hc=",
            "rw/jVviOgicj2+kHZULvebnA4ag=",
        ] {
            assert!(verify_json(TOKEN, &url, b"{}", signature));
            assert!(verify_json(TOKEN, &url_443, b"{}", signature));
            assert!(!verify_json(TOKEN, &url, b"{ }", signature));
        }
    }

    #[test]
    fn body_sha256_is_read_like_parse_qs() {
        let hash = "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
        // First non-empty value wins; names and values are %-decoded; the fragment is not query.
        let cases = [
            (format!("https://h/x?bodySHA256=&bodySHA256={hash}"), true),
            (format!("https://h/x?bodySHA256={hash}&bodySHA256=00"), true),
            (
                format!("https://h/x?bodySHA256=00&bodySHA256={hash}"),
                false,
            ),
            (format!("https://h/x?body%53HA256={hash}"), true),
            (format!("https://h/x?bodySHA256=%34{}", &hash[1..]), true),
            (format!("https://h/x#bodySHA256={hash}"), false),
            (format!("https://h/x?a=1#&bodySHA256={hash}"), false),
            (format!("https://h/x?bodysha256={hash}"), false),
            (format!("https://h/x?bodySHA256={hash}&"), true),
        ];
        for (url, expected) in cases {
            let signature = compute_signature(TOKEN, &url, &[]);
            assert_eq!(
                verify_json(TOKEN, &url, b"{}", &signature),
                expected,
                "{url}"
            );
        }
    }

    #[test]
    fn v7_docs_worked_example() {
        let params = p(&[
            ("Digits", "1234"),
            ("To", "+18005551212"),
            ("From", "+14158675310"),
            ("Caller", "+14158675310"),
            ("CallSid", "CA1234567890ABCDE"),
        ]);
        let url = "https://example.com/myapp.php?foo=1&bar=2";
        assert_eq!(
            string_to_sign(url, &params_suffix(&params)),
            "https://example.com/myapp.php?foo=1&bar=2CallSidCA1234567890ABCDECaller+14158675310Digits1234From+14158675310To+18005551212"
        );
        assert_eq!(
            compute_signature(TOKEN, url, &params),
            "L/OH5YylLD5NRKLltdqwSvS0BnU="
        );
    }

    #[test]
    fn v8_whatsapp_inbound_and_variants() {
        let params = v8_params(Some("Hello, agent! ¿Qué tal? 👋"));
        assert_eq!(
            string_to_sign(V8_URL, &params_suffix(&params)),
            "https://gateway.example.com/twilio/whatsapp/inboundAccountSidAC00000000000000000000000000000000ApiVersion2010-04-01BodyHello, agent! ¿Qué tal? 👋Fromwhatsapp:+14155550100MessageSidSM0123456789abcdef0123456789abcdefMessageTypetextNumMedia0NumSegments1ProfileNameAliceReferralNumMedia0SmsMessageSidSM0123456789abcdef0123456789abcdefSmsSidSM0123456789abcdef0123456789abcdefSmsStatusreceivedTowhatsapp:+14155238886WaId14155550100"
        );
        assert_eq!(
            compute_signature(V8_TOKEN, V8_URL, &params),
            "efQ0l4r/RUNpC2xpEdlcy+8gwpM="
        );
        assert!(verify_form(
            V8_TOKEN,
            V8_URL,
            &params,
            "efQ0l4r/RUNpC2xpEdlcy+8gwpM="
        ));
        let url_443 = "https://gateway.example.com:443/twilio/whatsapp/inbound";
        assert_eq!(
            compute_signature(V8_TOKEN, url_443, &params),
            "M9UaJaXCUnQ3K+ZsTNQ6Nw5LIdg="
        );
        assert!(verify_form(
            V8_TOKEN,
            V8_URL,
            &params,
            "M9UaJaXCUnQ3K+ZsTNQ6Nw5LIdg="
        ));
        // Empty Body is signed as "Body"; an absent Body is not signed at all.
        let empty_body = v8_params(Some(""));
        assert_eq!(
            compute_signature(V8_TOKEN, V8_URL, &empty_body),
            "0kw9PVnigKtIuZ8w5PgK777eZc0="
        );
        let no_body = v8_params(None);
        assert_eq!(
            compute_signature(V8_TOKEN, V8_URL, &no_body),
            "kavQhnpvPpZ/wgiaBxfUKezE7TU="
        );
        assert!(!verify_form(
            V8_TOKEN,
            V8_URL,
            &no_body,
            "0kw9PVnigKtIuZ8w5PgK777eZc0="
        ));
        // Case matters in the token; a trailing slash changes the URL.
        assert!(!verify_form(
            b"0123456789ABCDEF0123456789abcdef",
            V8_URL,
            &params,
            "efQ0l4r/RUNpC2xpEdlcy+8gwpM="
        ));
        assert!(!verify_form(
            V8_TOKEN,
            "https://gateway.example.com/twilio/whatsapp/inbound/",
            &params,
            "efQ0l4r/RUNpC2xpEdlcy+8gwpM="
        ));
        // The header value is compared as is (no trimming), like the SDK.
        assert!(!verify_form(
            V8_TOKEN,
            V8_URL,
            &params,
            "efQ0l4r/RUNpC2xpEdlcy+8gwpM= "
        ));
    }

    #[test]
    fn v9_status_callback() {
        let params = p(&[
            ("MessageSid", "SM0123456789abcdef0123456789abcdef"),
            ("MessageStatus", "delivered"),
            ("SmsSid", "SM0123456789abcdef0123456789abcdef"),
            ("SmsStatus", "delivered"),
            ("AccountSid", "AC00000000000000000000000000000000"),
            ("From", "whatsapp:+14155238886"),
            ("To", "whatsapp:+14155550100"),
            ("ApiVersion", "2010-04-01"),
            ("ChannelToAddress", "+1415555XXXX"),
            ("ChannelPrefix", "whatsapp"),
            ("ChannelInstallSid", "XE00000000000000000000000000000000"),
            ("StructuredMessage", "false"),
        ]);
        let url = "https://gateway.example.com/twilio/status?tenant=a";
        assert_eq!(
            compute_signature(V8_TOKEN, url, &params),
            "M57oGqG9Y2g0cg5Rem1+naJT8fQ="
        );
        assert!(verify_form(
            V8_TOKEN,
            url,
            &params,
            "M57oGqG9Y2g0cg5Rem1+naJT8fQ="
        ));
    }

    #[test]
    fn v10_query_string_is_signed_verbatim() {
        let params = v1_params();
        let encoded = "https://mycompany.com/myapp.php?foo=1&bar=2&Body=It%27s+amazing";
        let raw = "https://mycompany.com/myapp.php?foo=1&bar=2&Body=It's+amazing";
        assert_eq!(
            compute_signature(TOKEN, encoded, &params),
            "TfZzewPq8wqrGlMfyAud8+/IvJ0="
        );
        assert_eq!(
            compute_signature(TOKEN, raw, &params),
            "dsq4Ehbj6cs+KdTkpF5sSSplOWw="
        );
        assert!(verify_form(
            TOKEN,
            encoded,
            &params,
            "TfZzewPq8wqrGlMfyAud8+/IvJ0="
        ));
        assert!(verify_form(
            TOKEN,
            raw,
            &params,
            "dsq4Ehbj6cs+KdTkpF5sSSplOWw="
        ));
        assert!(!verify_form(
            TOKEN,
            raw,
            &params,
            "TfZzewPq8wqrGlMfyAud8+/IvJ0="
        ));
    }

    #[test]
    fn v11_userinfo_is_signed_when_present() {
        let params = v1_params();
        let url = "https://user:pass@mycompany.com/myapp.php?foo=1&bar=2";
        assert_eq!(
            compute_signature(TOKEN, url, &params),
            "CukzLTc1tT5dXEDIHm/tKBanW10="
        );
        assert!(verify_form(
            TOKEN,
            url,
            &params,
            "CukzLTc1tT5dXEDIHm/tKBanW10="
        ));
        // Userinfo is not stripped: callers pass the URL without it.
        assert!(!verify_form(
            TOKEN,
            url,
            &params,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
    }

    #[test]
    fn v12_shared_key_hmac_sha256() {
        assert_eq!(
            compute_signature_sha256(TOKEN, BASE_URL, &v1_params()),
            "033hgUJA9M/hXIZsYjwkerEP/DBm35nEri5FhCYjA5s="
        );
    }

    #[test]
    fn v13_no_params() {
        assert_eq!(
            compute_signature(TOKEN, BASE_URL, &[]),
            "zYQTYrRWXE7LtzbG4PfP7/bkkGo="
        );
        assert!(verify_form(
            TOKEN,
            BASE_URL,
            &[],
            "zYQTYrRWXE7LtzbG4PfP7/bkkGo="
        ));
    }

    #[test]
    fn wrong_inputs_are_rejected() {
        let params = v1_params();
        let good = "RSOYDt4T1cUTdK1PDd93/VVr8B8=";
        assert!(!verify_form(b"12346", BASE_URL, &params, good));
        assert!(!verify_form(b"", BASE_URL, &params, good));
        assert!(!verify_form(TOKEN, BASE_URL, &params, ""));
        assert!(!verify_form(
            TOKEN,
            BASE_URL,
            &params,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8"
        ));
        assert!(!verify_form(TOKEN, BASE_URL, &params[1..], good));
        let mut extra = params.clone();
        extra.push(("Body".to_owned(), String::new()));
        assert!(!verify_form(TOKEN, BASE_URL, &extra, good));
        let mut changed = params.clone();
        changed[1].1 = "1235".to_owned();
        assert!(!verify_form(TOKEN, BASE_URL, &changed, good));
        assert!(!verify_form(
            TOKEN,
            "http://mycompany.com/myapp.php?foo=1&bar=2",
            &params,
            good
        ));
    }

    #[test]
    fn port_candidates() {
        let cases: &[(&str, &[&str])] = &[
            ("https://h/x", &["https://h/x", "https://h:443/x"]),
            ("http://h/x", &["http://h/x", "http://h:80/x"]),
            ("https://h:443/x", &["https://h:443/x", "https://h/x"]),
            (
                "https://h:8443/x?a=b:c",
                &["https://h:8443/x?a=b:c", "https://h/x?a=b:c"],
            ),
            ("http://h:443/x", &["http://h:443/x", "http://h/x"]),
            ("https://h", &["https://h", "https://h:443"]),
            ("https://h:443", &["https://h:443", "https://h"]),
            ("https://h?q=1", &["https://h?q=1", "https://h:443?q=1"]),
            ("https://h#f", &["https://h#f", "https://h:443#f"]),
            ("HTTPS://h/x", &["HTTPS://h/x", "HTTPS://h:443/x"]),
            ("ftp://h/x", &["ftp://h/x", "ftp://h:80/x"]),
            ("wss://h/x", &["wss://h/x", "wss://h:80/x"]),
            ("https://h:0443/x", &["https://h:0443/x", "https://h/x"]),
            ("https://h:0/x", &["https://h:0/x", "https://h/x"]),
            (
                "https://h:/x",
                &["https://h:/x", "https://h/x", "https://h:443/x"],
            ),
            (
                "https://user:pw@h:8443/x",
                &["https://user:pw@h:8443/x", "https://user:pw@h/x"],
            ),
            (
                "https://user:pw@h/x",
                &["https://user:pw@h/x", "https://user:pw@h:443/x"],
            ),
            (
                "https://a@b:pw@h:81/x",
                &["https://a@b:pw@h:81/x", "https://a@b:pw@h/x"],
            ),
            (
                "https://[::1]:8443/x",
                &["https://[::1]:8443/x", "https://[::1]/x"],
            ),
            (
                "https://[2001:db8::1]/x",
                &["https://[2001:db8::1]/x", "https://[2001:db8::1]:443/x"],
            ),
            (
                "https://bücher.example:8443/ü",
                &["https://bücher.example:8443/ü", "https://bücher.example/ü"],
            ),
            // Unparseable authorities: only the URL as given.
            ("https://h:65536/x", &["https://h:65536/x"]),
            (
                "https://h:99999999999999999999/x",
                &["https://h:99999999999999999999/x"],
            ),
            ("https://h:8a/x", &["https://h:8a/x"]),
            ("https://h:+80/x", &["https://h:+80/x"]),
            ("https://h:1:2/x", &["https://h:1:2/x"]),
            ("https://::1/x", &["https://::1/x"]),
            ("https://[::1/x", &["https://[::1/x"]),
            ("https://[::1]x/x", &["https://[::1]x/x"]),
            ("https://h]/x", &["https://h]/x"]),
            ("https://h:١٢/x", &["https://h:١٢/x"]),
            ("https:/h/x", &["https:/h/x"]),
            ("//h:80/x", &["//h:80/x"]),
            ("1https://h/x", &["1https://h/x"]),
            ("", &[""]),
            ("not a url", &["not a url"]),
        ];
        for (url, expected) in cases {
            assert_eq!(candidates(url), *expected, "{url}");
        }
    }

    #[test]
    fn garbage_does_not_panic() {
        let urls = [
            "",
            ":",
            "://",
            "https://",
            "https://@",
            "https://[",
            "https://]",
            "https://[]",
            "https://[]:",
            "https://:",
            "https://:80",
            "https://@:/?#",
            "h://\u{0}:\u{0}",
            "https://é:é/é",
            "https://👋:1/👋",
            "https://a@👋@[👋]:443",
            "%",
            "https://h/x?bodySHA256=%",
            "https://h/x?bodySHA256=%f",
            "https://h/x?bodySHA256=%zz&=&&=x&bodySHA256",
            "\u{10FFFF}://\u{10FFFF}",
        ];
        for url in urls {
            let _ = candidates(url);
            let signature = compute_signature(b"", url, &[]);
            assert!(verify_form(b"", url, &[], &signature), "{url:?}");
            let _ = verify_json(b"", url, b"", &signature);
            let _ = verify_json(b"", url, &[0xff, 0xfe], "\u{0}");
        }
    }

    #[test]
    fn param_order_is_bytewise_and_values_sort_within_a_key() {
        // Uppercase sorts before lowercase; U+FFFD (BMP) before U+1F44B (astral), unlike UTF-16.
        let params = p(&[
            ("b", "2"),
            ("a", "z"),
            ("B", "1"),
            ("\u{1F44B}", "x"),
            ("\u{FFFD}", "y"),
            ("a", ""),
            ("a", "\u{1F44B}"),
            ("a", "\u{FFFD}"),
        ]);
        assert_eq!(
            params_suffix(&params),
            "B1a".to_owned()
                + "az"
                + "a\u{FFFD}"
                + "a\u{1F44B}"
                + "b2"
                + "\u{FFFD}y"
                + "\u{1F44B}x"
        );
    }

    fn url_strategy() -> impl Strategy<Value = String> {
        (
            prop_oneof![Just("https"), Just("http"), Just("HTTPS"), Just("wss")],
            prop_oneof![
                Just(String::new()),
                Just("user:pw@".to_owned()),
                Just("u@".to_owned())
            ],
            prop_oneof![
                Just("mycompany.com".to_owned()),
                Just("[::1]".to_owned()),
                Just("bücher.example".to_owned()),
                "[a-z0-9.-]{1,12}"
            ],
            prop_oneof![
                Just(String::new()),
                Just(":".to_owned()),
                (0u32..70_000).prop_map(|port| format!(":{port}"))
            ],
            prop_oneof![Just(String::new()), "/[^?#]{0,16}"],
            prop_oneof![Just(String::new()), "\\?[^#]{0,16}"],
        )
            .prop_map(|(scheme, userinfo, host, port, path, query)| {
                format!("{scheme}://{userinfo}{host}{port}{path}{query}")
            })
    }

    fn params_strategy() -> impl Strategy<Value = Vec<(String, String)>> {
        prop::collection::vec(
            (
                prop_oneof!["[A-Za-z]{1,3}", "\\PC{0,4}", Just("Body".to_owned())],
                prop_oneof![Just(String::new()), "\\PC{0,8}", ".{0,8}"],
            ),
            0..8,
        )
    }

    proptest! {
        #[test]
        fn computed_signature_verifies(
            token in prop::collection::vec(any::<u8>(), 0..40),
            url in url_strategy(),
            params in params_strategy(),
        ) {
            let signature = compute_signature(&token, &url, &params);
            prop_assert!(verify_form(&token, &url, &params, &signature));
            // Param order does not matter.
            let mut reversed = params.clone();
            reversed.reverse();
            prop_assert!(verify_form(&token, &url, &reversed, &signature));
            // Every port variant we accept verifies the received URL.
            for candidate in candidates(&url) {
                let signature = compute_signature(&token, &candidate, &params);
                prop_assert!(verify_form(&token, &url, &params, &signature));
            }
        }

        #[test]
        fn changing_a_param_value_breaks_the_signature(
            token in prop::collection::vec(any::<u8>(), 0..40),
            url in url_strategy(),
            params in prop::collection::btree_map("\\PC{0,6}", "\\PC{0,8}", 1..8),
            index in any::<prop::sample::Index>(),
            new_value in "\\PC{0,8}",
        ) {
            // Distinct names: with repeated names, changing one duplicate into another value the
            // name already has legitimately leaves the de-duplicated string unchanged.
            let mut params: Vec<(String, String)> = params.into_iter().collect();
            let i = index.index(params.len());
            prop_assume!(params[i].1 != new_value);
            let signature = compute_signature(&token, &url, &params);
            params[i].1 = new_value;
            prop_assert!(!verify_form(&token, &url, &params, &signature));
        }

        #[test]
        fn adding_a_param_breaks_the_signature(
            token in prop::collection::vec(any::<u8>(), 0..40),
            url in url_strategy(),
            params in params_strategy(),
            name in "\\PC{1,6}",
            value in "\\PC{0,6}",
        ) {
            prop_assume!(!params.iter().any(|(n, _)| *n == name));
            // Twilio's string-to-sign has no delimiters, so `https://host:4` with no params and
            // the port-less URL (which the SDKs also accept) plus a param named `:4` sign the
            // same string. That ambiguity is the algorithm's; no Twilio field name starts with
            // `:`.
            prop_assume!(!name.starts_with(':'));
            let signature = compute_signature(&token, &url, &params);
            let mut more = params.clone();
            more.push((name, value));
            prop_assert!(!verify_form(&token, &url, &more, &signature));
        }

        #[test]
        fn arbitrary_strings_never_panic(
            token in prop::collection::vec(any::<u8>(), 0..40),
            url in prop_oneof![any::<String>(), url_strategy(), "[a-zA-Z+.-]{0,5}:(//)?[\\[\\]:@a-z0-9%]{0,16}[/?#&=]{0,3}.{0,12}"],
            params in prop::collection::vec((any::<String>(), any::<String>()), 0..4),
            body in prop::collection::vec(any::<u8>(), 0..32),
            signature in any::<String>(),
        ) {
            let _ = compute_signature(&token, &url, &params);
            let _ = compute_signature_sha256(&token, &url, &params);
            let _ = verify_form(&token, &url, &params, &signature);
            let _ = verify_json(&token, &url, &body, &signature);
            let own = compute_signature(&token, &url, &params);
            prop_assert!(verify_form(&token, &url, &params, &own));
        }

        #[test]
        fn json_round_trip(
            token in prop::collection::vec(any::<u8>(), 0..40),
            url in url_strategy(),
            body in prop::collection::vec(any::<u8>(), 0..64),
            other in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            prop_assume!(!url.contains('#'));
            let separator = if url.contains('?') { "&" } else { "?" };
            let url = format!("{url}{separator}bodySHA256={}", hex::encode(Sha256::digest(&body)));
            let signature = compute_signature(&token, &url, &[]);
            prop_assert!(verify_json(&token, &url, &body, &signature));
            prop_assert_eq!(verify_json(&token, &url, &other, &signature), other == body);
        }
    }
}
