//! Any form body posted to the inbound webhook: building the envelope never panics, and an
//! accepted message has the fields the pipeline relies on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twilio::{form, inbound::parse_inbound};
use wagate_core::domain::AgentId;

fuzz_target!(|data: &[u8]| {
    let Ok(fields) = form::parse(data) else {
        return;
    };
    let agent = AgentId::parse("fuzz").expect("valid agent id");
    if let Ok(m) = parse_inbound(&agent, &fields, time::OffsetDateTime::UNIX_EPOCH) {
        assert!(m.message_sid.as_str().len() == 34);
        assert!(m.from.as_str().starts_with("whatsapp:"));
        let _ = m.session_id().subject_token();
    }
});
