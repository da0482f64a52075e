//! The worker's consumer: inbound envelopes, keyed by conversation, into [`crate::turn`].

use std::sync::Arc;

use bus::{BusError, Delivery};
use shared::{
    dispatch::{self, DispatchConfig, Handler},
    shutdown::Shutdown,
};
use wagate_core::envelope::InboundMessage;

use tracing::Instrument;

use crate::turn::{TurnContext, handle};

pub use shared::dispatch::DispatchConfig as WorkerConfig;

impl Handler<InboundMessage> for TurnContext {
    /// The turn continues the trace of its first message (a burst handled as one turn is
    /// one span, in the trace where it began).
    async fn handle(&self, batch: Vec<(Box<dyn Delivery>, InboundMessage)>) -> bool {
        let span = tracing::info_span!("turn", trace_id = tracing::field::Empty);
        let parent = batch.first().and_then(|(_, m)| m.traceparent.as_deref());
        wagate_core::trace::continue_trace(&span, parent);
        handle(self, batch).instrument(span).await
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
