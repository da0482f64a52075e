//! Consumes a topic with many conversations in flight at once, up to a limit, while the
//! messages of one conversation are handled one at a time in the order the bus delivered them.
//! Worker and sender both run on this: a queue per conversation, drained by one task each.
//! Across processes, a message is handled only when it is the oldest unfinished one of its
//! conversation ([`Delivery::is_next_in_conversation`]); a younger one is handed back to wait
//! a moment, so order holds however many processes consume (see docs/ordering.md).

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    pin::{Pin, pin},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

use crate::shutdown::Shutdown;
use bus::{Bus, BusError, Deliveries, Delivery, Envelope, Topic};

/// Handles decoded messages and settles their deliveries (ack, retry or dead letter).
pub trait Handler<T>: Send + Sync + 'static {
    /// Handles messages of one conversation, oldest first: one, or several that came back to
    /// back and are handled as one (burst coalescing); must settle every delivery. Returns
    /// whether every message of the batch was acknowledged (finished for good), which lets the
    /// conversation's next queued message skip over them when it checks its turn.
    fn handle(&self, batch: Vec<(Box<dyn Delivery>, T)>) -> impl Future<Output = bool> + Send;

    /// When the message was received, for the coalescing window; `None` if unknown.
    fn received_at(&self, _message: &T) -> Option<time::OffsetDateTime> {
        None
    }
}

/// Burst coalescing: messages of one conversation queued back to back go to the handler
/// together.
#[derive(Debug, Clone, Copy)]
pub struct Coalesce {
    /// How long after a message was received its turn waits for more (zero: take only what is
    /// already queued, adding no latency).
    pub window: Duration,
    /// Most messages in one batch.
    pub max: usize,
}

/// Tuning of a dispatcher.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// Messages handled (or queued behind their conversation) at once.
    pub concurrency: usize,
    /// Time given to in-flight messages on shutdown.
    pub shutdown_grace: Duration,
    /// Whether and how messages of a conversation are coalesced.
    pub coalesce: Option<Coalesce>,
}

struct Item<T> {
    delivery: Box<dyn Delivery>,
    message: T,
    permit: OwnedSemaphorePermit,
}

/// The conversations this process is working on.
struct Conversations<T> {
    /// Per conversation with a task draining it: the messages waiting behind the one in hand.
    queued: HashMap<String, VecDeque<Item<T>>>,
    /// Per conversation whose task ended a moment ago: the position of the last message it
    /// finished, and when. That message's ack may not have reached the bus yet, so the
    /// conversation's next message checks its turn after that position.
    finished: HashMap<String, (u64, Instant)>,
    /// When `finished` is next cleared of what it no longer needs.
    next_sweep: Instant,
}

impl<T> Default for Conversations<T> {
    fn default() -> Self {
        Self {
            queued: HashMap::new(),
            finished: HashMap::new(),
            next_sweep: Instant::now() + FINISHED_MEMORY,
        }
    }
}

/// How long a drained conversation's last finished position is remembered: far longer than an
/// ack takes to apply, short enough to keep the table to the conversations active just now.
const FINISHED_MEMORY: Duration = Duration::from_secs(5);

impl<T> Conversations<T> {
    /// The position of the message the task of `key` finished last, if it ended just now.
    fn take_finished(&mut self, key: &str) -> Option<u64> {
        self.finished
            .remove(key)
            .filter(|(_, at)| at.elapsed() < FINISHED_MEMORY)
            .map(|(position, _)| position)
    }

    /// Ends the task of `key`, remembering the last message it finished.
    fn end(&mut self, key: &str, finished: Option<u64>) {
        self.queued.remove(key);
        let now = Instant::now();
        if now >= self.next_sweep {
            self.finished
                .retain(|_, (_, at)| now.duration_since(*at) < FINISHED_MEMORY);
            self.next_sweep = now + FINISHED_MEMORY;
        }
        if let Some(position) = finished {
            self.finished.insert(key.to_owned(), (position, now));
        }
    }
}

type Queues<T> = Arc<Mutex<Conversations<T>>>;

/// How long to wait before asking the bus again for a subscription it could not give.
const SUBSCRIBE_RETRY: Duration = Duration::from_secs(1);
/// How long one attempt to subscribe may take: a request in flight when NATS went away is
/// never answered, and would otherwise hold the role until the process is stopped.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Subscribes to `topic`, asking again while the bus is unreachable (NATS restarting, say), so
/// that a role outlives an outage that begins before it has subscribed; `None` on shutdown.
async fn subscribe(bus: &dyn Bus, topic: Topic, shutdown: &Shutdown) -> Option<Deliveries> {
    loop {
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return None,
            a = tokio::time::timeout(SUBSCRIBE_TIMEOUT, bus.subscribe(topic)) => a,
        };
        match attempt {
            Ok(Ok(deliveries)) => return Some(deliveries),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, topic = topic.as_str(), "could not subscribe; retrying")
            }
            Err(_) => tracing::warn!(
                topic = topic.as_str(),
                "the bus did not answer the subscription in time; retrying"
            ),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(SUBSCRIBE_RETRY) => {}
        }
    }
}

