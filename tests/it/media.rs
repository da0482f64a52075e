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
    fake_openai::FakeOpenAi,
    harness::{ACCOUNT_SID, World, inbound_form, sid},
};

const WAIT: Duration = Duration::from_secs(20);
const FROM: &str = "+14155550177";
/// A PNG's first bytes: what the CDN serves.
const PICTURE: &[u8] = b"\x89PNG\r\n\x1a\n-a-picture-";

/// A CDN (or any other host): serves [`PICTURE`] as `image/png` on every path (a bigger body
/// on `/big`) and records each request's path and `Authorization` header.
async fn host() -> (String, Arc<Mutex<Vec<(String, Option<String>)>>>) {
    type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;
    async fn serve(State(seen): State<Seen>, uri: Uri, headers: HeaderMap) -> impl IntoResponse {
        let auth = headers
            .get(header::AUTHORIZATION)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        seen.lock().unwrap().push((uri.path().to_owned(), auth));
        let body = if uri.path() == "/big" {
            vec![0u8; 4096]
        } else {
            PICTURE.to_vec()
        };
        ([(header::CONTENT_TYPE, "image/png")], body)
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
    let mut form = inbound_form(sid, FROM, body);
    for (k, v) in form.iter_mut() {
        if k == "NumMedia" {
            *v = "1".into();
        }
    }
    form.push(("MediaUrl0".into(), url.into()));
    form.push(("MediaContentType0".into(), "image/png".into()));
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
    let notices: Vec<&str> = parts.iter().filter_map(|p| p["text"].as_str()).collect();
    assert!(
        notices
            .iter()
            .any(|t| t.contains("not on Twilio's API host")),
        "{parts:?}"
    );
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
    let parts = last_user_parts(&requests[2]);
    assert!(
        parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .any(|t| t.contains("too large")),
        "{parts:?}"
    );
    w.twilio.wait_for_sent(3, WAIT).await;
    assert!(model.violations().is_empty(), "{:?}", model.violations());
}
