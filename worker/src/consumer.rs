//! The worker's consumer: inbound envelopes, keyed by conversation, into [`crate::turn`].

use std::sync::Arc;

use shared::{
    bus::{BusError, Delivery},
    dispatch::{self, DispatchConfig, Handler},
    envelope::InboundMessage,
    shutdown::Shutdown,
};

use crate::turn::{TurnContext, handle};

pub use shared::dispatch::DispatchConfig as WorkerConfig;

impl Handler<InboundMessage> for TurnContext {
    async fn handle(&self, batch: Vec<(Box<dyn Delivery>, InboundMessage)>) -> bool {
        handle(self, batch).await
    }

    fn received_at(&self, message: &InboundMessage) -> Option<time::OffsetDateTime> {
        Some(message.received_at)
    }
}

/// Runs the worker until `shutdown`, then finishes or releases what it holds.
pub async fn run(
    ctx: TurnContext,
    config: DispatchConfig,
    shutdown: Shutdown,
) -> Result<(), BusError> {
    let bus = ctx.bus.clone();
    dispatch::run::<InboundMessage, _>(bus, Arc::new(ctx), config, shutdown).await
}
