//! Every row of INTERFACE.md's webhook table, status callbacks, and bad input at the edge:
//! each answered with the documented status and text, nothing queued, no 5xx.

use crate::support;

const FORM: &str = "application/x-www-form-urlencoded";

use std::time::Duration;

use support::harness::{AUTH_TOKEN, Mode, UNSET, Wagate, World, inbound_form, sid};
use twilio::signature::compute_signature;

const FROM: &str = "+14155550100";

#[tokio::test]
async fn accepted_message_gets_empty_twiml_and_duplicates_too() {
    let w = World::start().await;
    w.wagate.echo_agent("demo").await;
    for _ in 0..2 {
        let r = w.wagate.inbound("demo", &sid(1), FROM, "hi").await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "text/xml");
        assert!(r.text().await.unwrap().contains("<Response></Response>"));
    }
    // The user's next message, once the first is answered (sent earlier, the two could be
    // answered together as one burst), is a barrier: its reply follows any reply to the first.
    w.twilio.wait_for_sent(1, Duration::from_secs(10)).await;
    w.wagate.inbound("demo", &sid(2), FROM, "next").await;
    let sent = w.twilio.wait_for_sent(2, Duration::from_secs(10)).await;
    let bodies: Vec<_> = sent.iter().map(|m| m.body.as_deref()).collect();
    assert_eq!(
        bodies,
        [Some("hi"), Some("next")],
        "a duplicate MessageSid must not produce a second reply"
    );
}

/// Twilio's retries of one message carry its MessageSid again, the same form or the same fields
/// in another order, at another moment: the bus stores the message once, because the dedupe id
/// ingress gives it comes from the MessageSid alone. The worker's record of completed turns
/// would hide a second copy from the replies, so this looks at the bus itself: what it reports
/// as dropped (the metric, both modes) and what JetStream stored (NATS).
#[tokio::test]
async fn twilio_retries_of_one_message_sid_are_stored_once_on_the_bus() {
    let w = World::start().await;
    w.wagate.echo_agent("demo").await;
    let form = inbound_form(&sid(1), FROM, "hi");
    let mut reordered = form.clone();
    reordered.reverse();
    for fields in [&form, &form, &reordered] {
        let r = w
            .wagate
            .post_signed(&Wagate::inbound_path("demo"), fields, AUTH_TOKEN)
            .await;
        assert_eq!(r.status(), 200);
    }
    // Another MessageSid (of another user, so that its reply is not joined to the first's)
    // is stored: the bus does not drop everything.
    let r = w
        .wagate
        .inbound("demo", &sid(2), "+14155550101", "next")
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        w.wagate.metric("wagate_inbound_duplicates_total").await,
        2.0,
        "both retries dropped by the bus"
    );
    if w.servers.mode == Mode::Distributed {
        let state = w.servers.stream_state("WAGATE_INBOUND").await;
        assert_eq!(state.last_sequence, 2, "one stored message per MessageSid");
    }
    let sent = w.twilio.wait_for_sent(2, Duration::from_secs(10)).await;
    let mut bodies: Vec<_> = sent.iter().map(|m| m.body.as_deref()).collect();
    bodies.sort();
    assert_eq!(bodies, [Some("hi"), Some("next")]);
}

#[tokio::test]
async fn unknown_agent_and_agent_without_channel_are_404() {
    let w = World::start().await;
    let r = w.wagate.inbound("nobody", &sid(1), FROM, "hi").await;
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("Unknown agent"));
    w.wagate
        .agent("nochannel", serde_json::json!({"kind": "echo"}))
        .await;
    let r = w.wagate.inbound("nochannel", &sid(2), FROM, "hi").await;
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("Unknown agent"));
    let r = w.wagate.inbound("bad.id", &sid(3), FROM, "hi").await;
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn missing_or_wrong_signature_is_401() {
    let w = World::start().await;
    w.wagate.echo_agent("demo").await;
    let url = format!("{}{}", w.wagate.public_url, Wagate::inbound_path("demo"));
    let body = twilio::form::encode(&inbound_form(&sid(1), FROM, "hi"));
    let r = w
        .wagate
        .http
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("Unauthorized"));
    // Signed with another token.
    let r = w
        .wagate
        .post_signed(
            &Wagate::inbound_path("demo"),
            &inbound_form(&sid(1), FROM, "hi"),
            "another-token-0000000000000000",
        )
        .await;
    assert_eq!(r.status(), 401);
    // Signed, then one value changed in transit.
    let mut fields = inbound_form(&sid(1), FROM, "hi");
    let sig = twilio::signature::compute_signature(AUTH_TOKEN.as_bytes(), &url, &fields);
    fields[7].1 = "hi!".into();
    let r = w
        .wagate
        .http
        .post(&url)
        .header("x-twilio-signature", sig)
        .header("content-type", FORM)
        .body(twilio::form::encode(&fields))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // A well-signed message of the same user is a barrier: its reply follows any other.
    let r = w.wagate.inbound("demo", &sid(2), FROM, "signed").await;
    assert_eq!(r.status(), 200);
    let sent = w.twilio.wait_for_sent(1, Duration::from_secs(10)).await;
    let bodies: Vec<_> = sent.iter().map(|m| m.body.as_deref()).collect();
    assert_eq!(
        bodies,
        [Some("signed")],
        "nothing unauthenticated may be answered"
    );
}

