//! Strict `application/x-www-form-urlencoded` parsing. Twilio signs the decoded values, so a
//! lossy decoder (one that turns bad bytes into U+FFFD) would both corrupt text and make valid
//! signatures fail; bad encoding is refused with a reason instead.

use percent_encoding::percent_decode;

/// Why a form body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormError {
    /// A name or value is not UTF-8 after decoding.
    #[error("form field {0} is not valid UTF-8")]
    NotUtf8(usize),
    /// More fields than any Twilio webhook sends.
    #[error("form has more than {0} fields")]
    TooManyFields(usize),
}

/// Most fields accepted in one form; Twilio sends a few dozen at most (media adds two per item).
pub const MAX_FIELDS: usize = 512;

/// Decodes a form body into its name/value pairs, in order, keeping empty values and repeats.
pub fn parse(body: &[u8]) -> Result<Vec<(String, String)>, FormError> {
    let mut out = Vec::new();
    for (index, pair) in body.split(|b| *b == b'&').enumerate() {
        if pair.is_empty() {
            continue;
        }
        if out.len() == MAX_FIELDS {
            return Err(FormError::TooManyFields(MAX_FIELDS));
        }
        let (name, value) = match pair.iter().position(|b| *b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &[][..]),
        };
        let name = decode(name).ok_or(FormError::NotUtf8(index + 1))?;
        let value = decode(value).ok_or(FormError::NotUtf8(index + 1))?;
        out.push((name, value));
    }
    Ok(out)
}

/// `+` is a space and `%XX` a byte; a `+` is replaced before percent-decoding (so `%2B` stays a
/// plus) by decoding the runs between pluses. Runs without `%` are copied as they are, so a
/// typical Twilio field costs one allocation and one UTF-8 check.
fn decode(raw: &[u8]) -> Option<String> {
    let mut bytes = Vec::with_capacity(raw.len());
    for (i, run) in raw.split(|b| *b == b'+').enumerate() {
        if i > 0 {
            bytes.push(b' ');
        }
        let decoded: std::borrow::Cow<'_, [u8]> = percent_decode(run).into();
        bytes.extend_from_slice(&decoded);
    }
    String::from_utf8(bytes).ok()
}

/// Encodes pairs as a form body (for tests, `wagate chat` and the Twilio client).
pub fn encode(pairs: &[(String, String)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

/// The first value of `name`, if present.
pub fn first<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_like_twilio_encodes() {
        let p =
            parse(b"Body=Hello%2C+agent%21+%F0%9F%91%8B&Empty=&Flag&From=whatsapp%3A%2B1").unwrap();
        assert_eq!(p[0], ("Body".into(), "Hello, agent! 👋".into()));
        assert_eq!(p[1], ("Empty".into(), "".into()));
        assert_eq!(p[2], ("Flag".into(), "".into()));
        assert_eq!(p[3], ("From".into(), "whatsapp:+1".into()));
    }

    #[test]
    fn refuses_bad_utf8() {
        assert_eq!(parse(b"a=%FF"), Err(FormError::NotUtf8(1)));
        assert_eq!(parse(b"x=1&a=\xff"), Err(FormError::NotUtf8(2)));
    }

    #[test]
    fn keeps_malformed_percent_literally() {
        assert_eq!(parse(b"a=%zz%4").unwrap()[0].1, "%zz%4");
    }

    proptest! {
        #[test]
        fn round_trips(pairs in proptest::collection::vec((".{0,12}", ".{0,24}"), 0..20)) {
            let encoded = encode(&pairs);
            prop_assert_eq!(parse(encoded.as_bytes()).unwrap(), pairs);
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes);
        }
    }
}
