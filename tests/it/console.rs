//! The web console in a real headless Chromium (support::browser) against a real `wagate serve`,
//! fake Twilio and the suite's NATS and Redis (or embedded store): controls are found by the
//! accessible names that INTERFACE.md promises, and every wait has a deadline. Screenshots of
//! the pages go to docs/console/. Plus the console's HTTP contract without a browser: session
//! and CSRF checks, cookie attributes, security headers, and the admin API left as it was.

use std::time::Duration;

use fantoccini::{Locator, key::Key};
use reqwest::{Method, header};

use crate::support::{
    browser::Browser,
    fake_twilio::ScriptedResponse,
    harness::{
        ACCOUNT_SID, ADMIN_TOKEN, AUTH_TOKEN, Mode, Proc, SANDBOX, Wagate, World, eventually,
        free_port, inbound_form, sid, status_callback,
    },
};

const USER: &str = "+14155550100";
const WAIT: Duration = Duration::from_secs(20);

/// Signs in through the form.
async fn sign_in(b: &Browser, w: &World) {
    b.goto(&format!("{}/", w.wagate.admin_url)).await;
    b.wait_for_path("/signin").await;
    b.fill("Admin token", ADMIN_TOKEN).await;
    b.click_button("Sign in").await;
    b.wait_for_path("/agents").await;
}

/// Creates an echo agent through New agent.
async fn create_echo_agent(b: &Browser, id: &str) {
    b.click_link("Agents").await;
    b.click_link("New agent").await;
    b.fill("Agent ID", id).await;
    b.fill("Name", &format!("Agent {id}")).await;
    b.field("Backend")
        .await
        .select_by_label("Echo")
        .await
        .expect("choose Echo");
    b.click_button("Create agent").await;
    b.wait_for_path(&format!("/agents/{id}")).await;
}

/// Deploys the agent on the test Twilio account through its Deploy page.
async fn deploy(b: &Browser, id: &str) {
    b.goto_path(&format!("/agents/{id}")).await;
    b.click_link("Deploy").await;
    b.fill("Account SID", ACCOUNT_SID).await;
    b.fill("Auth Token", AUTH_TOKEN).await;
    b.fill("WhatsApp Number", SANDBOX).await;
    b.click_button("Save & Enable").await;
    b.wait_for_text("the channel enabled", |t| {
        t.contains("WhatsApp channel: enabled")
    })
    .await;
}

