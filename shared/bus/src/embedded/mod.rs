//! The bus on the embedded database, for one process. Messages, dedupe ids and dead letters are
//! tables of the data file; which message is ready, delivered or waiting out a retry delay is
//! kept in memory, because a restart ends every delivery anyway: on open, every stored message
//! is ready again. Semantics follow the JetStream bus as the pipeline uses it: a publish returns
//! once durable (group commit, see [`wagate_embedded`]), duplicates are dropped within the
//! duplicate window, an ack deletes the message durably, and a conversation's oldest unfinished
//! message is the one whose turn it is. Unlike JetStream there is no ack wait: a consumer that
//! gives a delivery up without settling it (drops it) hands it back at once, and a consumer
//! that dies takes the whole process with it.
//!
//! Tables: `bus_messages` ((topic, seq) → (conversation, payload)), `bus_dedupe`
//! ((topic, id) → published at, ms) and `bus_dedupe_by_time` (its expiry index),
//! `bus_dead_letters` (id → JSON), `bus_counters` (last sequence and dead-letter id).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use tokio::time::Instant;

use super::{Bus, BusError, Deliveries, Delivery, Published, Topic};
use wagate_core::envelope::DeadLetter;
use wagate_embedded::{CopyTable, Db, DbError, copy_table, now_ms};

mod queue;

use queue::Queue;

const MESSAGES: TableDefinition<(u8, u64), (&str, &[u8])> = TableDefinition::new("bus_messages");
const DEDUPE: TableDefinition<(u8, &str), u64> = TableDefinition::new("bus_dedupe");
const DEDUPE_BY_TIME: TableDefinition<(u64, u8, &str), ()> =
    TableDefinition::new("bus_dedupe_by_time");
const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("bus_dead_letters");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("bus_counters");

const MESSAGE_SEQ: &str = "message";
const DEAD_LETTER_ID: &str = "dead_letter";

/// Stands in for a retry delay too long to add to the clock.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// Expired dedupe ids removed per publish: more than one, so the table shrinks as fast as it
/// grows, and few, so no publish pays for a backlog.
const PURGE_PER_PUBLISH: usize = 16;

fn topic_code(topic: Topic) -> u8 {
    match topic {
        Topic::Inbound => 0,
        Topic::Outbound => 1,
        Topic::Events => 2,
        Topic::Bulk => 3,
    }
}

/// What [`EmbeddedBus::recover`] found in the file: the unfinished messages of each topic.
pub struct Recovered(Vec<(u8, u64, String)>);

/// The bus of embedded mode (one process, no NATS), from `shared::embedded::Embedded::open`.
/// Clones share the queues.
#[derive(Clone)]
pub struct EmbeddedBus {
    db: Db,
    queues: Arc<[Arc<Queue>; 4]>,
    /// How long a dedupe id is remembered, in ms.
    window_ms: u64,
}

impl EmbeddedBus {
    /// How a rewrite of the file copies each table of the bus ([`wagate_embedded::rewrite`]):
    /// every table [`Self::create_tables`] makes.
    pub const TABLES: &[CopyTable] = &[
        |from, to| copy_table(MESSAGES, from, to),
        |from, to| copy_table(DEDUPE, from, to),
        |from, to| copy_table(DEDUPE_BY_TIME, from, to),
        |from, to| copy_table(DEAD_LETTERS, from, to),
        |from, to| copy_table(COUNTERS, from, to),
    ];

    pub fn create_tables(txn: &WriteTransaction) -> Result<(), DbError> {
        txn.open_table(MESSAGES)?;
        txn.open_table(DEDUPE)?;
        txn.open_table(DEDUPE_BY_TIME)?;
        txn.open_table(DEAD_LETTERS)?;
        txn.open_table(COUNTERS)?;
        Ok(())
    }

    /// Reads every stored message: none is delivered before the process starts.
    pub fn recover(database: &Database) -> Result<Recovered, DbError> {
        let txn = database.begin_read()?;
        let table = txn.open_table(MESSAGES)?;
        let mut found = Vec::new();
        for row in table.iter()? {
            let (key, value) = row?;
            let (topic, seq) = key.value();
            found.push((topic, seq, value.value().0.to_owned()));
        }
        Ok(Recovered(found))
    }

    pub fn new(db: Db, recovered: Recovered, duplicate_window: Duration) -> Self {
        let queues: [Arc<Queue>; 4] = Default::default();
        for (topic, seq, conversation) in recovered.0 {
            if let Some(queue) = queues.get(usize::from(topic)) {
                queue.lock().add(seq, &conversation);
            }
        }
        Self {
            db,
            queues: Arc::new(queues),
            window_ms: u64::try_from(duplicate_window.as_millis()).unwrap_or(u64::MAX),
        }
    }

    fn queue(&self, topic: Topic) -> &Arc<Queue> {
        &self.queues[usize::from(topic_code(topic))]
    }

