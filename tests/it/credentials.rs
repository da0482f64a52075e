//! Passwords inside URLs never show: not in start-up errors, not in logs (at debug level), not
//! in what the admin API answers; an agent URL's credentials are stored sealed and still used.

use crate::support;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Json, Router, extract::State, http::HeaderMap, routing::post};
use base64::Engine;
use support::harness::{Mode, ServerAuth, Servers, Wagate, free_port, run_wagate, test_master_key};

const NATS_PASSWORD: &str = "nats-pw-4f1c9e2ab7d3";
const REDIS_PASSWORD: &str = "redis-pw-8e2d7c6b5a41";
const AGENT_PASSWORD: &str = "agent-pw-3b9f0d1e6c27";

fn auth() -> ServerAuth {
    ServerAuth {
        nats: Some(("wagate".into(), NATS_PASSWORD.into())),
        redis: Some(REDIS_PASSWORD.into()),
    }
}

/// A start that must fail: its output says why, with the URL masked and no password in it.
fn refused(nats_url: &str, redis_url: &str, wrong: &str) -> String {
    let key = test_master_key();
    let listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let (ok, text) = run_wagate(
        &["serve"],
        &[
            ("WAGATE_NATS_URL", nats_url),
            ("WAGATE_REDIS_URL", redis_url),
            ("WAGATE_MASTER_KEY", &key),
            ("WAGATE_LISTEN", &listen),
            ("WAGATE_ADMIN_LISTEN", &admin),
            ("RUST_LOG", "debug"),
        ],
    );
    assert!(!ok, "a wrong password must stop the start: {text}");
    for secret in [NATS_PASSWORD, REDIS_PASSWORD, wrong] {
        assert!(!text.contains(secret), "a password was printed: {text}");
    }
    text
}

#[tokio::test]
async fn server_passwords_never_appear_in_errors_or_logs() {
    let servers = Servers::start_with_auth(Mode::Distributed, auth()).await;
    let wrong = "wrong-pw-0a9b8c7d6e5f";

    let bad_nats = servers.nats_url.replace(NATS_PASSWORD, wrong);
    let text = refused(&bad_nats, &servers.redis_url, wrong);
    assert!(
        text.contains("NATS") && text.contains("nats://***@127.0.0.1"),
        "the error names the server, its URL masked: {text}"
    );
    let bad_redis = servers.redis_url.replace(REDIS_PASSWORD, wrong);
    let text = refused(&servers.nats_url, &bad_redis, wrong);
    assert!(
        text.contains("Redis") && text.contains("redis://***@127.0.0.1"),
        "the error names the server, its URL masked: {text}"
    );

    // With the right passwords it runs, and a turn end to end logs nothing of them at debug.
    let twilio = support::fake_twilio::FakeTwilio::start().await;
    twilio.add_account(support::harness::ACCOUNT_SID, support::harness::AUTH_TOKEN);
    let mut w = Wagate::start(&servers, &twilio.base_url, &[("RUST_LOG", "debug")]).await;
    w.echo_agent("demo").await;
    assert_eq!(
        w.inbound("demo", &support::harness::sid(1), "+14155550100", "hi")
            .await
            .status(),
        200
    );
    twilio.wait_for_sent(1, Duration::from_secs(10)).await;
    w.terminate().await;
    let logs = w.logs();
    assert!(logs.contains("DEBUG"), "the log ran at debug level");
    for secret in [NATS_PASSWORD, REDIS_PASSWORD] {
        assert!(!logs.contains(secret), "a password was logged");
    }
}

/// What the stand-in agent saw: the `Authorization` header of each call.
type Seen = Arc<Mutex<Vec<Option<String>>>>;

/// An agent endpoint that records `Authorization` and answers `{"reply": "ok"}`; the signature
/// of wagate's webhook protocol is checked by other suites.
async fn agent_endpoint() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let app = Router::new()
        .route(
            "/hook",
            post(|State(seen): State<Seen>, headers: HeaderMap| async move {
                let auth = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                seen.lock().unwrap().push(auth);
                Json(serde_json::json!({"reply": "ok"}))
            }),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("127.0.0.1:{port}/hook"), seen)
}

#[tokio::test]
async fn an_agent_url_with_credentials_is_used_but_never_shown_back() {
    let w = support::harness::World::start().await;
    let (host_path, seen) = agent_endpoint().await;
    let with_password = format!("http://bot%40acme:{AGENT_PASSWORD}@{host_path}");
    let shown = format!("http://***@{host_path}");
    let put = |url: String| {
        w.wagate
            .admin(reqwest::Method::PUT, "/v1/agents/demo")
            .json(&serde_json::json!({"backend": {
                "kind": "webhook", "url": url, "secret": "0123456789abcdef0123"
            }}))
            .send()
    };

    let r = put(with_password.clone()).await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(!text.contains(AGENT_PASSWORD), "{text}");
    let view: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(view["backend"]["url"], shown);
    assert_eq!(view["backend"]["credentials_set"], true);
    for path in ["/v1/agents/demo", "/v1/agents"] {
        let text = w.wagate.admin_text(path).await;
        assert!(
            text.contains(&shown) && !text.contains(AGENT_PASSWORD),
            "{text}"
        );
    }
    if w.servers.mode == Mode::Distributed {
        let mut redis = w.servers.redis().await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut redis)
            .await
            .unwrap();
        for key in keys {
            let dump: Option<Vec<u8>> = redis::cmd("DUMP")
                .arg(&key)
                .query_async(&mut redis)
                .await
                .unwrap();
            let dump = String::from_utf8_lossy(&dump.unwrap_or_default()).into_owned();
            assert!(
                !dump.contains(AGENT_PASSWORD),
                "{key} holds the password in clear"
            );
        }
    }

    // The credentials go to the agent as HTTP Basic authentication, user percent-decoded.
    w.wagate.channel("demo", true).await;
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("bot@acme:{AGENT_PASSWORD}"))
    );
    // Turn `n`: one inbound message, and the `Authorization` the agent saw for it.
    let turn = async |n: u64| {
        let r = w
            .wagate
            .inbound("demo", &support::harness::sid(n), "+14155550100", "hi")
            .await;
        assert_eq!(r.status(), 200);
        w.twilio
            .wait_for_sent(n as usize, Duration::from_secs(10))
            .await;
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), n as usize, "one agent call per message");
        seen.last().cloned().flatten()
    };
    assert_eq!(turn(1).await, Some(expected.clone()));

    // Saving the URL as shown (`***`) keeps the stored credentials; without any, there are none.
    assert_eq!(put(shown.clone()).await.unwrap().status(), 200);
    assert_eq!(turn(2).await, Some(expected));
    let bare = put(format!("http://{host_path}")).await.unwrap();
    let view: serde_json::Value = bare.json().await.unwrap();
    assert_eq!(view["backend"]["credentials_set"], false);
    assert_eq!(turn(3).await, None);
}