#[tokio::test]
async fn an_operator_signs_in_deploys_an_agent_and_sees_its_conversations_live() {
    let w = World::start().await;
    // The test reports the replies' statuses itself, as Twilio would.
    w.twilio.withhold_status_callbacks();
    let b = Browser::start(1280).await;
    let mut pages = Vec::new();

    // A wrong token does not sign in.
    b.goto(&format!("{}/agents", w.wagate.admin_url)).await;
    b.wait_for_path("/signin").await;
    b.screenshot("sign-in").await;
    b.fill("Admin token", "not-the-admin-token-0000").await;
    b.click_button("Sign in").await;
    b.wait_for_text("the refusal", |t| t.contains("not accepted"))
        .await;
    assert_eq!(b.path().await, "/signin");
    assert_eq!(
        b.session_cookie().await,
        None,
        "no session for a wrong token"
    );

    sign_in(&b, &w).await;
    b.button("Sign out").await;
    create_echo_agent(&b, "demo").await;
    for name in ["Deploy", "Test chat", "Leads", "Conversations"] {
        b.link(name).await;
    }

    // Deploy: the webhook URL to paste into Twilio is on the page, as text.
    deploy(&b, "demo").await;
    let webhook = b
        .find(Locator::Id("webhook-url"), "webhook URL")
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(
        webhook.split('#').next(),
        Some(format!("{}/webhooks/twilio/whatsapp/demo", w.wagate.public_url).as_str()),
        "{webhook}"
    );
    b.screenshot("deploy").await;
    pages.push(b.html().await);

    // Copy webhook URL puts the URL on the clipboard (its handler runs under the page's CSP):
    // pasted into a field, it is the URL.
    b.click_button("Copy webhook URL").await;
    b.wait_for_text("the copy confirmed", |t| t.contains("Copied"))
        .await;
    let scratch = b.field("Account SID").await;
    scratch.clear().await.expect("clear");
    scratch
        .send_keys(&(Key::Control + "v"))
        .await
        .expect("paste");
    assert_eq!(
        scratch.prop("value").await.unwrap().as_deref(),
        Some(webhook.as_str()),
        "the clipboard holds the webhook URL"
    );
    b.goto_path("/agents/demo/deploy").await;

    // Conversations: a signed webhook arrives, and the conversation and then the reply appear
    // without a reload.
    b.click_link("Conversations").await;
    b.wait_for_path("/agents/demo/conversations").await;
    let r = w
        .wagate
        .inbound("demo", &sid(1), USER, "hello console")
        .await;
    assert_eq!(r.status(), 200);
    b.wait_for_text("the new conversation", |t| t.contains(USER))
        .await;
    b.screenshot("conversations").await;
    b.click_link(USER).await;
    b.wait_for_text("the message and its echo", |t| {
        t.matches("hello console").count() == 2
    })
    .await;
    w.twilio.wait_for_sent(1, WAIT).await;
    let r = w
        .wagate
        .inbound("demo", &sid(2), USER, "second, live")
        .await;
    assert_eq!(r.status(), 200);
    b.wait_for_text("the live message and reply", |t| {
        t.matches("second, live").count() == 2
    })
    .await;
    // Each reply shows its Twilio message and status, which follows the status callbacks
    // without a reload.
    let sent = w.twilio.wait_for_sent(2, WAIT).await;
    b.wait_for_text("both replies' messages, queued", |t| {
        t.contains(&format!("{} queued", sent[0].sid))
            && t.contains(&format!("{} queued", sent[1].sid))
    })
    .await;
    status_callback(&w, &sent[0].sid, "delivered", None).await;
    status_callback(&w, &sent[1].sid, "undelivered", Some(63016)).await;
    b.wait_for_text("the statuses, live", |t| {
        t.contains(&format!("{} delivered", sent[0].sid))
            && t.contains(&format!("{} undelivered Twilio error 63016", sent[1].sid))
    })
    .await;
    b.screenshot("transcript").await;
    pages.push(b.html().await);

    // Leads: the user is in the table, and Download CSV gives them.
    b.click_link("Leads").await;
    b.wait_for_text("the lead", |t| t.contains(USER)).await;
    let csv_href = b
        .link("Download CSV")
        .await
        .attr("href")
        .await
        .unwrap()
        .expect("href");
    let cookie = b.session_cookie().await.expect("signed in");
    let csv = w
        .wagate
        .http
        .get(format!("{}{csv_href}", w.wagate.admin_url))
        .header(header::COOKIE, format!("wagate_console={cookie}"))
        .send()
        .await
        .unwrap();
    assert_eq!(csv.status(), 200);
    let csv = csv.text().await.unwrap();
    assert!(csv.starts_with("phone,platform"), "{csv}");
    assert!(csv.contains(&format!("{USER},whatsapp,Test User")), "{csv}");
    b.screenshot("leads").await;
    pages.push(b.html().await);
    // Newest first unless asked otherwise, and the table says so.
    assert!(
        b.html().await.contains("aria-sort=\"descending\"><a"),
        "the default sort is marked"
    );
    // Search narrows the table.
    b.fill("Search", "nobody-by-that-name").await;
    b.click_button("Search").await;
    b.wait_for_text("an empty search", |t| {
        t.contains("0 leads") && !t.contains(USER)
    })
    .await;
    b.fill("Search", "test user").await;
    b.click_button("Search").await;
    b.wait_for_text("a search by name", |t| {
        t.contains("1 lead") && t.contains(USER)
    })
    .await;

    // Channel health: a webhook signed with another token is refused, and Deploy says why.
    let forged = inbound_form(&sid(3), USER, "forged");
    let r = w
        .wagate
        .post_signed(
            &Wagate::inbound_path("demo"),
            &forged,
            "another-auth-token-0000",
        )
        .await;
    assert_eq!(r.status(), 401);
    b.click_link("Deploy").await;
    b.wait_for_text("the signature failure", |t| {
        t.contains("Last signature failure") && t.contains("not the account's current one")
    })
    .await;
    b.wait_for_text("the last message", |t| !t.contains("none yet"))
        .await;

    // An OpenAI-compatible agent: its API key is write-only too.
    b.click_link("Agents").await;
    b.click_link("New agent").await;
    b.fill("Agent ID", "gpt").await;
    b.field("Backend")
        .await
        .select_by_label("OpenAI-compatible")
        .await
        .unwrap();
    b.fill("Base URL", "https://models.example.com/v1").await;
    b.fill("Model", "small").await;
    b.fill("API key", "sk-console-secret-0123456789").await;
    b.click_button("Create agent").await;
    b.wait_for_path("/agents/gpt").await;
    b.screenshot("agent").await;
    pages.push(b.html().await);
    // Edited with the API key left empty: the name changes, the stored key stays.
    b.fill("Name", "GPT renamed").await;
    b.click_button("Save agent").await;
    b.wait_for_path("/agents/gpt").await;
    let agent = eventually(WAIT, "the renamed agent", || async {
        let a = w.wagate.admin_json("/v1/agents/gpt").await;
        (a["name"] == "GPT renamed").then_some(a)
    })
    .await;
    assert_eq!(agent["backend"]["api_key_set"], true, "{agent}");
    assert_eq!(agent["backend"]["model"], "small", "{agent}");

    // No page shows a secret once entered, whichever page it is.
    for path in [
        "/agents",
        "/agents/demo",
        "/agents/demo/deploy",
        "/agents/gpt",
        "/agents/demo/leads",
        "/agents/demo/conversations",
        "/dead-letters",
    ] {
        b.goto_path(path).await;
        b.wait_for_path(path).await;
        pages.push(b.html().await);
    }
    b.click_link("Agents").await;
    b.screenshot("agents").await;
    for html in &pages {
        assert!(!html.contains(AUTH_TOKEN), "the Auth Token is on a page");
        assert!(
            !html.contains("sk-console-secret"),
            "the API key is on a page"
        );
    }

    // Sign out: the pages ask for a sign-in again.
    b.click_button("Sign out").await;
    b.wait_for_path("/signin").await;
    b.goto_path("/agents").await;
    b.wait_for_path("/signin").await;
    b.close().await;
}

