//! Keeps what ingress accepted when NATS is away. A publish that the bus does not acknowledge
//! in time is appended to a local spool (a redb table in the data folder, committed with fsync
//! before the webhook is answered 200), and a drainer publishes the spool in order once the bus
//! answers again, also after a restart. While the spool holds anything, new messages queue
//! behind it, so a conversation's messages keep their order. Spooled messages keep their dedupe
//! ids, so one whose timed-out publish did land is dropped as a duplicate when drained. A full
//! spool refuses (the webhook answers 503 and Twilio retries).
//!
//! One spool per ingress process: a second process on the same data folder fails to open it.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use bus::{Bus, BusError, Deliveries, Published, Topic};
use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use shared::shutdown::Shutdown;
use tokio::sync::Notify;
use wagate_core::envelope::DeadLetter;
use wagate_embedded::{
    DbError,
    data_dir::{self, DataFileError},
};

const SPOOL: TableDefinition<u64, &[u8]> = TableDefinition::new("spool");
/// Entries published per drain step.
const DRAIN_BATCH: usize = 256;

/// A spooled publish.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    topic: Topic,
    conversation: String,
    dedupe: String,
    payload: Bytes,
}

impl Entry {
    /// `topic byte, u32 length + conversation, u32 length + dedupe id, payload`.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            9 + self.conversation.len() + self.dedupe.len() + self.payload.len(),
        );
        out.push(match self.topic {
            Topic::Inbound => 0,
            Topic::Outbound => 1,
            Topic::Events => 2,
            Topic::Bulk => 3,
        });
        for field in [self.conversation.as_bytes(), self.dedupe.as_bytes()] {
            out.extend_from_slice(&u32::try_from(field.len()).unwrap_or(u32::MAX).to_be_bytes());
            out.extend_from_slice(field);
        }
        out.extend_from_slice(&self.payload);
        out
    }

    fn decode(raw: &[u8]) -> Option<Self> {
        let (&topic, mut rest) = raw.split_first()?;
        let mut field = || -> Option<String> {
            let (len, tail) = rest.split_first_chunk::<4>()?;
            let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
            let (text, tail) = (tail.get(..len)?, tail.get(len..)?);
            rest = tail;
            String::from_utf8(text.to_vec()).ok()
        };
        let conversation = field()?;
        let dedupe = field()?;
        Some(Self {
            topic: match topic {
                0 => Topic::Inbound,
                1 => Topic::Outbound,
                2 => Topic::Events,
                3 => Topic::Bulk,
                _ => return None,
            },
            conversation,
            dedupe,
            payload: Bytes::copy_from_slice(rest),
        })
    }
}

/// Why the spool cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The data folder or the file could not be made private, or the file is empty or
    /// damaged; the error names it.
    #[error("ingress spool: {0}")]
    File(DataFileError),
    /// Another ingress process has it open.
    #[error(
        "ingress spool {0}: another wagate ingress process is using it; give each ingress its own WAGATE_DATA_DIR"
    )]
    InUse(String),
    /// It could not be read or prepared.
    #[error("ingress spool {path}: {reason}")]
    Open {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

struct Spool {
    db: Database,
    next: AtomicU64,
    len: AtomicU64,
    bytes: AtomicU64,
    max_bytes: u64,
}

fn db_err(e: impl Into<DbError>) -> BusError {
    BusError::Embedded(e.into())
}

impl Spool {
    fn open(path: &Path, max_bytes: u64) -> Result<Self, SpoolError> {
        let fail = |reason: String| SpoolError::Open {
            path: path.display().to_string(),
            reason,
        };
        if let Some(dir) = path.parent() {
            data_dir::private_dir(dir).map_err(SpoolError::File)?;
        }
        let db = data_dir::open_database(path).map_err(|e| match e {
            DataFileError::InUse(path) => SpoolError::InUse(path.display().to_string()),
            other => SpoolError::File(other),
        })?;
        let (mut next, mut len, mut bytes) = (0, 0, 0);
        {
            let txn = db.begin_write().map_err(|e| fail(e.to_string()))?;
            {
                let table = txn.open_table(SPOOL).map_err(|e| fail(e.to_string()))?;
                for row in table.iter().map_err(|e| fail(e.to_string()))? {
                    let (k, v) = row.map_err(|e| fail(e.to_string()))?;
                    next = k.value() + 1;
                    len += 1;
                    bytes += v.value().len() as u64;
                }
            }
            txn.commit().map_err(|e| fail(e.to_string()))?;
        }
        Ok(Self {
            db,
            next: AtomicU64::new(next),
            len: AtomicU64::new(len),
            bytes: AtomicU64::new(bytes),
            max_bytes,
        })
    }

    fn append(&self, entry: &Entry) -> Result<(), BusError> {
        let raw = entry.encode();
        let size = raw.len() as u64;
        if self.bytes.load(Ordering::SeqCst) + size > self.max_bytes {
            return Err(BusError::Refused(
                "NATS is unreachable and the ingress spool is full".into(),
            ));
        }
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(SPOOL).map_err(db_err)?;
            let seq = self.next.fetch_add(1, Ordering::SeqCst);
            table.insert(seq, raw.as_slice()).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        self.len.fetch_add(1, Ordering::SeqCst);
        self.bytes.fetch_add(size, Ordering::SeqCst);
        Ok(())
    }

    fn oldest(&self, n: usize) -> Result<Vec<(u64, usize, Option<Entry>)>, BusError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(SPOOL).map_err(db_err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(db_err)?.take(n) {
            let (k, v) = row.map_err(db_err)?;
            out.push((k.value(), v.value().len(), Entry::decode(v.value())));
        }
        Ok(out)
    }

    fn remove(&self, done: &[(u64, usize)]) -> Result<(), BusError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(SPOOL).map_err(db_err)?;
            for (seq, _) in done {
                table.remove(seq).map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)?;
        self.len.fetch_sub(done.len() as u64, Ordering::SeqCst);
        let freed: u64 = done.iter().map(|(_, size)| *size as u64).sum();
        self.bytes.fetch_sub(freed, Ordering::SeqCst);
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.len.load(Ordering::SeqCst) == 0
    }
}

