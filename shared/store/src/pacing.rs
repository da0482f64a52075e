//! Pacing of sender numbers, shared by every sender process: a GCRA (generic cell rate
//! algorithm) per sender, the standard limiter that keeps one number per sender, its
//! theoretical arrival time (TAT): the time by which its sends so far would have gone out at
//! the rate. A send may go when the TAT is at most its `tolerance` ahead of now, and moves the
//! TAT on by one `interval`. Over any stretch a sender thus posts at most the rate plus
//! `tolerance / interval` messages, and a caller with more tolerance gets the next slot before
//! one with less: that is how live replies go before bulk sends (the sender's `pacing`).
//!
//! A `grace` lets a send that comes late for its slot keep the schedule: the TAT is moved up to
//! now less the grace, not to now, so a waiter woken a little after its slot (a busy machine)
//! takes that slot rather than losing the time it was late by. A grace adds to the burst as a
//! tolerance does: the sender keeps tolerance plus grace at most one interval, which is the
//! burst of one message.
//!
//! On Redis the step is one Lua script ([`TAKE_SLOT`]) on one key, with Redis's clock
//! (`TIME`), so one round trip answers and processes on hosts whose clocks differ share one
//! pace. The embedded store is one process: [`LocalPaces`] runs the same step in memory
//! ([`gcra`]). A crate such as `governor` gives a GCRA too, but one quota per limiter and no
//! tolerance per request, which the priority needs; the step is a few lines, and the contract
//! tests hold both stores to the same answers.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

/// How a send of one sender number is paced ([`crate::SendLedger::take_send_slot`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    /// One message's share of time: a second divided by the messages per second.
    pub interval: Duration,
    /// How far ahead of now the sender's TAT may be for this send to go.
    pub tolerance: Duration,
    /// How far behind now the sender's TAT may stay, for a send that came late for its slot.
    pub grace: Duration,
}

/// What [`crate::SendLedger::take_send_slot`] answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Send now: this many slots are taken (at least one, at most as many as were asked for),
    /// one for each of that many sends.
    Go(u32),
    /// Nothing taken; ask again after this long, when a slot may be free.
    Wait(Duration),
}

/// Microseconds, the unit of the TAT (Redis's `TIME` gives them; a Lua number holds them
/// exactly until the year 2255).
pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// One GCRA step for up to `want` sends at once, in microseconds: the stored TAT (0 for none)
/// and now in; the TAT to store and how many may go (each slot within the tolerance, at
/// least one), or how long to wait. [`TAKE_SLOT`] is the same steps in Lua. Taking several at
/// once is what a line of waiting sends does: one store call for the line, not one per send.
pub(crate) fn gcra(tat: u64, now: u64, pace: Pace, want: u32) -> Result<(u64, u32), Duration> {
    let tat = tat.max(now.saturating_sub(micros(pace.grace)));
    let allowed_from = tat.saturating_sub(micros(pace.tolerance));
    if allowed_from > now {
        return Err(Duration::from_micros(allowed_from - now));
    }
    let interval = micros(pace.interval).max(1);
    let room = (now - allowed_from) / interval + 1;
    let granted = u32::try_from(room)
        .unwrap_or(u32::MAX)
        .clamp(1, want.max(1));
    Ok((
        tat.saturating_add(interval.saturating_mul(u64::from(granted))),
        granted,
    ))
}

/// [`gcra`] on Redis. KEYS[1] = the sender's TAT (µs); ARGV[1] = interval, ARGV[2] = tolerance,
/// ARGV[3] = grace (µs), ARGV[4] = the most slots wanted. Answers `{slots taken, 0}` when sends
/// may go (the TAT moved on), else `{0, µs to wait}`. The key expires once its TAT has passed
/// (plus a second): an idle sender costs nothing. Numbers are written with `%.0f`, as
/// `tostring` would cut them to 14 digits.
pub(crate) const TAKE_SLOT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local floor = now - tonumber(ARGV[3])
if tat < floor then tat = floor end
local allowed_from = tat - tonumber(ARGV[2])
if allowed_from > now then return {0, allowed_from - now} end
local interval = tonumber(ARGV[1])
if interval < 1 then interval = 1 end
local granted = math.floor((now - allowed_from) / interval) + 1
local want = tonumber(ARGV[4])
if want < 1 then want = 1 end
if granted > want then granted = want end
local next_tat = tat + interval * granted
local ttl_ms = math.floor((next_tat - now) / 1000) + 1000
redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX', string.format('%.0f', ttl_ms))
return {granted, 0}
"#;

/// Where the embedded store's clock starts, in µs: a day, so that now less a grace (at most an
/// interval, at most a minute) is never before the clock's start.
const CLOCK_START: u64 = 86_400_000_000;

/// Senders tracked in memory before those whose TAT has passed are dropped.
const PRUNE_ABOVE: usize = 1024;