/// Deploy sets the sender's pace: the field shows the rate in effect, a rate that is not a
/// number or out of range is refused there and changes nothing, and a saved one is the channel's.
#[tokio::test]
async fn an_operator_sets_the_messages_per_second_on_deploy() {
    let w = World::start().await;
    let b = Browser::start(1280).await;
    sign_in(&b, &w).await;
    create_echo_agent(&b, "paced").await;
    deploy(&b, "paced").await;
    let shown = || async {
        let field = b.field("Messages per second").await;
        field.prop("value").await.unwrap().unwrap_or_default()
    };
    let channel_mps = || async {
        let r = w
            .wagate
            .admin(Method::GET, "/v1/agents/paced/whatsapp")
            .send()
            .await
            .unwrap();
        let channel: serde_json::Value = r.json().await.unwrap();
        channel["mps"].as_f64()
    };
    let default = channel_mps().await.expect("the channel shows its mps");
    assert_eq!(shown().await, default.to_string(), "the rate in effect");

    for (typed, refusal) in [
        ("fast", "messages per second must be a number"),
        ("20000", "mps is messages per second"),
    ] {
        b.fill("Auth Token", AUTH_TOKEN).await;
        b.fill("Messages per second", typed).await;
        b.click_button("Save & Enable").await;
        b.wait_for_text("the refusal", |t| t.contains(refusal))
            .await;
        assert_eq!(shown().await, typed, "what was typed stays to be corrected");
        assert_eq!(channel_mps().await, Some(default), "nothing changed");
    }

    b.fill("Messages per second", "0.5").await;
    b.click_button("Save & Enable").await;
    eventually(WAIT, "the saved rate", || async {
        (channel_mps().await == Some(0.5)).then_some(())
    })
    .await;
    b.wait_for_path("/agents/paced/deploy").await;
    b.goto_path("/agents/paced/deploy").await;
    assert_eq!(shown().await, "0.5");
}

