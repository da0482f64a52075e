//! Any reply and limit: splitting never panics, parts respect the limit, and the parts with the
//! whitespace cut between them are exactly the reply.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wagate_core::text::{split_reply, utf16_len};

fuzz_target!(|input: (u8, String)| {
    let (limit, text) = input;
    let limit = usize::from(limit).max(8);
    let parts = split_reply(&text, limit);
    let mut rest = text.as_str();
    for part in &parts {
        assert!(!part.is_empty());
        assert!(utf16_len(part) <= limit, "a part over the limit");
        let at = rest
            .find(part.as_str())
            .expect("parts are consecutive slices of the reply");
        assert!(
            rest[..at].trim().is_empty(),
            "only whitespace lies between parts"
        );
        rest = &rest[at + part.len()..];
    }
    assert!(rest.trim().is_empty(), "nothing but whitespace is left out");
});
