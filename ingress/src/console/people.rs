//! Leads and Conversations: who wrote to an agent, and what was said. Both read the same
//! functions as the API (`admin::leads`, `admin::sessions`).
//!
//! The live views are server-sent events that look at the store once a second and send what
//! changed. Polling the store, rather than listening inside this process, is what makes them
//! work whichever ingress, worker or sender process handled the message.

use std::{convert::Infallible, time::Duration};

use askama::Template;
use axum::{
    Extension, Router,
    extract::{Path, Query, State},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::get,
};
use futures::Stream;
use serde::Deserialize;
use store::{Lead, Role, Turn};
use wagate_core::envelope::DeadMessage;

use super::{Layout, SignedIn, error_page, page, shown_time};
use crate::{
    AppState,
    admin::{
        ApiError, dead_letters,
        delivery::{self, PartDelivery},
        leads, sessions,
    },
};

const PAGE_SIZE: usize = 25;
/// How often a live view looks at the store.
const POLL: Duration = Duration::from_secs(1);

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/agents/{agent_id}/leads", get(leads_page))
        .route("/agents/{agent_id}/leads.csv", get(leads_csv))
        .route("/agents/{agent_id}/conversations", get(conversations))
        .route(
            "/agents/{agent_id}/conversations/events",
            get(conversation_events),
        )
        .route("/agents/{agent_id}/conversations/{phone}", get(transcript))
        .route(
            "/agents/{agent_id}/conversations/{phone}/events",
            get(transcript_events),
        )
}

/// A lead as a table row.
struct LeadRow {
    phone: String,
    name: String,
    first_seen: String,
    last_seen: String,
    messages: u64,
}

impl From<&Lead> for LeadRow {
    fn from(l: &Lead) -> Self {
        Self {
            phone: l.phone.clone(),
            name: l.profile_name.clone().unwrap_or_default(),
            first_seen: shown_time(l.first_seen),
            last_seen: shown_time(l.last_seen),
            messages: l.message_count,
        }
    }
}

#[derive(Deserialize, Default)]
struct LeadsQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    sort: String,
    #[serde(default)]
    page: usize,
}

#[derive(Template)]
#[template(path = "leads.html")]
struct LeadsPage {
    layout: Layout,
    agent_id: String,
    rows: Vec<LeadRow>,
    q: String,
    sort: String,
    page: usize,
    pages: usize,
    total: usize,
}

/// Sorts leads by a column name of the table (`-` in front: descending); newest first when
/// the name is not one of them.
fn sort_leads(leads: &mut [Lead], sort: &str) {
    let (descending, key) = match sort.strip_prefix('-') {
        Some(k) => (true, k),
        None => (false, sort),
    };
    match key {
        "phone" => leads.sort_by(|a, b| a.phone.cmp(&b.phone)),
        "name" => leads.sort_by(|a, b| a.profile_name.cmp(&b.profile_name)),
        "first_seen" => leads.sort_by_key(|l| l.first_seen),
        "messages" => leads.sort_by_key(|l| l.message_count),
        "last_seen" => leads.sort_by_key(|l| l.last_seen),
        _ => {
            leads.sort_by_key(|l| std::cmp::Reverse(l.last_seen));
            return;
        }
    }
    if descending {
        leads.reverse();
    }
}

fn matches(lead: &Lead, q: &str) -> bool {
    let q = q.trim().to_lowercase();
    q.is_empty()
        || lead.phone.contains(&q)
        || lead
            .profile_name
            .as_deref()
            .is_some_and(|n| n.to_lowercase().contains(&q))
}

