//! The store contract: every test body is written once against `Arc<dyn Store>` and runs on
//! both backends (`<test>::embedded` on a temp folder, `<test>::redis` on a fresh redis-server),
//! so a behaviour that differs between them is a failing test. Redis runs it twice more:
//! `<test>::redis_cluster` on a Redis Cluster and `<test>::redis_sentinel` through Sentinel,
//! each shared by the tests of this binary, every test under a key prefix of its own.

use crate::support;

use std::{path::Path, sync::Arc, time::Duration};

use futures::{StreamExt, stream::BoxStream};
use shared::embedded::Embedded;
use shared::embedded::EmbeddedOptions;
use store::{
    Change, CompletedTurn, GuardState, Hold, LeadSighting, Pace, Pause, Role, SendLedger,
    SentMessage, SignatureFailure, Slot, Store, Turn, TurnStart,
    redis::{RedisStore, RedisTopology},
};
use support::{
    harness::{Servers, sid},
    redis_cluster::{RedisCluster, RedisSentinel, SENTINEL_MASTER},
};
use time::OffsetDateTime;
use twilio::status::{MessageStatus, StatusUpdate};
use wagate_core::window::WindowClocks;
use wagate_core::{
    agent::{Agent, Backend, WhatsAppChannel},
    crypto::Keyring,
    domain::{AgentId, MessageSid, PhoneNumber, SessionId, WhatsAppAddress},
    envelope::{OutboundReply, ReplyContent},
};

/// One backend under test, and how to open it again (a restart for the embedded store, a new
/// connection for Redis).
struct Rig {
    name: &'static str,
    kind: Kind,
    store: Option<Arc<dyn Store>>,
}

enum Kind {
    Embedded(tempfile::TempDir),
    Redis(Servers),
    Cluster(&'static RedisCluster, String),
    Sentinel(&'static RedisSentinel, String),
}

/// A key prefix no other test of this binary uses, on the shared cluster and Sentinel setup.
fn fresh_prefix() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("t{n}")
}

impl Rig {
    async fn embedded() -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(open_embedded(dir.path()).store);
        Rig {
            name: "embedded",
            kind: Kind::Embedded(dir),
            store: Some(store),
        }
    }

    async fn redis() -> Rig {
        let servers = Servers::start().await;
        let store = connect_redis(&servers).await;
        Rig {
            name: "redis",
            kind: Kind::Redis(servers),
            store: Some(store),
        }
    }

    async fn redis_cluster() -> Rig {
        let kind = Kind::Cluster(RedisCluster::shared().await, fresh_prefix());
        Rig {
            name: "redis cluster",
            store: Some(connect_kind(&kind).await),
            kind,
        }
    }

    async fn redis_sentinel() -> Rig {
        let kind = Kind::Sentinel(RedisSentinel::shared().await, fresh_prefix());
        Rig {
            name: "redis sentinel",
            store: Some(connect_kind(&kind).await),
            kind,
        }
    }

    /// `SCRIPT FLUSH` on every Redis server of the rig, as a restart would.
    async fn flush_scripts(&self) {
        let urls: Vec<String> = match &self.kind {
            Kind::Embedded(_) => vec![],
            Kind::Redis(servers) => vec![servers.redis_url.clone()],
            Kind::Cluster(c, _) => c.nodes.iter().map(|n| n.url()).collect(),
            Kind::Sentinel(s, _) => s.data.iter().map(|n| n.url()).collect(),
        };
        for url in urls {
            let client = redis::Client::open(url.as_str()).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let _: () = redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }

    fn store(&self) -> Arc<dyn Store> {
        self.store.clone().expect("open")
    }

    /// Drops this handle (the caller must have dropped its clones) and opens the store again.
    async fn reopen(&mut self) -> Arc<dyn Store> {
        self.store = None;
        let store: Arc<dyn Store> = match &self.kind {
            Kind::Embedded(dir) => Arc::new(open_embedded(dir.path()).store),
            kind => connect_kind(kind).await,
        };
        self.store = Some(store.clone());
        store
    }
}

async fn connect_kind(kind: &Kind) -> Arc<dyn Store> {
    let (url, topology, prefix) = match kind {
        Kind::Embedded(_) => unreachable!("not Redis"),
        Kind::Redis(servers) => return connect_redis(servers).await,
        Kind::Cluster(c, prefix) => (c.url(), RedisTopology::Cluster, prefix),
        Kind::Sentinel(s, prefix) => (
            s.url(),
            RedisTopology::Sentinel {
                sentinels: s.sentinels().split(',').map(str::to_owned).collect(),
                master: SENTINEL_MASTER.into(),
            },
            prefix,
        ),
    };
    Arc::new(
        RedisStore::connect_to(&url, &topology, prefix)
            .await
            .expect("connect to Redis"),
    )
}

async fn connect_redis(servers: &Servers) -> Arc<dyn Store> {
    Arc::new(
        RedisStore::connect(&servers.redis_url, "wagate")
            .await
            .expect("connect to Redis"),
    )
}

/// Opens the embedded file; a handle dropped just before has released it (its last handle
/// waits for the writer thread to finish).
fn open_embedded(dir: &Path) -> Embedded {
    let options = EmbeddedOptions {
        duplicate_window: Duration::from_secs(600),
    };
    Embedded::open(dir, options).unwrap_or_else(|e| panic!("open embedded: {e}"))
}

/// Runs each named test body on both backends, as `<name>::embedded` and `<name>::redis`, and
/// on Redis Cluster and Sentinel as `<name>::redis_cluster` and `<name>::redis_sentinel`.
macro_rules! on_both {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$test(super::Rig::embedded().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                super::$test(super::Rig::redis().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis_cluster() {
                super::$test(super::Rig::redis_cluster().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis_sentinel() {
                super::$test(super::Rig::redis_sentinel().await).await;
            }
        }
    )*};
}

on_both!(
    a_senders_pace_holds_its_rate_and_lets_live_sends_first,
    agents_channels_and_change_notifications,
    history_window_and_order,
    a_turn_completes_once_under_concurrency,
    a_turn_begins_with_earlier_answers_leads_window_and_history,
    leads_count_each_message_once,
    leads_are_listed_by_first_contact,
    window_and_opt_out_never_go_back,
    send_guard_states_and_lease,
    send_guard_is_claimed_once_under_concurrency,
    a_send_guard_is_renewed_only_by_its_holder,
    a_message_found_in_twilios_list_settles_one_part_only,
    a_first_part_is_claimed_with_the_window_clocks,
    sent_parts_round_trip,
    a_sessions_sent_messages_are_listed_with_their_statuses,
    statuses_only_move_forward,
    failures_are_counted_and_cleared,
    the_simulated_outbox_keeps_order_and_reads_from_an_index,
    everything_survives_reopen,
    the_key_check_is_written_once_and_replaced_only_as_it_was_read,
    forgetting_a_session_keeps_what_is_not_the_conversation,
    erasing_a_user_removes_everything_of_theirs_and_nothing_else,
    deleting_an_agent_removes_it_and_tells_every_cache,
    signature_failures_are_kept_per_agent_and_go_with_it,
    a_pause_is_read_with_the_turn_replaced_and_lifted,
    a_content_sid_is_cached_once_and_survives_reopen,
    a_completed_turn_keeps_its_quick_replies,
    history_older_than_its_retention_is_dropped,
    a_leads_opt_out_shows_in_the_list,
);

/// A sender's pace (a GCRA): a send with the tolerance of one interval (a live reply) gets one
/// message of burst and the slot before a send with less (bulk); senders are paced apart; and
/// sends racing for one sender from several tasks get no more than the rate.
async fn a_senders_pace_holds_its_rate_and_lets_live_sends_first(rig: Rig) {
    let store = rig.store();
    let name = rig.name;
    let interval = Duration::from_millis(400);
    let live = Pace {
        interval,
        tolerance: interval,
        grace: Duration::ZERO,
    };
    let bulk = Pace {
        interval,
        tolerance: interval / 2,
        grace: Duration::ZERO,
    };
    let take = |sender: &'static str, pace: Pace| {
        let store = store.clone();
        async move { store.take_send_slot(sender, pace, 1).await.unwrap() }
    };
    assert_eq!(take("AC1:+1555", bulk).await, Slot::Go(1), "{name}: idle");
    // The next bulk send waits until the schedule is half an interval ahead; a live one may
    // go now, once (the burst of one message), and then waits less than the bulk one.
    let Slot::Wait(bulk_wait) = take("AC1:+1555", bulk).await else {
        panic!("{name}: a second bulk send went at once");
    };
    assert!(
        bulk_wait > Duration::ZERO && bulk_wait <= interval / 2,
        "{name}: {bulk_wait:?}"
    );
    assert_eq!(
        take("AC1:+1555", live).await,
        Slot::Go(1),
        "{name}: the burst"
    );
    let (Slot::Wait(live_wait), Slot::Wait(bulk_wait)) =
        (take("AC1:+1555", live).await, take("AC1:+1555", bulk).await)
    else {
        panic!("{name}: a send went beyond the burst");
    };
    assert!(
        live_wait <= interval && bulk_wait >= live_wait + interval / 2 - interval / 8,
        "{name}: the live send waits less: {live_wait:?} against {bulk_wait:?}"
    );
    // Another sender has a pace of its own.
    assert_eq!(
        take("AC1:+1666", bulk).await,
        Slot::Go(1),
        "{name}: another sender"
    );
    // A grace of one interval is a burst of one as a tolerance is: two at once, then the rate.
    let graced = Pace {
        interval,
        tolerance: Duration::ZERO,
        grace: interval,
    };
    assert_eq!(take("AC1:+1888", graced).await, Slot::Go(1), "{name}: idle");
    assert_eq!(
        take("AC1:+1888", graced).await,
        Slot::Go(1),
        "{name}: grace"
    );
    assert!(
        matches!(take("AC1:+1888", graced).await, Slot::Wait(_)),
        "{name}: beyond the burst"
    );

    // A line of sends takes what the tolerance holds in one call, no more, and then waits.
    let window = Pace {
        interval: Duration::from_secs(1),
        tolerance: Duration::from_secs(4),
        grace: Duration::ZERO,
    };
    assert_eq!(
        store.take_send_slot("AC1:+1999", window, 10).await.unwrap(),
        Slot::Go(5),
        "{name}: the window's slots at once"
    );
    assert!(
        matches!(
            store.take_send_slot("AC1:+1999", window, 10).await.unwrap(),
            Slot::Wait(_)
        ),
        "{name}: nothing beyond the window"
    );
    assert_eq!(
        store.take_send_slot("AC1:+2000", window, 2).await.unwrap(),
        Slot::Go(2),
        "{name}: no more than wanted"
    );

    // Four tasks racing for one sender for a while get the rate, and no more.
    let fast = Pace {
        interval: Duration::from_millis(50),
        tolerance: Duration::from_millis(25),
        grace: Duration::from_millis(25),
    };
    let started = std::time::Instant::now();
    let run_for = Duration::from_millis(1500);
    let racers = (0..4).map(|_| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut sent = Vec::new();
            while started.elapsed() < run_for {
                match store.take_send_slot("AC1:+1777", fast, 1).await.unwrap() {
                    Slot::Go(_) => sent.push(started.elapsed()),
                    Slot::Wait(wait) => tokio::time::sleep(wait).await,
                }
            }
            sent
        })
    });
    let mut sent: Vec<Duration> = futures::future::join_all(racers)
        .await
        .into_iter()
        .flat_map(Result::unwrap)
        .collect();
    sent.sort();
    let last = *sent.last().expect("some sends");
    // The n-th send goes no earlier than (n - 1) intervals less the tolerance and the grace
    // after the first.
    let most = (last.as_micros() + 50_000) / 50_000 + 1;
    assert!(
        sent.len() as u128 <= most,
        "{name}: {} sends in {last:?}: more than the rate",
        sent.len()
    );
    assert!(
        sent.len() >= 20,
        "{name}: only {} sends in {last:?} (30 at the rate)",
        sent.len()
    );
}