/// Deploy's "Send long replies in order" is the channel's `ordered_parts`: ticked by default,
/// and what is saved is what the API shows.
#[tokio::test]
async fn an_operator_turns_ordered_parts_off_and_on_on_deploy() {
    const LABEL: &str = "Send long replies in order";
    let w = World::start().await;
    let b = Browser::start(1280).await;
    sign_in(&b, &w).await;
    create_echo_agent(&b, "parts").await;
    b.goto_path("/agents/parts/deploy").await;
    let ticked = || async {
        let field = b.field(LABEL).await;
        field.prop("checked").await.unwrap() == Some("true".to_owned())
    };
    assert!(ticked().await, "on before the channel exists");
    deploy(&b, "parts").await;
    let ordered = || async {
        w.wagate.admin_json("/v1/agents/parts/whatsapp").await["ordered_parts"].as_bool()
    };
    assert_eq!(ordered().await, Some(true));
    assert!(ticked().await);
    for on in [false, true] {
        b.fill("Auth Token", AUTH_TOKEN).await;
        b.field(LABEL).await.click().await.unwrap();
        b.click_button("Save & Enable").await;
        eventually(WAIT, "the saved setting", || async {
            (ordered().await == Some(on)).then_some(())
        })
        .await;
        b.goto_path("/agents/parts/deploy").await;
        assert_eq!(ticked().await, on, "the page shows what was saved");
    }
}

#[tokio::test]
async fn a_failed_send_shows_in_dead_letters_and_replay_delivers_it() {
    let w = World::start().await;
    let b = Browser::start(1280).await;
    sign_in(&b, &w).await;
    create_echo_agent(&b, "demo").await;
    deploy(&b, "demo").await;

    // Twilio refuses the reply to one user for good (21211), then to another.
    for (n, user) in [(1, "+14155550101"), (2, "+14155550102")] {
        w.twilio.push_response(ScriptedResponse::TwilioError {
            status: 400,
            code: 21211,
            message: "The 'To' number is not a valid phone number.".into(),
        });
        let r = w.wagate.inbound("demo", &sid(n), user, "hi").await;
        assert_eq!(r.status(), 200);
    }
    b.click_link("Dead letters").await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let text = b.text().await;
        if text.contains("+14155550101") && text.contains("+14155550102") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no dead letters:\n{text}"
        );
        // The list is not live: look again, as an operator would.
        b.client.refresh().await.unwrap();
    }
    b.screenshot("dead-letters").await;
    // The conversation shows the reply as not delivered, with Twilio's code.
    b.goto_path("/agents/demo/conversations/+14155550101").await;
    b.wait_for_text("the undelivered reply", |t| {
        t.contains("Replies not delivered") && t.contains("Twilio error 21211")
    })
    .await;
    b.click_link("Dead letters").await;
    // Each row names the user and Twilio's code, with its own Replay button.
    let row = b
        .find(
            Locator::XPath("//tr[td[normalize-space(.)='+14155550101']]"),
            "the row of +14155550101",
        )
        .await;
    let row_text = row.text().await.unwrap();
    assert!(row_text.contains("21211"), "{row_text}");
    row.find(Locator::XPath(".//button[normalize-space(.)='Replay']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait_for_text("the replay", |t| t.contains("Replayed 1"))
        .await;
    let sent = w.twilio.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].to, "whatsapp:+14155550101");
    assert!(!b.text().await.contains("+14155550101"));

    // Replay all asks first; dismissed, nothing happens; accepted, the rest goes out.
    b.click_button("Replay all").await;
    b.client.dismiss_alert().await.expect("a confirmation");
    assert!(b.text().await.contains("+14155550102"));
    b.click_button("Replay all").await;
    b.client.accept_alert().await.expect("a confirmation");
    b.wait_for_text("the replay of all", |t| t.contains("No dead letters"))
        .await;
    let sent = w.twilio.wait_for_sent(2, WAIT).await;
    assert_eq!(sent[1].to, "whatsapp:+14155550102");
    b.close().await;
}