async fn leads_page(
    State(state): State<AppState>,
    Extension(who): Extension<SignedIn>,
    Path(raw): Path<String>,
    Query(query): Query<LeadsQuery>,
) -> Response {
    let (agent, mut all) = match leads::of_agent(&state, &raw).await {
        Ok(x) => x,
        Err(e) => return error_page(&who, &e),
    };
    all.retain(|l| matches(l, &query.q));
    sort_leads(&mut all, &query.sort);
    let total = all.len();
    let pages = total.div_ceil(PAGE_SIZE).max(1);
    let page_no = query.page.clamp(1, pages);
    let rows = all
        .iter()
        .skip((page_no - 1) * PAGE_SIZE)
        .take(PAGE_SIZE)
        .map(LeadRow::from)
        .collect();
    page(&LeadsPage {
        layout: Layout::new(format!("Leads of {}", agent.id), &who),
        agent_id: agent.id.to_string(),
        rows,
        q: query.q,
        sort: query.sort,
        page: page_no,
        pages,
        total,
    })
}

async fn leads_csv(
    State(state): State<AppState>,
    Extension(who): Extension<SignedIn>,
    Path(raw): Path<String>,
) -> Response {
    match leads::of_agent(&state, &raw).await {
        Ok((agent, leads)) => leads::csv_download(&agent, &leads),
        Err(e) => error_page(&who, &e),
    }
}

#[derive(Template)]
#[template(path = "conversations.html")]
struct ConversationsPage {
    layout: Layout,
    agent_id: String,
    rows: Vec<LeadRow>,
    /// The numbers, among the most recent conversations, that a person has now.
    with_people: Vec<String>,
}

/// Conversations looked at for a person having them: the most recent, one read each.
const PAUSES_SHOWN: usize = 50;

