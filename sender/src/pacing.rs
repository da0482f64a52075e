//! Pacing: each sender number (or Messaging Service) posts at most its channel's `mps`, shared
//! by every sender process through the store's GCRA ([`store::pacing`]), because
//! Twilio queues and then refuses what a number sends faster (WhatsApp: 80 a second by
//! default, the Sandbox about one every 3 s).
//!
//! Live replies go first: a live reply may go while the sender's schedule is up to one
//! window ahead of now, a bulk send (an admin's message or template) only while it is at most
//! half a window ahead. So whenever both wait, the next free slot goes to the live reply. The
//! window is one interval (a burst of one message beyond the rate) or [`MIN_WINDOW`],
//! whichever is longer: a waiter sleeps on the runtime's timer, which counts whole
//! milliseconds and wakes later still on a busy machine, so at 10,000 messages a second a
//! burst of one would let through one message per wake-up, about a thousand a second. With
//! the window, a sender at a high rate sends what the wake-up's delay let build up, and the
//! rate over any second still holds. Bulk sends also travel on a queue of their
//! own ([`bus::Topic::Bulk`]), so a backlog of them never stands between a live reply
//! and the sender. Bulk sends are the ones that wait in line for slots, so they also get a
//! grace of half an interval ([`Pace::grace`]): a waiter woken up to an interval after it was
//! told to come back (timers, the round trip, a busy machine) still takes the slot it waited
//! for, and the rate holds. Tolerance and grace together stay one window.
//!
//! In one process, the sends of one sender and priority wait in line (first come, first
//! served) and only the first of the line asks the store, for as many slots as the line has
//! sends (as many as the pace allows at once), and hands the rest to those behind it: a
//! backlog costs a store call per window of the pace rather than one per send, one after the
//! other. Waiting holds no other
//! conversation: the dispatcher runs conversations in parallel, and the part's send guard is
//! renewed while it waits (the wait runs inside the send's `renewing`).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use store::{Pace, Slot, Store, StoreError};
use wagate_core::{
    agent::{MAX_MPS, WhatsAppChannel},
    envelope::OutboundReply,
};

/// The least burst a sender may send ahead of its rate, in time: at 80 messages a second (a
/// WhatsApp number's default) one interval is longer, so there the burst stays one message.
const MIN_WINDOW: Duration = Duration::from_millis(10);

/// Which sends go first when a sender number's slots are scarce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Priority {
    /// A reply in a conversation: the agent's, an operator's, an opt-out's confirmation.
    Live,
    /// An admin's message or template ([`OutboundReply::bulk`]).
    Bulk,
}

impl Priority {
    /// The priority of `reply`.
    pub fn of(reply: &OutboundReply) -> Self {
        if reply.bulk { Self::Bulk } else { Self::Live }
    }

    /// How a send of this priority is paced, `interval` apart.
    fn pace(self, interval: Duration) -> Pace {
        let window = interval.max(MIN_WINDOW);
        match self {
            Self::Live => Pace {
                interval,
                tolerance: window,
                grace: Duration::ZERO,
            },
            Self::Bulk => Pace {
                interval,
                tolerance: window / 2,
                grace: window / 2,
            },
        }
    }

    /// Its label on `wagate_pacing_wait_seconds`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Bulk => "bulk",
        }
    }
}

/// A line of sends waiting in this process for one sender's slots, with the slots that its
/// head took for those behind it and that are not used yet.
type Line = Arc<tokio::sync::Mutex<u32>>;

/// Paces the posts of this process's sends, with every other sender process.
pub struct Pacer {
    store: Arc<dyn Store>,
    /// The rate of channels on the Sandbox's number that set none (`WAGATE_SANDBOX_MPS`).
    sandbox_mps: f64,
    /// The lines with someone in them, by sender and priority.
    lines: Mutex<HashMap<(String, Priority), Line>>,
}

impl Pacer {
    /// A pacer over `store`'s shared schedules.
    pub fn new(store: Arc<dyn Store>, sandbox_mps: f64) -> Self {
        Self {
            store,
            sandbox_mps,
            lines: Mutex::default(),
        }
    }

    /// Waits until `channel`'s sender may post one more message of `priority`, and takes that
    /// slot. An error of the store ends the wait: the send fails for another attempt, as a
    /// guard that cannot be claimed does.
    pub async fn wait_turn(
        &self,
        channel: &WhatsAppChannel,
        priority: Priority,
    ) -> Result<(), StoreError> {
        let started = Instant::now();
        let pace = priority.pace(interval(channel.mps(self.sandbox_mps)));
        let sender = sender_key(channel);
        let taken = match self.line(&sender, priority) {
            // Nobody of this process waits for the sender: ask at once, and join a line only
            // to wait, so that a sender under its rate pays one store call and no hand-off.
            None => match self.store.take_send_slot(&sender, pace, 1).await {
                Ok(Slot::Go(_)) => Ok(()),
                Ok(Slot::Wait(wait)) => {
                    let line = self.join(&sender, priority);
                    let taken = {
                        let mut spare = line.lock().await;
                        tokio::time::sleep(wait).await;
                        self.take(&sender, pace, &line, &mut spare).await
                    };
                    self.leave(&sender, priority, line);
                    taken
                }
                Err(e) => Err(e),
            },
            Some(line) => {
                let taken = {
                    let mut spare = line.lock().await;
                    self.take(&sender, pace, &line, &mut spare).await
                };
                self.leave(&sender, priority, line);
                taken
            }
        };
        metrics::histogram!("wagate_pacing_wait_seconds", "priority" => priority.as_str())
            .record(started.elapsed().as_secs_f64());
        taken
    }