/// A lead shows whether its user opted out, and when, as the conversation's clocks say; an
/// opt-out of someone who is no lead makes none.
async fn a_leads_opt_out_shows_in_the_list(rig: Rig) {
    let (store, n) = (rig.store(), rig.name);
    let s = session("a1", "+14155550100");
    let message = msid(1);
    sight(
        &store,
        &LeadSighting {
            session: &s,
            message_sid: &message,
            profile_name: None,
            at: at(10),
        },
    )
    .await;
    let lead = || async { store.leads(&agent_id("a1")).await.unwrap().remove(0) };
    assert_eq!(
        (lead().await.opted_out, lead().await.opted_out_at),
        (false, None),
        "{n}"
    );
    store.opt_out(&s, at(20)).await.unwrap();
    assert_eq!(
        (lead().await.opted_out, lead().await.opted_out_at),
        (true, Some(at(20))),
        "{n}"
    );
    store.opt_out(&s, at(15)).await.unwrap();
    assert_eq!(lead().await.opted_out_at, Some(at(20)), "{n}: never back");
    store.opt_in(&s, at(30)).await.unwrap();
    assert_eq!(
        (lead().await.opted_out, lead().await.opted_out_at),
        (false, None),
        "{n}"
    );
    store.opt_out(&s, at(40)).await.unwrap();
    assert_eq!(lead().await.opted_out_at, Some(at(40)), "{n}");
    store
        .opt_out(&session("a1", "+14155550199"), at(50))
        .await
        .unwrap();
    assert_eq!(store.leads(&agent_id("a1")).await.unwrap().len(), 1, "{n}");
}

/// A cached Content API sid: absent until cached, the first sid cached stands against a later
/// one and against racing senders, it is one key's only, and it survives a reopen.
async fn a_content_sid_is_cached_once_and_survives_reopen(mut rig: Rig) {
    let n = rig.name;
    let store = rig.store();
    let (first, second) = (
        format!("HX{}", "a1".repeat(16)),
        format!("HX{}", "b2".repeat(16)),
    );
    assert_eq!(store.content_sid("k1").await.unwrap(), None, "{n}");
    assert_eq!(
        store.cache_content_sid("k1", &first).await.unwrap(),
        first,
        "{n}"
    );
    assert_eq!(
        store.cache_content_sid("k1", &second).await.unwrap(),
        first,
        "{n}: the first content stands"
    );
    assert_eq!(
        store.content_sid("k1").await.unwrap(),
        Some(first.clone()),
        "{n}"
    );
    assert_eq!(store.content_sid("k2").await.unwrap(), None, "{n}");

    let racers: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let sid = format!("HX{i:032x}");
                store.cache_content_sid("k3", &sid).await.unwrap()
            })
        })
        .collect();
    let mut standing = Vec::new();
    for racer in racers {
        standing.push(racer.await.unwrap());
    }
    assert!(
        standing.iter().all(|s| *s == standing[0]),
        "{n}: {standing:?}"
    );

    drop(store);
    let store = rig.reopen().await;
    assert_eq!(store.content_sid("k1").await.unwrap(), Some(first), "{n}");
    assert_eq!(
        store.content_sid("k3").await.unwrap(),
        Some(standing[0].clone()),
        "{n}"
    );
}

/// The choices an agent offered stay with the completed turn's record, so a redelivered
/// message republishes them.
async fn a_completed_turn_keeps_its_quick_replies(rig: Rig) {
    let n = rig.name;
    let store = rig.store();
    let s = session("a1", "+14155550100");
    let record = CompletedTurn {
        reply_id: "in-1".into(),
        reply: "Shall I?".into(),
        media: Vec::new(),
        handoff: false,
        quick_replies: vec!["Yes".into(), "No".into()],
    };
    let key = sid(1);
    let stands = store
        .complete_turn(
            &s,
            std::slice::from_ref(&key),
            &[turn(Role::Assistant, "Shall I?", 1)],
            &record,
            KEEP,
        )
        .await
        .unwrap();
    assert_eq!(stands, record, "{n}");
    assert_eq!(answered(&store, &s, &key).await, Some(record), "{n}");
}

