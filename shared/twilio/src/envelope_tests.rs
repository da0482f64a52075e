//! Envelopes made from Twilio's forms keep their wire form on the bus, and dead letters of
//! every stage read back as written.

use time::OffsetDateTime;
use wagate_core::{
    domain::{AgentId, WhatsAppAddress},
    envelope::{DeadLetter, DeadMessage, InboundMessage, OutboundReply, ReplyContent, Stage},
    events::{Event, Kind},
};

use crate::inbound::parse_inbound;

fn inbound() -> InboundMessage {
    let fields: Vec<(String, String)> = [
        ("MessageSid", "SM0123456789abcdef0123456789abcdef"),
        ("From", "whatsapp:+14155550100"),
        ("To", "whatsapp:+14155238886"),
        ("Body", "hi \"there\"\n"),
        ("Custom", "kept"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    parse_inbound(
        &AgentId::parse("a").unwrap(),
        &fields,
        OffsetDateTime::UNIX_EPOCH,
    )
    .unwrap()
}

/// The fields travel in the form the version before wrote and read (a list of string
/// pairs), so old and new processes read each other's envelopes.
#[test]
fn fields_keep_the_wire_form_of_a_list_of_pairs() {
    let json = serde_json::to_value(inbound()).unwrap();
    let before: Vec<(String, String)> = serde_json::from_value(json["fields"].clone()).unwrap();
    assert_eq!(before[3], ("Body".to_owned(), "hi \"there\"\n".to_owned()));
    assert_eq!(before.len(), 5);

    let mut written_before = json.clone();
    written_before["fields"] = serde_json::to_value(&before).unwrap();
    let read: InboundMessage =
        serde_json::from_slice(&serde_json::to_vec(&written_before).unwrap()).unwrap();
    assert_eq!(read, inbound());
}

#[test]
fn dead_letters_of_every_stage_read_back_as_written() {
    let reply = OutboundReply {
        id: "in-SM1".to_owned(),
        agent_id: AgentId::parse("a").unwrap(),
        to: WhatsAppAddress::parse("whatsapp:+14155550100").unwrap(),
        content: ReplyContent::Text {
            parts: vec!["hello".to_owned()],
        },
        created_at: OffsetDateTime::UNIX_EPOCH,
        answers_received_at: None,
        media: Vec::new(),
        quick_replies: Vec::new(),
        traceparent: None,
        callback_base: None,
        bulk: false,
    };
    let mut event = Event::new(
        Kind::MessageSent,
        &reply.agent_id,
        &reply.to,
        "SM1",
        serde_json::json!({"sid": "SM1"}),
    );
    event.timestamp = OffsetDateTime::UNIX_EPOCH;
    for message in [
        DeadMessage::Inbound(Box::new(inbound())),
        DeadMessage::Reply(Box::new(reply)),
        DeadMessage::Event(Box::new(event)),
    ] {
        let letter = DeadLetter {
            id: String::new(),
            stage: Stage::Agent,
            reason: "agent down".to_owned(),
            code: None,
            attempts: 3,
            failed_at: OffsetDateTime::UNIX_EPOCH,
            agent_id: AgentId::parse("a").unwrap(),
            message,
        };
        let read: DeadLetter =
            serde_json::from_slice(&serde_json::to_vec(&letter).unwrap()).unwrap();
        assert_eq!(read, letter);
    }
}

#[test]
fn a_dead_letter_holding_no_kind_of_message_is_refused_with_why() {
    let json = r#"{"stage":"agent","reason":"r","code":null,"attempts":1,
        "failed_at":"1970-01-01T00:00:00Z","agent_id":"a","message":{"to":"nobody"}}"#;
    let e = serde_json::from_str::<DeadLetter>(json).unwrap_err();
    assert!(
        e.to_string()
            .contains("neither an inbound message, a reply nor an event"),
        "{e}"
    );
}
