#![warn(missing_docs)]
//! The sender role: replies in, Twilio Messages API out.
//!
//! # Layout
//! - [`twilio_client`]: the Messages API over HTTP: create (form, Basic auth), list (to settle
//!   ambiguous outcomes), Twilio's error JSON and what each failure means.
//! - [`send`]: one reply: 24-hour window check, then each part in order behind its send guard,
//!   with retries on rate limits and a dead letter for what cannot be sent.

pub mod send;
pub mod twilio_client;

use std::sync::Arc;

use shared::{
    bus::BusError,
    dispatch::{self, DispatchConfig},
    envelope::OutboundReply,
    shutdown::Shutdown,
};

pub use send::SendContext;

/// Runs the sender until `shutdown`, then finishes or releases what it holds.
pub async fn run(
    ctx: SendContext,
    config: DispatchConfig,
    shutdown: Shutdown,
) -> Result<(), BusError> {
    let bus = ctx.bus.clone();
    dispatch::run::<OutboundReply, _>(bus, Arc::new(ctx), config, shutdown).await
}