/// Dead letters come a page of 25 at a time, newest first, with a link to the older ones
/// and back; Replay all still names them all.
#[tokio::test]
async fn dead_letters_are_shown_newest_first_a_page_at_a_time() {
    let w = World::start().await;
    w.wagate.echo_agent("demo").await;
    let user = |n: u64| format!("+1415555{:04}", 1000 + n);
    for n in 1..=26 {
        w.twilio.push_response(ScriptedResponse::TwilioError {
            status: 400,
            code: 21211,
            message: "The 'To' number is not a valid phone number.".into(),
        });
        let r = w.wagate.inbound("demo", &sid(n), &user(n), "hi").await;
        assert_eq!(r.status(), 200);
        // One at a time, so that the dead letters' order is the users' order.
        eventually(WAIT, "the dead letter", || async {
            let d = w.wagate.admin_json("/v1/dead-letters").await;
            (d.as_array().map(Vec::len) == Some(n as usize)).then_some(())
        })
        .await;
    }
    let b = Browser::start(1280).await;
    sign_in(&b, &w).await;
    b.click_link("Dead letters").await;
    b.wait_for_text("the newest page", |t| t.contains(&user(26)))
        .await;
    let rows = b.client.find_all(Locator::Css("tbody tr")).await.unwrap();
    assert_eq!(rows.len(), 25);
    assert!(
        rows[0].text().await.unwrap().contains(&user(26)),
        "newest first"
    );
    assert!(!b.text().await.contains(&user(1)));
    assert!(
        b.html().await.contains("Replay all 26 dead letters?"),
        "Replay all names every dead letter"
    );
    b.click_link("Older").await;
    b.wait_for_text("the older page", |t| {
        t.contains(&user(1)) && !t.contains(&user(2))
    })
    .await;
    b.click_link("Newest").await;
    b.wait_for_text("the newest page again", |t| t.contains(&user(26)))
        .await;
    b.close().await;
}

#[tokio::test]
async fn test_chat_talks_to_the_agent_through_the_pipeline_without_twilio() {
    let w = World::start().await;
    // 375 px: the width of a small phone.
    let b = Browser::start(375).await;
    sign_in(&b, &w).await;
    b.screenshot("agents-375px").await;
    create_echo_agent(&b, "trial").await;
    b.click_link("Test chat").await;
    b.fill("Message", "ping from the console").await;
    b.click_button("Send").await;
    // The echo comes back as the agent's line, without a reload.
    b.find(
        Locator::XPath("//li[contains(@class,'theirs')][contains(., 'ping from the console')]"),
        "the agent's reply",
    )
    .await;
    assert_eq!(b.path().await, "/agents/trial/chat");
    b.fill("Message", "and again").await;
    b.click_button("Send").await;
    b.find(
        Locator::XPath("//li[contains(@class,'theirs')][contains(., 'and again')]"),
        "the second reply",
    )
    .await;
    b.screenshot("test-chat-375px").await;
    assert!(w.twilio.requests().is_empty(), "nothing went to Twilio");
    // The agent that posts to Twilio is left alone: Test chat says so and sends nothing.
    deploy(&b, "trial").await;
    b.click_link("Test chat").await;
    b.wait_for_text("the refusal", |t| t.contains("posts to Twilio"))
        .await;
    b.close().await;
}

/// Sign-in attempts are limited per client: five wrong tokens are 401, the sixth attempt is
/// 429 with a page that says so, whatever token it carries (none is checked), and once the
/// allowance grows back (one attempt per 10 s) the right token signs in.
#[tokio::test]
async fn a_sixth_sign_in_attempt_at_once_is_429_and_the_token_works_after_the_wait() {
    let w = World::start().await;
    let admin = &w.wagate.admin_url;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let attempt = |token: &'static str| {
        http.post(format!("{admin}/signin"))
            .form(&[("token", token)])
            .send()
    };
    for n in 1..=5 {
        let r = attempt("wrong-token-000000000000").await.unwrap();
        assert_eq!(r.status(), 401, "wrong attempt {n}");
    }
    let r = attempt("wrong-token-000000000000").await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()[header::RETRY_AFTER], "10");
    assert!(r.headers().get(header::SET_COOKIE).is_none());
    let page = r.text().await.unwrap();
    assert!(
        page.contains("Too many sign-in attempts") && page.contains("Wait 10 seconds"),
        "{page}"
    );
    let refused = std::time::Instant::now();
    let r = attempt(ADMIN_TOKEN).await.unwrap();
    assert_eq!(r.status(), 429, "over the limit even the right token waits");
    assert!(r.headers().get(header::SET_COOKIE).is_none());

    let signed_in = eventually(
        Duration::from_secs(15),
        "an attempt allowed again",
        || async {
            let r = attempt(ADMIN_TOKEN).await.unwrap();
            (r.status() != 429).then_some(r)
        },
    )
    .await;
    assert!(
        refused.elapsed() >= Duration::from_secs(8),
        "allowed again after {:?}",
        refused.elapsed()
    );
    assert_eq!(signed_in.status(), 303);
    assert!(signed_in.headers().get(header::SET_COOKIE).is_some());
}

