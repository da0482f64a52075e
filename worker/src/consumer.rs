//! The worker's consumer: inbound envelopes, keyed by conversation, into [`crate::turn`].

use std::sync::Arc;

use shared::{
    bus::{BusError, Delivery, Topic},
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
    let decode = |payload: &[u8]| {
        serde_json::from_slice::<InboundMessage>(payload)
            .map(|m| (m.session_id().to_string(), m))
            .map_err(|e| e.to_string())
    };
    dispatch::run(bus, Topic::Inbound, decode, Arc::new(ctx), config, shutdown).await
}