    /// The next delivery of `topic`, waiting for one as long as it takes.
    async fn next_delivery(&self, topic: Topic) -> Result<Box<dyn Delivery>, BusError> {
        loop {
            let queue = self.queue(topic).clone();
            let claim = queue.claim().await;
            // Hand the message back if this future is dropped while the payload loads.
            let held = Held {
                queue,
                seq: claim.seq,
                token: claim.token,
                settled: AtomicBool::new(false),
            };
            let key = (topic_code(topic), claim.seq);
            let payload = self
                .db
                .read(move |txn| {
                    let table = txn.open_table(MESSAGES)?;
                    let row = table.get(key)?;
                    Ok(row.map(|v| Bytes::copy_from_slice(v.value().1)))
                })
                .await?;
            match payload {
                Some(payload) => {
                    return Ok(Box::new(EmbeddedDelivery {
                        held,
                        topic,
                        payload,
                        conversation: claim.conversation,
                        attempt: claim.attempt,
                        db: self.db.clone(),
                    }));
                }
                // Acked through an earlier delivery meanwhile: finished.
                None => {
                    held.settled.store(true, Ordering::Release);
                    held.queue.update(|s| s.remove(claim.seq));
                }
            }
        }
    }
}

fn next_counter(txn: &WriteTransaction, name: &str) -> Result<u64, DbError> {
    let mut counters = txn.open_table(COUNTERS)?;
    let next = counters.get(name)?.map_or(0, |v| v.value()) + 1;
    counters.insert(name, next)?;
    Ok(next)
}

/// Removes up to [`PURGE_PER_PUBLISH`] dedupe ids older than the window.
fn purge_dedupe(txn: &WriteTransaction, now: u64, window_ms: u64) -> Result<(), DbError> {
    let cutoff = now.saturating_sub(window_ms);
    let mut by_time = txn.open_table(DEDUPE_BY_TIME)?;
    let mut expired = Vec::new();
    for row in by_time.range::<(u64, u8, &str)>(..(cutoff, 0, ""))? {
        let (key, _) = row?;
        let (at, topic, id) = key.value();
        expired.push((at, topic, id.to_owned()));
        if expired.len() == PURGE_PER_PUBLISH {
            break;
        }
    }
    if expired.is_empty() {
        return Ok(());
    }
    let mut dedupe = txn.open_table(DEDUPE)?;
    for (at, topic, id) in &expired {
        by_time.remove((*at, *topic, id.as_str()))?;
        dedupe.remove((*topic, id.as_str()))?;
    }
    Ok(())
}

/// The outcome of a publish step: stored under a sequence number, or a duplicate.
enum Stored {
    New(u64),
    Duplicate,
}

#[async_trait]
impl Bus for EmbeddedBus {
    /// The trace rides in the envelope only: the data file has no headers.
    async fn publish_traced(
        &self,
        topic: Topic,
        conversation: &str,
        dedupe_id: &str,
        payload: Bytes,
        _traceparent: Option<&str>,
    ) -> Result<Published, BusError> {
        let code = topic_code(topic);
        let window_ms = self.window_ms;
        let id = dedupe_id.to_owned();
        let conv = conversation.to_owned();
        let step = {
            let conv = conv.clone();
            move |txn: &WriteTransaction| {
                let now = now_ms();
                purge_dedupe(txn, now, window_ms)?;
                let mut dedupe = txn.open_table(DEDUPE)?;
                let mut by_time = txn.open_table(DEDUPE_BY_TIME)?;
                let seen = dedupe.get((code, id.as_str()))?.map(|v| v.value());
                if let Some(at) = seen {
                    if now.saturating_sub(at) < window_ms {
                        return Ok(Stored::Duplicate);
                    }
                    by_time.remove((at, code, id.as_str()))?;
                }
                dedupe.insert((code, id.as_str()), now)?;
                by_time.insert((now, code, id.as_str()), ())?;
                let seq = next_counter(txn, MESSAGE_SEQ)?;
                txn.open_table(MESSAGES)?
                    .insert((code, seq), (conv.as_str(), payload.as_ref()))?;
                Ok(Stored::New(seq))
            }
        };
        let queue = self.queue(topic).clone();
        let stored = self
            .db
            .write_then(step, move |stored| {
                if let Stored::New(seq) = stored {
                    queue.update(|s| s.add(*seq, &conv));
                }
            })
            .await?;
        Ok(match stored {
            Stored::New(_) => Published::Stored,
            Stored::Duplicate => Published::Duplicate,
        })
    }

    async fn subscribe(&self, topic: Topic) -> Result<Deliveries, BusError> {
        Ok(
            futures::stream::unfold(self.clone(), move |bus| async move {
                let next = bus.next_delivery(topic).await;
                Some((next, bus))
            })
            .boxed(),
        )
    }

