//! Ordered parts: a reply's next part waits for Twilio's report that the one before it was
//! sent (channels with `ordered_parts`).

use std::time::{Duration, Instant};

use twilio::status::MessageStatus;
use wagate_core::domain::MessageSid;

use super::SendContext;

/// How often a waiting part looks for its predecessor's status at first, and at most: the
/// report usually comes within a second, and the wait doubles so that parts waiting on a
/// report that never comes cost the store a few reads a second each.
pub(super) const FIRST_STATUS_POLL: Duration = Duration::from_millis(25);
pub(super) const LAST_STATUS_POLL: Duration = Duration::from_millis(400);

/// Waits until Twilio reports the message `sid` sent, or any status after that (a failure
/// ends the wait too: nothing more will come before it), or for `part_sent_timeout`.
/// WhatsApp may deliver messages posted in quick succession out of order; Twilio hands them
/// to WhatsApp in order once each is `sent`. A store that cannot be read ends the wait only
/// at the timeout, as a lost report would.
pub(super) async fn wait_until_sent(ctx: &SendContext, sid: &str) {
    // Not Twilio's: no report will name it.
    let Ok(parsed) = MessageSid::parse(sid) else {
        return;
    };
    let started = Instant::now();
    let deadline = started + ctx.part_sent_timeout;
    let mut poll = FIRST_STATUS_POLL;
    let reported = loop {
        match ctx.store.status(&parsed).await {
            Ok(Some((status, _))) if status.rank() >= MessageStatus::Sent.rank() => break true,
            Ok(_) => {}
            Err(e) => tracing::debug!(sid, error = %e, "could not read a part's status"),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            // Counted in the metric below; a log line per part would flood where callbacks
            // cannot reach wagate.
            tracing::debug!(
                sid,
                "no report that the previous part was sent; sending the next one"
            );
            break false;
        }
        tokio::time::sleep(poll.min(left)).await;
        poll = (poll * 2).min(LAST_STATUS_POLL);
    };
    let outcome = if reported { "reported" } else { "timeout" };
    metrics::histogram!("wagate_part_order_wait_seconds", "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
}