/// How often a consumer reads its topic's backlog for `wagate_backlog_messages`.
const BACKLOG_EVERY: Duration = Duration::from_secs(5);

/// Keeps the gauge `wagate_backlog_messages{topic}` current while the consumer runs: the lag
/// that says whether to add workers or senders, on any bus (KEDA and the NATS exporter read
/// JetStream's own figure; this one also works embedded and without an exporter). Every
/// consumer process reports the same figure, so dashboards take the max, not the sum.
async fn watch_backlog(bus: Arc<dyn Bus>, topic: Topic, shutdown: Shutdown) {
    let gauge = metrics::gauge!("wagate_backlog_messages", "topic" => topic.as_str());
    let mut every = tokio::time::interval(BACKLOG_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        match bus.backlog(topic).await {
            Ok(n) => gauge.set(n as f64),
            Err(e) => {
                tracing::debug!(error = %e, topic = topic.as_str(), "could not read the backlog")
            }
        }
    }
}

/// Consumes `T`'s topic until `shutdown`, then waits for in-flight messages up to the grace
/// period. A payload that is not a `T` is logged and acknowledged (it is not a message of this
/// pipeline); the others are handled in order per conversation.
pub async fn run<T, H>(
    bus: Arc<dyn Bus>,
    handler: Arc<H>,
    config: DispatchConfig,
    shutdown: Shutdown,
) -> Result<(), BusError>
where
    T: Envelope,
    H: Handler<T>,
{
    run_on(T::TOPIC, bus, handler, config, shutdown).await
}

/// [`run`] on `topic`, one of the queues `T` travels on ([`Envelope::topic`]).
pub async fn run_on<T, H>(
    topic: Topic,
    bus: Arc<dyn Bus>,
    handler: Arc<H>,
    config: DispatchConfig,
    shutdown: Shutdown,
) -> Result<(), BusError>
where
    T: Envelope,
    H: Handler<T>,
{
    let permits = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let queues: Queues<T> = Arc::default();
    let tracker = TaskTracker::new();
    let Some(mut deliveries) = subscribe(&*bus, topic, &shutdown).await else {
        return Ok(());
    };
    tracing::info!(
        topic = topic.as_str(),
        concurrency = config.concurrency,
        "consuming"
    );
    tracker.spawn(watch_backlog(bus.clone(), topic, shutdown.clone()));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let next = tokio::select! {
            _ = shutdown.cancelled() => break,
            n = deliveries.next() => n,
        };
        let mut delivery = match next {
            Some(Ok(d)) => d,
            failed => {
                // A subscription whose pull failed is not read again but replaced: async-nats
                // counts a pull answered "no responders" (the consumer had no leader, as while
                // JetStream elects one) as a batch still to come, and asks again only when that
                // request expires, 30 s later, while the worker idles. A new one asks at once.
                match failed {
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, topic = topic.as_str(), "pulling failed; subscribing again")
                    }
                    _ => tracing::warn!(
                        topic = topic.as_str(),
                        "subscription ended; subscribing again"
                    ),
                }
                drop(deliveries);
                tokio::time::sleep(Duration::from_millis(500)).await;
                match subscribe(&*bus, topic, &shutdown).await {
                    Some(d) => deliveries = d,
                    None => break,
                }
                continue;
            }
        };
        let (key, message) = match serde_json::from_slice::<T>(&delivery.take_payload()) {
            Ok(message) => (message.session_id().to_string(), message),
            Err(e) => {
                tracing::error!(error = %e, topic = topic.as_str(), "dropping a payload that is not a message of this pipeline");
                let _ = delivery.ack().await;
                continue;
            }
        };
        let item = Item {
            delivery,
            message,
            permit,
        };
        // A conversation without a task gets one, which takes this message from the queue:
        // passed to the task instead, the message would be held in the task twice (an async
        // fn keeps its arguments apart from its locals), for the whole turn.
        let first = {
            let mut q = queues.lock().unwrap_or_else(|p| p.into_inner());
            match q.queued.get_mut(&key) {
                Some(waiting) => {
                    waiting.push_back(item);
                    None
                }
                None => {
                    q.queued.insert(key.clone(), VecDeque::from([item]));
                    Some(q.take_finished(&key))
                }
            }
        };
        if let Some(finished) = first {
            tracker.spawn(drain(
                handler.clone(),
                queues.clone(),
                key,
                finished,
                config.coalesce,
                shutdown.clone(),
            ));
        }
    }
    tracker.close();
    if tokio::time::timeout(config.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            topic = topic.as_str(),
            "shutdown deadline passed with messages in flight; they will be redelivered"
        );
    }
    Ok(())
}

/// How long a message waits for an older one of its conversation, jittered so that waiting
/// messages do not come back in lockstep.
fn order_wait() -> Duration {
    use rand::RngExt;
    Duration::from_millis(rand::rng().random_range(50..150))
}