#[tokio::test]
async fn signature_over_public_url_with_or_without_default_port_is_accepted() {
    let w = World::start_with(&[("WAGATE_PUBLIC_URL", "https://bot.example.com")]).await;
    w.wagate.echo_agent("demo").await;
    let path = Wagate::inbound_path("demo");
    let listener = format!(
        "http://127.0.0.1:{}{path}",
        w.wagate.public_url.rsplit(':').next().unwrap()
    );
    for (n, signed) in [
        (1, format!("https://bot.example.com{path}")),
        (2, format!("https://bot.example.com:443{path}")),
    ] {
        let fields = inbound_form(&sid(n), FROM, "port");
        let sig = twilio::signature::compute_signature(AUTH_TOKEN.as_bytes(), &signed, &fields);
        let r = w
            .wagate
            .http
            .post(&listener)
            .header("x-twilio-signature", sig)
            .header("content-type", FORM)
            .body(twilio::form::encode(&fields))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "signed over {signed}");
    }
    // The listener's own address is not what Twilio signed.
    let fields = inbound_form(&sid(3), FROM, "port");
    let sig = twilio::signature::compute_signature(AUTH_TOKEN.as_bytes(), &listener, &fields);
    let r = w
        .wagate
        .http
        .post(&listener)
        .header("x-twilio-signature", sig)
        .header("content-type", FORM)
        .body(twilio::form::encode(&fields))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn disabled_channel_is_403_after_a_valid_signature() {
    let w = World::start().await;
    w.wagate
        .agent("demo", serde_json::json!({"kind": "echo"}))
        .await;
    w.wagate.channel("demo", false).await;
    let r = w.wagate.inbound("demo", &sid(1), FROM, "hi").await;
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("WhatsApp not enabled"));
    // Enabling takes effect at once (the cached settings are refreshed).
    let r = w
        .wagate
        .admin(reqwest::Method::POST, "/v1/agents/demo/whatsapp/enable")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = w.wagate.inbound("demo", &sid(2), FROM, "hi").await;
    assert_eq!(r.status(), 200);
    let r = w
        .wagate
        .admin(reqwest::Method::POST, "/v1/agents/demo/whatsapp/disable")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = w.wagate.inbound("demo", &sid(3), FROM, "hi").await;
    assert_eq!(r.status(), 403);
}

#[tokio::test]
async fn missing_fields_are_400_naming_the_field() {
    let w = World::start().await;
    w.wagate.echo_agent("demo").await;
    for (drop, name) in [("MessageSid", "MessageSid"), ("From", "From"), ("To", "To")] {
        let fields: Vec<_> = inbound_form(&sid(1), FROM, "hi")
            .into_iter()
            .filter(|(k, _)| k != drop)
            .collect();
        let r = w
            .wagate
            .post_signed(&Wagate::inbound_path("demo"), &fields, AUTH_TOKEN)
            .await;
        assert_eq!(r.status(), 400, "without {drop}");
        assert!(r.text().await.unwrap().contains(name));
    }
    let mut fields = inbound_form(&sid(1), FROM, "hi");
    fields[11].1 = "garbage".into();
    let r = w
        .wagate
        .post_signed(&Wagate::inbound_path("demo"), &fields, AUTH_TOKEN)
        .await;
    assert_eq!(r.status(), 400);
}