/// Turns older than the retention are dropped at the next completion (the new ones stay,
/// whatever their order), and a conversation left alone for the whole retention is gone.
async fn history_older_than_its_retention_is_dropped(rig: Rig) {
    let (store, n) = (rig.store(), rig.name);
    let s = session("a1", "+14155550100");
    let record = |i: u64| CompletedTurn {
        reply_id: format!("in-{i}"),
        reply: String::new(),
        media: Vec::new(),
        handoff: false,
        quick_replies: Vec::new(),
    };
    let old = [
        turn(Role::User, "in 2023", 0),
        turn(Role::Assistant, "also 2023", 1),
    ];
    store
        .complete_turn(&s, &[sid(1)], &old, &record(1), KEEP)
        .await
        .unwrap();
    assert_eq!(store.history(&s, 10).await.unwrap(), old, "{n}: kept");
    let now = OffsetDateTime::now_utc();
    let fresh = [
        Turn::new(Role::User, "today".into(), now),
        Turn::new(Role::Assistant, "today too".into(), now),
    ];
    let day = Duration::from_secs(86_400);
    store
        .complete_turn(&s, &[sid(2)], &fresh, &record(2), day)
        .await
        .unwrap();
    assert_eq!(
        store.history(&s, 10).await.unwrap(),
        fresh,
        "{n}: the 2023 turns are past a day's retention"
    );

    let brief = session("a1", "+14155550101");
    store
        .complete_turn(
            &brief,
            &[sid(3)],
            &fresh,
            &record(3),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut i = 10;
    loop {
        // Any write gives the embedded store its chance to purge.
        i += 1;
        store
            .complete_turn(&s, &[sid(i)], &[], &record(i), day)
            .await
            .unwrap();
        if store.history(&brief, 10).await.unwrap().is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{n}: a conversation past its retention is dropped whole"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(store.history(&s, 10).await.unwrap(), fresh, "{n}");
}

/// A conversation's pause comes with the turn that begins while it stands (no round trip of
/// its own), a new pause replaces it, resuming lifts it, and it concerns one conversation.
async fn a_pause_is_read_with_the_turn_replaced_and_lifted(mut rig: Rig) {
    let n = rig.name;
    let store = rig.store();
    let s = session("a1", "+14155550100");
    let other = session("a1", "+14155550101");
    let message = msid(1);
    let sighting = LeadSighting {
        session: &s,
        message_sid: &message,
        profile_name: None,
        at: at(10),
    };
    assert_eq!(store.pause(&s).await.unwrap(), None, "{n}");
    let by_agent = Pause::new("agent", at(5));
    store.set_pause(&s, Some(&by_agent)).await.unwrap();
    let start = store
        .begin_turn(&s, std::slice::from_ref(&sighting), 10)
        .await
        .unwrap();
    assert_eq!(start.pause.as_ref(), Some(&by_agent), "{n}");
    assert_eq!(store.pause(&other).await.unwrap(), None, "{n}");

    let mut by_person = Pause::new("Grace", at(5));
    by_person.active_at = at(50);
    store.set_pause(&s, Some(&by_person)).await.unwrap();
    drop(store);
    let store = rig.reopen().await;
    assert_eq!(store.pause(&s).await.unwrap(), Some(by_person), "{n}");

    store.set_pause(&s, None).await.unwrap();
    let start = store.begin_turn(&s, &[sighting], 10).await.unwrap();
    assert_eq!(start.pause, None, "{n}");
    store.set_pause(&s, None).await.unwrap();
}

/// The master key check: the first check offered stands for every later one, a replacement
/// applies only over the check it was made from, and the check survives a reopen.
async fn the_key_check_is_written_once_and_replaced_only_as_it_was_read(mut rig: Rig) {
    let n = rig.name;
    let store = rig.store();
    let ring = || Keyring::from_base64(&Keyring::generate_key(), &[]).unwrap();
    let (first, second) = (ring().seal_key_check(), ring().seal_key_check());
    assert_eq!(store.key_check(&first).await.unwrap(), first, "{n}");
    assert_eq!(
        store.key_check(&second).await.unwrap(),
        first,
        "{n}: the stored check stands"
    );
    assert!(
        !store.replace_key_check(&second, &second).await.unwrap(),
        "{n}: not over a check that is not stored"
    );
    assert!(
        store.replace_key_check(&first, &second).await.unwrap(),
        "{n}"
    );
    drop(store);
    let store = rig.reopen().await;
    assert_eq!(store.key_check(&first).await.unwrap(), second, "{n}");
}

fn agent_id(id: &str) -> AgentId {
    AgentId::parse(id).unwrap()
}

fn session(agent: &str, phone: &str) -> SessionId {
    SessionId::for_phone(&agent_id(agent), &PhoneNumber::parse(phone).unwrap())
}

fn msid(n: u64) -> MessageSid {
    MessageSid::parse(&sid(n)).unwrap()
}

/// History kept long enough that the fixed times of these tests (2023) are not dropped.
const KEEP: Duration = Duration::from_secs(100 * 365 * 86_400);

/// A time on a whole millisecond, as both stores keep times.
fn at(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(1_700_000_000_000 + ms) * 1_000_000)
        .unwrap()
}

/// A message seen as the worker sees it: a turn begun over it alone, which counts it toward its
/// user's lead and moves the window clock (the store's one way to do either).
async fn sight(store: &Arc<dyn Store>, sighting: &LeadSighting<'_>) -> TurnStart {
    store
        .begin_turn(sighting.session, std::slice::from_ref(sighting), 0)
        .await
        .unwrap()
}

/// The message `n` of `s`, written at `ms`, seen as the worker sees it ([`sight`]).
async fn message_at(store: &Arc<dyn Store>, s: &SessionId, n: u64, ms: i64) {
    let message = msid(n);
    let sighting = LeadSighting {
        session: s,
        message_sid: &message,
        profile_name: None,
        at: at(ms),
    };
    sight(store, &sighting).await;
}

/// The record of the turn that answered the message `key` of `s`, as a redelivery of that
/// message finds it. Seen at the epoch, so that asking moves no window clock; a message never
/// seen before becomes a lead's, so a test that counts leads asks after counting.
async fn answered(store: &Arc<dyn Store>, s: &SessionId, key: &str) -> Option<CompletedTurn> {
    let message = MessageSid::parse(key).unwrap();
    let sighting = LeadSighting {
        session: s,
        message_sid: &message,
        profile_name: None,
        at: OffsetDateTime::UNIX_EPOCH,
    };
    sight(store, &sighting).await.completed.remove(0)
}

fn agent(id: &str, name: &str) -> Agent {
    Agent {
        id: agent_id(id),
        name: name.into(),
        backend: Backend::Echo,
        handoff_resume_after_s: 60,
        retention_days: 90,
        history_turns: None,
        history_tokens: None,
        typing_indicator: true,
        events: None,
        created_at: at(0),
        updated_at: at(1),
    }
}

fn channel(enabled: bool) -> WhatsAppChannel {
    serde_json::from_value(serde_json::json!({
        "account_sid": "AC0123456789abcdef0123456789abcdef",
        "auth_token": "v1.k1.nonce.ciphertext",
        "phone_number": "+14155238886",
        "enabled": enabled,
        "updated_at": "2024-01-02T03:04:05Z",
    }))
    .unwrap()
}

fn json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap()
}

fn turn(role: Role, content: &str, ms: i64) -> Turn {
    Turn::new(role, content.into(), at(ms))
}

fn reply(id: &str, text: &str) -> OutboundReply {
    OutboundReply {
        id: id.into(),
        agent_id: agent_id("a1"),
        to: WhatsAppAddress::parse("whatsapp:+14155550100").unwrap(),
        content: ReplyContent::Text {
            parts: vec![text.into()],
        },
        created_at: at(5),
        answers_received_at: None,
        media: Vec::new(),
        quick_replies: Vec::new(),
        traceparent: None,
        callback_base: None,
        bulk: false,
    }
}

/// Which kind of claim a guard answered, the holder's token aside.
#[derive(Debug, PartialEq)]
enum State {
    Claimed,
    Reclaimed,
}

/// Asserts the kind of claim, and returns its hold.
#[track_caller]
fn assert_state(actual: GuardState, expected: State, what: &str) -> Hold {
    let (kind, hold) = match &actual {
        GuardState::Claimed(hold) => (Some(State::Claimed), Some(*hold)),
        GuardState::Reclaimed(hold) => (Some(State::Reclaimed), Some(*hold)),
        _ => (None, None),
    };
    assert_eq!(kind, Some(expected), "{what}: {actual:?}");
    hold.unwrap_or_else(|| panic!("{what}: {actual:?}"))
}

async fn next_change(changes: &mut BoxStream<'static, Change>, n: &str) -> Change {
    tokio::time::timeout(Duration::from_secs(10), changes.next())
        .await
        .unwrap_or_else(|_| panic!("{n}: no change notification within 10s"))
        .unwrap_or_else(|| panic!("{n}: change stream ended"))
}

async fn agents_channels_and_change_notifications(rig: Rig) {
    let (store, n) = (rig.store(), rig.name);
    store
        .ready()
        .await
        .unwrap_or_else(|e| panic!("{n}: ready: {e}"));
    let mut changes = store.changes().await.unwrap();
    assert_eq!(
        next_change(&mut changes, n).await,
        Change::All,
        "{n}: first, drop all"
    );

    assert!(store.agent(&agent_id("a1")).await.unwrap().is_none(), "{n}");
    assert!(store.agents().await.unwrap().is_empty(), "{n}");
    store.put_agent(&agent("b2", "Bee")).await.unwrap();
    store.put_agent(&agent("a1", "Ay")).await.unwrap();
    assert_eq!(
        next_change(&mut changes, n).await,
        Change::Agent(agent_id("b2")),
        "{n}"
    );
    assert_eq!(
        next_change(&mut changes, n).await,
        Change::Agent(agent_id("a1")),
        "{n}"
    );
    let got = store.agent(&agent_id("a1")).await.unwrap().expect("stored");
    assert_eq!(json(&got), json(&agent("a1", "Ay")), "{n}: round trip");
    let names: Vec<String> = store
        .agents()
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert_eq!(names, ["Ay", "Bee"], "{n}: by id");
    store.put_agent(&agent("a1", "Ay again")).await.unwrap();
    assert_eq!(
        next_change(&mut changes, n).await,
        Change::Agent(agent_id("a1")),
        "{n}"
    );
    assert_eq!(
        store.agents().await.unwrap().len(),
        2,
        "{n}: replaced, not added"
    );
    assert_eq!(
        store.agent(&agent_id("a1")).await.unwrap().unwrap().name,
        "Ay again",
        "{n}"
    );

    assert!(
        store.channel(&agent_id("a1")).await.unwrap().is_none(),
        "{n}"
    );
    store
        .put_channel(&agent_id("a1"), &channel(true))
        .await
        .unwrap();
    assert_eq!(
        next_change(&mut changes, n).await,
        Change::Agent(agent_id("a1")),
        "{n}"
    );
    let got = store
        .channel(&agent_id("a1"))
        .await
        .unwrap()
        .expect("stored");
    assert_eq!(json(&got), json(&channel(true)), "{n}");
    store
        .put_channel(&agent_id("a1"), &channel(false))
        .await
        .unwrap();
    assert_eq!(
        next_change(&mut changes, n).await,
        Change::Agent(agent_id("a1")),
        "{n}"
    );
    assert!(
        !store
            .channel(&agent_id("a1"))
            .await
            .unwrap()
            .unwrap()
            .enabled,
        "{n}"
    );
    assert!(
        store.channel(&agent_id("b2")).await.unwrap().is_none(),
        "{n}"
    );

    // A second subscriber gets its own "drop all", then the same notifications.
    let mut other = store.changes().await.unwrap();
    assert_eq!(next_change(&mut other, n).await, Change::All, "{n}");
    store.put_agent(&agent("b2", "Bee")).await.unwrap();
    assert_eq!(
        next_change(&mut other, n).await,
        Change::Agent(agent_id("b2")),
        "{n}"
    );
    assert_eq!(
        next_change(&mut changes, n).await,
        Change::Agent(agent_id("b2")),
        "{n}"
    );
}

