//! `wagate chat`, driven as a person would through its stdin and stdout, against a running
//! `wagate serve` (embedded mode): each typed line reaches the agent signed as Twilio signs, its
//! replies are printed as they come, and nothing is posted to Twilio (simulation mode).

use crate::support;

use std::{process::Stdio, time::Duration};

use support::harness::{ADMIN_TOKEN, Mode, World};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, Command},
};

fn chat(w: &World, agent: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_wagate"))
        .args(["chat", "--agent", agent, "--from", "+15555550123"])
        .env_clear()
        .env("WAGATE_ADMIN_URL", &w.wagate.admin_url)
        .env("WAGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn next_line(out: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> String {
    tokio::time::timeout(Duration::from_secs(15), out.next_line())
        .await
        .expect("chat printed nothing within 15s")
        .unwrap()
        .expect("chat closed its output")
}

#[tokio::test]
async fn a_person_chats_with_an_echo_agent_in_the_terminal() {
    let w = World::start_in(Mode::Embedded, &[]).await;
    w.wagate
        .agent("demo", serde_json::json!({"kind": "echo"}))
        .await;
    let mut child = chat(&w, "demo");
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(
        next_line(&mut out)
            .await
            .starts_with("chatting with demo as +15555550123")
    );
    for line in ["Hello agent", "¿Qué tal? 👋"] {
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        assert_eq!(next_line(&mut out).await, format!("demo> {line}"));
    }
    drop(stdin);
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());

    // The channel is in simulation mode, the replies are recorded, Twilio saw nothing.
    let channel = w.wagate.admin_json("/v1/agents/demo/whatsapp").await;
    assert_eq!(channel["simulation"], true);
    let outbox = w
        .wagate
        .admin_json("/v1/agents/demo/whatsapp/simulated/+15555550123")
        .await;
    let bodies: Vec<&str> = outbox["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["Hello agent", "¿Qué tal? 👋"]);
    assert!(
        w.twilio.requests().is_empty(),
        "simulation mode posts nothing to Twilio"
    );
    let session = w.wagate.session_contents("demo", "+15555550123").await;
    assert_eq!(
        session,
        ["Hello agent", "Hello agent", "¿Qué tal? 👋", "¿Qué tal? 👋"]
    );
    assert_eq!(
        w.wagate.leads("demo").await[0]["profile_name"],
        "wagate chat"
    );
}

#[tokio::test]
async fn chat_leaves_a_channel_that_posts_to_twilio_alone() {
    let w = World::start_in(Mode::Embedded, &[]).await;
    w.wagate.echo_agent("live").await;
    let child = chat(&w, "live");
    let out = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("posts to Twilio") && err.contains("simulation"),
        "{err}"
    );
    assert_eq!(
        w.wagate.admin_json("/v1/agents/live/whatsapp").await["simulation"],
        false
    );
    let missing = chat(&w, "nobody").wait_with_output().await.unwrap();
    assert!(String::from_utf8_lossy(&missing.stderr).contains("there is no agent 'nobody'"));
}