/// Handles a conversation's queued messages in order until its queue is empty. `finished` is
/// the position of the conversation's last message this process finished, if that was just
/// now. The task is held for as long as the handler runs (a worker's agent call, seconds), at
/// the size of its largest state: the message in hand is in its batch on the heap, and what
/// is awaited besides the handler is boxed.
async fn drain<T, H: Handler<T>>(
    handler: Arc<H>,
    queues: Queues<T>,
    key: String,
    mut finished: Option<u64>,
    coalesce: Option<Coalesce>,
    shutdown: Shutdown,
) {
    loop {
        let item = {
            let mut q = queues.lock().unwrap_or_else(|p| p.into_inner());
            match q.queued.get_mut(&key).and_then(VecDeque::pop_front) {
                Some(next) => next,
                None => {
                    q.end(&key, finished);
                    return;
                }
            }
        };
        // On the heap at once, in the batch of the turn it begins: the task keeps no room for
        // the message beside the turn's (its cell 1,024 -> 512 bytes for the worker).
        let mut batch = vec![item];
        let delivery = batch[0].delivery.as_ref();
        if shutdown.is_cancelled() {
            // Not started: hand it back at once so another process takes it.
            let _ = delivery.retry_in(Duration::ZERO).await;
            continue;
        }
        // After a message this process finished, the next one only has to be the first after
        // it: the finished one may still be stored until its ack is applied.
        let turn = match finished.take() {
            Some(position) => delivery.is_next_after(position).await,
            None => delivery.is_next_in_conversation().await,
        };
        match turn {
            Ok(true) => {
                if let Some(c) = coalesce {
                    Box::pin(gather(handler.as_ref(), &queues, &key, &mut batch, c)).await;
                }
                if batch.len() > 1 {
                    metrics::counter!("wagate_coalesced_total").increment(batch.len() as u64 - 1);
                }
                // The permits are held until the batch is handled: they are what bounds
                // the agent calls (or Twilio posts) running at once.
                let last = batch.iter().map(|i| i.delivery.position()).max();
                let (permits, batch): (Vec<_>, Vec<_>) = batch
                    .into_iter()
                    .map(|i| (i.permit, (i.delivery, i.message)))
                    .unzip();
                // Boxed, the handler's future (a whole turn: store, agent and bus calls)
                // is not part of this task's, which tokio copies on every spawn and again
                // when the task ends (1.5 KB for the worker's turn).
                if Box::pin(handler.handle(batch)).await {
                    finished = last;
                }
                drop(permits);
            }
            Ok(false) => {
                metrics::counter!("wagate_order_waits_total").increment(1);
                let _ = delivery.retry_in(order_wait()).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot tell the conversation's order; trying later");
                let _ = delivery.retry_in(order_wait()).await;
            }
        }
    }
}

/// Adds to `batch`, after its one message, the messages queued behind it that directly follow
/// it in the conversation (waiting out the window first), up to the batch limit.
async fn gather<T, H: Handler<T>>(
    handler: &H,
    queues: &Queues<T>,
    key: &str,
    batch: &mut Vec<Item<T>>,
    coalesce: Coalesce,
) {
    let Some(first) = batch.first() else { return };
    if let Some(received) = handler.received_at(&first.message) {
        let age = time::OffsetDateTime::now_utc() - received;
        if let Ok(left) =
            Duration::try_from(time::Duration::try_from(coalesce.window).unwrap_or_default() - age)
        {
            with_keep_alive(first.delivery.as_ref(), pin!(tokio::time::sleep(left))).await;
        }
    }
    while batch.len() < coalesce.max {
        let candidate = {
            let mut q = queues.lock().unwrap_or_else(|p| p.into_inner());
            q.queued.get_mut(key).and_then(VecDeque::pop_front)
        };
        let Some(candidate) = candidate else { break };
        let previous = batch.last().map_or(0, |i| i.delivery.position());
        if matches!(candidate.delivery.is_next_after(previous).await, Ok(true)) {
            batch.push(candidate);
        } else {
            let mut q = queues.lock().unwrap_or_else(|p| p.into_inner());
            q.queued
                .entry(key.to_owned())
                .or_default()
                .push_front(candidate);
            break;
        }
    }
}

/// Runs `work` while telling the bus every few seconds that this delivery is still being worked
/// on, so a slow agent does not get its message handed to another worker. `work` is pinned by
/// the caller and only borrowed here: an async fn keeps a future it is given apart from its
/// locals, and pinning it moves it once more, so taken by value a send was held three times
/// (a sender's reply in flight took 16.6 KB, 3.8 KB now: sender/src/send/sizes.rs).
pub async fn with_keep_alive<F: Future>(
    delivery: &dyn Delivery,
    mut work: Pin<&mut F>,
) -> F::Output {
    let Some(every) = delivery.keep_alive_every() else {
        return work.await;
    };
    let mut ticker = tokio::time::interval(every);
    ticker.tick().await;
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = ticker.tick() => {
                if let Err(e) = delivery.keep_alive().await {
                    tracing::debug!(error = %e, "keep-alive failed");
                }
            }
        }
    }
}
