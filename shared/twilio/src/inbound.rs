//! Twilio's inbound-message webhook form, turned into an [`InboundMessage`].

use time::OffsetDateTime;

use super::form::first;
use wagate_core::{
    domain::{AgentId, InvalidValue, MessageSid, WhatsAppAddress},
    envelope::{Button, InboundMessage, Location, Media, TwilioFields},
};

/// The fields of the media items Twilio attaches to one message (at most 10), named up front
/// so that no name is formatted per message.
const MEDIA_FIELDS: [(&str, &str); 10] = [
    ("MediaUrl0", "MediaContentType0"),
    ("MediaUrl1", "MediaContentType1"),
    ("MediaUrl2", "MediaContentType2"),
    ("MediaUrl3", "MediaContentType3"),
    ("MediaUrl4", "MediaContentType4"),
    ("MediaUrl5", "MediaContentType5"),
    ("MediaUrl6", "MediaContentType6"),
    ("MediaUrl7", "MediaContentType7"),
    ("MediaUrl8", "MediaContentType8"),
    ("MediaUrl9", "MediaContentType9"),
];

/// Builds the envelope from the decoded form; the error says which field is missing or wrong.
pub fn parse_inbound(
    agent_id: &AgentId,
    fields: &[(String, String)],
    received_at: OffsetDateTime,
) -> Result<InboundMessage, InvalidValue> {
    let required = |name: &str| {
        first(fields, name)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| InvalidValue(format!("missing {name}")))
    };
    let message_sid = MessageSid::parse(required("MessageSid")?)?;
    let from = WhatsAppAddress::parse(required("From")?)
        .map_err(|e| InvalidValue(format!("From: {e}")))?;
    let to =
        WhatsAppAddress::parse(required("To")?).map_err(|e| InvalidValue(format!("To: {e}")))?;
    let optional = |name: &str| {
        first(fields, name)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };

    let media = MEDIA_FIELDS
        .iter()
        .filter_map(|(url, content_type)| {
            optional(url).map(|url| Media {
                url,
                content_type: optional(content_type),
            })
        })
        .collect();
    let location = match (optional("Latitude"), optional("Longitude")) {
        (Some(latitude), Some(longitude)) => Some(Location {
            latitude,
            longitude,
            address: optional("Address"),
            label: optional("Label"),
        }),
        _ => None,
    };
    let button = match (optional("ButtonPayload"), optional("ButtonText")) {
        (None, None) => None,
        (payload, text) => Some(Button { payload, text }),
    };
    let all = TwilioFields::new(fields).map_err(|e| InvalidValue(format!("fields: {e}")))?;
    Ok(InboundMessage {
        agent_id: agent_id.clone(),
        message_sid,
        body: first(fields, "Body").unwrap_or_default().to_owned(),
        profile_name: optional("ProfileName"),
        wa_id: optional("WaId"),
        from,
        to,
        media,
        location,
        button,
        received_at,
        fields: all,
        callback_base: None,
        traceparent: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn keeps_all_ten_media_items_in_order_with_their_types() {
        let sid = format!("MM{}", "1".repeat(32));
        let mut list = vec![
            ("MessageSid".to_string(), sid),
            ("From".to_string(), "whatsapp:+14155550100".to_string()),
            ("To".to_string(), "whatsapp:+14155238886".to_string()),
            ("NumMedia".to_string(), "10".to_string()),
        ];
        // Twilio's order is not promised; the types come first here.
        for i in (0..10).rev() {
            list.push((format!("MediaContentType{i}"), format!("image/t{i}")));
        }
        for i in 0..10 {
            list.push((
                format!("MediaUrl{i}"),
                format!("https://api.twilio.com/m/{i}"),
            ));
        }
        let m = parse_inbound(
            &AgentId::parse("a").unwrap(),
            &list,
            OffsetDateTime::UNIX_EPOCH,
        )
        .unwrap();
        let seen: Vec<(String, Option<String>)> = m
            .media
            .into_iter()
            .map(|item| (item.url, item.content_type))
            .collect();
        let expected: Vec<(String, Option<String>)> = (0..10)
            .map(|i| {
                (
                    format!("https://api.twilio.com/m/{i}"),
                    Some(format!("image/t{i}")),
                )
            })
            .collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn keeps_everything() {
        let sid = format!("MM{}", "1".repeat(32));
        let f = pairs(&[
            ("MessageSid", &sid),
            ("From", "whatsapp:+14155550100"),
            ("To", "whatsapp:+14155238886"),
            ("Body", ""),
            ("NumMedia", "1"),
            ("MediaUrl0", "https://api.twilio.com/m/1"),
            ("MediaContentType0", "image/jpeg"),
            ("Latitude", "1.5"),
            ("Longitude", "2.5"),
            ("Label", "Home"),
            ("ButtonPayload", "yes"),
            ("ProfileName", "Ana"),
            ("WaId", "14155550100"),
            ("Custom", "kept"),
        ]);
        let m = parse_inbound(
            &AgentId::parse("a").unwrap(),
            &f,
            OffsetDateTime::UNIX_EPOCH,
        )
        .unwrap();
        assert_eq!(m.media[0].content_type.as_deref(), Some("image/jpeg"));
        assert_eq!(m.location.as_ref().unwrap().label.as_deref(), Some("Home"));
        assert_eq!(m.button.as_ref().unwrap().payload.as_deref(), Some("yes"));
        assert_eq!(m.profile_name.as_deref(), Some("Ana"));
        assert_eq!(m.fields, TwilioFields::new(&f).unwrap());
        assert_eq!(m.session_id().to_string(), "twilio_a_+14155550100");
    }

    #[test]
    fn says_what_is_missing() {
        let a = AgentId::parse("a").unwrap();
        let e = parse_inbound(
            &a,
            &pairs(&[("From", "whatsapp:+1415")]),
            OffsetDateTime::UNIX_EPOCH,
        )
        .unwrap_err();
        assert_eq!(e.0, "missing MessageSid");
        let sid = format!("SM{}", "1".repeat(32));
        let e = parse_inbound(
            &a,
            &pairs(&[("MessageSid", &sid), ("From", "+1415"), ("To", "x")]),
            OffsetDateTime::UNIX_EPOCH,
        )
        .unwrap_err();
        assert!(e.0.starts_with("From:"), "{}", e.0);
    }
}
