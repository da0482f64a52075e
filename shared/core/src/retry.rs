//! Retry schedules as data: a list of delays, one per further attempt, each with jitter.
//! A stage that fails transiently waits the next delay and tries again; when the list is used
//! up, the message becomes a dead letter. Operators tune the list, not the code.

use std::{fmt, str::FromStr, time::Duration};

use rand::RngExt;

/// Delays between attempts; `delays.len() + 1` attempts in all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySchedule {
    delays: Vec<Duration>,
}

impl RetrySchedule {
    /// A schedule from explicit delays.
    pub fn new(delays: Vec<Duration>) -> Self {
        Self { delays }
    }

    /// Attempts allowed in all, the first included.
    pub fn max_attempts(&self) -> u64 {
        self.delays.len() as u64 + 1
    }

    /// The delay before attempt `attempt + 1`, after `attempt` (1-based) failed, with ±20%
    /// jitter so that many failures at once do not retry in lockstep; `None` when attempts are
    /// used up.
    pub fn delay_after(&self, attempt: u64) -> Option<Duration> {
        let base = *self
            .delays
            .get(usize::try_from(attempt).ok()?.checked_sub(1)?)?;
        let factor = rand::rng().random_range(0.8..=1.2);
        Some(base.mul_f64(factor))
    }
}

impl FromStr for RetrySchedule {
    type Err = BadDuration;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let delays = s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(parse_duration)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { delays })
    }
}

impl fmt::Display for RetrySchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .delays
            .iter()
            .map(|d| format!("{}ms", d.as_millis()))
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// A text that is not a duration.
#[derive(Debug, thiserror::Error)]
#[error("'{0}' is not a duration (e.g. 500ms, 5s, 2m, 1h)")]
pub struct BadDuration(String);

/// Parses `250ms`, `5s`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, BadDuration> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let bad = || BadDuration(s.to_owned());
    let n: u64 = num.parse().map_err(|_| bad())?;
    let ms = match unit {
        "ms" => n,
        "s" => n.saturating_mul(1000),
        "m" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        _ => return Err(bad()),
    };
    Ok(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_bounds() {
        let s: RetrySchedule = "1s, 500ms,2m".parse().unwrap();
        assert_eq!(s.max_attempts(), 4);
        let d = s.delay_after(1).unwrap();
        assert!(d >= Duration::from_millis(800) && d <= Duration::from_millis(1200));
        assert!(s.delay_after(3).is_some());
        assert!(s.delay_after(4).is_none());
        assert!(s.delay_after(0).is_none());
        assert!("5x".parse::<RetrySchedule>().is_err());
        assert!("".parse::<RetrySchedule>().unwrap().max_attempts() == 1);
    }
}
