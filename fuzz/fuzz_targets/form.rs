//! Any body: form parsing never panics, and what it accepts survives encoding and parsing again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twilio::form;

fuzz_target!(|data: &[u8]| {
    if let Ok(pairs) = form::parse(data) {
        let again = form::parse(form::encode(&pairs).as_bytes()).expect("re-encoded form parses");
        assert_eq!(again, pairs);
    }
});
