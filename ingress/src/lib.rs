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