/// Twilio's webhooks are forms: a correctly signed form sent under any other Content-Type (or
/// none) is not from Twilio, and is refused with 415 and not queued.
#[tokio::test]
async fn a_webhook_that_is_not_a_form_is_refused_415_and_not_queued() {
    let w = World::start().await;
    w.wagate.echo_agent("demo").await;
    let url = format!("{}{}", w.wagate.public_url, Wagate::inbound_path("demo"));
    let fields = inbound_form(&sid(1), FROM, "hi");
    let sig = twilio::signature::compute_signature(AUTH_TOKEN.as_bytes(), &url, &fields);
    for content_type in [
        Some("application/json"),
        Some("text/plain"),
        Some("multipart/form-data; boundary=x"),
        Some("application/x-www-form-urlencodedx"),
        None,
    ] {
        let mut b = w
            .wagate
            .http
            .post(&url)
            .header("x-twilio-signature", &sig)
            .body(twilio::form::encode(&fields));
        if let Some(t) = content_type {
            b = b.header("content-type", t);
        }
        let r = b.send().await.unwrap();
        assert_eq!(r.status(), 415, "{content_type:?}");
    }
    // The same request as a form, with a charset, is accepted: the refusals were for the type.
    let r = w
        .wagate
        .http
        .post(&url)
        .header("x-twilio-signature", &sig)
        .header(
            "content-type",
            "Application/X-WWW-Form-Urlencoded; charset=utf-8",
        )
        .body(twilio::form::encode(&fields))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The user's next message, once the first is answered (sent earlier, the two could be
    // answered together as one burst), is a barrier: its reply follows any other.
    w.twilio.wait_for_sent(1, Duration::from_secs(15)).await;
    w.wagate.inbound("demo", &sid(2), FROM, "next").await;
    let sent = w.twilio.wait_for_sent(2, Duration::from_secs(15)).await;
    let bodies: Vec<_> = sent.iter().map(|m| m.body.as_deref()).collect();
    assert_eq!(bodies, [Some("hi"), Some("next")]);
}