async fn history_window_and_order(rig: Rig) {
    let (store, n) = (rig.store(), rig.name);
    let s = session("a1", "+14155550100");
    assert!(store.history(&s, 10).await.unwrap().is_empty(), "{n}");
    let mut all = Vec::new();
    for i in 0..4i64 {
        let turns = [
            turn(Role::User, &format!("q{i}"), i * 10),
            turn(Role::Assistant, &format!("a{i}"), i * 10 + 1),
        ];
        let record = CompletedTurn {
            reply_id: format!("in-{i}"),
            reply: format!("a{i}"),
            media: Vec::new(),
            handoff: false,
            quick_replies: Vec::new(),
        };
        let key = sid(100 + i as u64);
        let stood = store
            .complete_turn(&s, &[key], &turns, &record, KEEP)
            .await
            .unwrap();
        assert_eq!(stood, record, "{n}");
        all.extend(turns);
    }
    assert_eq!(
        store.history(&s, usize::MAX).await.unwrap(),
        all,
        "{n}: all, in order"
    );
    assert_eq!(store.history(&s, 100).await.unwrap(), all, "{n}");
    assert_eq!(
        store.history(&s, 3).await.unwrap(),
        all[5..],
        "{n}: the last three"
    );
    assert_eq!(store.history(&s, 1).await.unwrap(), all[7..], "{n}");
    assert!(
        store.history(&s, 0).await.unwrap().is_empty(),
        "{n}: none asked"
    );
    let other = session("a1", "+14155550101");
    assert!(
        store.history(&other, 10).await.unwrap().is_empty(),
        "{n}: per session"
    );
    let other_agent = session("b2", "+14155550100");
    assert!(
        store.history(&other_agent, 10).await.unwrap().is_empty(),
        "{n}: per agent"
    );
}

async fn a_turn_completes_once_under_concurrency(rig: Rig) {
    let (store, n) = (rig.store(), rig.name);
    let s = session("a1", "+14155550100");
    let first = sid(1);
    assert!(answered(&store, &s, &first).await.is_none(), "{n}");
    let calls = (0..20).map(|i| {
        let (store, s, first) = (store.clone(), s.clone(), first.clone());
        tokio::spawn(async move {
            let keys = [first, sid(1000 + i), sid(2000 + i)];
            let turns = [
                turn(Role::User, "hello", 0),
                turn(Role::Assistant, &format!("reply {i}"), 1),
            ];
            let record = CompletedTurn {
                reply_id: format!("in-{i}"),
                reply: format!("reply {i}"),
                media: Vec::new(),
                handoff: false,
                quick_replies: Vec::new(),
            };
            store
                .complete_turn(&s, &keys, &turns, &record, KEEP)
                .await
                .unwrap()
        })
    });
    let results: Vec<CompletedTurn> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let winner = results[0].clone();
    assert!(
        results.iter().all(|r| *r == winner),
        "{n}: one record stands: {results:?}"
    );
    let i: u64 = winner.reply_id.trim_start_matches("in-").parse().unwrap();
    let history = store.history(&s, usize::MAX).await.unwrap();
    assert_eq!(
        history,
        [
            turn(Role::User, "hello", 0),
            turn(Role::Assistant, &winner.reply, 1)
        ],
        "{n}: exactly one set of turns"
    );
    for key in [first, sid(1000 + i), sid(2000 + i)] {
        assert_eq!(
            answered(&store, &s, &key).await,
            Some(winner.clone()),
            "{n}: every key of the winner resolves"
        );
    }
    let loser = if i == 0 { 1 } else { 0 };
    assert!(
        answered(&store, &s, &sid(1000 + loser)).await.is_none(),
        "{n}: a loser's keys are not recorded"
    );
    let other = session("a1", "+14155550101");
    assert!(
        answered(&store, &other, &sid(1)).await.is_none(),
        "{n}: per session"
    );
    let none: [String; 0] = [];
    assert!(
        store
            .complete_turn(&s, &none, &[], &winner, KEEP)
            .await
            .is_err(),
        "{n}: a turn needs a key"
    );
}

async fn a_turn_begins_with_earlier_answers_leads_window_and_history(rig: Rig) {
    let (store, n) = (rig.store(), rig.name);
    let s = session("a1", "+14155550100");
    let sids: Vec<MessageSid> = (1..=3).map(msid).collect();
    let sighting = |i: usize, ms: i64, name: Option<&'static str>| LeadSighting {
        session: &s,
        message_sid: &sids[i],
        profile_name: name,
        at: at(ms),
    };
    let earlier = CompletedTurn {
        reply_id: "in-1".into(),
        reply: "first answer".into(),
        media: Vec::new(),
        handoff: false,
        quick_replies: Vec::new(),
    };
    let turns = [
        turn(Role::User, "one", 0),
        turn(Role::Assistant, "first answer", 1),
    ];
    store
        .complete_turn(&s, &[sid(1)], &turns, &earlier, KEEP)
        .await
        .unwrap();

    let batch = [
        sighting(0, 10, Some("Ada")),
        sighting(1, 30, None),
        sighting(2, 20, Some("Ada L.")),
    ];
    let start = store.begin_turn(&s, &batch, 10).await.unwrap();
    assert_eq!(
        start,
        TurnStart {
            completed: vec![Some(earlier.clone()), None, None],
            history: turns.to_vec(),
            pause: None,
            new_lead: true,
        },
        "{n}: the answered message is told apart, the history is read"
    );
    assert_eq!(
        store.last_inbound(&s).await.unwrap(),
        Some(at(30)),
        "{n}: the clock moves to the latest message, not the last of the batch"
    );
    let lead = store.leads(&agent_id("a1")).await.unwrap().remove(0);
    assert_eq!(
        (
            lead.message_count,
            lead.first_seen,
            lead.last_seen,
            lead.profile_name.as_deref()
        ),
        (3, at(10), at(30), Some("Ada L.")),
        "{n}: every message counted toward the lead"
    );

    // The same batch again (a redelivery) counts nothing and moves nothing; on Redis, after
    // the scripts were lost (as after a restart), so they are loaded again.
    rig.flush_scripts().await;
    let again = store.begin_turn(&s, &batch, 1).await.unwrap();
    assert_eq!(again.completed, start.completed, "{n}");
    assert!(!again.new_lead, "{n}: made once");
    assert_eq!(again.history, turns[1..], "{n}: the last turn only");
    assert_eq!(
        store
            .begin_turn(&s, &batch, usize::MAX)
            .await
            .unwrap()
            .history,
        turns,
        "{n}: as much history as there is"
    );
    let lead = store.leads(&agent_id("a1")).await.unwrap().remove(0);
    assert_eq!(lead.message_count, 3, "{n}: counted once per sid");

    // An older message does not move the clock back; no history wanted, none read.
    let late = store
        .begin_turn(&s, &[sighting(1, 5, None)], 0)
        .await
        .unwrap();
    assert!(late.history.is_empty(), "{n}");
    assert_eq!(store.last_inbound(&s).await.unwrap(), Some(at(30)), "{n}");

    // Every message answered before: no history is needed.
    let answered = store
        .begin_turn(&s, &[sighting(0, 10, None)], 10)
        .await
        .unwrap();
    assert_eq!(
        answered,
        TurnStart {
            completed: vec![Some(earlier)],
            history: vec![],
            pause: None,
            new_lead: false,
        },
        "{n}"
    );

    let none = store.begin_turn(&s, &[], 10).await.unwrap();
    assert!(none.completed.is_empty() && none.history.is_empty(), "{n}");
    let other = session("a1", "+14155550101");
    let foreign = LeadSighting {
        session: &other,
        message_sid: &sids[0],
        profile_name: None,
        at: at(40),
    };
    assert!(
        store.begin_turn(&s, &[foreign], 10).await.is_err(),
        "{n}: the messages of one session only"
    );
    assert_eq!(
        store.last_inbound(&other).await.unwrap(),
        None,
        "{n}: a refused call changes nothing"
    );
}

