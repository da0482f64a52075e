//! Inbound images reach an OpenAI-compatible model inline: the worker fetches each `MediaUrl`
//! from Twilio's API with the account's Basic auth, follows Twilio's redirect to its media CDN
//! without the credentials, and sends the bytes as a `data:` URL. A `MediaUrl` on any other
//! host is never requested (the Auth Token must not go where a webhook's sender points), and
//! the model gets a notice instead, as it does for a medium over the size limit.

use crate::support;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, Uri, header},
    response::IntoResponse,
};
use base64::Engine;
use support::{
    fake_agent_webhook::FakeAgentWebhook,
    fake_openai::FakeOpenAi,
    harness::{ACCOUNT_SID, World, inbound_form, sid},
};

const WAIT: Duration = Duration::from_secs(20);
const FROM: &str = "+14155550177";
/// A PNG's first bytes: what the CDN serves.
const PICTURE: &[u8] = b"\x89PNG\r\n\x1a\n-a-picture-";
/// A shared contact, as WhatsApp sends one.
const CARD: &[u8] = b"BEGIN:VCARD\r\nVERSION:3.0\r\nN:Hopper;Grace;;;\r\nFN:Grace Hopper\r\nTEL;type=CELL;waid=14155550199:+1 415-555-0199\r\nEND:VCARD\r\n";
/// A PDF's first bytes: a document.
const DOCUMENT: &[u8] = b"%PDF-1.7\n-a-document-";
/// An Ogg stream's first bytes: a voice note.
const VOICE: &[u8] = b"OggS\0\x02-a-voice-note-";

