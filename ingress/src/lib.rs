#![warn(missing_docs)]
//! The ingress role: Twilio's webhooks in, the admin API, health and metrics.
//!
//! # Layout
//! - [`state`]: what every handler shares (bus, store, channel directory, keys, settings).
//! - [`webhook`]: `POST /webhooks/twilio/whatsapp/{agent_id}` (inbound messages: verify, publish
//!   durably, answer empty TwiML) and `…/status` (delivery statuses).
//! - [`signed_url`]: the URL Twilio signed, rebuilt byte for byte.
//! - [`health`]: `/healthz`, `/readyz`, `/metrics`.
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
pub use state::AppState;

/// The router of the webhook listener (`WAGATE_LISTEN`).
pub fn webhook_router(state: AppState) -> Router {
    webhook::routes().merge(health::routes()).with_state(state)
}

/// The router of the admin listener (`WAGATE_ADMIN_LISTEN`).
pub fn admin_router(state: AppState) -> Router {
    admin::routes(state.clone())
        .merge(health::routes())
        .with_state(state)
}