async fn leads_count_each_message_once(rig: Rig) {
    let (store, n) = (rig.store(), rig.name);
    let s = session("a1", "+14155550100");
    let sightings = (0..50u64).map(|i| {
        let (store, s) = (store.clone(), s.clone());
        tokio::spawn(async move {
            let message_sid = msid(i);
            // Out of order: the earliest and the latest arrive in the middle.
            let ms = match i {
                25 => -5_000,
                26 => 90_000,
                _ => i as i64 * 100,
            };
            let name = (i == 7).then_some("Ada");
            sight(
                &store,
                &LeadSighting {
                    session: &s,
                    message_sid: &message_sid,
                    profile_name: name,
                    at: at(ms),
                },
            )
            .await;
        })
    });
    for t in futures::future::join_all(sightings).await {
        t.unwrap();
    }
    let leads = store.leads(&agent_id("a1")).await.unwrap();
    assert_eq!(leads.len(), 1, "{n}: one lead per user: {leads:?}");
    let lead = &leads[0];
    assert_eq!(lead.message_count, 50, "{n}");
    assert_eq!(
        (lead.phone.as_str(), lead.platform.as_str()),
        ("+14155550100", "whatsapp")
    );
    assert_eq!(
        (lead.first_seen, lead.last_seen),
        (at(-5_000), at(90_000)),
        "{n}: min/max"
    );
    assert_eq!(
        lead.profile_name.as_deref(),
        Some("Ada"),
        "{n}: a missing name keeps it"
    );

    // The same message again (a redelivery) is not counted.
    for _ in 0..2 {
        sight(
            &store,
            &LeadSighting {
                session: &s,
                message_sid: &msid(3),
                profile_name: Some("Ignored"),
                at: at(200_000),
            },
        )
        .await;
    }
    let lead = store.leads(&agent_id("a1")).await.unwrap().remove(0);
    assert_eq!(lead.message_count, 50, "{n}: counted once per sid");
    assert_eq!(lead.last_seen, at(90_000), "{n}: a repeat changes nothing");
    assert_eq!(lead.profile_name.as_deref(), Some("Ada"), "{n}");

    sight(
        &store,
        &LeadSighting {
            session: &s,
            message_sid: &msid(60),
            profile_name: Some("Ada L."),
            at: at(100_000),
        },
    )
    .await;
    let lead = store.leads(&agent_id("a1")).await.unwrap().remove(0);
    assert_eq!(
        (
            lead.message_count,
            lead.last_seen,
            lead.profile_name.as_deref()
        ),
        (51, at(100_000), Some("Ada L.")),
        "{n}: the latest name"
    );
    assert!(
        store.leads(&agent_id("b2")).await.unwrap().is_empty(),
        "{n}: per agent"
    );
}

async fn leads_are_listed_by_first_contact(rig: Rig) {
    let (store, n) = (rig.store(), rig.name);
    let see = |phone: &'static str, sid_n: u64, ms: i64, agent: &'static str| {
        let store = store.clone();
        async move {
            sight(
                &store,
                &LeadSighting {
                    session: &session(agent, phone),
                    message_sid: &msid(sid_n),
                    profile_name: None,
                    at: at(ms),
                },
            )
            .await;
        }
    };
    see("+14155550103", 1, 300, "a1").await;
    see("+14155550101", 2, 100, "a1").await;
    see("+14155550102", 3, 200, "a1").await;
    see("+14155550109", 4, 50, "a10").await;
    // An earlier message recorded late moves the lead to the front.
    see("+14155550103", 5, 10, "a1").await;
    let phones: Vec<String> = store
        .leads(&agent_id("a1"))
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.phone)
        .collect();
    assert_eq!(
        phones,
        ["+14155550103", "+14155550101", "+14155550102"],
        "{n}"
    );
    let lead = store.leads(&agent_id("a1")).await.unwrap().remove(0);
    assert_eq!(
        (lead.first_seen, lead.last_seen, lead.profile_name),
        (at(10), at(300), None)
    );
    assert_eq!(
        store.leads(&agent_id("a10")).await.unwrap().len(),
        1,
        "{n}: per agent"
    );
}

async fn window_and_opt_out_never_go_back(rig: Rig) {
    let (store, n) = (rig.store(), rig.name);
    let s = session("a1", "+14155550100");
    assert_eq!(store.last_inbound(&s).await.unwrap(), None, "{n}");
    assert_eq!(store.opted_out_at(&s).await.unwrap(), None, "{n}");
    message_at(&store, &s, 1, 1_000).await;
    message_at(&store, &s, 2, 500).await;
    assert_eq!(
        store.last_inbound(&s).await.unwrap(),
        Some(at(1_000)),
        "{n}: not back"
    );
    message_at(&store, &s, 3, 2_000).await;
    assert_eq!(
        store.last_inbound(&s).await.unwrap(),
        Some(at(2_000)),
        "{n}: forward"
    );
    store.opt_out(&s, at(3_000)).await.unwrap();
    store.opt_out(&s, at(2_500)).await.unwrap();
    assert_eq!(
        store.opted_out_at(&s).await.unwrap(),
        Some(at(3_000)),
        "{n}"
    );
    store.opt_out(&s, at(4_000)).await.unwrap();
    assert_eq!(
        store.opted_out_at(&s).await.unwrap(),
        Some(at(4_000)),
        "{n}"
    );
    assert_eq!(
        store.last_inbound(&s).await.unwrap(),
        Some(at(2_000)),
        "{n}: separate"
    );
    assert_eq!(store.opted_in_at(&s).await.unwrap(), None, "{n}");
    store.opt_in(&s, at(5_000)).await.unwrap();
    store.opt_in(&s, at(4_500)).await.unwrap();
    assert_eq!(
        store.opted_in_at(&s).await.unwrap(),
        Some(at(5_000)),
        "{n}: an opt-in never goes back"
    );
    assert_eq!(
        store.opted_out_at(&s).await.unwrap(),
        Some(at(4_000)),
        "{n}: an opt-in leaves the opt-out clock as it was"
    );
    let other = session("a1", "+14155550101");
    assert_eq!(
        store.last_inbound(&other).await.unwrap(),
        None,
        "{n}: per session"
    );
    assert_eq!(store.opted_out_at(&other).await.unwrap(), None, "{n}");
    assert_eq!(store.opted_in_at(&other).await.unwrap(), None, "{n}");
}

async fn send_guard_states_and_lease(rig: Rig) {
    let (store, n) = (rig.store(), rig.name);
    let long = Duration::from_secs(60);
    let first = assert_state(
        store.claim_send("g1", long).await.unwrap(),
        State::Claimed,
        n,
    );
    assert_eq!(
        store.claim_send("g1", long).await.unwrap(),
        GuardState::Busy,
        "{n}"
    );
    store.release_send("g1", first).await.unwrap();
    let second = assert_state(
        store.claim_send("g1", long).await.unwrap(),
        State::Claimed,
        n,
    );
    store
        .mark_sent("g1", "SMsent1", &reply("in-1", "hi"))
        .await
        .unwrap();
    assert_eq!(
        store.claim_send("g1", long).await.unwrap(),
        GuardState::Sent("SMsent1".into()),
        "{n}"
    );
    store.release_send("g1", second).await.unwrap();
    assert_eq!(
        store.claim_send("g1", long).await.unwrap(),
        GuardState::Sent("SMsent1".into()),
        "{n}: a sent part cannot be released"
    );
    store.release_send("never-claimed", second).await.unwrap();

    // A holder that died loses the guard when its lease ends.
    let lease = Duration::from_millis(300);
    let lapsed = assert_state(
        store.claim_send("g2", lease).await.unwrap(),
        State::Claimed,
        n,
    );
    assert_eq!(
        store.claim_send("g2", lease).await.unwrap(),
        GuardState::Busy,
        "{n}"
    );
    tokio::time::sleep(Duration::from_millis(450)).await;
    let taker = assert_state(
        store.claim_send("g2", long).await.unwrap(),
        State::Reclaimed,
        &format!("{n}: the lease ended; the new holder is told it may have been posted"),
    );
    assert_eq!(
        store.claim_send("g2", long).await.unwrap(),
        GuardState::Busy,
        "{n}"
    );
    // The holder whose lease ran out gives the guard back late: it is the new holder's now.
    store.release_send("g2", lapsed).await.unwrap();
    assert_eq!(
        store.claim_send("g2", long).await.unwrap(),
        GuardState::Busy,
        "{n}: a lapsed holder cannot release the guard that was taken over"
    );
    store.release_send("g2", taker).await.unwrap();
    assert_state(
        store.claim_send("g2", long).await.unwrap(),
        State::Claimed,
        &format!("{n}: released, so nobody held it"),
    );
}

async fn send_guard_is_claimed_once_under_concurrency(rig: Rig) {
    let (store, n) = (rig.store(), rig.name);
    let claims = (0..20).map(|_| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .claim_send("race", Duration::from_secs(60))
                .await
                .unwrap()
        })
    });
    let states: Vec<GuardState> = futures::future::join_all(claims)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let claimed = states
        .iter()
        .filter(|s| matches!(s, GuardState::Claimed(_)))
        .count();
    let busy = states.iter().filter(|s| **s == GuardState::Busy).count();
    assert_eq!((claimed, busy), (1, 19), "{n}: {states:?}");
}