/// A CDN (or any other host): serves [`PICTURE`] as `image/png` on every path (a bigger body
/// on `/big`, [`VOICE`] as `audio/ogg` on `/voice.ogg`) and records each request's path and
/// `Authorization` header.
async fn host() -> (String, Arc<Mutex<Vec<(String, Option<String>)>>>) {
    type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;
    async fn serve(State(seen): State<Seen>, uri: Uri, headers: HeaderMap) -> impl IntoResponse {
        let auth = headers
            .get(header::AUTHORIZATION)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        seen.lock().unwrap().push((uri.path().to_owned(), auth));
        let (content_type, body) = match uri.path() {
            "/big" => ("image/png", vec![0u8; 4096]),
            "/voice.ogg" => ("audio/ogg", VOICE.to_vec()),
            "/terms.pdf" => ("application/pdf", DOCUMENT.to_vec()),
            "/card.vcf" => ("text/vcard", CARD.to_vec()),
            _ => ("image/png", PICTURE.to_vec()),
        };
        ([(header::CONTENT_TYPE, content_type)], body)
    }
    let seen: Seen = Arc::default();
    let app = Router::new().fallback(serve).with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

/// An inbound message with one image.
fn with_image(sid: &str, body: &str, url: &str) -> Vec<(String, String)> {
    with_medium(sid, body, url, "image/png")
}

/// An inbound message with one medium of `content_type`.
fn with_medium(sid: &str, body: &str, url: &str, content_type: &str) -> Vec<(String, String)> {
    let mut form = inbound_form(sid, FROM, body);
    for (k, v) in form.iter_mut() {
        if k == "NumMedia" {
            *v = "1".into();
        }
    }
    form.push(("MediaUrl0".into(), url.into()));
    form.push(("MediaContentType0".into(), content_type.into()));
    form
}

/// The content parts of the last user message of a Chat Completions request.
fn last_user_parts(request: &serde_json::Value) -> Vec<serde_json::Value> {
    let messages = request["messages"].as_array().expect("messages");
    let last = messages
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .expect("a user message");
    last["content"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn an_image_reaches_the_model_inline_and_the_token_only_twilios_api() {
    let (cdn, cdn_seen) = host().await;
    let (elsewhere, elsewhere_seen) = host().await;
    let model = FakeOpenAi::start("sk-media").await;
    let w = World::start_with(&[("WAGATE_MEDIA_MAX_BYTES", "1024")]).await;
    w.wagate
        .agent(
            "eyes",
            serde_json::json!({
                "kind": "openai", "base_url": model.base_url, "model": "gpt-vision",
                "api_key": "sk-media"
            }),
        )
        .await;
    w.wagate.channel("eyes", true).await;
    let path = support::harness::Wagate::inbound_path("eyes");
    let post = |form: Vec<(String, String)>| {
        let w = &w;
        let path = path.clone();
        async move {
            let r = w
                .wagate
                .post_signed(&path, &form, support::harness::AUTH_TOKEN)
                .await;
            assert_eq!(r.status(), 200);
        }
    };

    // Twilio's media: the API with Basic auth, then its CDN without.
    let media_url = w.twilio.add_media(
        ACCOUNT_SID,
        &sid(1),
        "ME00000000000000000000000000000001",
        &format!("{cdn}/cdn/picture.png?signature=abc"),
    );
    post(with_image(&sid(1), "what is this?", &media_url)).await;
    let requests = model.wait_for_requests(1, WAIT).await;
    let parts = last_user_parts(&requests[0]);
    let expected = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(PICTURE)
    );
    assert_eq!(parts[0]["type"], "text", "{parts:?}");
    assert_eq!(parts[0]["text"], "what is this?");
    assert_eq!(parts[1]["type"], "image_url", "{parts:?}");
    assert_eq!(parts[1]["image_url"]["url"], expected.as_str());
    let api_get = w
        .twilio
        .requests()
        .into_iter()
        .find(|r| r.method == "GET" && r.path.contains("/Media/"))
        .expect("the media was asked of Twilio's API");
    let basic = base64::engine::general_purpose::STANDARD
        .encode(format!("{ACCOUNT_SID}:{}", support::harness::AUTH_TOKEN));
    assert_eq!(api_get.authorization, Some(format!("Basic {basic}")));
    assert_eq!(
        cdn_seen.lock().unwrap().clone(),
        vec![("/cdn/picture.png".to_owned(), None)],
        "the CDN got the request, without credentials"
    );

    // A MediaUrl on another host is not requested at all; the model is told.
    post(with_image(
        &sid(2),
        "and this?",
        &format!("{elsewhere}/steal"),
    ))
    .await;
    let requests = model.wait_for_requests(2, WAIT).await;
    let parts = last_user_parts(&requests[1]);
    let text = support::fake_openai::last_user_text(&requests[1]);
    assert!(text.contains("not on Twilio's API host"), "{text}");
    assert!(parts.iter().all(|p| p["type"] != "image_url"), "{parts:?}");
    assert!(
        elsewhere_seen.lock().unwrap().is_empty(),
        "another host was asked"
    );

    // Over WAGATE_MEDIA_MAX_BYTES: a notice, and the turn is answered.
    let big = w.twilio.add_media(
        ACCOUNT_SID,
        &sid(3),
        "ME00000000000000000000000000000003",
        &format!("{cdn}/big"),
    );
    post(with_image(&sid(3), "a big one", &big)).await;
    let requests = model.wait_for_requests(3, WAIT).await;
    let text = support::fake_openai::last_user_text(&requests[2]);
    assert!(text.contains("too large"), "{text}");
    w.twilio.wait_for_sent(3, WAIT).await;
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

/// A voice note is transcribed by the agent's transcription model, and its words are the
/// user's turn, marked as a voice note, for the model and in the history; with transcription
/// turned off (`null`), the model is told, and nothing is uploaded.
#[tokio::test]
async fn a_voice_note_is_heard_as_its_transcript() {
    let (cdn, _) = host().await;
    let model = FakeOpenAi::start("sk-ears").await;
    let w = World::start().await;
    let backend = |transcription: serde_json::Value| {
        serde_json::json!({
            "kind": "openai", "base_url": model.base_url, "model": "gpt-ears",
            "api_key": "sk-ears", "transcription_model": transcription
        })
    };
    w.wagate
        .agent("ears", backend(serde_json::json!("whisper-1")))
        .await;
    w.wagate.channel("ears", true).await;
    let path = support::harness::Wagate::inbound_path("ears");
    let voice = w.twilio.add_media(
        ACCOUNT_SID,
        &sid(1),
        "ME00000000000000000000000000000011",
        &format!("{cdn}/voice.ogg"),
    );
    let r = w
        .wagate
        .post_signed(
            &path,
            &with_medium(&sid(1), "", &voice, "audio/ogg"),
            support::harness::AUTH_TOKEN,
        )
        .await;
    assert_eq!(r.status(), 200);
    let requests = model.wait_for_requests(1, WAIT).await;
    let heard = format!("[voice note] heard {} bytes", VOICE.len());
    let messages = requests[0]["messages"].as_array().unwrap();
    assert_eq!(
        messages.last().unwrap()["content"],
        heard.as_str(),
        "{messages:?}"
    );
    let uploads = model.transcriptions();
    assert_eq!(uploads.len(), 1);
    assert_eq!(uploads[0].model, "whisper-1");
    assert_eq!(uploads[0].content_type, "audio/ogg");
    assert_eq!(uploads[0].file_name, "voice-note.ogg");
    assert_eq!(uploads[0].bytes, VOICE);
    w.twilio.wait_for_sent(1, WAIT).await;
    assert_eq!(
        w.wagate
            .session_contents("ears", FROM)
            .await
            .first()
            .map(String::as_str),
        Some(heard.as_str()),
        "the history keeps the words"
    );

    // Transcription off: a notice, and no upload.
    w.wagate
        .agent("ears", backend(serde_json::Value::Null))
        .await;
    let r = w
        .wagate
        .post_signed(
            &path,
            &with_medium(&sid(2), "", &voice, "audio/ogg"),
            support::harness::AUTH_TOKEN,
        )
        .await;
    assert_eq!(r.status(), 200);
    let requests = model.wait_for_requests(2, WAIT).await;
    let last = requests[1]["messages"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert!(
        last["content"]
            .as_str()
            .is_some_and(|t| t.contains("no transcription model")),
        "{last:?}"
    );
    assert_eq!(model.transcriptions().len(), 1, "nothing more uploaded");
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

/// A webhook agent gets each medium of the turn with its bytes, so it needs no Twilio
/// credentials: an image here, with Twilio's link, content type and size.
#[tokio::test]
async fn a_webhook_agent_gets_the_media_bytes_in_its_request() {
    let (cdn, cdn_seen) = host().await;
    let hook = FakeAgentWebhook::start("whsec-media-0123456789").await;
    let w = World::start().await;
    w.wagate
        .agent(
            "biz",
            serde_json::json!({"kind": "webhook", "url": hook.url, "secret": "whsec-media-0123456789"}),
        )
        .await;
    w.wagate.channel("biz", true).await;
    let url = w.twilio.add_media(
        ACCOUNT_SID,
        &sid(1),
        "ME00000000000000000000000000000021",
        &format!("{cdn}/picture.png"),
    );
    let path = support::harness::Wagate::inbound_path("biz");
    let r = w
        .wagate
        .post_signed(
            &path,
            &with_medium(&sid(1), "see attached", &url, "image/png"),
            support::harness::AUTH_TOKEN,
        )
        .await;
    assert_eq!(r.status(), 200);
    let requests = hook.wait_for_requests(1, WAIT).await;
    let media = requests[0]["media"].as_array().expect("media").clone();
    assert_eq!(media.len(), 1, "{media:?}");
    assert_eq!(media[0]["url"], url.as_str());
    assert_eq!(media[0]["content_type"], "image/png");
    assert_eq!(media[0]["size"], PICTURE.len());
    assert_eq!(
        media[0]["data_base64"],
        base64::engine::general_purpose::STANDARD
            .encode(PICTURE)
            .as_str()
    );
    assert_eq!(
        cdn_seen.lock().unwrap()[0].1,
        None,
        "the CDN got no credentials"
    );
    assert_eq!(hook.bad_signatures(), 0);
}

/// An agent's answer with media goes out one medium a message (WhatsApp takes one), the first
/// with the reply's text as its caption; the history keeps the links.
#[tokio::test]
async fn media_in_an_agents_answer_go_out_one_a_message_the_first_with_the_caption() {
    let hook = FakeAgentWebhook::start("whsec-media-0123456789").await;
    hook.set_reply(|_| {
        serde_json::json!({
            "reply": "here are both",
            "media": ["https://cdn.example.com/a.jpg", "https://cdn.example.com/b.pdf"]
        })
    });
    let w = World::start().await;
    w.wagate
        .agent(
            "biz",
            serde_json::json!({"kind": "webhook", "url": hook.url, "secret": "whsec-media-0123456789"}),
        )
        .await;
    w.wagate.channel("biz", true).await;
    w.wagate
        .inbound("biz", &sid(1), FROM, "send me the files")
        .await;
    let sent = w.twilio.wait_for_sent(2, WAIT).await;
    let media_of = |i: usize| -> Vec<String> {
        sent[i]
            .form
            .iter()
            .filter(|(k, _)| k == "MediaUrl")
            .map(|(_, v)| v.clone())
            .collect()
    };
    assert_eq!(media_of(0), ["https://cdn.example.com/a.jpg"]);
    assert_eq!(sent[0].body.as_deref(), Some("here are both"));
    assert_eq!(media_of(1), ["https://cdn.example.com/b.pdf"]);
    assert_eq!(sent[1].body, None);
    assert_eq!(
        w.wagate
            .session_contents("biz", FROM)
            .await
            .last()
            .map(String::as_str),
        Some(
            "here are both\n[media: https://cdn.example.com/a.jpg]\n[media: https://cdn.example.com/b.pdf]"
        )
    );
    assert!(
        w.twilio.violations().is_empty(),
        "{:?}",
        w.twilio.violations()
    );

    // Not an https URL: the turn fails for good (a dead letter says why), nothing is sent.
    hook.set_reply(|_| serde_json::json!({"reply": "x", "media": ["file:///etc/passwd"]}));
    w.wagate.inbound("biz", &sid(2), FROM, "again").await;
    let letters = support::harness::eventually(WAIT, "a dead letter", || async {
        let r = w
            .wagate
            .admin(reqwest::Method::GET, "/v1/dead-letters")
            .send()
            .await
            .unwrap();
        let list: Vec<serde_json::Value> = r.json().await.unwrap();
        (!list.is_empty()).then_some(list)
    })
    .await;
    assert!(
        letters[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("https")),
        "{letters:?}"
    );
    assert_eq!(w.twilio.sent().len(), 2);
}

/// A PDF reaches an OpenAI-compatible model as a file part (its bytes inline); a file of
/// another type becomes a notice that the agent cannot read it, and is never fetched.
#[tokio::test]
async fn a_pdf_reaches_the_model_as_a_file_and_other_files_as_a_notice() {
    let (cdn, cdn_seen) = host().await;
    let model = FakeOpenAi::start("sk-docs").await;
    let w = World::start().await;
    w.wagate
        .agent(
            "docs",
            serde_json::json!({"kind": "openai", "base_url": model.base_url, "model": "m",
                               "api_key": "sk-docs"}),
        )
        .await;
    w.wagate.channel("docs", true).await;
    let path = support::harness::Wagate::inbound_path("docs");
    let pdf = w.twilio.add_media(
        ACCOUNT_SID,
        &sid(1),
        "ME00000000000000000000000000000031",
        &format!("{cdn}/terms.pdf"),
    );
    let r = w
        .wagate
        .post_signed(
            &path,
            &with_medium(&sid(1), "please read", &pdf, "application/pdf"),
            support::harness::AUTH_TOKEN,
        )
        .await;
    assert_eq!(r.status(), 200);
    let requests = model.wait_for_requests(1, WAIT).await;
    let parts = last_user_parts(&requests[0]);
    assert_eq!(parts[0]["text"], "please read", "{parts:?}");
    assert_eq!(parts[1]["type"], "file", "{parts:?}");
    let expected = format!(
        "data:application/pdf;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(DOCUMENT)
    );
    assert_eq!(parts[1]["file"]["file_data"], expected.as_str());

    let docx = w.twilio.add_media(
        ACCOUNT_SID,
        &sid(2),
        "ME00000000000000000000000000000032",
        &format!("{cdn}/letter.docx"),
    );
    let r = w
        .wagate
        .post_signed(
            &path,
            &with_medium(
                &sid(2),
                "and this",
                &docx,
                "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
            ),
            support::harness::AUTH_TOKEN,
        )
        .await;
    assert_eq!(r.status(), 200);
    let requests = model.wait_for_requests(2, WAIT).await;
    let text = support::fake_openai::last_user_text(&requests[1]);
    assert!(
        text.contains("and this") && text.contains("which this agent cannot read"),
        "{text}"
    );
    assert_eq!(
        cdn_seen.lock().unwrap().len(),
        1,
        "only the PDF was fetched"
    );
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

/// A photo of an earlier turn is still shown to the model in the next turns (the history keeps
/// only its link), from the worker's brief cache rather than fetched from Twilio again.
#[tokio::test]
async fn an_earlier_image_is_shown_again_without_a_second_fetch() {
    let (cdn, cdn_seen) = host().await;
    let model = FakeOpenAi::start("sk-again").await;
    let w = World::start().await;
    w.wagate
        .agent(
            "eyes",
            serde_json::json!({"kind": "openai", "base_url": model.base_url, "model": "m",
                               "api_key": "sk-again"}),
        )
        .await;
    w.wagate.channel("eyes", true).await;
    let url = w.twilio.add_media(
        ACCOUNT_SID,
        &sid(1),
        "ME00000000000000000000000000000041",
        &format!("{cdn}/picture.png"),
    );
    let path = support::harness::Wagate::inbound_path("eyes");
    let r = w
        .wagate
        .post_signed(
            &path,
            &with_image(&sid(1), "look", &url),
            support::harness::AUTH_TOKEN,
        )
        .await;
    assert_eq!(r.status(), 200);
    w.twilio.wait_for_sent(1, WAIT).await;
    w.wagate
        .inbound("eyes", &sid(2), FROM, "what colour was it?")
        .await;
    let requests = model.wait_for_requests(2, WAIT).await;
    let data_url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(PICTURE)
    );
    let first_turn = requests[1]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["role"] == "user")
        .unwrap()
        .clone();
    let images: Vec<&str> = first_turn["content"]
        .as_array()
        .map(|parts| {
            parts
                .iter()
                .filter_map(|p| p.pointer("/image_url/url").and_then(|u| u.as_str()))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(images, [data_url.as_str()], "{first_turn}");
    assert_eq!(
        cdn_seen.lock().unwrap().len(),
        1,
        "shown again from the cache, not fetched again"
    );
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}

/// A shared contact (a vCard) reaches the model as structured text: name and number.
#[tokio::test]
async fn a_shared_contact_reaches_the_model_as_its_name_and_number() {
    let (cdn, _) = host().await;
    let model = FakeOpenAi::start("sk-card").await;
    let w = World::start().await;
    w.wagate
        .agent(
            "cards",
            serde_json::json!({"kind": "openai", "base_url": model.base_url, "model": "m",
                               "api_key": "sk-card"}),
        )
        .await;
    w.wagate.channel("cards", true).await;
    let url = w.twilio.add_media(
        ACCOUNT_SID,
        &sid(1),
        "ME00000000000000000000000000000051",
        &format!("{cdn}/card.vcf"),
    );
    let r = w
        .wagate
        .post_signed(
            &support::harness::Wagate::inbound_path("cards"),
            &with_medium(&sid(1), "", &url, "text/vcard"),
            support::harness::AUTH_TOKEN,
        )
        .await;
    assert_eq!(r.status(), 200);
    let requests = model.wait_for_requests(1, WAIT).await;
    let text = support::fake_openai::last_user_text(&requests[0]);
    assert_eq!(text, "[contact: Grace Hopper, +1 415-555-0199]");
}

/// A webhook agent with a `transcription` endpoint gets each voice note's words with its audio
/// (and as the user's turn); without one, the audio alone.
#[tokio::test]
async fn a_webhook_agent_with_a_transcriber_gets_the_voice_notes_words() {
    let (cdn, _) = host().await;
    let model = FakeOpenAi::start("sk-ears").await;
    let hook = FakeAgentWebhook::start("whsec-media-0123456789").await;
    let w = World::start().await;
    let r = w
        .wagate
        .admin(reqwest::Method::PUT, "/v1/agents/biz")
        .json(&serde_json::json!({
            "backend": {"kind": "webhook", "url": hook.url, "secret": "whsec-media-0123456789",
                        "transcription": {"base_url": model.base_url, "api_key": "sk-ears"}},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let agent: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        agent["backend"]["transcription"]["model"], "whisper-1",
        "{agent}"
    );
    assert!(!agent.to_string().contains("sk-ears"), "{agent}");
    w.wagate.channel("biz", true).await;
    let url = w.twilio.add_media(
        ACCOUNT_SID,
        &sid(1),
        "ME00000000000000000000000000000061",
        &format!("{cdn}/voice.ogg"),
    );
    let r = w
        .wagate
        .post_signed(
            &support::harness::Wagate::inbound_path("biz"),
            &with_medium(&sid(1), "", &url, "audio/ogg"),
            support::harness::AUTH_TOKEN,
        )
        .await;
    assert_eq!(r.status(), 200);
    let requests = hook.wait_for_requests(1, WAIT).await;
    let heard = format!("heard {} bytes", VOICE.len());
    assert_eq!(requests[0]["media"][0]["transcript"], heard.as_str());
    assert!(requests[0]["media"][0]["data_base64"].is_string());
    let said = requests[0]["messages"].as_array().unwrap().last().unwrap()["content"].clone();
    assert_eq!(said, format!("[voice note] {heard}").as_str());
    assert_eq!(model.transcriptions().len(), 1);

    // Without the transcriber (null), the audio alone.
    let r = w
        .wagate
        .admin(reqwest::Method::PUT, "/v1/agents/biz")
        .json(&serde_json::json!({
            "backend": {"kind": "webhook", "url": hook.url, "transcription": null},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let url = w.twilio.add_media(
        ACCOUNT_SID,
        &sid(2),
        "ME00000000000000000000000000000062",
        &format!("{cdn}/voice.ogg"),
    );
    let r = w
        .wagate
        .post_signed(
            &support::harness::Wagate::inbound_path("biz"),
            &with_medium(&sid(2), "", &url, "audio/ogg"),
            support::harness::AUTH_TOKEN,
        )
        .await;
    assert_eq!(r.status(), 200);
    let requests = hook.wait_for_requests(2, WAIT).await;
    assert!(
        requests[1]["media"][0].get("transcript").is_none(),
        "{}",
        requests[1]
    );
    assert_eq!(model.transcriptions().len(), 1, "nothing uploaded");
}

/// A shared location reaches the agent as structured text: coordinates and its label.
#[tokio::test]
async fn a_shared_location_reaches_the_agent_as_coordinates_and_label() {
    let hook = FakeAgentWebhook::start("whsec-media-0123456789").await;
    let w = World::start().await;
    w.wagate
        .agent(
            "biz",
            serde_json::json!({"kind": "webhook", "url": hook.url, "secret": "whsec-media-0123456789"}),
        )
        .await;
    w.wagate.channel("biz", true).await;
    let mut form = inbound_form(&sid(1), FROM, "");
    form.extend([
        ("Latitude".to_owned(), "37.7955".to_owned()),
        ("Longitude".to_owned(), "-122.3937".to_owned()),
        (
            "Address".to_owned(),
            "1 Ferry Building, San Francisco".to_owned(),
        ),
        ("Label".to_owned(), "Ferry Building".to_owned()),
    ]);
    let r = w
        .wagate
        .post_signed(
            &support::harness::Wagate::inbound_path("biz"),
            &form,
            support::harness::AUTH_TOKEN,
        )
        .await;
    assert_eq!(r.status(), 200);
    let requests = hook.wait_for_requests(1, WAIT).await;
    let said = requests[0]["messages"].as_array().unwrap().last().unwrap()["content"].clone();
    assert_eq!(said, "[location: 37.7955,-122.3937 Ferry Building]");
}
