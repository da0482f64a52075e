//! Raising events for the agents' event webhooks (the events themselves:
//! [`wagate_core::events`]).

use wagate_core::{domain::AgentId, events::Event};

use crate::directory::{ChannelDirectory, Lookup};

/// Registers the events' metric family at zero (every role raises events; the sender delivers
/// them).
pub fn register_metrics() {
    metrics::describe_counter!(
        "wagate_events_total",
        "Events for the agents' event webhooks, by outcome (lost: not queued)"
    );
    for outcome in ["delivered", "retry", "dead_letter", "lost"] {
        metrics::counter!("wagate_events_total", "outcome" => outcome).increment(0);
    }
}

/// Publishes the event that `event` makes for `agent`'s event webhook; nothing for an agent
/// without one (asked of the directory's cache). The event is made only when it will be
/// published: most agents have no webhook, and making one (its data, its id, the trace it
/// carries) costs more than the rest of raising it. A failure is logged and counted rather
/// than failing what raised it: the event reports a step that happened, which must not be
/// undone or repeated for its sake.
pub async fn emit<E: Into<Option<Event>>>(
    bus: &dyn bus::Bus,
    directory: &ChannelDirectory,
    agent: &AgentId,
    event: impl FnOnce() -> E,
) {
    match directory.lookup(agent).await {
        Ok(Lookup::Found(c)) if c.agent.events.is_some() => {}
        _ => return,
    }
    let Some(event) = event().into() else {
        return;
    };
    if let Err(e) = bus::publish(bus, &event).await {
        tracing::error!(kind = %event.kind, id = %event.id, error = %e, "an event could not be queued for the agent's event webhook; it is lost");
        metrics::counter!("wagate_events_total", "outcome" => "lost").increment(1);
    }
}