/// A webhook refused for its signature at one ingress process shows on Deploy as served by
/// another (the failure is in the store), and a flood of them is written once per 10 s: the
/// stored failure keeps the time of the first of the flood.
#[tokio::test]
async fn signature_failures_at_any_ingress_show_on_deploy_and_a_flood_is_written_once() {
    let w = World::start_in(Mode::Distributed, &[]).await;
    w.wagate.echo_agent("demo").await;
    let spool = tempfile::tempdir().unwrap();
    let spool_dir = spool.path().to_string_lossy().into_owned();
    let other = Wagate::start_role(
        "ingress",
        &w.servers,
        &w.twilio.base_url,
        &[("WAGATE_DATA_DIR", &spool_dir)],
    )
    .await;
    let admin = &w.wagate.admin_url;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = http
        .post(format!("{admin}/signin"))
        .form(&[("token", ADMIN_TOKEN)])
        .send()
        .await
        .unwrap();
    let cookie = r.headers()[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let deploy_page = || async {
        let r = http
            .get(format!("{admin}/agents/demo/deploy"))
            .header(header::COOKIE, &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap()
    };
    assert!(deploy_page().await.contains("none in the last 30 days"));

    let forge = |n: u64| {
        let form = inbound_form(&sid(n), USER, "forged");
        let other = &other;
        async move {
            let r = other
                .post_signed(
                    &Wagate::inbound_path("demo"),
                    &form,
                    "another-auth-token-0000",
                )
                .await;
            assert_eq!(r.status(), 401);
        }
    };
    forge(1).await;
    let page = eventually(WAIT, "the other ingress's failure on Deploy", || async {
        let page = deploy_page().await;
        page.contains("likely cause").then_some(page)
    })
    .await;
    // The other ingress has an address of its own, which the page names.
    assert!(
        page.contains(&format!("checked against {}/webhooks", other.public_url)),
        "{page}"
    );

    let redis = w.servers.redis().await;
    let stored = || {
        let mut redis = redis.clone();
        async move {
            let keys: Vec<String> = redis::AsyncCommands::keys(&mut redis, "*sigfail:demo")
                .await
                .unwrap();
            assert_eq!(keys.len(), 1, "{keys:?}");
            let value: String = redis::AsyncCommands::get(&mut redis, &keys[0])
                .await
                .unwrap();
            value
        }
    };
    let first = stored().await;
    for n in 2..=30 {
        forge(n).await;
    }
    // Each refusal starts its write before answering: a write the flood caused would land
    // within milliseconds; what is checked is that none does, so a short grace, not a wait.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(stored().await, first, "the flood was not written");
}

/// The HTTP contract of the console, without a browser.
#[tokio::test]
async fn pages_need_a_session_and_forms_their_csrf_token() {
    let w = World::start().await;
    let admin = &w.wagate.admin_url;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    // Unchanged: /v1 answers 401 JSON without the bearer token, /metrics and /healthz serve.
    let r = http.get(format!("{admin}/v1/agents")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("\"error\""));
    let r = http
        .get(format!("{admin}/v1/nothing"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    for path in ["/metrics", "/healthz"] {
        let r = http.get(format!("{admin}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }

    // Without a session: pages send to the sign-in, forms are refused.
    let r = http.get(format!("{admin}/agents")).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()[header::LOCATION], "/signin");
    let r = http
        .post(format!("{admin}/agents"))
        .form(&[("agent_id", "x"), ("name", "x"), ("backend", "echo")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // A wrong token: no cookie.
    let r = http
        .post(format!("{admin}/signin"))
        .form(&[("token", "wrong-token-000000000000")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get(header::SET_COOKIE).is_none());

    // The right token over HTTPS (as a proxy says): an HttpOnly, SameSite=Strict, Secure,
    // expiring cookie.
    let r = http
        .post(format!("{admin}/signin"))
        .header("x-forwarded-proto", "https")
        .form(&[("token", ADMIN_TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let set = r.headers()[header::SET_COOKIE].to_str().unwrap().to_owned();
    for attr in [
        "HttpOnly",
        "SameSite=Strict",
        "Secure",
        "Max-Age=28800",
        "Path=/",
    ] {
        assert!(set.contains(attr), "{set}");
    }
    let cookie = set.split(';').next().unwrap().to_owned();
    // Over plain HTTP, not Secure (the browser would drop it).
    let r = http
        .post(format!("{admin}/signin"))
        .form(&[("token", ADMIN_TOKEN)])
        .send()
        .await
        .unwrap();
    assert!(
        !r.headers()[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Secure")
    );

    // Signed in: pages carry the CSP (no inline script) and the CSRF token.
    let r = http
        .get(format!("{admin}/agents/new"))
        .header(header::COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    let html = r.text().await.unwrap();
    assert!(!html.contains("<script>"), "no inline script");
    let csrf = html
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("a CSRF token")
        .to_owned();

    let create = |token: Option<&str>, cookie: &str| {
        let mut form = vec![("agent_id", "made"), ("name", "Made"), ("backend", "echo")];
        if let Some(t) = token {
            form.push(("csrf", t));
        }
        http.post(format!("{admin}/agents"))
            .header(header::COOKIE, cookie.to_owned())
            .form(&form)
    };
    // Without the token, with another token, with a tampered cookie: refused, nothing made.
    assert_eq!(create(None, &cookie).send().await.unwrap().status(), 403);
    let other = "0".repeat(64);
    assert_eq!(
        create(Some(&other), &cookie).send().await.unwrap().status(),
        403
    );
    let tampered = format!("{}0", &cookie[..cookie.len() - 1]);
    let tampered = if tampered == cookie {
        format!("{}1", &cookie[..cookie.len() - 1])
    } else {
        tampered
    };
    assert_eq!(
        create(Some(&csrf), &tampered)
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        w.wagate
            .admin(Method::GET, "/v1/agents/made")
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    // With it: made, the same as through the API.
    let r = create(Some(&csrf), &cookie).send().await.unwrap();
    assert_eq!(r.status(), 303);
    let agent = w.wagate.admin_json("/v1/agents/made").await;
    assert_eq!(agent["backend"]["kind"], "echo");
}

/// `wagate serve` in embedded mode prints a sign-in link at start, as Jupyter does; it signs in
/// once.
#[tokio::test]
async fn serve_prints_a_sign_in_link_that_works_once() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_wagate"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("WAGATE_DATA_DIR", dir.path().join("data"))
        .env("WAGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("WAGATE_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start wagate serve");
    let stdout = child.stdout.take().expect("stdout");
    let _running = Proc(child);
    // A reader thread, so that the test's deadline holds even if nothing is printed.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("a line on stdout");
    let link = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no link in {line:?}"))
        .to_owned();
    assert!(
        link.starts_with(&format!(
            "http://127.0.0.1:{admin_port}/signin/link?ticket="
        )),
        "{link}"
    );
    let token = std::fs::read_to_string(dir.path().join("data/admin.token")).unwrap();
    assert!(
        !line.contains(token.trim()),
        "the admin token is not printed"
    );

    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let first = http.get(&link).send().await.unwrap();
    assert_eq!(first.status(), 303);
    let cookie = first.headers()[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let page = http
        .get(format!("http://127.0.0.1:{admin_port}/agents"))
        .header(header::COOKIE, cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200, "signed in by the link");
    let again = http.get(&link).send().await.unwrap();
    assert_eq!(again.status(), 401, "the link works once");
    assert!(again.headers().get(header::SET_COOKIE).is_none());
}

#[tokio::test]
async fn an_operator_forgets_a_conversation_erases_a_lead_and_deletes_the_agent() {
    let w = World::start().await;
    let b = Browser::start(1280).await;
    sign_in(&b, &w).await;
    create_echo_agent(&b, "demo").await;
    deploy(&b, "demo").await;
    let (one, two) = ("+14155550101", "+14155550102");
    w.wagate.inbound("demo", &sid(1), one, "hello one").await;
    w.wagate.inbound("demo", &sid(2), two, "hello two").await;
    w.twilio.wait_for_sent(2, WAIT).await;

    // Forget conversation asks first; dismissed, the transcript stays.
    b.goto_path(&format!("/agents/demo/conversations/{one}"))
        .await;
    b.wait_for_text("the transcript", |t| t.contains("hello one"))
        .await;
    b.click_button("Forget conversation").await;
    b.client.dismiss_alert().await.expect("a confirmation");
    assert!(b.text().await.contains("hello one"));
    b.click_button("Forget conversation").await;
    b.client.accept_alert().await.expect("a confirmation");
    b.wait_for_text("the forgotten transcript", |t| !t.contains("hello one"))
        .await;
    assert!(w.wagate.session_contents("demo", one).await.is_empty());
    assert_eq!(w.wagate.leads("demo").await.len(), 2, "the lead stays");

    // Erase on the lead's row.
    b.goto_path("/agents/demo/leads").await;
    let row = b
        .find(
            Locator::XPath(&format!("//tr[td[normalize-space(.)='{two}']]")),
            "the lead's row",
        )
        .await;
    row.find(Locator::XPath(".//button[normalize-space(.)='Erase']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.client.accept_alert().await.expect("a confirmation");
    b.wait_for_text("the erased lead gone", |t| !t.contains(two))
        .await;
    let leads = w.wagate.leads("demo").await;
    assert_eq!(leads.len(), 1, "{leads:?}");
    assert!(w.wagate.session_contents("demo", two).await.is_empty());

    // Delete agent on its page.
    b.goto_path("/agents/demo").await;
    b.click_button("Delete agent").await;
    b.client.accept_alert().await.expect("a confirmation");
    b.wait_for_path("/agents").await;
    let r = w
        .wagate
        .admin(Method::GET, "/v1/agents/demo")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = w.wagate.inbound("demo", &sid(3), one, "anyone?").await;
    assert_eq!(r.status(), 404);
    b.close().await;
}

/// A person takes a conversation over in the console: the list marks it, the user's next
/// message gets no agent reply, the operator's reply goes out under their name, and giving it
/// back lets the agent answer again.
#[tokio::test]
async fn an_operator_takes_over_a_conversation_answers_and_gives_it_back() {
    let w = World::start().await;
    let b = Browser::start(1280).await;
    sign_in(&b, &w).await;
    create_echo_agent(&b, "demo").await;
    deploy(&b, "demo").await;
    const USER: &str = "+14155550131";
    w.wagate.inbound("demo", &sid(1), USER, "hello").await;
    w.twilio.wait_for_sent(1, WAIT).await;

    b.goto_path(&format!("/agents/demo/conversations/{USER}"))
        .await;
    b.wait_for_text("the agent has it", |t| t.contains("With the agent"))
        .await;
    b.click_button("Take over").await;
    b.wait_for_text("the person has it", |t| {
        t.contains("With a person: console")
    })
    .await;
    w.wagate
        .inbound("demo", &sid(2), USER, "is a person there?")
        .await;
    b.wait_for_text("the user's message", |t| t.contains("is a person there?"))
        .await;
    assert_eq!(w.twilio.sent().len(), 1, "the agent stays quiet");

    b.fill("Your name", "Grace").await;
    b.fill("Reply as operator", "Hi, Grace here.").await;
    b.click_button("Send reply").await;
    let sent = w.twilio.wait_for_sent(2, WAIT).await;
    assert_eq!(sent[1].body.as_deref(), Some("Hi, Grace here."));
    b.wait_for_text("the reply under its author", |t| {
        t.contains("Grace (operator)") && t.contains("With a person: Grace")
    })
    .await;
    b.screenshot("handoff").await;

    b.click_link("Conversations").await;
    b.wait_for_text("the list's mark", |t| t.contains("with a person"))
        .await;
    // The list is live (its rows are redrawn): open the transcript by its address.
    b.goto_path(&format!("/agents/demo/conversations/{USER}"))
        .await;
    b.click_button("Give back to the agent").await;
    b.wait_for_text("the agent has it again", |t| t.contains("With the agent"))
        .await;
    w.wagate.inbound("demo", &sid(3), USER, "thanks").await;
    let sent = w.twilio.wait_for_sent(3, WAIT).await;
    assert_eq!(sent[2].body.as_deref(), Some("thanks"));
    b.close().await;
}