/// A bus whose publishes fall back to the spool.
pub struct SpooledBus {
    inner: Arc<dyn Bus>,
    spool: Arc<Spool>,
    publish_timeout: Duration,
    wake: Arc<Notify>,
}

impl SpooledBus {
    /// Opens (or creates) the spool at `path` and starts its drainer.
    pub fn open(
        inner: Arc<dyn Bus>,
        path: &Path,
        max_bytes: u64,
        publish_timeout: Duration,
        shutdown: Shutdown,
    ) -> Result<Arc<Self>, SpoolError> {
        let spool = Arc::new(Spool::open(path, max_bytes)?);
        if !spool.is_empty() {
            tracing::warn!(
                messages = spool.len.load(Ordering::SeqCst),
                "the ingress spool holds messages from before; publishing them"
            );
        }
        let bus = Arc::new(Self {
            inner,
            spool,
            publish_timeout,
            wake: Arc::new(Notify::new()),
        });
        tokio::spawn(drain(
            bus.inner.clone(),
            bus.spool.clone(),
            bus.wake.clone(),
            shutdown,
        ));
        Ok(bus)
    }

    /// Messages waiting in the spool.
    pub fn spooled(&self) -> u64 {
        self.spool.len.load(Ordering::SeqCst)
    }
}

async fn drain(inner: Arc<dyn Bus>, spool: Arc<Spool>, wake: Arc<Notify>, shutdown: Shutdown) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        while !spool.is_empty() && !shutdown.is_cancelled() {
            let s = spool.clone();
            let batch = match tokio::task::spawn_blocking(move || s.oldest(DRAIN_BATCH)).await {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot read the ingress spool");
                    break;
                }
                Err(_) => break,
            };
            let mut done = Vec::new();
            let mut stalled = false;
            for (seq, size, entry) in batch {
                let Some(entry) = entry else {
                    tracing::error!(seq, "dropping an unreadable spool entry");
                    done.push((seq, size));
                    continue;
                };
                match inner
                    .publish(
                        entry.topic,
                        &entry.conversation,
                        &entry.dedupe,
                        entry.payload,
                    )
                    .await
                {
                    Ok(_) => done.push((seq, size)),
                    Err(e) => {
                        tracing::debug!(error = %e, "NATS still away; the spool waits");
                        stalled = true;
                        break;
                    }
                }
            }
            if !done.is_empty() {
                let s = spool.clone();
                let published = done.len();
                match tokio::task::spawn_blocking(move || s.remove(&done)).await {
                    Ok(Ok(())) => {
                        metrics::counter!("wagate_spool_drained_total").increment(published as u64);
                        tracing::info!(
                            published,
                            left = spool.len.load(Ordering::SeqCst),
                            "published spooled messages"
                        );
                    }
                    _ => tracing::error!(
                        "cannot remove drained entries from the spool; they will be published again (and dropped as duplicates)"
                    ),
                }
            }
            if stalled {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        metrics::gauge!("wagate_spool_messages").set(spool.len.load(Ordering::SeqCst) as f64);
    }
}

