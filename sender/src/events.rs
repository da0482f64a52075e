//! Delivers the agents' events ([`shared::events`]) to their event webhooks, signed the
//! Standard Webhooks way, at least once: an answer other than 2xx, or none, is tried again
//! after the `WAGATE_EVENTS_RETRY` delays, keeping its `webhook-id`, and then becomes a dead
//! letter (stage `event`). A conversation's events arrive in order.

use std::{sync::Arc, time::Duration};

use bus::{Bus, Delivery};
use secrecy::ExposeSecret;
use shared::{
    directory::{ChannelDirectory, Lookup},
    dispatch::Handler,
};
use wagate_core::{
    envelope::DeadLetter,
    events::{Event, secret_key, signature},
    retry::RetrySchedule,
};

/// What delivering events needs.
pub struct EventSender {
    /// Dead letters go here.
    pub bus: Arc<dyn Bus>,
    /// Agents with their decrypted event secrets.
    pub directory: Arc<ChannelDirectory>,
    /// For the webhooks.
    pub http: reqwest::Client,
    /// When to try again.
    pub retry: RetrySchedule,
    /// Time limit of one delivery.
    pub timeout: Duration,
}

impl Handler<Event> for EventSender {
    async fn handle(&self, batch: Vec<(Box<dyn Delivery>, Event)>) -> bool {
        let mut acked = true;
        for (delivery, event) in batch {
            acked &= self.settle(delivery.as_ref(), event).await;
        }
        acked
    }
}

impl EventSender {
    /// Delivers one event and settles its delivery; true when it was acknowledged.
    async fn settle(&self, delivery: &dyn Delivery, event: Event) -> bool {
        let outcome = match self.deliver(&event).await {
            Ok(()) => {
                metrics::counter!("wagate_events_total", "outcome" => "delivered").increment(1);
                return ack(delivery).await;
            }
            Err(Undelivered::Dropped(why)) => {
                tracing::info!(kind = %event.kind, id = %event.id, why, "event dropped");
                return ack(delivery).await;
            }
            Err(Undelivered::Failed(why)) => why,
        };
        let attempt = delivery.attempt();
        if let Some(delay) = self.retry.delay_after(attempt) {
            tracing::warn!(kind = %event.kind, id = %event.id, attempt, ?delay, reason = %outcome, "event not delivered; trying again");
            metrics::counter!("wagate_events_total", "outcome" => "retry").increment(1);
            let _ = delivery.retry_in(delay).await;
            return false;
        }
        tracing::error!(kind = %event.kind, id = %event.id, attempt, reason = %outcome, "event not delivered for good: dead letter");
        let letter = DeadLetter::event(event, outcome, attempt);
        match self.bus.put_dead_letter(&letter).await {
            Ok(_) => {
                metrics::counter!("wagate_events_total", "outcome" => "dead_letter").increment(1);
                ack(delivery).await
            }
            Err(e) => {
                tracing::error!(error = %e, "could not store the event's dead letter; keeping it");
                let _ = delivery.retry_in(Duration::from_secs(5)).await;
                false
            }
        }
    }

    async fn deliver(&self, event: &Event) -> Result<(), Undelivered> {
        let channel = match self.directory.lookup(&event.agent_id).await {
            Ok(Lookup::Found(c)) => c,
            Ok(_) => return Err(Undelivered::Dropped("the agent is gone")),
            Err(e) => return Err(Undelivered::Failed(e.to_string())),
        };
        let (Some(endpoint), Some(secret)) = (&channel.agent.events, &channel.events_secret) else {
            return Err(Undelivered::Dropped("the agent has no event webhook now"));
        };
        let key = secret_key(secret.expose_secret()).ok_or_else(|| {
            Undelivered::Failed("the stored events_secret is not a whsec_ secret".into())
        })?;
        let body = event
            .body()
            .map_err(|e| Undelivered::Failed(format!("the event did not encode: {e}")))?;
        let timestamp = time::OffsetDateTime::now_utc().unix_timestamp();
        let answer = self
            .http
            .post(&endpoint.url)
            .timeout(self.timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &event.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                signature(&key, &event.id, timestamp, &body),
            )
            .body(body)
            .send()
            .await
            .map_err(|e| {
                Undelivered::Failed(if e.is_timeout() {
                    "the event webhook did not answer in time".to_owned()
                } else {
                    "the event webhook could not be reached".to_owned()
                })
            })?;
        let status = answer.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(Undelivered::Failed(format!(
                "the event webhook answered HTTP {}",
                status.as_u16()
            )))
        }
    }
}

/// Why an event was not delivered.
enum Undelivered {
    /// Nothing to deliver it to any more: acknowledged and forgotten.
    Dropped(&'static str),
    /// The webhook did not take it (why, safe to log and keep): tried again, then a dead
    /// letter.
    Failed(String),
}

async fn ack(delivery: &dyn Delivery) -> bool {
    match delivery.ack().await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "event ack failed; it will be delivered again");
            false
        }
    }
}
