use crate::support;

// The data lifecycle through the admin API (issue 23): forgetting a conversation, erasing a
// person for a data protection request, deleting an agent. Each runs in both modes; the
// erasure test then, with NATS and Redis, reads every key of Redis and every message of every
// JetStream stream (through their own APIs, as an operator or auditor would) and looks for the
// person's number in any form; in embedded mode it reads every byte of the data folder, wagate
// still running.

use std::time::Duration;

use redis::AsyncCommands;
use reqwest::Method;
use serde_json::{Value, json};
use support::harness::{AUTH_TOKEN, Mode, Servers, Wagate, World, eventually, sid};

const USER: &str = "+14155550123";
/// The number's digits: what every stored form of it (`+1…`, `whatsapp:+1…`, a subject token)
/// contains.
const DIGITS: &str = "14155550123";
const OTHER: &str = "+14155550177";
const WAIT: Duration = Duration::from_secs(15);

async fn call(w: &Wagate, method: Method, path: &str) -> (u16, String) {
    let r = w.admin(method, path).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

async fn dead_letters(w: &Wagate) -> Vec<Value> {
    w.admin_json("/v1/dead-letters")
        .await
        .as_array()
        .expect("a list")
        .clone()
}

fn template() -> Value {
    json!({"to": USER, "content_sid": format!("HX{}", "0123456789abcdef".repeat(2))})
}

/// `USER` writes, is answered, says STOP, and writes again: the reply to that is refused and
/// becomes a dead letter (a conversation's messages are handled in order, so once it is there
/// the opt-out is recorded). `first` numbers the message sids.
async fn opted_out_with_a_dead_letter(w: &World, agent: &str, first: u64) {
    let before = dead_letters(&w.wagate).await.len();
    let sent = w.twilio.sent().len();
    w.wagate
        .inbound(agent, &sid(first), USER, "my number is +14155550123")
        .await;
    w.twilio.wait_for_sent(sent + 1, WAIT).await;
    w.wagate.inbound(agent, &sid(first + 1), USER, "STOP").await;
    w.wagate
        .inbound(agent, &sid(first + 2), USER, "hello?")
        .await;
    eventually(WAIT, "the refused reply's dead letter", || async {
        (dead_letters(&w.wagate).await.len() > before).then_some(())
    })
    .await;
}

#[tokio::test]
async fn forgetting_a_session_starts_a_new_history_and_keeps_the_lead_and_the_opt_out() {
    let w = World::start().await;
    w.wagate.echo_agent("demo").await;
    w.wagate.inbound("demo", &sid(1), OTHER, "first").await;
    w.twilio.wait_for_sent(1, WAIT).await;
    assert_eq!(
        w.wagate.session_contents("demo", OTHER).await,
        ["first", "first"]
    );

    let path = format!("/v1/agents/demo/sessions/{OTHER}");
    assert_eq!(call(&w.wagate, Method::DELETE, &path).await.0, 204);
    assert!(w.wagate.session_contents("demo", OTHER).await.is_empty());
    let leads = w.wagate.leads("demo").await;
    assert_eq!(leads.len(), 1, "the lead stays: {leads:?}");
    assert_eq!(
        call(&w.wagate, Method::DELETE, &path).await.0,
        204,
        "forgetting again"
    );

    w.wagate.inbound("demo", &sid(2), OTHER, "second").await;
    w.twilio.wait_for_sent(2, WAIT).await;
    let history = eventually(WAIT, "the new turn", || async {
        let h = w.wagate.session_contents("demo", OTHER).await;
        (h.len() == 2).then_some(h)
    })
    .await;
    assert_eq!(history, ["second", "second"], "a new history");
    assert_eq!(w.wagate.leads("demo").await[0]["message_count"], 2);

    // An opt-out outlives the conversation.
    opted_out_with_a_dead_letter(&w, "demo", 10).await;
    let path = format!("/v1/agents/demo/sessions/{}", USER.replace('+', "%2B"));
    assert_eq!(call(&w.wagate, Method::DELETE, &path).await.0, 204);
    let r = w
        .wagate
        .admin(Method::POST, "/v1/agents/demo/messages")
        .json(&template())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409, "still opted out after forgetting");

    let (status, body) = call(
        &w.wagate,
        Method::DELETE,
        "/v1/agents/nobody/sessions/+1415",
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = call(&w.wagate, Method::DELETE, "/v1/agents/demo/sessions/12ab").await;
    assert_eq!(status, 422, "{body}");
}

#[tokio::test]
async fn erasing_a_lead_leaves_no_trace_of_the_number_in_any_backend() {
    let w = World::start().await;
    w.wagate.echo_agent("demo").await;
    w.wagate.inbound("demo", &sid(1), OTHER, "keep me").await;
    w.twilio.wait_for_sent(1, WAIT).await;
    opted_out_with_a_dead_letter(&w, "demo", 10).await;
    // A delivery status of a reply to the user.
    let to_user = w
        .twilio
        .sent()
        .into_iter()
        .find(|m| m.to.contains(DIGITS))
        .expect("a reply to the user");
    let status = [
        ("MessageSid", to_user.sid.as_str()),
        ("MessageStatus", "delivered"),
        ("AccountSid", support::harness::ACCOUNT_SID),
        ("ChannelPrefix", "whatsapp"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let r = w
        .wagate
        .post_signed("/webhooks/twilio/whatsapp/demo/status", &status, AUTH_TOKEN)
        .await;
    assert!(r.status().is_success(), "{}", r.status());
    assert!(
        dead_letters(&w.wagate)
            .await
            .iter()
            .any(|d| d.to_string().contains(DIGITS)),
        "the user's dead letter is there to erase"
    );
    if w.servers.mode == Mode::Distributed {
        assert!(
            !traces(&w.servers).await.is_empty(),
            "the scan finds the number before the erasure"
        );
    }

    let path = format!("/v1/agents/demo/leads/{}", USER.replace('+', "%2B"));
    assert_eq!(call(&w.wagate, Method::DELETE, &path).await.0, 204);
    if w.servers.mode == Mode::Embedded {
        // redb leaves deleted bytes in the pages it frees and in the unused tail of those it
        // keeps; the erasure answers once it has rewritten the data file with the live records
        // only, so the file as it is now, wagate running, holds nothing of the number.
        let found = files_with_number(w.servers.dir.path());
        assert!(found.is_empty(), "the number is still in {found:?}");
    }
    assert_eq!(call(&w.wagate, Method::DELETE, &path).await.0, 204, "again");

    let leads = w.wagate.leads("demo").await;
    assert_eq!(leads.len(), 1, "{leads:?}");
    assert_eq!(leads[0]["phone"], OTHER);
    assert!(w.wagate.session_contents("demo", USER).await.is_empty());
    assert_eq!(
        w.wagate.session_contents("demo", OTHER).await,
        ["keep me", "keep me"]
    );
    let letters = dead_letters(&w.wagate).await;
    assert!(
        letters.iter().all(|d| !d.to_string().contains(DIGITS)),
        "{letters:?}"
    );
    if w.servers.mode == Mode::Distributed {
        // Acknowledged work-queue messages leave their stream a moment after the ack.
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let found = traces(&w.servers).await;
            if found.is_empty() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the number is still stored after the erasure:\n{}",
                found.join("\n")
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let (status, _) = call(
        &w.wagate,
        Method::DELETE,
        "/v1/agents/nobody/leads/+14155550123",
    )
    .await;
    assert_eq!(status, 404);
}

/// The files under `dir` whose bytes hold the number's digits.
fn files_with_number(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(files_with_number(&path));
        } else if std::fs::read(&path)
            .unwrap()
            .windows(DIGITS.len())
            .any(|w| w == DIGITS.as_bytes())
        {
            found.push(path);
        }
    }
    found
}

/// Where the user's number still is: every Redis key (its name and its value, whatever its
/// type) and every message of every JetStream stream (subject, headers and payload), read
/// through the servers' own APIs, so that what they still serve is what is checked.
async fn traces(servers: &Servers) -> Vec<String> {
    let mut found = Vec::new();
    let mut redis = servers.redis().await;
    let keys: Vec<String> = redis.keys("*").await.unwrap();
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .unwrap();
        let value: redis::Value = match kind.as_str() {
            "string" => redis.get(&key).await,
            "hash" => redis.hgetall(&key).await,
            "list" => redis.lrange(&key, 0, -1).await,
            "set" => redis.smembers(&key).await,
            "zset" => redis.zrange_withscores(&key, 0, -1).await,
            "stream" => {
                redis::cmd("XRANGE")
                    .arg(&key)
                    .arg("-")
                    .arg("+")
                    .query_async(&mut redis)
                    .await
            }
            "none" => continue,
            other => panic!("a Redis key of a type this scan does not read: {other}"),
        }
        .unwrap();
        let text = format!("{key} {value:?}");
        if text.contains(DIGITS) {
            found.push(format!("redis {text}"));
        }
    }

    let client = async_nats::connect(&servers.nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut names = js.stream_names();
    let mut streams = Vec::new();
    while let Some(name) = futures::StreamExt::next(&mut names).await {
        streams.push(name.unwrap());
    }
    assert!(!streams.is_empty(), "no JetStream streams to read");
    for name in streams {
        let mut stream = js.get_stream(&name).await.unwrap();
        let state = stream.info().await.unwrap().state.clone();
        if state.messages == 0 {
            continue;
        }
        for seq in state.first_sequence..=state.last_sequence {
            let Ok(m) = stream.get_raw_message(seq).await else {
                continue;
            };
            let text = format!(
                "{} {:?} {}",
                m.subject,
                m.headers,
                String::from_utf8_lossy(&m.payload)
            );
            if text.contains(DIGITS) {
                found.push(format!("nats {name} #{seq}: {text}"));
            }
        }
    }
    found
}

#[tokio::test]
async fn deleting_an_agent_removes_its_data_and_its_webhook_answers_404() {
    let w = World::start().await;
    w.wagate.echo_agent("doomed").await;
    w.wagate.echo_agent("keeper").await;
    // In distributed mode a second ingress process has the channel cached; the deletion made
    // through the first must reach it.
    let spool = tempfile::tempdir().unwrap();
    let spool_dir = spool.path().to_string_lossy().into_owned();
    let other_ingress = match w.servers.mode {
        Mode::Distributed => Some(
            Wagate::start_role(
                "ingress",
                &w.servers,
                &w.twilio.base_url,
                &[("WAGATE_DATA_DIR", &spool_dir)],
            )
            .await,
        ),
        Mode::Embedded => None,
    };
    opted_out_with_a_dead_letter(&w, "doomed", 1).await;
    w.wagate.inbound("keeper", &sid(20), OTHER, "stay").await;
    eventually(WAIT, "the keeper's reply", || async {
        (w.wagate.session_contents("keeper", OTHER).await.len() == 2).then_some(())
    })
    .await;
    if let Some(ingress) = &other_ingress {
        let r = ingress.inbound("doomed", &sid(30), OTHER, "cached").await;
        assert_eq!(r.status(), 200, "the other ingress knows the agent");
        // Answered before the deletion: a message still queued then may store again.
        eventually(WAIT, "the answer through the other ingress", || async {
            (w.wagate.session_contents("doomed", OTHER).await.len() == 2).then_some(())
        })
        .await;
    }

    assert_eq!(
        call(&w.wagate, Method::DELETE, "/v1/agents/doomed").await.0,
        204
    );
    let (status, _) = call(&w.wagate, Method::GET, "/v1/agents/doomed").await;
    assert_eq!(status, 404);
    let r = w.wagate.inbound("doomed", &sid(40), USER, "anyone?").await;
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("Unknown agent"));
    if let Some(ingress) = &other_ingress {
        // Well inside the cache's 30 s safety net: only the change notification does this.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let r = ingress.inbound("doomed", &sid(41), USER, "anyone?").await;
            if r.status() == 404 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the other ingress still takes the deleted agent's webhook: {}",
                r.status()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let letters = dead_letters(&w.wagate).await;
    assert!(
        letters.iter().all(|d| d["agent_id"] != "doomed"),
        "{letters:?}"
    );
    assert_eq!(
        call(&w.wagate, Method::DELETE, "/v1/agents/doomed").await.0,
        404
    );
    if w.servers.mode == Mode::Distributed {
        // What a message in flight at the deletion leaves (its turn began before the agent
        // went): a lead of the deleted agent. Deleting again sweeps it, then there is nothing.
        let mut redis = w.servers.redis().await;
        let _: () = redis
            .hset(format!("wagate:lead:{{doomed}}:{USER}"), "phone", USER)
            .await
            .unwrap();
        let _: () = redis.zadd("wagate:leads:{doomed}", USER, 1).await.unwrap();
        let (status, body) = call(&w.wagate, Method::DELETE, "/v1/agents/doomed").await;
        assert_eq!(status, 204, "{body}");
        // Only the "seen" marks of message sids stay (no number in them; they lapse).
        let left: Vec<String> = redis.keys("*doomed*").await.unwrap();
        let left: Vec<&String> = left.iter().filter(|k| !k.contains(":leadseen:")).collect();
        assert!(left.is_empty(), "{left:?}");
        let (status, body) = call(&w.wagate, Method::DELETE, "/v1/agents/doomed").await;
        assert_eq!(status, 404, "{body}");
    }

    // The same id again starts with nothing of the old agent's.
    w.wagate.echo_agent("doomed").await;
    assert!(w.wagate.leads("doomed").await.is_empty());
    assert!(w.wagate.session_contents("doomed", USER).await.is_empty());
    assert_eq!(w.wagate.leads("keeper").await.len(), 1);
    assert_eq!(
        w.wagate.session_contents("keeper", OTHER).await,
        ["stay", "stay"]
    );
}

/// An agent's `history_turns` and `history_tokens` bound what its model sees of a long
/// conversation (the history itself keeps everything within the retention), and its
/// `retention_days` is shown and checked.
#[tokio::test]
async fn an_agents_history_limits_bound_what_its_model_sees() {
    let model = support::fake_openai::FakeOpenAi::start("sk-limits").await;
    model.set_reply(|n, _| format!("answer {n}"));
    let w = World::start().await;
    let put = |body: Value| {
        let w = &w;
        async move {
            let r = w
                .wagate
                .admin(Method::PUT, "/v1/agents/brief")
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let backend = json!({"kind": "openai", "base_url": model.base_url, "model": "m",
                         "api_key": "sk-limits", "tools": false});
    let (status, agent) = put(json!({"backend": backend, "history_turns": 3})).await;
    assert_eq!(status, 200, "{agent}");
    assert_eq!(
        (&agent["history_turns"], &agent["retention_days"]),
        (&json!(3), &json!(90))
    );
    w.wagate.channel("brief", true).await;
    // The history and the new message, as the model sees them: roles and contents.
    let seen = |request: &Value| -> Vec<String> {
        request["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["content"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    for (i, text) in ["one", "two", "three"].into_iter().enumerate() {
        w.wagate
            .inbound("brief", &sid(i as u64 + 1), USER, text)
            .await;
        w.twilio.wait_for_sent(i + 1, WAIT).await;
    }
    let requests = model.wait_for_requests(3, WAIT).await;
    assert_eq!(
        seen(&requests[2]),
        ["answer 1", "two", "answer 2", "three"],
        "three turns of history, then the new message"
    );

    // About 4 characters a token: 3 tokens hold "answer 3" (8 characters) and nothing more.
    let (status, agent) = put(json!({"backend": backend, "history_tokens": 3})).await;
    assert_eq!(status, 200, "{agent}");
    assert_eq!(agent["history_turns"], 3, "kept when left out");
    w.wagate.inbound("brief", &sid(4), USER, "four").await;
    let requests = model.wait_for_requests(4, WAIT).await;
    assert_eq!(seen(&requests[3]), ["answer 3", "four"]);
    w.twilio.wait_for_sent(4, WAIT).await;
    assert_eq!(
        w.wagate.session_contents("brief", USER).await.len(),
        8,
        "the history itself keeps every turn"
    );

    for bad in [
        json!({"backend": backend, "retention_days": 0}),
        json!({"backend": backend, "history_turns": 10_001}),
    ] {
        let (status, answer) = put(bad.clone()).await;
        assert_eq!(status, 422, "{bad}: {answer}");
    }
}
