#![warn(missing_docs)]
//! The ingress role: Twilio's webhooks in, and the admin API. The probes and `/metrics` that
//! its listeners also serve belong to the process (`src/health.rs` of the binary).
//!
//! # Layout
//! - [`state`]: what every handler shares (bus, store, channel directory, keys, settings).
//! - [`webhook`]: `POST /webhooks/twilio/whatsapp/{agent_id}` (inbound messages: verify, publish
//!   durably, answer empty TwiML) and `…/status` (delivery statuses).
//! - [`signed_url`]: the URL Twilio signed, rebuilt byte for byte.
//! - [`spool`]: the local, fsync'd spool that keeps accepted messages while NATS is away.
//! - [`admin`]: the bearer-protected JSON API of agents, channels, leads, sessions, sends and
//!   dead letters, one file per resource.
//! - [`console`]: the web console on the admin listener's `/`, signed in with the admin token,
//!   a client of the same functions as the API.

pub mod admin;
pub mod console;
pub mod signed_url;
pub mod spool;
pub mod state;
pub mod webhook;

use axum::Router;
pub use state::AppState;

/// The routes of the webhook listener (`WAGATE_LISTEN`).
pub fn webhook_router(state: AppState) -> Router {
    webhook::routes().with_state(state)
}

/// The routes of the admin listener (`WAGATE_ADMIN_LISTEN`): the admin API under `/v1`, and
/// the console. The API's fallback (401 without the bearer token) stays the fallback.
pub fn admin_router(state: AppState) -> Router {
    admin::routes(state.clone())
        .merge(console::routes(state.clone()))
        .with_state(state)
}

/// Registers ingress's metric families at zero, with their help text, when the process starts:
/// dashboards and alerts then never query a series that does not exist yet (a rate over a
/// missing series is "no data", not 0). docs/operations.md lists them.
pub fn register_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_histogram!(
        "wagate_webhook_seconds",
        metrics::Unit::Seconds,
        "An accepted inbound webhook, from request to 200"
    );
    let _ = metrics::histogram!("wagate_webhook_seconds");
    describe_counter!("wagate_webhooks_total", "Webhooks by kind and outcome");
    for kind in ["inbound", "status"] {
        for outcome in [
            "accepted",
            "unauthorized",
            "unknown_agent",
            "disabled",
            "bad_request",
            "unavailable",
        ] {
            metrics::counter!("wagate_webhooks_total", "kind" => kind, "outcome" => outcome)
                .increment(0);
        }
    }
    describe_counter!(
        "wagate_inbound_duplicates_total",
        "Twilio retries of a MessageSid already queued"
    );
    metrics::counter!("wagate_inbound_duplicates_total").increment(0);
    describe_counter!(
        "wagate_spooled_total",
        "Messages kept in the local spool while NATS was away"
    );
    metrics::counter!("wagate_spooled_total").increment(0);
    describe_counter!(
        "wagate_spool_drained_total",
        "Spooled messages published since"
    );
    metrics::counter!("wagate_spool_drained_total").increment(0);
    describe_gauge!("wagate_spool_messages", "Messages waiting in the spool");
    metrics::gauge!("wagate_spool_messages").set(0.0);
    describe_counter!(
        "wagate_message_status_total",
        "Twilio's status callbacks, each status of a message once; failures by error code"
    );
    for status in ["sent", "delivered", "read", "failed", "undelivered"] {
        metrics::counter!("wagate_message_status_total", "status" => status, "error_code" => "")
            .increment(0);
    }
    describe_counter!(
        "wagate_handoffs_total",
        "Conversations handed to a person, by who paused them"
    );
    metrics::counter!("wagate_handoffs_total", "by" => "operator").increment(0);
    shared::events::register_metrics();
}