/// Which of the most recent conversations in `leads` a person has now.
async fn with_people(state: &AppState, raw: &str, leads: &[Lead]) -> Vec<String> {
    let Ok(agent) = crate::admin::load_agent(state, raw).await else {
        return Vec::new();
    };
    let now = time::OffsetDateTime::now_utc();
    let reads = leads.iter().take(PAUSES_SHOWN).map(|l| async {
        let session = crate::admin::lifecycle::session_of(&agent, &l.phone).ok()?;
        let pause = state.store.pause(&session).await.ok()??;
        pause
            .holds(now, agent.handoff_idle())
            .then(|| l.phone.clone())
    });
    futures::future::join_all(reads)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Conversations, most recent first: one per lead, since every user who wrote is a lead.
async fn recent(state: &AppState, raw: &str) -> Result<(String, Vec<Lead>), ApiError> {
    let (agent, mut all) = leads::of_agent(state, raw).await?;
    sort_leads(&mut all, "");
    Ok((agent.id.to_string(), all))
}

async fn conversations(
    State(state): State<AppState>,
    Extension(who): Extension<SignedIn>,
    Path(raw): Path<String>,
) -> Response {
    match recent(&state, &raw).await {
        Ok((agent_id, all)) => page(&ConversationsPage {
            layout: Layout::new(format!("Conversations of {agent_id}"), &who),
            rows: all.iter().map(LeadRow::from).collect(),
            with_people: with_people(&state, &raw, &all).await,
            agent_id,
        }),
        Err(e) => error_page(&who, &e),
    }
}

/// A stream that calls `step` once a [`POLL`], sending the events it returns, until the
/// browser goes away.
fn every_poll<S, F, Fut>(seed: S, step: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    S: Send + 'static,
    F: Fn(S) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = (Vec<Event>, S)> + Send,
{
    let step = std::sync::Arc::new(step);
    futures::stream::unfold((seed, true), move |(seed, first)| {
        let step = step.clone();
        async move {
            if !first {
                tokio::time::sleep(POLL).await;
            }
            let (events, seed) = step(seed).await;
            Some((
                futures::stream::iter(events.into_iter().map(Ok)),
                (seed, false),
            ))
        }
    })
    .flatten()
}

use futures::StreamExt as _;

/// The conversation list, sent whole as JSON whenever it changed.
async fn conversation_events(State(state): State<AppState>, Path(raw): Path<String>) -> Response {
    if let Err(e) = recent(&state, &raw).await {
        return e.into_response();
    }
    let stream = every_poll(String::new(), move |last: String| {
        let state = state.clone();
        let raw = raw.clone();
        async move {
            let Ok((agent_id, all)) = recent(&state, &raw).await else {
                return (Vec::new(), last);
            };
            let people = with_people(&state, &raw, &all).await;
            let rows: Vec<_> = all
                .iter()
                .map(|l| {
                    serde_json::json!({
                        "phone": l.phone,
                        "name": l.profile_name,
                        "last_seen": shown_time(l.last_seen),
                        "messages": l.message_count,
                        "href": format!("/agents/{agent_id}/conversations/{}", l.phone),
                        "person": people.contains(&l.phone),
                    })
                })
                .collect();
            let data = serde_json::Value::from(rows).to_string();
            if data == last {
                (Vec::new(), last)
            } else {
                (
                    vec![Event::default().event("conversations").data(data.clone())],
                    data,
                )
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// A turn as shown in a transcript, the agent's with the delivery of each part of its reply.
struct TurnRow {
    index: usize,
    mine: bool,
    who: String,
    text: String,
    at: String,
    parts: Vec<PartRow>,
}

/// One Twilio message of a reply, as a transcript shows it.
#[derive(serde::Serialize)]
struct PartRow {
    sid: String,
    status: &'static str,
    code: Option<u32>,
}

impl From<&PartDelivery> for PartRow {
    fn from(p: &PartDelivery) -> Self {
        Self {
            sid: p.sid.clone(),
            status: p.status.as_str(),
            code: p.error_code,
        }
    }
}

fn part_rows(parts: Option<&Vec<PartDelivery>>) -> Vec<PartRow> {
    parts.map_or_else(Vec::new, |p| p.iter().map(PartRow::from).collect())
}

/// The rows of a transcript: `turns` and the delivery of each ([`delivery::by_turn`]).
fn turn_rows(turns: &[Turn], deliveries: &[Option<Vec<PartDelivery>>]) -> Vec<TurnRow> {
    turns
        .iter()
        .enumerate()
        .map(|(index, t)| {
            let user = t.role == Role::User;
            let who = match (&t.author, user) {
                (_, true) => "User".to_owned(),
                (Some(person), false) => format!("{person} (operator)"),
                (None, false) => "Agent".to_owned(),
            };
            TurnRow {
                index,
                mine: user,
                who,
                text: t.content.clone(),
                at: shown_time(t.at),
                parts: part_rows(deliveries.get(index).and_then(Option::as_ref)),
            }
        })
        .collect()
}

fn turn_json(row: &TurnRow) -> String {
    serde_json::json!({
        "index": row.index,
        "user": row.mine,
        "who": row.who,
        "text": row.text,
        "at": row.at,
        "parts": row.parts,
    })
    .to_string()
}

/// A reply to this user that could not be delivered (a dead letter of the send stage).
struct Undelivered {
    at: String,
    code: Option<u32>,
    reason: String,
}

#[derive(Template)]
#[template(path = "transcript.html")]
struct TranscriptPage {
    layout: Layout,
    agent_id: String,
    phone: String,
    turns: Vec<TurnRow>,
    undelivered: Vec<Undelivered>,
    /// Who has the conversation: `None` the agent, else the person and since when.
    person: Option<Person>,
}

/// The person who has a conversation ([`store::Pause`]), as a transcript shows it.
struct Person {
    name: String,
    since: String,
    /// When the agent takes it back unless the person writes again.
    until: String,
}

/// The person who has the conversation `phone` of agent `raw` now, if anyone.
async fn person(state: &AppState, raw: &str, phone: &str) -> Result<Option<Person>, ApiError> {
    let agent = crate::admin::load_agent(state, raw).await?;
    let session = crate::admin::lifecycle::session_of(&agent, phone)?;
    let pause = state
        .store
        .pause(&session)
        .await
        .map_err(ApiError::unavailable)?;
    let now = time::OffsetDateTime::now_utc();
    Ok(pause
        .filter(|p| p.holds(now, agent.handoff_idle()))
        .map(|p| Person {
            until: p
                .lapses_at(agent.handoff_idle())
                .map(shown_time)
                .unwrap_or_default(),
            since: shown_time(p.since),
            name: p.by,
        }))
}

/// A conversation's turns and the delivery of each: what a transcript shows.
async fn transcript_rows(
    state: &AppState,
    raw: &str,
    phone: &str,
) -> Result<Vec<TurnRow>, ApiError> {
    let (session, turns) = sessions::transcript(state, raw, phone).await?;
    let deliveries = delivery::of_session(state, &session, &turns).await?;
    Ok(turn_rows(&turns, &deliveries))
}

/// The replies to `phone` that failed for good and wait in the dead letters: the delivery
/// status that wagate knows per conversation.
async fn undelivered(
    state: &AppState,
    agent_id: &str,
    phone: &str,
) -> Result<Vec<Undelivered>, ApiError> {
    let to = format!("whatsapp:{phone}");
    let letters = dead_letters::matching(state, &dead_letters::Filter::default()).await?;
    Ok(letters
        .into_iter()
        .filter_map(|d| match &d.message {
            DeadMessage::Reply(r) if d.agent_id.as_str() == agent_id && r.to.to_string() == to => {
                Some(Undelivered {
                    at: shown_time(d.failed_at),
                    code: d.code,
                    reason: d.reason.clone(),
                })
            }
            _ => None,
        })
        .collect())
}

async fn transcript(
    State(state): State<AppState>,
    Extension(who): Extension<SignedIn>,
    Path((raw, phone)): Path<(String, String)>,
) -> Response {
    let found = async {
        let turns = transcript_rows(&state, &raw, &phone).await?;
        let failed = undelivered(&state, &raw, &phone).await?;
        let person = person(&state, &raw, &phone).await?;
        Ok::<_, ApiError>((turns, failed, person))
    };
    match found.await {
        Ok((turns, undelivered, person)) => page(&TranscriptPage {
            layout: Layout::new(format!("Conversation with {phone}"), &who),
            agent_id: raw,
            phone,
            turns,
            undelivered,
            person,
        }),
        Err(e) => error_page(&who, &e),
    }
}

#[derive(Deserialize)]
struct AfterQuery {
    #[serde(default)]
    after: usize,
}

/// What a transcript's browser was last sent: how many turns, and the delivery of each of
/// them as JSON (`None` for turns of the page itself, not yet sent).
#[derive(Default)]
struct Shown {
    turns: usize,
    deliveries: Vec<Option<String>>,
}

/// The turns of a conversation after the first `after`, each as a `turn` event, as they are
/// stored: the user's messages and the agent's replies; and for each reply whose delivery
/// changed since it was last sent (or since the page was made), a `delivery` event, so that
/// the status of each message follows Twilio's callbacks.
async fn transcript_events(
    State(state): State<AppState>,
    Path((raw, phone)): Path<(String, String)>,
    Query(q): Query<AfterQuery>,
) -> Response {
    if let Err(e) = sessions::transcript(&state, &raw, &phone).await {
        return e.into_response();
    }
    let shown = Shown {
        turns: q.after,
        deliveries: Vec::new(),
    };
    let stream = every_poll(shown, move |mut shown: Shown| {
        let state = state.clone();
        let (raw, phone) = (raw.clone(), phone.clone());
        async move {
            let Ok(rows) = transcript_rows(&state, &raw, &phone).await else {
                return (Vec::new(), shown);
            };
            let mut events = Vec::new();
            shown
                .deliveries
                .resize(rows.len().max(shown.deliveries.len()), None);
            for (row, last) in rows.iter().zip(shown.deliveries.iter_mut()) {
                let delivery =
                    serde_json::json!({"index": row.index, "parts": row.parts}).to_string();
                if row.index >= shown.turns {
                    events.push(Event::default().event("turn").data(turn_json(row)));
                } else if !row.mine && last.as_deref() != Some(delivery.as_str()) {
                    events.push(Event::default().event("delivery").data(delivery.clone()));
                }
                *last = Some(delivery);
            }
            shown.turns = rows.len().max(shown.turns);
            (events, shown)
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}