/// Claims `key` until it is no longer busy, or panics after `timeout`.
async fn claim_when_free(store: &Arc<dyn Store>, key: &str, timeout: Duration) -> GuardState {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let state = store
            .claim_send(key, Duration::from_secs(60))
            .await
            .unwrap();
        if state != GuardState::Busy {
            return state;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key} still busy after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn a_send_guard_is_renewed_only_by_its_holder(rig: Rig) {
    let (store, n) = (rig.store(), rig.name);
    let lease = Duration::from_millis(400);
    let GuardState::Claimed(mut hold) = store.claim_send("r1", lease).await.unwrap() else {
        panic!("{n}: a free guard is claimed");
    };
    // Renewed every third of the lease for several leases: nobody else gets the part.
    let renewing_until = tokio::time::Instant::now() + lease * 4;
    while tokio::time::Instant::now() < renewing_until {
        tokio::time::sleep(lease / 3).await;
        hold = store
            .renew_send("r1", hold, lease)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{n}: the holder renews its own guard"));
        assert_eq!(
            store.claim_send("r1", lease).await.unwrap(),
            GuardState::Busy,
            "{n}: a renewed guard stays held"
        );
    }
    // Not renewed: it lapses and another sender takes it over; the old holder cannot renew
    // the new holder's lease, the new holder can.
    let taken = claim_when_free(&store, "r1", lease * 3).await;
    let GuardState::Reclaimed(new_hold) = taken else {
        panic!("{n}: a lapsed guard is reclaimed, got {taken:?}");
    };
    assert_eq!(
        store.renew_send("r1", hold, lease).await.unwrap(),
        None,
        "{n}: a holder whose lease was taken over cannot renew"
    );
    assert_eq!(
        store.claim_send("r1", lease).await.unwrap(),
        GuardState::Busy,
        "{n}: the new holder keeps it"
    );
    let new_hold = store
        .renew_send("r1", new_hold, lease)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{n}: the new holder renews"));
    store
        .mark_sent("r1", "SMrenewed", &reply("in-r1", "hi"))
        .await
        .unwrap();
    assert_eq!(
        store.renew_send("r1", new_hold, lease).await.unwrap(),
        None,
        "{n}: a sent part is not held any more"
    );
    assert_eq!(
        store.claim_send("r1", lease).await.unwrap(),
        GuardState::Sent("SMrenewed".into()),
        "{n}: a renewal never turns a sent part back into a held one"
    );

    let GuardState::Claimed(released) = store.claim_send("r2", lease).await.unwrap() else {
        panic!("{n}: a free guard is claimed");
    };
    store.release_send("r2", released).await.unwrap();
    assert_eq!(
        store.renew_send("r2", released, lease).await.unwrap(),
        None,
        "{n}: a released guard is not renewed"
    );
    assert_eq!(
        store
            .renew_send("never-claimed", released, lease)
            .await
            .unwrap(),
        None,
        "{n}"
    );
}

async fn a_message_found_in_twilios_list_settles_one_part_only(rig: Rig) {
    let (store, n) = (rig.store(), rig.name);
    let lease = Duration::from_secs(60);
    let first = reply("in-1-p0", "OK");
    let second = reply("in-2-p0", "OK");
    store.mark_sent("in-1:0", "SMfirst", &first).await.unwrap();
    assert_state(
        store.claim_send("in-2:0", lease).await.unwrap(),
        State::Claimed,
        n,
    );
    assert!(
        !store
            .settle_sent("in-2:0", "SMfirst", &second)
            .await
            .unwrap(),
        "{n}: a message recorded as another part is not this one"
    );
    assert_eq!(
        store.sent_part("SMfirst").await.unwrap(),
        Some(first),
        "{n}: the first part keeps its message"
    );
    assert_eq!(
        store.claim_send("in-2:0", lease).await.unwrap(),
        GuardState::Busy,
        "{n}: the guard is still held, not marked sent"
    );
    assert!(
        store
            .settle_sent("in-2:0", "SMsecond", &second)
            .await
            .unwrap(),
        "{n}: an unrecorded message is settled"
    );
    assert!(
        store
            .settle_sent("in-2:0", "SMsecond", &second)
            .await
            .unwrap(),
        "{n}: settling again on the same message is this part's still"
    );
    assert_eq!(
        store.claim_send("in-2:0", lease).await.unwrap(),
        GuardState::Sent("SMsecond".into()),
        "{n}: the part is marked sent"
    );
    assert_eq!(
        store.sent_part("SMsecond").await.unwrap(),
        Some(second),
        "{n}"
    );

    // Parts racing for one message: exactly one gets it.
    let racers = (0..10).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            let part = reply(&format!("in-race-{i}-p0"), "OK");
            store
                .settle_sent(&format!("in-race-{i}:0"), "SMraced", &part)
                .await
                .unwrap()
        })
    });
    let won = futures::future::join_all(racers)
        .await
        .into_iter()
        .map(Result::unwrap)
        .filter(|won| *won)
        .count();
    assert_eq!(won, 1, "{n}: one part per message");
}

async fn a_first_part_is_claimed_with_the_window_clocks(rig: Rig) {
    let (store, n) = (rig.store(), rig.name);
    let s = session("a1", "+14155550100");
    let lease = Duration::from_secs(60);
    let (state, clocks) = store.claim_send_with_clocks(&s, "c1", lease).await.unwrap();
    assert_state(state, State::Claimed, n);
    assert_eq!(
        clocks,
        WindowClocks::default(),
        "{n}: a user who never wrote has no clocks"
    );
    message_at(&store, &s, 1, 1_000).await;
    store.opt_out(&s, at(500)).await.unwrap();
    store.opt_in(&s, at(700)).await.unwrap();
    let clocks = WindowClocks {
        last_inbound: Some(at(1_000)),
        opted_out_at: Some(at(500)),
        opted_in_at: Some(at(700)),
    };
    assert_eq!(
        store.claim_send_with_clocks(&s, "c1", lease).await.unwrap(),
        (GuardState::Busy, clocks),
        "{n}: held by the first claim"
    );
    store
        .mark_sent("c1", "SMfirst", &reply("in-1", "hi"))
        .await
        .unwrap();
    assert_eq!(
        store.claim_send_with_clocks(&s, "c1", lease).await.unwrap(),
        (GuardState::Sent("SMfirst".into()), clocks),
        "{n}"
    );
    assert_state(
        store.claim_send("c2", lease).await.unwrap(),
        State::Claimed,
        &format!("{n}: guards are per part"),
    );
    let other = session("a1", "+14155550101");
    let (state, clocks) = store
        .claim_send_with_clocks(&other, "c3", lease)
        .await
        .unwrap();
    assert_state(state, State::Claimed, n);
    assert_eq!(
        clocks,
        WindowClocks::default(),
        "{n}: clocks are per conversation"
    );
}

/// A first part's claim and its clocks are two requests, sent together. When only the claim
/// goes through (a connection broke between the two), the part is given back, so that its retry takes it at once instead of waiting out the lease
/// behind its own claim. A Redis user barred from `MGET` makes the clocks fail every time.
#[tokio::test]
async fn a_claim_whose_clocks_failed_is_given_back() {
    let servers = Servers::start().await;
    let store = connect_redis(&servers).await;
    let barred = bar_mget(std::slice::from_ref(&servers.redis_url)).await;
    let barred = RedisStore::connect(&barred[0], "wagate").await.unwrap();
    claim_without_clocks(&*store, &barred, "redis").await;

    let cluster = RedisCluster::shared().await;
    let prefix = fresh_prefix();
    let store = connect_kind(&Kind::Cluster(cluster, prefix.clone())).await;
    let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url()).collect();
    let barred = bar_mget(&urls).await.join(",");
    let barred = RedisStore::connect_to(&barred, &RedisTopology::Cluster, &prefix)
        .await
        .unwrap();
    claim_without_clocks(&*store, &barred, "redis cluster").await;
}

/// Makes a Redis user that may run anything but `MGET` on each server of `urls`; returns the
/// URLs that log in as that user.
async fn bar_mget(urls: &[String]) -> Vec<String> {
    let mut barred = Vec::new();
    for url in urls {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut admin = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("ACL")
            .arg(&[
                "SETUSER",
                "noclocks",
                "on",
                ">noclocks-pass",
                "~*",
                "&*",
                "+@all",
                "-mget",
            ])
            .query_async(&mut admin)
            .await
            .unwrap();
        barred.push(url.replacen("redis://", "redis://noclocks:noclocks-pass@", 1));
    }
    barred
}

async fn claim_without_clocks(store: &dyn Store, barred: &RedisStore, n: &str) {
    let s = session("a1", "+14155550100");
    let lease = Duration::from_secs(60);
    let refused = barred.claim_send_with_clocks(&s, "c1", lease).await;
    assert!(
        refused.is_err(),
        "{n}: the clocks cannot be read: {refused:?}"
    );
    assert_state(
        store.claim_send("c1", lease).await.unwrap(),
        State::Claimed,
        &format!("{n}: the part given back"),
    );
}

async fn sent_parts_round_trip(rig: Rig) {
    let (store, n) = (rig.store(), rig.name);
    assert_eq!(store.sent_part("SMnothing").await.unwrap(), None, "{n}");
    let part = reply("in-7-part-1", "the second part");
    store.mark_sent("in-7#1", "SMsent7", &part).await.unwrap();
    assert_eq!(store.sent_part("SMsent7").await.unwrap(), Some(part), "{n}");
    let replaced = reply("in-7-part-1b", "again");
    store
        .mark_sent("in-7#1", "SMsent7", &replaced)
        .await
        .unwrap();
    assert_eq!(
        store.sent_part("SMsent7").await.unwrap(),
        Some(replaced),
        "{n}"
    );
}

