//! The master key is checked against the data at start: a wrong (but well-formed) key is a
//! start-up error naming the mismatch, never a process that says ready and answers 503 to every
//! webhook; a rotation (new key, old one in `WAGATE_MASTER_KEY_PREVIOUS`) seals every stored
//! secret again, after which the new key alone runs everything. In both modes.

use crate::support;

use std::time::Duration;

use base64::Engine;
use support::{
    fake_twilio::FakeTwilio,
    harness::{ACCOUNT_SID, AUTH_TOKEN, Mode, Servers, Wagate, sid, test_master_key},
};

const USER: &str = "+14155550100";

fn other_key() -> String {
    base64::engine::general_purpose::STANDARD.encode([42u8; 64])
}

/// Starts `wagate serve` on the data of `servers` with these keys, expecting it to be refused.
async fn refused(servers: &Servers, twilio: &FakeTwilio, env: &[(&str, &str)]) -> String {
    match Wagate::try_start_role("serve", servers, &twilio.base_url, env).await {
        Ok(w) => panic!("wagate started with {env:?}:\n{}", w.logs()),
        Err(refused) => {
            assert!(!refused.status.success(), "{refused}");
            assert!(!refused.logs.contains("wagate ready"), "{refused}");
            assert!(!refused.logs.contains("panicked"), "{refused}");
            refused.logs
        }
    }
}

/// A message from the test user is accepted (its Auth Token opened) and answered (the sender
/// opened it too), counting the replies Twilio has received so far.
async fn answered(w: &Wagate, twilio: &FakeTwilio, n: u64) {
    let r = w
        .inbound("demo", &sid(n), USER, &format!("hello {n}"))
        .await;
    assert_eq!(r.status(), 200, "{}", w.logs());
    let body = format!("hello {n}");
    w.wait_until(Duration::from_secs(20), "the echo reply", || {
        twilio
            .sent()
            .iter()
            .any(|m| m.body.as_deref() == Some(body.as_str()))
    })
    .await;
}

async fn a_wrong_key_is_refused_and_a_rotation_finishes(mode: Mode) {
    let servers = Servers::start_in(mode).await;
    let twilio = FakeTwilio::start().await;
    twilio.add_account(ACCOUNT_SID, AUTH_TOKEN);
    let (k1, k2) = (test_master_key(), other_key());

    let mut w = Wagate::start(&servers, &twilio.base_url, &[("WAGATE_MASTER_KEY", &k1)]).await;
    w.echo_agent("demo").await;
    answered(&w, &twilio, 1).await;
    assert!(w.terminate().await.0);

    let logs = refused(&servers, &twilio, &[("WAGATE_MASTER_KEY", &k2)]).await;
    assert!(
        logs.contains("the master key does not match the one this data was written with")
            && logs.contains("WAGATE_MASTER_KEY"),
        "{logs}"
    );
    assert!(
        !logs.contains(&k1) && !logs.contains(&k2),
        "no key is printed: {logs}"
    );

    let rotating = [
        ("WAGATE_MASTER_KEY", k2.as_str()),
        ("WAGATE_MASTER_KEY_PREVIOUS", k1.as_str()),
    ];
    let mut w = Wagate::start(&servers, &twilio.base_url, &rotating).await;
    assert!(
        w.logs().contains("master key rotation finished"),
        "{}",
        w.logs()
    );
    answered(&w, &twilio, 2).await;
    assert!(w.terminate().await.0);

    // The new key alone opens everything: the check and the channel's Auth Token were sealed
    // again with it.
    let mut w = Wagate::start(&servers, &twilio.base_url, &[("WAGATE_MASTER_KEY", &k2)]).await;
    answered(&w, &twilio, 3).await;
    assert!(w.terminate().await.0);

    let logs = refused(&servers, &twilio, &[("WAGATE_MASTER_KEY", &k1)]).await;
    assert!(
        logs.contains("the master key does not match"),
        "the old key no longer fits the data: {logs}"
    );
}

#[tokio::test]
async fn a_wrong_key_is_refused_and_a_rotation_finishes_on_redis() {
    a_wrong_key_is_refused_and_a_rotation_finishes(Mode::Distributed).await;
}

#[tokio::test]
async fn a_wrong_key_is_refused_and_a_rotation_finishes_embedded() {
    a_wrong_key_is_refused_and_a_rotation_finishes(Mode::Embedded).await;
}
