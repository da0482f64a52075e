#![warn(missing_docs)]
//! The sender role: replies in, Twilio Messages API out.
//!
//! # Layout
//! - [`twilio_client`]: the Messages API over HTTP: create (form, Basic auth), list (to settle
//!   ambiguous outcomes), Twilio's error JSON and what each failure means.
//! - [`content`]: the Content API, which makes an agent's quick replies into a content
//!   (buttons or a list) once per distinct question and account.
//! - [`send`]: one reply: 24-hour window check, then each part in order behind its send guard,
//!   with retries on rate limits and a dead letter for what cannot be sent.
//! - [`pacing`]: each sender number's rate, shared by every sender process, live replies
//!   before bulk sends.
//! - [`events`]: the agents' events, delivered to their event webhooks.

pub mod content;
pub mod events;
pub mod pacing;
pub mod send;
pub mod twilio_client;

use std::sync::Arc;

use bus::{BusError, Topic};
use shared::{
    dispatch::{self, DispatchConfig},
    shutdown::Shutdown,
};
use wagate_core::envelope::OutboundReply;

pub use send::SendContext;

/// Runs the sender (replies, bulk sends, and the agents' events) until `shutdown`, then
/// finishes or releases what it holds. Replies and bulk sends are consumed apart, each with
/// the configured concurrency, so that bulk sends waiting for their slots never hold up the
/// live replies behind them in one queue.
pub async fn run(
    ctx: SendContext,
    events: events::EventSender,
    config: DispatchConfig,
    shutdown: Shutdown,
) -> Result<(), BusError> {
    let bus = ctx.bus.clone();
    let ctx = Arc::new(ctx);
    let replies = dispatch::run_on::<OutboundReply, _>(
        Topic::Outbound,
        bus.clone(),
        ctx.clone(),
        config.clone(),
        shutdown.clone(),
    );
    let bulk = dispatch::run_on::<OutboundReply, _>(
        Topic::Bulk,
        bus.clone(),
        ctx,
        config.clone(),
        shutdown.clone(),
    );
    let events =
        dispatch::run::<wagate_core::events::Event, _>(bus, Arc::new(events), config, shutdown);
    tokio::try_join!(replies, bulk, events).map(|_| ())
}

/// Registers the sender's metric families at zero, with their help text, when the process
/// starts (see `ingress::register_metrics`).
pub fn register_metrics() {
    metrics::describe_gauge!(
        "wagate_backlog_messages",
        "Messages of the topic stored and not yet acknowledged (the consumers' lag)"
    );
    metrics::gauge!("wagate_backlog_messages", "topic" => "outbound").set(0.0);
    metrics::gauge!("wagate_backlog_messages", "topic" => "events").set(0.0);
    metrics::gauge!("wagate_backlog_messages", "topic" => "bulk").set(0.0);
    shared::events::register_metrics();
    use metrics::{describe_counter, describe_histogram};
    for (name, help) in [
        ("wagate_twilio_request_seconds", "One Messages API request"),
        (
            "wagate_reply_seconds",
            "From ingress's 200 for a message to its reply accepted by Twilio",
        ),
    ] {
        describe_histogram!(name, metrics::Unit::Seconds, help);
        let _ = metrics::histogram!(name);
    }
    describe_histogram!(
        "wagate_pacing_wait_seconds",
        metrics::Unit::Seconds,
        "Time a post waited for its sender number's slot (the channel's mps), by priority"
    );
    for priority in [pacing::Priority::Live, pacing::Priority::Bulk] {
        let _ = metrics::histogram!("wagate_pacing_wait_seconds", "priority" => priority.as_str());
    }
    describe_histogram!(
        "wagate_part_order_wait_seconds",
        metrics::Unit::Seconds,
        "Time a reply's part waited for Twilio to report the part before it sent (ordered_parts), by whether the report came or the wait timed out"
    );
    for outcome in ["reported", "timeout"] {
        let _ = metrics::histogram!("wagate_part_order_wait_seconds", "outcome" => outcome);
    }
    describe_counter!("wagate_replies_total", "Replies by how they ended");
    for outcome in ["sent", "retry", "dead_letter"] {
        metrics::counter!("wagate_replies_total", "outcome" => outcome).increment(0);
    }
    describe_counter!(
        "wagate_send_ambiguous_total",
        "Answers that left open whether Twilio created the message, by what its list said"
    );
    for resolution in ["found", "not_found"] {
        metrics::counter!("wagate_send_ambiguous_total", "resolution" => resolution).increment(0);
    }
    describe_counter!(
        "wagate_twilio_rate_limited_total",
        "429s and Twilio's rate-limit codes, waited out in place"
    );
    metrics::counter!("wagate_twilio_rate_limited_total").increment(0);
}