/// The parts sent to a user, found through the session (as a transcript finds them), each
/// with its latest status: those marked sent and those settled after an ambiguous answer, and
/// none of another user's.
async fn a_sessions_sent_messages_are_listed_with_their_statuses(rig: Rig) {
    let (store, n) = (rig.store(), rig.name);
    let s = session("a1", "+14155550100");
    let other = session("a1", "+14155550111");
    assert!(store.sent_messages(&s).await.unwrap().is_empty(), "{n}");
    let first = reply("in-9-p0", "first");
    let second = reply("in-9-p1", "second");
    let mut theirs = reply("in-8-p0", "to someone else");
    theirs.to = WhatsAppAddress::parse("whatsapp:+14155550111").unwrap();
    store.mark_sent("in-9:0", &sid(31), &first).await.unwrap();
    assert!(
        store
            .settle_sent("in-9:1", &sid(32), &second)
            .await
            .unwrap()
    );
    store.mark_sent("in-8:0", &sid(33), &theirs).await.unwrap();
    store
        .record_status(&StatusUpdate {
            message_sid: msid(31),
            status: MessageStatus::Delivered,
            error_code: None,
            to: None,
        })
        .await
        .unwrap();
    store
        .record_status(&StatusUpdate {
            message_sid: msid(32),
            status: MessageStatus::Undelivered,
            error_code: Some(63016),
            to: None,
        })
        .await
        .unwrap();

    let mut sent = store.sent_messages(&s).await.unwrap();
    sent.sort_by(|a, b| a.sid.cmp(&b.sid));
    assert_eq!(
        sent,
        [
            SentMessage {
                sid: sid(31),
                part: first,
                status: Some((MessageStatus::Delivered, None)),
            },
            SentMessage {
                sid: sid(32),
                part: second,
                status: Some((MessageStatus::Undelivered, Some(63016))),
            },
        ],
        "{n}"
    );
    assert_eq!(
        store.sent_messages(&other).await.unwrap(),
        [SentMessage {
            sid: sid(33),
            part: theirs,
            status: None,
        }],
        "{n}: no status reported yet"
    );
}

async fn statuses_only_move_forward(rig: Rig) {
    let (store, n) = (rig.store(), rig.name);
    let update = |sid_n: u64, status: MessageStatus, error_code: Option<u32>| StatusUpdate {
        message_sid: msid(sid_n),
        status,
        error_code,
        to: Some("whatsapp:+14155550100".into()),
    };
    let one = msid(1);
    assert_eq!(store.status(&one).await.unwrap(), None, "{n}");
    // A status this version does not know is recorded when nothing is, and replaced by any
    // known one.
    let steps = [
        (MessageStatus::Other, true),
        (MessageStatus::Other, false),
        (MessageStatus::Queued, true),
        (MessageStatus::Other, false),
        (MessageStatus::Sent, true),
        (MessageStatus::Delivered, true),
        (MessageStatus::Sent, false),
        (MessageStatus::Delivered, false),
        (MessageStatus::Failed, false),
        (MessageStatus::Read, true),
        (MessageStatus::Delivered, false),
    ];
    for (status, applied) in steps {
        assert_eq!(
            store.record_status(&update(1, status, None)).await.unwrap(),
            applied,
            "{n}: {status:?}"
        );
    }
    assert_eq!(
        store.status(&one).await.unwrap(),
        Some((MessageStatus::Read, None)),
        "{n}"
    );

    // A failure ends a message's life after `sent`, with its code.
    assert!(
        store
            .record_status(&update(2, MessageStatus::Sent, None))
            .await
            .unwrap()
    );
    assert!(
        store
            .record_status(&update(2, MessageStatus::Undelivered, Some(63016)))
            .await
            .unwrap(),
        "{n}"
    );
    assert_eq!(
        store.status(&msid(2)).await.unwrap(),
        Some((MessageStatus::Undelivered, Some(63016))),
        "{n}"
    );
    assert!(
        !store
            .record_status(&update(2, MessageStatus::Failed, Some(30003)))
            .await
            .unwrap(),
        "{n}: same rank is not applied"
    );
    assert!(
        store
            .record_status(&update(2, MessageStatus::Delivered, None))
            .await
            .unwrap()
    );
    assert_eq!(
        store.status(&msid(2)).await.unwrap(),
        Some((MessageStatus::Delivered, None)),
        "{n}: delivered proves arrival"
    );
}

async fn failures_are_counted_and_cleared(rig: Rig) {
    let (store, n) = (rig.store(), rig.name);
    for expected in 1..=3 {
        assert_eq!(store.count_failure("k1").await.unwrap(), expected, "{n}");
    }
    assert_eq!(store.count_failure("k2").await.unwrap(), 1, "{n}: per key");
    store.clear_failures("k1").await.unwrap();
    assert_eq!(store.count_failure("k1").await.unwrap(), 1, "{n}: cleared");
    store.clear_failures("never").await.unwrap();
    let counts = (0..20).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { store.count_failure("k3").await.unwrap() })
    });
    let mut got: Vec<u64> = futures::future::join_all(counts)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    got.sort_unstable();
    assert_eq!(got, (1..=20).collect::<Vec<_>>(), "{n}: atomic increments");
}

async fn the_simulated_outbox_keeps_order_and_reads_from_an_index(rig: Rig) {
    let (store, n) = (rig.store(), rig.name);
    let s = session("a1", "+14155550100");
    let other = session("a1", "+14155550101");
    assert!(store.simulated(&s, 0).await.unwrap().is_empty(), "{n}");
    let at = time::OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
    for (i, body) in ["one", "two ¿👋?", "three"].iter().enumerate() {
        let index = store.record_simulated(&s, body, at).await.unwrap();
        assert_eq!(index, i as u64 + 1, "{n}: indexes count from 1");
    }
    store
        .record_simulated(&other, "elsewhere", at)
        .await
        .unwrap();
    let all = store.simulated(&s, 0).await.unwrap();
    let bodies: Vec<&str> = all.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(bodies, ["one", "two ¿👋?", "three"], "{n}");
    assert_eq!(all[1].index, 2, "{n}");
    assert_eq!(all[0].at, at, "{n}");
    let after: Vec<u64> = store
        .simulated(&s, 2)
        .await
        .unwrap()
        .iter()
        .map(|m| m.index)
        .collect();
    assert_eq!(after, [3], "{n}: only what follows the index");
    assert!(store.simulated(&s, 3).await.unwrap().is_empty(), "{n}");
    assert!(
        store.simulated(&s, u64::MAX).await.unwrap().is_empty(),
        "{n}"
    );
    assert_eq!(
        store.simulated(&other, 0).await.unwrap().len(),
        1,
        "{n}: per conversation"
    );
}

async fn everything_survives_reopen(mut rig: Rig) {
    let n = rig.name;
    let store = rig.store();
    let s = session("a1", "+14155550100");
    store.put_agent(&agent("a1", "Ay")).await.unwrap();
    store
        .put_channel(&agent_id("a1"), &channel(true))
        .await
        .unwrap();
    let record = CompletedTurn {
        reply_id: "in-1".into(),
        reply: "hi".into(),
        media: Vec::new(),
        handoff: false,
        quick_replies: Vec::new(),
    };
    let turns = [turn(Role::User, "hello", 0), turn(Role::Assistant, "hi", 1)];
    store
        .complete_turn(&s, &[sid(1)], &turns, &record, KEEP)
        .await
        .unwrap();
    let sighting = LeadSighting {
        session: &s,
        message_sid: &msid(1),
        profile_name: Some("Ada"),
        at: at(0),
    };
    sight(&store, &sighting).await;
    store.opt_out(&s, at(1)).await.unwrap();
    store.opt_in(&s, at(2)).await.unwrap();
    store
        .claim_send("g1", Duration::from_secs(60))
        .await
        .unwrap();
    store
        .mark_sent("g2", "SMsent2", &reply("in-2", "x"))
        .await
        .unwrap();
    let delivered = StatusUpdate {
        message_sid: msid(9),
        status: MessageStatus::Delivered,
        error_code: None,
        to: None,
    };
    store.record_status(&delivered).await.unwrap();
    store.count_failure("k1").await.unwrap();
    drop(store);

    let store = rig.reopen().await;
    assert_eq!(
        store.agent(&agent_id("a1")).await.unwrap().unwrap().name,
        "Ay",
        "{n}"
    );
    assert!(
        store.channel(&agent_id("a1")).await.unwrap().is_some(),
        "{n}"
    );
    assert_eq!(store.history(&s, 10).await.unwrap(), turns, "{n}");
    let again = sight(&store, &sighting).await;
    assert_eq!(
        (again.completed, again.new_lead),
        (vec![Some(record)], false),
        "{n}: the turn record and the lead are remembered"
    );
    let lead = store.leads(&agent_id("a1")).await.unwrap().remove(0);
    assert_eq!(lead.message_count, 1, "{n}: the seen sid is remembered");
    assert_eq!(store.last_inbound(&s).await.unwrap(), Some(at(0)), "{n}");
    assert_eq!(store.opted_out_at(&s).await.unwrap(), Some(at(1)), "{n}");
    assert_eq!(store.opted_in_at(&s).await.unwrap(), Some(at(2)), "{n}");
    assert_eq!(
        store
            .claim_send("g1", Duration::from_secs(60))
            .await
            .unwrap(),
        GuardState::Busy,
        "{n}: the lease outlives a restart"
    );
    assert_eq!(
        store
            .claim_send("g2", Duration::from_secs(60))
            .await
            .unwrap(),
        GuardState::Sent("SMsent2".into()),
        "{n}"
    );
    assert!(store.sent_part("SMsent2").await.unwrap().is_some(), "{n}");
    assert_eq!(
        store.status(&msid(9)).await.unwrap(),
        Some((MessageStatus::Delivered, None)),
        "{n}"
    );
    assert_eq!(store.count_failure("k1").await.unwrap(), 2, "{n}");
}