#[async_trait]
impl Bus for SpooledBus {
    /// A spooled message is later published without the `traceparent` header; its envelope
    /// still carries it.
    async fn publish_traced(
        &self,
        topic: Topic,
        conversation: &str,
        dedupe_id: &str,
        payload: Bytes,
        traceparent: Option<&str>,
    ) -> Result<Published, BusError> {
        if self.spool.is_empty() {
            let direct = self.inner.publish_traced(
                topic,
                conversation,
                dedupe_id,
                payload.clone(),
                traceparent,
            );
            match tokio::time::timeout(self.publish_timeout, direct).await {
                Ok(Ok(published)) => return Ok(published),
                Ok(Err(e)) => tracing::warn!(error = %e, "publishing failed; spooling the message"),
                Err(_) => tracing::warn!("publishing timed out; spooling the message"),
            }
        }
        let entry = Entry {
            topic,
            conversation: conversation.to_owned(),
            dedupe: dedupe_id.to_owned(),
            payload,
        };
        let spool = self.spool.clone();
        tokio::task::spawn_blocking(move || spool.append(&entry))
            .await
            .map_err(|e| db_err(DbError::Blocking(std::sync::Arc::new(e))))??;
        metrics::counter!("wagate_spooled_total").increment(1);
        self.wake.notify_one();
        Ok(Published::Stored)
    }

    async fn subscribe(&self, topic: Topic) -> Result<Deliveries, BusError> {
        self.inner.subscribe(topic).await
    }

    async fn put_dead_letter(&self, letter: &DeadLetter) -> Result<String, BusError> {
        self.inner.put_dead_letter(letter).await
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, BusError> {
        self.inner.dead_letters().await
    }

    async fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>, BusError> {
        self.inner.dead_letter(id).await
    }

    async fn remove_dead_letter(&self, id: &str) -> Result<bool, BusError> {
        self.inner.remove_dead_letter(id).await
    }

    async fn ready(&self) -> Result<(), BusError> {
        self.inner.ready().await
    }

    async fn backlog(&self, topic: Topic) -> Result<u64, BusError> {
        self.inner.backlog(topic).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn entries_round_trip(conversation in ".{0,40}", dedupe in ".{0,60}", payload in proptest::collection::vec(any::<u8>(), 0..300), outbound in any::<bool>()) {
            let e = Entry { topic: if outbound { Topic::Outbound } else { Topic::Inbound }, conversation, dedupe, payload: Bytes::from(payload) };
            prop_assert_eq!(Entry::decode(&e.encode()), Some(e));
        }

        #[test]
        fn garbage_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Entry::decode(&raw);
        }
    }

    #[test]
    fn survives_reopening_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.redb");
        let entry = |n: u8| Entry {
            topic: Topic::Inbound,
            conversation: "a.1".into(),
            dedupe: format!("d{n}"),
            payload: Bytes::from(vec![n]),
        };
        {
            let s = Spool::open(&path, 1 << 20).unwrap();
            for n in 0..3 {
                s.append(&entry(n)).unwrap();
            }
            assert!(
                Spool::open(&path, 1 << 20).is_err(),
                "a second opener is refused"
            );
        }
        let s = Spool::open(&path, 1 << 20).unwrap();
        let got: Vec<Entry> = s
            .oldest(10)
            .unwrap()
            .into_iter()
            .filter_map(|(_, _, e)| e)
            .collect();
        assert_eq!(got, vec![entry(0), entry(1), entry(2)]);
        let first = s.oldest(1).unwrap();
        s.remove(&[(first[0].0, first[0].1)]).unwrap();
        s.append(&entry(3)).unwrap();
        let got: Vec<Entry> = s
            .oldest(10)
            .unwrap()
            .into_iter()
            .filter_map(|(_, _, e)| e)
            .collect();
        assert_eq!(got, vec![entry(1), entry(2), entry(3)]);
    }

    #[test]
    fn a_full_spool_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(&dir.path().join("s.redb"), 64).unwrap();
        let big = Entry {
            topic: Topic::Inbound,
            conversation: "c".into(),
            dedupe: "d".into(),
            payload: Bytes::from(vec![0; 100]),
        };
        assert!(
            s.append(&big)
                .unwrap_err()
                .to_string()
                .contains("spool is full")
        );
    }
}