    /// Takes a slot for the head of `line` (the caller, holding its lock): one that an earlier
    /// head took for those behind it, else as many from the store as there are sends in the
    /// line now, asking until the store gives some. One store call thus serves the whole line;
    /// a call per send, one after the other, was what held a fast sender's rate down. Slots left
    /// over when the line empties are not used: the sender posts a little under its rate then,
    /// never over it.
    async fn take(
        &self,
        sender: &str,
        pace: Pace,
        line: &Line,
        spare: &mut u32,
    ) -> Result<(), StoreError> {
        if *spare > 0 {
            *spare -= 1;
            return Ok(());
        }
        loop {
            // Every holder of the line but the table: this send and those behind it.
            let waiting = u32::try_from(Arc::strong_count(line).saturating_sub(1))
                .unwrap_or(u32::MAX)
                .max(1);
            match self.store.take_send_slot(sender, pace, waiting).await? {
                Slot::Go(granted) => {
                    *spare = granted.saturating_sub(1);
                    return Ok(());
                }
                Slot::Wait(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    /// The line of `sender` and `priority`, joined, if someone is in it.
    fn line(&self, sender: &str, priority: Priority) -> Option<Line> {
        let lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        lines.get(&(sender.to_owned(), priority)).cloned()
    }

    /// The line of `sender` and `priority`, joined (made if nobody is in it).
    fn join(&self, sender: &str, priority: Priority) -> Line {
        let mut lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        lines
            .entry((sender.to_owned(), priority))
            .or_default()
            .clone()
    }

    /// Leaves `line`, dropping it when nobody else is in it, so that the table holds only
    /// the senders that are waited for.
    fn leave(&self, sender: &str, priority: Priority, line: Line) {
        let mut lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        // The table's reference and this one: nobody else holds it, and nobody can join it
        // while the table is locked.
        if Arc::strong_count(&line) == 2 {
            lines.remove(&(sender.to_owned(), priority));
        }
    }
}

/// One message's share of a second at `mps` messages per second. Stored rates are checked
/// when saved; one that is not a positive number still paces, at the slowest rate a channel
/// can have rather than not at all.
fn interval(mps: f64) -> Duration {
    let mps = if mps.is_finite() && mps > 0.0 {
        mps.min(MAX_MPS)
    } else {
        wagate_core::agent::MIN_MPS
    };
    Duration::from_secs_f64(1.0 / mps)
}

/// The pace's key: what Twilio paces, the number or the Messaging Service, in its account.
fn sender_key(channel: &WhatsAppChannel) -> String {
    let from = channel
        .messaging_service_sid
        .as_deref()
        .unwrap_or(channel.phone_number.as_str());
    format!("{}:{from}", channel.account_sid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use store::SendLedger;

    #[test]
    fn the_interval_is_a_second_shared_out_and_never_zero() {
        assert_eq!(interval(80.0), Duration::from_micros(12_500));
        assert_eq!(interval(1.0 / 3.0), Duration::from_secs(3));
        assert_eq!(interval(1e9), Duration::from_micros(100));
        assert_eq!(interval(f64::NAN), interval(wagate_core::agent::MIN_MPS));
        assert_eq!(interval(0.0), interval(wagate_core::agent::MIN_MPS));
    }

    /// At a number's default rate a burst is one message; at a high rate it is what the window
    /// holds, so that slots freed while a waiter sleeps on a millisecond timer are not lost.
    #[test]
    fn the_burst_is_one_interval_or_the_window() {
        let slow = Priority::Live.pace(interval(80.0));
        assert_eq!(slow.tolerance, Duration::from_micros(12_500));
        let fast = Priority::Live.pace(interval(10_000.0));
        assert_eq!(fast.tolerance, MIN_WINDOW);
        let bulk = Priority::Bulk.pace(interval(10_000.0));
        assert_eq!(bulk.tolerance + bulk.grace, MIN_WINDOW);
        assert!(bulk.tolerance < fast.tolerance, "live replies go first");
    }

    /// A burst arriving at once at 10,000 a second goes without waiting for the timer: the
    /// window holds 100 slots. Time passing only frees more, so this holds on a slow machine.
    #[tokio::test]
    async fn a_burst_at_a_high_rate_goes_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let options = shared::embedded::EmbeddedOptions {
            duplicate_window: Duration::from_secs(120),
        };
        let store = shared::embedded::Embedded::open(dir.path(), options)
            .unwrap()
            .store;
        let pace = Priority::Live.pace(interval(10_000.0));
        for n in 0..50 {
            assert_eq!(
                store
                    .take_send_slot("AC1:+15550001111", pace, 1)
                    .await
                    .unwrap(),
                Slot::Go(1),
                "send {n}"
            );
        }
    }
}
