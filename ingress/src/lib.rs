#![warn(missing_docs)]
//! The ingress role: Twilio's webhooks in, the admin API, health and metrics.
//!
//! # Layout
//! - [`state`]: what every handler shares (bus, store, channel directory, keys, settings).
//! - [`webhook`]: `POST /webhooks/twilio/whatsapp/{agent_id}` (inbound messages: verify, publish
//!   durably, answer empty TwiML) and `…/status` (delivery statuses).
//! - [`signed_url`]: the URL Twilio signed, rebuilt byte for byte.
//! - [`health`]: `/healthz` and `/readyz` (both listeners), `/metrics` (admin listener only).
//! - [`spool`]: the local, fsync'd spool that keeps accepted messages while NATS is away.
//! - [`admin`]: the bearer-protected JSON API of agents, channels, leads, sessions, sends and
//!   dead letters, one file per resource.

pub mod admin;
pub mod health;
pub mod signed_url;
pub mod spool;
pub mod state;
pub mod webhook;

use axum::Router;
use health::Health;
pub use state::AppState;

/// The router of the webhook listener (`WAGATE_LISTEN`): the webhooks and the probes.
pub fn webhook_router(state: AppState, health: Health) -> Router {
    webhook::routes()
        .merge(health::probes(health))
        .with_state(state)
}

/// The router of the admin listener (`WAGATE_ADMIN_LISTEN`): the admin API, the probes and
/// `/metrics`.
pub fn admin_router(state: AppState, health: Health) -> Router {
    admin::routes(state.clone())
        .merge(health::routes(health))
        .with_state(state)
}