/// One user's footprint in a store, as the pipeline leaves it: a turn with its record, a lead,
/// the window and opt-out clocks, a simulated send, and a part sent (with a status and one
/// settled after an ambiguous answer). Returns the message sid of the turn's record.
async fn footprint(store: &Arc<dyn Store>, agent: &str, phone: &str, n: u64) -> String {
    let s = session(agent, phone);
    let message = msid(n);
    let sighting = LeadSighting {
        session: &s,
        message_sid: &message,
        profile_name: Some("Ada"),
        at: at(10),
    };
    store.begin_turn(&s, &[sighting], 10).await.unwrap();
    let record = CompletedTurn {
        reply_id: format!("in-{n}"),
        reply: format!("answer {n}"),
        media: Vec::new(),
        handoff: false,
        quick_replies: Vec::new(),
    };
    let turns = [
        turn(Role::User, &format!("question {n}"), 10),
        turn(Role::Assistant, &format!("answer {n}"), 11),
    ];
    store
        .complete_turn(&s, &[sid(n)], &turns, &record, KEEP)
        .await
        .unwrap();
    store.opt_out(&s, at(12)).await.unwrap();
    store.opt_in(&s, at(13)).await.unwrap();
    store
        .set_pause(&s, Some(&Pause::new("Grace", at(13))))
        .await
        .unwrap();
    store
        .record_simulated(&s, "simulated", at(14))
        .await
        .unwrap();
    let mut part = reply(&format!("in-{n}-part-0"), "sent part");
    part.agent_id = agent_id(agent);
    part.to = WhatsAppAddress::parse(&format!("whatsapp:{phone}")).unwrap();
    store
        .mark_sent(&format!("in-{n}#0"), &sid(1000 + n), &part)
        .await
        .unwrap();
    let mut settled = part.clone();
    settled.id = format!("in-{n}-part-1");
    assert!(
        store
            .settle_sent(&format!("in-{n}#1"), &sid(2000 + n), &settled)
            .await
            .unwrap()
    );
    store
        .record_status(&StatusUpdate {
            message_sid: msid(1000 + n),
            status: MessageStatus::Delivered,
            error_code: None,
            to: Some(format!("whatsapp:{phone}")),
        })
        .await
        .unwrap();
    sid(n)
}

/// Forgetting a conversation empties its history and outbox, so the next turn starts afresh,
/// and keeps the lead, the clocks (an opt-out above all) and the turn records.
async fn forgetting_a_session_keeps_what_is_not_the_conversation(rig: Rig) {
    let (store, n) = (rig.store(), rig.name);
    let s = session("a1", "+14155550100");
    let other = session("a1", "+14155550111");
    let key = footprint(&store, "a1", "+14155550100", 1).await;
    footprint(&store, "a1", "+14155550111", 2).await;
    store.opt_out(&s, at(20)).await.unwrap();

    store.forget_session(&s).await.unwrap();
    assert!(
        store.history(&s, usize::MAX).await.unwrap().is_empty(),
        "{n}"
    );
    assert!(store.simulated(&s, 0).await.unwrap().is_empty(), "{n}");
    assert_eq!(
        store.pause(&s).await.unwrap(),
        None,
        "{n}: a new conversation starts with the agent"
    );
    assert!(store.pause(&other).await.unwrap().is_some(), "{n}");
    assert!(
        answered(&store, &s, &key).await.is_some(),
        "{n}: a redelivered message is still known as answered"
    );
    assert_eq!(store.last_inbound(&s).await.unwrap(), Some(at(10)), "{n}");
    assert_eq!(
        store.opted_out_at(&s).await.unwrap(),
        Some(at(20)),
        "{n}: an opt-out is never forgotten with the conversation"
    );
    assert_eq!(store.leads(&agent_id("a1")).await.unwrap().len(), 2, "{n}");
    assert_eq!(store.history(&other, 10).await.unwrap().len(), 2, "{n}");
    assert_eq!(store.simulated(&other, 0).await.unwrap().len(), 1, "{n}");

    store.forget_session(&s).await.unwrap();
    let again = msid(3);
    let sighting = LeadSighting {
        session: &s,
        message_sid: &again,
        profile_name: None,
        at: at(30),
    };
    let start = store.begin_turn(&s, &[sighting], 10).await.unwrap();
    assert!(start.history.is_empty(), "{n}: a new history: {start:?}");
}

/// Erasing a user leaves nothing stored under their number or about the messages to them,
/// and touches no other user.
async fn erasing_a_user_removes_everything_of_theirs_and_nothing_else(rig: Rig) {
    let (store, n) = (rig.store(), rig.name);
    let s = session("a1", "+14155550100");
    let other = session("a1", "+14155550111");
    let key = footprint(&store, "a1", "+14155550100", 1).await;
    let other_key = footprint(&store, "a1", "+14155550111", 2).await;

    store.erase_user(&s).await.unwrap();
    assert!(
        store.history(&s, usize::MAX).await.unwrap().is_empty(),
        "{n}"
    );
    assert!(store.simulated(&s, 0).await.unwrap().is_empty(), "{n}");
    assert_eq!(store.pause(&s).await.unwrap(), None, "{n}");
    assert!(store.pause(&other).await.unwrap().is_some(), "{n}");
    for (clock, value) in [
        ("window", store.last_inbound(&s).await.unwrap()),
        ("opt-out", store.opted_out_at(&s).await.unwrap()),
        ("opt-in", store.opted_in_at(&s).await.unwrap()),
    ] {
        assert_eq!(value, None, "{n}: the {clock} clock");
    }
    assert_eq!(store.sent_part(&sid(1001)).await.unwrap(), None, "{n}");
    assert_eq!(store.sent_part(&sid(2001)).await.unwrap(), None, "{n}");
    assert_eq!(store.status(&msid(1001)).await.unwrap(), None, "{n}");
    assert!(store.sent_messages(&s).await.unwrap().is_empty(), "{n}");
    let leads: Vec<String> = store
        .leads(&agent_id("a1"))
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.phone)
        .collect();
    assert_eq!(leads, ["+14155550111"], "{n}");
    assert_eq!(answered(&store, &s, &key).await, None, "{n}");

    assert_eq!(store.history(&other, 10).await.unwrap().len(), 2, "{n}");
    assert!(answered(&store, &other, &other_key).await.is_some(), "{n}");
    assert!(store.last_inbound(&other).await.unwrap().is_some(), "{n}");
    assert!(store.sent_part(&sid(1002)).await.unwrap().is_some(), "{n}");
    assert!(store.sent_part(&sid(2002)).await.unwrap().is_some(), "{n}");
    assert!(store.status(&msid(1002)).await.unwrap().is_some(), "{n}");
    assert_eq!(store.sent_messages(&other).await.unwrap().len(), 2, "{n}");
    assert_eq!(store.simulated(&other, 0).await.unwrap().len(), 1, "{n}");

    store.erase_user(&s).await.unwrap();
}

/// Deleting an agent removes it and its channel, and every process's caches hear of it.
async fn deleting_an_agent_removes_it_and_tells_every_cache(rig: Rig) {
    let (store, n) = (rig.store(), rig.name);
    let mut changes = store.changes().await.unwrap();
    assert_eq!(next_change(&mut changes, n).await, Change::All, "{n}");
    store.put_agent(&agent("a1", "Ay")).await.unwrap();
    store.put_agent(&agent("b2", "Bee")).await.unwrap();
    store
        .put_channel(&agent_id("a1"), &channel(true))
        .await
        .unwrap();
    for _ in 0..3 {
        next_change(&mut changes, n).await;
    }

    assert!(store.delete_agent(&agent_id("a1")).await.unwrap(), "{n}");
    assert_eq!(
        next_change(&mut changes, n).await,
        Change::Agent(agent_id("a1")),
        "{n}"
    );
    assert!(store.agent(&agent_id("a1")).await.unwrap().is_none(), "{n}");
    assert!(
        store.channel(&agent_id("a1")).await.unwrap().is_none(),
        "{n}"
    );
    let ids: Vec<String> = store
        .agents()
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.id.to_string())
        .collect();
    assert_eq!(ids, ["b2"], "{n}");
    assert!(
        !store.delete_agent(&agent_id("a1")).await.unwrap(),
        "{n}: already gone"
    );
}

/// The latest signature failure of each agent: the last noted stands, and it goes with the
/// agent.
async fn signature_failures_are_kept_per_agent_and_go_with_it(rig: Rig) {
    let (store, n) = (rig.store(), rig.name);
    store.put_agent(&agent("a1", "Ay")).await.unwrap();
    let a1 = agent_id("a1");
    assert_eq!(store.signature_failure(&a1).await.unwrap(), None, "{n}");
    let failure = |ms: i64, url: &str| SignatureFailure {
        at: at(ms),
        signed_url: url.to_owned(),
    };
    store
        .note_signature_failure(&a1, &failure(1, "https://one.example/webhooks"))
        .await
        .unwrap();
    store
        .note_signature_failure(&a1, &failure(2, "https://two.example/webhooks"))
        .await
        .unwrap();
    assert_eq!(
        store.signature_failure(&a1).await.unwrap(),
        Some(failure(2, "https://two.example/webhooks")),
        "{n}"
    );
    assert_eq!(
        store.signature_failure(&agent_id("a2")).await.unwrap(),
        None,
        "{n}"
    );
    store.delete_agent(&a1).await.unwrap();
    assert_eq!(store.signature_failure(&a1).await.unwrap(), None, "{n}");
}
