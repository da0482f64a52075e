//! Any token, URL and parameters: computing and checking signatures never panics, a computed
//! signature always checks, and a changed one never does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twilio::signature::{compute_signature, verify_form, verify_json};

fuzz_target!(|input: (Vec<u8>, String, Vec<(String, String)>, String)| {
    let (token, url, params, other) = input;
    let sig = compute_signature(&token, &url, &params);
    assert!(verify_form(&token, &url, &params, &sig));
    if other != sig {
        assert!(
            !verify_form(&token, &url, &params, &other),
            "a different signature checks"
        );
    }
    let _ = verify_json(&token, &url, other.as_bytes(), &sig);
});