    async fn put_dead_letter(&self, letter: &DeadLetter) -> Result<String, BusError> {
        let json = serde_json::to_vec(letter).map_err(BusError::json("encode a dead letter"))?;
        let id = self
            .db
            .write(move |txn| {
                let id = next_counter(txn, DEAD_LETTER_ID)?;
                txn.open_table(DEAD_LETTERS)?.insert(id, json.as_slice())?;
                Ok(id)
            })
            .await?;
        Ok(id.to_string())
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, BusError> {
        let rows = self
            .db
            .read(|txn| {
                let table = txn.open_table(DEAD_LETTERS)?;
                let mut rows = Vec::new();
                for row in table.iter()? {
                    let (id, json) = row?;
                    rows.push((id.value(), json.value().to_vec()));
                }
                Ok(rows)
            })
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, json)| decode_letter(id, &json))
            .collect())
    }

    async fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>, BusError> {
        let Ok(id) = id.parse::<u64>() else {
            return Ok(None);
        };
        let json = self
            .db
            .read(move |txn| {
                let table = txn.open_table(DEAD_LETTERS)?;
                let row = table.get(id)?;
                Ok(row.map(|v| v.value().to_vec()))
            })
            .await?;
        Ok(json.and_then(|json| decode_letter(id, &json)))
    }

    async fn remove_dead_letter(&self, id: &str) -> Result<bool, BusError> {
        let Ok(id) = id.parse::<u64>() else {
            return Ok(false);
        };
        Ok(self
            .db
            .write(move |txn| {
                let mut table = txn.open_table(DEAD_LETTERS)?;
                let removed = table.remove(id)?.is_some();
                Ok(removed)
            })
            .await?)
    }

    async fn ready(&self) -> Result<(), BusError> {
        Ok(self.db.ready().await?)
    }

    async fn backlog(&self, topic: Topic) -> Result<u64, BusError> {
        Ok(self.queue(topic).lock().entries.len() as u64)
    }
}

/// A stored dead letter with its id; one that no longer decodes is left out of listings (as
/// the JetStream bus does) and logged, so one bad record does not hide the others.
fn decode_letter(id: u64, json: &[u8]) -> Option<DeadLetter> {
    match serde_json::from_slice::<DeadLetter>(json) {
        Ok(mut letter) => {
            letter.id = id.to_string();
            Some(letter)
        }
        Err(e) => {
            tracing::warn!(id, error = %e, "a stored dead letter does not decode");
            None
        }
    }
}

/// A message taken by one delivery; handed back at once when dropped unsettled.
struct Held {
    queue: Arc<Queue>,
    seq: u64,
    token: u64,
    settled: AtomicBool,
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.settled.load(Ordering::Acquire) {
            let (seq, token) = (self.seq, self.token);
            self.queue.update(|s| s.release(seq, token, None));
        }
    }
}

struct EmbeddedDelivery {
    held: Held,
    topic: Topic,
    payload: Bytes,
    conversation: Arc<str>,
    attempt: u64,
    db: Db,
}

#[async_trait]
impl Delivery for EmbeddedDelivery {
    fn take_payload(&mut self) -> Bytes {
        std::mem::take(&mut self.payload)
    }

    fn attempt(&self) -> u64 {
        self.attempt
    }

    async fn ack(&self) -> Result<(), BusError> {
        let key = (topic_code(self.topic), self.held.seq);
        let seq = self.held.seq;
        let queue = self.held.queue.clone();
        self.db
            .write_then(
                move |txn| {
                    txn.open_table(MESSAGES)?.remove(key)?;
                    Ok(())
                },
                move |_: &()| queue.update(|s| s.remove(seq)),
            )
            .await?;
        self.held.settled.store(true, Ordering::Release);
        Ok(())
    }

    async fn retry_in(&self, delay: Duration) -> Result<(), BusError> {
        if !self.held.settled.swap(true, Ordering::AcqRel) {
            let now = Instant::now();
            // A delay past what the clock can hold waits for the next restart.
            let at = (!delay.is_zero()).then(|| now.checked_add(delay).unwrap_or(now + FOREVER));
            let (seq, token) = (self.held.seq, self.held.token);
            self.held.queue.update(|s| s.release(seq, token, at));
        }
        Ok(())
    }

    async fn keep_alive(&self) -> Result<(), BusError> {
        Ok(())
    }

    /// No ack wait to extend: a delivery is held until settled, dropped, or the process ends.
    fn keep_alive_every(&self) -> Option<Duration> {
        None
    }

    async fn is_next_in_conversation(&self) -> Result<bool, BusError> {
        Ok(self
            .held
            .queue
            .lock()
            .is_next(self.held.seq, &self.conversation))
    }

    fn position(&self) -> u64 {
        self.held.seq
    }

    async fn is_next_after(&self, position: u64) -> Result<bool, BusError> {
        Ok(self
            .held
            .queue
            .lock()
            .is_next_after(self.held.seq, position, &self.conversation))
    }
}