/// The embedded store's paces: the TAT of each sender, in µs on a monotonic clock (which a
/// change of the wall clock does not move) that reads [`CLOCK_START`] when the store opens.
pub(crate) struct LocalPaces {
    origin: Instant,
    tats: Mutex<HashMap<String, u64>>,
}

impl Default for LocalPaces {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            tats: Mutex::default(),
        }
    }
}

impl LocalPaces {
    /// [`crate::SendLedger::take_send_slot`] in this process.
    pub(crate) fn take(&self, sender: &str, pace: Pace, want: u32) -> Slot {
        let now = CLOCK_START.saturating_add(micros(self.origin.elapsed()));
        let mut tats = self.tats.lock().unwrap_or_else(PoisonError::into_inner);
        let tat = tats.get(sender).copied().unwrap_or(0);
        match gcra(tat, now, pace, want) {
            Ok((next, granted)) => {
                if tats.len() >= PRUNE_ABOVE && !tats.contains_key(sender) {
                    tats.retain(|_, tat| *tat > now);
                }
                tats.insert(sender.to_owned(), next);
                Slot::Go(granted)
            }
            Err(wait) => Slot::Wait(wait),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1000;

    /// One send's step: the TAT to store, or the wait.
    fn one(tat: u64, now: u64, pace: Pace) -> Result<u64, Duration> {
        gcra(tat, now, pace, 1).map(|(tat, granted)| {
            assert_eq!(granted, 1);
            tat
        })
    }

    fn pace(interval_ms: u64, tolerance_ms: u64) -> Pace {
        Pace {
            interval: Duration::from_millis(interval_ms),
            tolerance: Duration::from_millis(tolerance_ms),
            grace: Duration::ZERO,
        }
    }

    #[test]
    fn a_late_send_with_grace_keeps_the_schedule() {
        let late = Pace {
            grace: Duration::from_millis(50),
            ..pace(100, 50)
        };
        // The TAT was 1,000 ms; a send at 1,030 ms takes that slot: the next is at 1,100.
        assert_eq!(one(1_000 * MS, 1_030 * MS, late), Ok(1_100 * MS));
        // Without grace it would start from now, 30 ms lost.
        assert_eq!(one(1_000 * MS, 1_030 * MS, pace(100, 50)), Ok(1_130 * MS));
        // Grace is no credit for an idle sender beyond itself: two at once, then the rate.
        let tat = one(0, 10_000 * MS, late).expect("idle");
        let tat = one(tat, 10_000 * MS, late).expect("the burst of one");
        assert!(one(tat, 10_000 * MS, late).is_err());
    }

    #[test]
    fn an_idle_sender_sends_at_once_and_then_one_interval_apart() {
        let strict = pace(100, 0);
        let tat = one(0, 1_000 * MS, strict).expect("idle: go");
        assert_eq!(tat, 1_100 * MS);
        assert_eq!(one(tat, 1_040 * MS, strict), Err(Duration::from_millis(60)));
        assert_eq!(one(tat, 1_100 * MS, strict), Ok(1_200 * MS));
    }

    #[test]
    fn a_tolerance_of_one_interval_is_a_burst_of_one_message_and_goes_first() {
        let live = pace(100, 100);
        let bulk = pace(100, 50);
        let tat = one(0, 0, live).expect("first");
        let tat = one(tat, 0, live).expect("the burst of one");
        assert_eq!(one(tat, 0, live), Err(Duration::from_millis(100)));
        // A TAT half an interval ahead stops a bulk send and lets a live one through.
        assert_eq!(one(150 * MS, 90 * MS, bulk), Err(Duration::from_millis(10)));
        assert_eq!(one(150 * MS, 90 * MS, live), Ok(250 * MS));
    }

    #[test]
    fn the_local_paces_keep_senders_apart() {
        let paces = LocalPaces::default();
        let strict = pace(60_000, 0);
        assert_eq!(paces.take("a", strict, 1), Slot::Go(1));
        assert_eq!(paces.take("b", strict, 1), Slot::Go(1));
        assert!(matches!(paces.take("a", strict, 1), Slot::Wait(w) if w > Duration::from_secs(59)));
    }

    /// A line of sends takes what the tolerance holds in one step, never more than it wants,
    /// and the rate goes on from the last slot taken.
    #[test]
    fn several_slots_at_once_are_the_tolerance_and_no_more() {
        let burst = pace(100, 400);
        assert_eq!(gcra(0, 1_000 * MS, burst, 10), Ok((1_500 * MS, 5)));
        assert_eq!(gcra(0, 1_000 * MS, burst, 3), Ok((1_300 * MS, 3)));
        assert_eq!(
            gcra(1_500 * MS, 1_000 * MS, burst, 10),
            Err(Duration::from_millis(100))
        );
        // Half an interval later still one slot, not a fraction more.
        assert_eq!(gcra(1_500 * MS, 1_150 * MS, burst, 10), Ok((1_600 * MS, 1)));
        assert_eq!(
            gcra(0, 1_000 * MS, burst, 0),
            Ok((1_100 * MS, 1)),
            "at least one"
        );
    }
}
