#![warn(missing_docs)]
//! The worker role: inbound messages in, agent replies out.
//!
//! # Layout
//! - [`consumer`]: pulls inbound messages and runs many conversations at once (bounded), each
//!   conversation's messages one at a time in arrival order.
//! - [`turn`]: one inbound message: lead, 24-hour window clock, history, agent, stored turns,
//!   split reply published, then ack. Safe to repeat: a redelivered message republishes the
//!   stored reply instead of running the agent again.
//! - [`agent`]: the backends (`echo`, `openai`, `webhook`) behind one call.
//! - [`media`]: inbound photos and voice notes fetched from Twilio with the account's
//!   credentials, for models that see images and transcription models that hear audio.
//! - [`typing`]: the WhatsApp typing indicator shown while a turn runs.

pub mod agent;
mod consent;
pub mod consumer;
pub mod media;
#[cfg(test)]
mod sizes;
pub mod turn;
pub mod typing;

pub use consumer::{WorkerConfig, run};
pub use turn::TurnContext;

/// Registers the worker's metric families at zero, with their help text, when the process
/// starts (see `ingress::register_metrics`).
pub fn register_metrics() {
    metrics::describe_gauge!(
        "wagate_backlog_messages",
        "Messages of the topic stored and not yet acknowledged (the consumers' lag)"
    );
    metrics::gauge!("wagate_backlog_messages", "topic" => "inbound").set(0.0);
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    for (name, help) in [
        (
            "wagate_queue_wait_seconds",
            "From ingress's 200 to a worker taking the message up (first deliveries)",
        ),
        ("wagate_agent_seconds", "One agent call"),
        ("wagate_turn_seconds", "One turn, store and bus included"),
    ] {
        describe_histogram!(name, metrics::Unit::Seconds, help);
        let _ = metrics::histogram!(name);
    }
    describe_counter!("wagate_turns_total", "Turns by how they ended");
    for outcome in ["replied", "paused", "retry", "dead_letter"] {
        metrics::counter!("wagate_turns_total", "outcome" => outcome).increment(0);
    }
    describe_counter!(
        "wagate_handoffs_total",
        "Conversations handed to a person, by who paused them"
    );
    metrics::counter!("wagate_handoffs_total", "by" => "agent").increment(0);
    shared::events::register_metrics();
    describe_gauge!("wagate_turns_in_flight", "Agent calls running now");
    metrics::gauge!("wagate_turns_in_flight").set(0.0);
    for (name, help) in [
        (
            "wagate_coalesced_total",
            "Messages handled together with others as one burst",
        ),
        (
            "wagate_order_waits_total",
            "Deliveries handed back to keep a conversation in order",
        ),
        (
            "wagate_replies_truncated_total",
            "Agent replies cut at the longest reply",
        ),
    ] {
        describe_counter!(name, help);
        metrics::counter!(name).increment(0);
    }
}