#[tokio::test]
async fn non_utf8_and_oversized_bodies_are_refused_cleanly() {
    let w = World::start().await;
    w.wagate.echo_agent("demo").await;
    let url = format!("{}{}", w.wagate.public_url, Wagate::inbound_path("demo"));
    let r = w
        .wagate
        .http
        .post(&url)
        .header("x-twilio-signature", "x")
        .header("content-type", FORM)
        .body(b"Body=%FF%FE&From=\xff".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("UTF-8"));
    let big = format!("Body={}", "a".repeat(70 * 1024));
    let r = w
        .wagate
        .http
        .post(&url)
        .header("x-twilio-signature", "x")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let r = w
        .wagate
        .http
        .post(&url)
        .header("content-type", "application/json")
        .header("x-twilio-signature", "x")
        .body("[1,2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    // Random bytes never produce a 5xx.
    for seed in 0u8..40 {
        let bytes: Vec<u8> = (0..200u16)
            .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed))
            .collect();
        let r = w
            .wagate
            .http
            .post(&url)
            .header("x-twilio-signature", "x")
            .body(bytes)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_client_error(), "status {}", r.status());
    }
    let health = w
        .wagate
        .http
        .get(format!("{}/healthz", w.wagate.public_url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn status_callbacks_are_verified_and_never_go_backwards() {
    let w = World::start().await;
    w.wagate.echo_agent("demo").await;
    w.wagate.inbound("demo", &sid(1), FROM, "hi").await;
    let sent = w.twilio.wait_for_sent(1, Duration::from_secs(15)).await;
    let path = format!("{}/status", Wagate::inbound_path("demo"));
    let status = |s: &str, code: Option<&str>| {
        let mut f = vec![
            ("MessageSid".to_string(), sent[0].sid.clone()),
            ("MessageStatus".to_string(), s.to_string()),
            (
                "AccountSid".to_string(),
                support::harness::ACCOUNT_SID.to_string(),
            ),
            ("ChannelPrefix".to_string(), "whatsapp".to_string()),
        ];
        if let Some(c) = code {
            f.push(("ErrorCode".to_string(), c.to_string()));
        }
        f
    };
    for s in ["delivered", "sent", "read", "delivered"] {
        let r = w
            .wagate
            .post_signed(&path, &status(s, None), AUTH_TOKEN)
            .await;
        assert!(r.status() == 200 || r.status() == 204, "{}", r.status());
    }
    // A failure reported after `read` arrived out of order: the message was read, so the
    // failure is not applied and makes no dead letter.
    let r = w
        .wagate
        .post_signed(&path, &status("failed", Some("63016")), AUTH_TOKEN)
        .await;
    assert!(r.status().is_success());
    let dead: Vec<serde_json::Value> = w
        .wagate
        .admin_json("/v1/dead-letters")
        .await
        .as_array()
        .unwrap()
        .clone();
    assert!(dead.is_empty(), "{dead:?}");
    let r = w
        .wagate
        .post_signed(
            &path,
            &status("sent", None),
            "wrong-token-xxxxxxxxxxxxxxxxxxxx",
        )
        .await;
    assert_eq!(r.status(), 401);
    // Every status Twilio sends, today's and future ones, is acknowledged: a 400 would make
    // Twilio retry it for nothing.
    for s in [
        "partially_delivered",
        "canceled",
        "accepted",
        "scheduled",
        "read",
        "bogus-future-status",
    ] {
        let r = w
            .wagate
            .post_signed(&path, &status(s, None), AUTH_TOKEN)
            .await;
        assert!(
            r.status() == 200 || r.status() == 204,
            "{s}: {}",
            r.status()
        );
    }
    let r = w
        .wagate
        .post_signed(
            &path,
            &[("MessageStatus".to_string(), "sent".to_string())],
            AUTH_TOKEN,
        )
        .await;
    assert_eq!(r.status(), 400);
}

/// The probes answer on both listeners; `/metrics` only on the admin listener, where it needs
/// no token (Prometheus scrapes it inside the network), and never on the public one.
#[tokio::test]
async fn probes_answer_on_both_listeners_and_metrics_only_on_the_admin_one() {
    let w = World::start().await;
    let get = |url: String| {
        let http = w.wagate.http.clone();
        async move { http.get(&url).send().await.unwrap() }
    };
    for base in [&w.wagate.public_url, &w.wagate.admin_url] {
        for path in ["/healthz", "/readyz"] {
            assert_eq!(
                get(format!("{base}{path}")).await.status(),
                200,
                "{base}{path}"
            );
        }
    }
    assert_eq!(
        get(format!("{}/metrics", w.wagate.public_url))
            .await
            .status(),
        404,
        "the public listener serves no metrics"
    );
    w.wagate.echo_agent("demo").await;
    assert_eq!(
        w.wagate.inbound("demo", &sid(1), FROM, "hi").await.status(),
        200
    );
    let r = get(format!("{}/metrics", w.wagate.admin_url)).await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"),
        "{:?}",
        r.headers()
    );
    let m = r.text().await.unwrap();
    assert!(m.contains("wagate_webhooks_total"), "{m}");
    // The metrics' exemption is theirs alone: the admin API still wants the bearer token.
    let r = get(format!("{}/v1/agents", w.wagate.admin_url)).await;
    assert_eq!(r.status(), 401);
}

/// Without `WAGATE_PUBLIC_URL`, a reply's status callbacks go to the scheme and host that the
/// inbound webhook's signature was verified against (Twilio signed that URL), while a request
/// whose `Host` was changed without a matching signature is refused and sends nothing. Ingress
/// with NATS and Redis also says at start that the public URL is missing.
#[tokio::test]
async fn without_a_public_url_status_callbacks_follow_the_verified_webhook_url() {
    let w = World::start_with(&[("WAGATE_PUBLIC_URL", UNSET)]).await;
    w.wagate.echo_agent("demo").await;
    let path = Wagate::inbound_path("demo");
    let post = |host: &'static str, proto: &'static str, signed: String, sid: String| {
        let fields = inbound_form(&sid, FROM, "hi");
        let sig = compute_signature(AUTH_TOKEN.as_bytes(), &signed, &fields);
        w.wagate
            .http
            .post(format!("{}{path}", w.wagate.public_url))
            .header("host", host)
            .header("x-forwarded-proto", proto)
            .header("content-type", FORM)
            .header("x-twilio-signature", sig)
            .body(twilio::form::encode(&fields))
            .send()
    };

    let forged = post(
        "evil.example",
        "https",
        format!("https://bot.example.test:8443{path}"),
        sid(1),
    )
    .await
    .unwrap();
    assert_eq!(forged.status(), 401, "a Host the signature does not cover");

    let r = post(
        "bot.example.test:8443",
        "https",
        format!("https://bot.example.test:8443{path}"),
        sid(2),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let sent = w.twilio.wait_for_sent(1, Duration::from_secs(10)).await;
    assert_eq!(
        sent[0].status_callback.as_deref(),
        Some("https://bot.example.test:8443/webhooks/twilio/whatsapp/demo/status")
    );
    assert_eq!(w.twilio.sent().len(), 1, "the forged request sent nothing");

    let warned = w.wagate.logs().contains("WAGATE_PUBLIC_URL is not set");
    assert_eq!(
        warned,
        w.servers.mode == Mode::Distributed,
        "the start-up warning appears in NATS + Redis mode only"
    );
}
