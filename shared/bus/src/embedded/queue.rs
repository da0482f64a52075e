//! The embedded bus's in-memory queue of one topic: which stored message is ready, delivered
//! or waiting out a retry delay, in sequence order, with a conversation's oldest unfinished
//! message first.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::{sync::Notify, time::Instant};

/// Where one unfinished message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// Waiting for a consumer.
    Ready,
    /// Held by the delivery with this token.
    Delivered(u64),
    /// Handed back; ready again at this time.
    Delayed(Instant),
}

pub(super) struct Entry {
    pub(super) conversation: Arc<str>,
    pub(super) state: State,
    /// Deliveries since the process started.
    pub(super) deliveries: u64,
}

/// The unfinished messages of one topic.
#[derive(Default)]
pub(super) struct QueueState {
    pub(super) entries: HashMap<u64, Entry>,
    pub(super) ready: BTreeSet<u64>,
    pub(super) delayed: BTreeSet<(Instant, u64)>,
    /// Unfinished messages of each conversation, oldest first.
    pub(super) conversations: HashMap<Arc<str>, BTreeSet<u64>>,
    pub(super) next_token: u64,
}

pub(super) struct Claim {
    pub(super) seq: u64,
    pub(super) token: u64,
    pub(super) conversation: Arc<str>,
    pub(super) attempt: u64,
}

impl QueueState {
    pub(super) fn add(&mut self, seq: u64, conversation: &str) {
        let conversation = match self.conversations.get_key_value(conversation) {
            Some((key, _)) => key.clone(),
            None => Arc::from(conversation),
        };
        self.conversations
            .entry(conversation.clone())
            .or_default()
            .insert(seq);
        self.entries.insert(
            seq,
            Entry {
                conversation,
                state: State::Ready,
                deliveries: 0,
            },
        );
        self.ready.insert(seq);
    }

    pub(super) fn remove(&mut self, seq: u64) {
        let Some(entry) = self.entries.remove(&seq) else {
            return;
        };
        match entry.state {
            State::Ready => {
                self.ready.remove(&seq);
            }
            State::Delayed(at) => {
                self.delayed.remove(&(at, seq));
            }
            State::Delivered(_) => {}
        }
        if let Some(seqs) = self.conversations.get_mut(&entry.conversation) {
            seqs.remove(&seq);
            if seqs.is_empty() {
                self.conversations.remove(&entry.conversation);
            }
        }
    }

    /// Makes the messages whose delay has passed ready; returns when the next one will be.
    pub(super) fn promote_due(&mut self, now: Instant) -> Option<Instant> {
        while let Some(&(at, seq)) = self.delayed.first() {
            if at > now {
                return Some(at);
            }
            self.delayed.pop_first();
            if let Some(entry) = self.entries.get_mut(&seq) {
                entry.state = State::Ready;
                self.ready.insert(seq);
            }
        }
        None
    }

    pub(super) fn claim(&mut self) -> Option<Claim> {
        let seq = self.ready.pop_first()?;
        let entry = self.entries.get_mut(&seq)?;
        self.next_token += 1;
        entry.state = State::Delivered(self.next_token);
        entry.deliveries += 1;
        Some(Claim {
            seq,
            token: self.next_token,
            conversation: entry.conversation.clone(),
            attempt: entry.deliveries,
        })
    }

    /// Hands a message back from the delivery `token`, ready at `at` (now if `None`); nothing
    /// if that delivery no longer holds it.
    pub(super) fn release(&mut self, seq: u64, token: u64, at: Option<Instant>) {
        let Some(entry) = self.entries.get_mut(&seq) else {
            return;
        };
        if entry.state != State::Delivered(token) {
            return;
        }
        match at {
            Some(at) => {
                entry.state = State::Delayed(at);
                self.delayed.insert((at, seq));
            }
            None => {
                entry.state = State::Ready;
                self.ready.insert(seq);
            }
        }
    }

    pub(super) fn is_next_after(&self, seq: u64, position: u64, conversation: &str) -> bool {
        self.conversations
            .get(conversation)
            .and_then(|seqs| seqs.range(position.saturating_add(1)..).next())
            .is_none_or(|&between| between >= seq)
    }

    pub(super) fn is_next(&self, seq: u64, conversation: &str) -> bool {
        self.conversations
            .get(conversation)
            .and_then(BTreeSet::first)
            .is_none_or(|&oldest| oldest >= seq)
    }
}

/// One topic's queue and the consumers waiting on it.
#[derive(Default)]
pub(super) struct Queue {
    pub(super) state: Mutex<QueueState>,
    pub(super) changed: Notify,
}

impl Queue {
    pub(super) fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a ready message and takes it.
    pub(super) async fn claim(&self) -> Claim {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let next_due = {
                let mut state = self.lock();
                let next_due = state.promote_due(Instant::now());
                if let Some(claim) = state.claim() {
                    return claim;
                }
                next_due
            };
            match next_due {
                Some(at) => {
                    let _ = tokio::time::timeout_at(at, changed).await;
                }
                None => changed.await,
            }
        }
    }

    pub(super) fn update(&self, change: impl FnOnce(&mut QueueState)) {
        change(&mut self.lock());
        self.changed.notify_waiters();
    }
}
