//! The bus on NATS JetStream. Three streams per prefix: `<P>_INBOUND` and `<P>_OUTBOUND`
//! (work queues, one durable pull consumer each, shared by every worker or sender process) and
//! `<P>_DLQ` (dead letters, kept until replayed). Subjects carry the conversation
//! (`<p>.inbound.<agent>.<user>`), so JetStream's per-subject order is the conversation's order.
//! Publishes set `Nats-Msg-Id`, so JetStream drops duplicates within its window.

use std::{path::PathBuf, sync::Arc, time::Duration};

use async_nats::jetstream::{
    self, AckKind, Context,
    consumer::{PullConsumer, pull},
    context::PublishErrorKind,
    message::PublishMessage,
    stream::{self, RetentionPolicy, StorageType, Stream},
};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use secrecy::ExposeSecret;

use super::{Bus, BusError, Deliveries, Delivery, Published, Topic};
use wagate_core::{envelope::DeadLetter, redact};

/// How long a delivery may stay unacknowledged before JetStream gives it to another consumer;
/// consumers send keep-alives while they work.
const ACK_WAIT: Duration = Duration::from_secs(30);
/// Tries of one ack before giving up (about 10 s in all, enough for a NATS reconnect).
const ACK_ATTEMPTS: usize = 8;
/// How long a publish is tried again while its stream elects a leader or the client
/// reconnects (a JetStream election after a server died takes a few seconds).
const PUBLISH_RETRY_FOR: Duration = Duration::from_secs(20);

/// Whether a publish that failed this way can succeed when tried again. Only a message too big
/// for the server and the expected-last checks (which wagate does not use) cannot. Everything
/// else, including the JetStream API errors async-nats reports as `Other` (a stream offline or
/// a cluster temporarily unavailable while it elects a leader), is tried again until the
/// deadline: a publish that failed at once used to make ingress spool the message, and its
/// later messages then queued behind the spool while other ingress processes published
/// theirs directly, out of order.
fn may_pass_on_retry(kind: PublishErrorKind) -> bool {
    !matches!(
        kind,
        PublishErrorKind::MaxPayloadExceeded
            | PublishErrorKind::WrongLastMessageId
            | PublishErrorKind::WrongLastSequence
    )
}
/// Messages older than this are dropped from the work queues, whatever their state.
const MAX_AGE: Duration = Duration::from_secs(14 * 24 * 3600);
/// How long one pull request waits for messages before the client asks again.
const PULL_EXPIRES: Duration = Duration::from_secs(10);
/// How often the server says a waiting pull request is alive. Without it (async-nats's default),
/// a request lost with its server, killed or restarted, or one answered "no responders" while a
/// consumer elects its leader, is noticed only when it expires; with it, two missed heartbeats
/// end the subscription, and dispatch subscribes again at once.
const PULL_HEARTBEAT: Duration = Duration::from_secs(2);

/// Tuning of a JetStream bus.
#[derive(Debug, Clone)]
pub struct JetStreamOptions {
    /// Prefix of streams and subjects.
    pub prefix: String,
    /// Most deliveries one consumer process holds at once (unacked).
    pub max_in_flight: usize,
    /// How long JetStream remembers a `Nats-Msg-Id` to drop duplicates. Twilio's own retries
    /// of a webhook come within seconds; later repeats are caught by the store (completed
    /// turns, send guards), so this only needs to cover the common case cheaply.
    pub duplicate_window: Duration,
    /// Replicas of every stream created; an existing stream with another count is changed to
    /// this one at connect (JetStream moves the data; a cluster needs that many servers).
    pub replicas: usize,
    /// A `.creds` file (user JWT and nkey seed) to authenticate with.
    pub credentials_file: Option<PathBuf>,
    /// A CA bundle (PEM) the servers' certificates must chain to; set, TLS is required.
    pub tls_ca: Option<PathBuf>,
}

impl JetStreamOptions {
    /// Options with the given prefix and one replica, no credentials file and no TLS.
    pub fn new(
        prefix: impl Into<String>,
        max_in_flight: usize,
        duplicate_window: Duration,
    ) -> Self {
        Self {
            prefix: prefix.into(),
            max_in_flight,
            duplicate_window,
            replicas: 1,
            credentials_file: None,
            tls_ca: None,
        }
    }
}

/// The bus on NATS JetStream.
#[derive(Clone)]
pub struct JetStreamBus {
    js: Context,
    prefix: String,
    inbound: Stream,
    outbound: Stream,
    events: Stream,
    bulk: Stream,
    dlq: Stream,
    max_in_flight: usize,
}

impl JetStreamBus {
    /// Connects and creates (or checks) the streams.
    pub async fn connect(url: &str, options: JetStreamOptions) -> Result<Self, BusError> {
        // Credentials go to the client as options, never inside the URL: the client logs the
        // server addresses it tries (at debug), password and all.
        let mut servers = Vec::new();
        let mut credentials = None;
        for item in url.split(',') {
            let (bare, userinfo) = redact::split_userinfo(item.trim());
            servers.push(bare);
            credentials = credentials.or(userinfo);
        }
        // TLS (a tls:// URL, WAGATE_NATS_TLS_CA, or a server that requires it) needs rustls's
        // process-wide crypto provider, which rustls cannot choose by itself when two are
        // compiled in (async-nats brings ring, reqwest aws-lc-rs). Installing fails only when
        // one is installed already, which is as good.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let mut connect = async_nats::ConnectOptions::new()
            .name("wagate")
            .connection_timeout(Duration::from_secs(5));
        if let Some(userinfo) = credentials {
            connect = match redact::decode_userinfo(&userinfo) {
                (user, Some(password)) => connect.user_and_password(
                    user.expose_secret().to_owned(),
                    password.expose_secret().to_owned(),
                ),
                (token, None) => connect.token(token.expose_secret().to_owned()),
            };
        }
        let shown = redact::url(url);
        if let Some(path) = &options.credentials_file {
            // The error names the file, never its content (a seed).
            connect = connect
                .credentials_file(path)
                .await
                .map_err(|e| BusError::Connect {
                    url: shown.clone(),
                    reason: format!(
                        "WAGATE_NATS_CREDS {}: not a readable .creds file ({})",
                        path.display(),
                        e.kind()
                    ),
                })?;
        }
        if let Some(path) = &options.tls_ca {
            if let Err(e) = std::fs::metadata(path) {
                return Err(BusError::Connect {
                    url: shown,
                    reason: format!("WAGATE_NATS_TLS_CA {}: {e}", path.display()),
                });
            }
            connect = connect
                .add_root_certificates(path.clone())
                .require_tls(true);
        }
        // A list, not the joined text: the client reads a string as one address.
        let client = connect.connect(servers);
        let client = tokio::time::timeout(Duration::from_secs(10), client)
            .await
            .map_err(|_| BusError::Connect {
                url: shown.clone(),
                reason: "no answer within 10s".into(),
            })?
            .map_err(|e| BusError::Connect {
                url: shown.clone(),
                reason: redact::text(&e.to_string()),
            })?;
        let js = jetstream::new(client);
        let prefix = options.prefix;
        let replicas = options.replicas.max(1);
        let upper = prefix.to_uppercase();
        let work_queue = |name: &str, topic: Topic| stream::Config {
            name: format!("{upper}_{name}"),
            subjects: vec![format!("{prefix}.{}.>", topic.as_str())],
            retention: RetentionPolicy::WorkQueue,
            storage: StorageType::File,
            duplicate_window: options.duplicate_window,
            max_age: MAX_AGE,
            num_replicas: replicas,
            allow_direct: true,
            ..Default::default()
        };
        let create = |config: stream::Config| {
            let js = js.clone();
            async move {
                let name = config.name.clone();
                let mut stream = js.get_or_create_stream(config).await.map_err(|e| {
                    BusError::Refused(format!(
                        "could not create stream {name} (is JetStream enabled? nats-server -js): {e}"
                    ))
                })?;
                // An existing stream keeps its configuration (an operator's limits included)
                // but takes the replica count configured now.
                let info = stream.info().await.map_err(BusError::nats("stream info"))?;
                if info.config.num_replicas != replicas {
                    let mut config = info.config.clone();
                    let was = config.num_replicas;
                    config.num_replicas = replicas;
                    js.update_stream(&config).await.map_err(|e| {
                        BusError::Refused(format!(
                            "could not change stream {name} from {was} to {replicas} replicas (WAGATE_NATS_REPLICAS; a cluster needs at least that many JetStream servers): {e}"
                        ))
                    })?;
                    tracing::info!(stream = %name, from = was, to = replicas, "stream replicas changed");
                    stream = js
                        .get_stream(&name)
                        .await
                        .map_err(BusError::nats("stream"))?;
                }
                Ok::<_, BusError>(stream)
            }
        };
        let inbound = create(work_queue("INBOUND", Topic::Inbound)).await?;
        let outbound = create(work_queue("OUTBOUND", Topic::Outbound)).await?;
        let events = create(work_queue("EVENTS", Topic::Events)).await?;
        let bulk = create(work_queue("BULK", Topic::Bulk)).await?;
        let dlq = create(stream::Config {
            name: format!("{upper}_DLQ"),
            subjects: vec![format!("{prefix}.dlq.>")],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        })
        .await?;
        Ok(Self {
            js,
            prefix,
            inbound,
            outbound,
            events,
            bulk,
            dlq,
            max_in_flight: options.max_in_flight.max(1),
        })
    }

    fn stream(&self, topic: Topic) -> &Stream {
        match topic {
            Topic::Inbound => &self.inbound,
            Topic::Outbound => &self.outbound,
            Topic::Events => &self.events,
            Topic::Bulk => &self.bulk,
        }
    }

    async fn consumer(&self, topic: Topic) -> Result<PullConsumer, BusError> {
        let name = format!("{}-{}", self.prefix, topic.as_str());
        self.stream(topic)
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    ack_wait: ACK_WAIT,
                    max_ack_pending: 100_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(BusError::nats("could not create consumer"))
    }

    fn decode_letter(seq: u64, payload: &[u8]) -> Option<DeadLetter> {
        let mut letter: DeadLetter = serde_json::from_slice(payload).ok()?;
        letter.id = seq.to_string();
        Some(letter)
    }
}

struct JetStreamDelivery {
    message: jetstream::Message,
    /// The work queue the message came from, to look up its conversation's oldest message;
    /// shared, because a `Stream` carries its whole configuration.
    stream: Arc<Stream>,
}

#[async_trait]
impl Delivery for JetStreamDelivery {
    fn take_payload(&mut self) -> Bytes {
        std::mem::take(&mut self.message.message.payload)
    }

    fn attempt(&self) -> u64 {
        self.message
            .info()
            .map(|i| u64::try_from(i.delivered).unwrap_or(1))
            .unwrap_or(1)
    }

    async fn ack(&self) -> Result<(), BusError> {
        // Sent, not confirmed: a confirmed ack is a request the server answers, and dropping
        // that answer took P2 from 4,100-4,500 to 4,500-4,800 replies/s (docs/benchmarks.md).
        // Sending fails only while the client is closing; it is tried a few times all the same.
        // An ack lost on a dropped connection only brings the message back after the ack wait.
        let mut wait = Duration::from_millis(100);
        let mut last = None;
        for _ in 0..ACK_ATTEMPTS {
            match self.message.ack().await {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(2));
        }
        Err(match last {
            Some(e) => BusError::nats("ack")(e),
            None => BusError::Refused("ack: no attempt was made".into()),
        })
    }

    async fn retry_in(&self, delay: Duration) -> Result<(), BusError> {
        self.message
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(BusError::nats("nak"))
    }

    async fn keep_alive(&self) -> Result<(), BusError> {
        self.message
            .ack_with(AckKind::Progress)
            .await
            .map_err(BusError::nats("progress"))
    }

    /// A third of the ack wait: two keep-alives may be lost before JetStream redelivers.
    fn keep_alive_every(&self) -> Option<Duration> {
        Some(ACK_WAIT / 3)
    }

    async fn is_next_in_conversation(&self) -> Result<bool, BusError> {
        // Work-queue streams drop a message once it is acked, so the first message still stored
        // on the conversation's subject is its oldest unfinished one. On a replicated stream
        // the direct get may be answered by any replica, possibly a lagging one; the answer is
        // still safe: a replica that stores a message at or after this one has applied every
        // publish before it, and drops a message only once it was acked (done), so if it holds
        // no older one on the subject, none is unfinished.
        let mine = self
            .message
            .info()
            .map_err(BusError::nats("message info"))?
            .stream_sequence;
        match self
            .stream
            .direct_get_first_for_subject(self.message.subject.as_str())
            .await
        {
            Ok(first) => Ok(first.sequence >= mine),
            // This delivery's own message is stored, so "nothing stored" comes from a replica
            // that has not applied it yet (a direct get may be answered by any replica):
            // it cannot tell, so not yet (docs/operations.md, "NATS: a JetStream cluster").
            Err(e) if e.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound => {
                Ok(false)
            }
            Err(e) => Err(BusError::nats("conversation order")(e)),
        }
    }

    fn position(&self) -> u64 {
        self.message.info().map_or(0, |i| i.stream_sequence)
    }

    async fn is_next_after(&self, position: u64) -> Result<bool, BusError> {
        let mine = self.position();
        match self
            .stream
            .direct_get_next_for_subject(
                self.message.subject.as_str(),
                Some(position.saturating_add(1)),
            )
            .await
        {
            Ok(next) => Ok(next.sequence >= mine),
            // As above: this message lies after `position`, so a replica that finds nothing
            // there has not applied it yet.
            Err(e) if e.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound => {
                Ok(false)
            }
            Err(e) => Err(BusError::nats("conversation order")(e)),
        }
    }
}

#[async_trait]
impl Bus for JetStreamBus {
    async fn publish_traced(
        &self,
        topic: Topic,
        conversation: &str,
        dedupe_id: &str,
        payload: Bytes,
        traceparent: Option<&str>,
    ) -> Result<Published, BusError> {
        // Joined, not formatted: twice per message, and `format!` starts such a string with
        // no room and grows it.
        let subject = [self.prefix.as_str(), topic.as_str(), conversation].join(".");
        // Tried again while the stream has no leader (after its leader died, the replicas
        // take a few seconds to elect another: "no stream" answers, or no answer) or the
        // client reconnects; the message id makes a repeat of a publish that was in fact
        // stored a duplicate, not a second copy. A caller with a deadline of its own (ingress
        // spools after WAGATE_SPOOL_AFTER_MS) cancels the wait sooner.
        let deadline = tokio::time::Instant::now() + PUBLISH_RETRY_FOR;
        let mut wait = Duration::from_millis(50);
        let ack = loop {
            let attempt = async {
                let mut message = PublishMessage::build()
                    .payload(payload.clone())
                    .message_id(dedupe_id);
                if let Some(traceparent) = traceparent {
                    message = message.header(wagate_core::trace::TRACEPARENT, traceparent);
                }
                self.js.send_publish(subject.clone(), message).await?.await
            };
            match attempt.await {
                Ok(ack) => break ack,
                Err(e)
                    if may_pass_on_retry(e.kind())
                        && tokio::time::Instant::now() + wait < deadline =>
                {
                    tracing::debug!(error = %e, "publish not acknowledged; trying again");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_millis(500));
                }
                Err(e) => return Err(BusError::nats("publish")(e)),
            }
        };
        Ok(if ack.duplicate {
            Published::Duplicate
        } else {
            Published::Stored
        })
    }

    async fn subscribe(&self, topic: Topic) -> Result<Deliveries, BusError> {
        let consumer = self.consumer(topic).await?;
        let stream = Arc::new(self.stream(topic).clone());
        let batch = self.max_in_flight.min(1000);
        let messages = consumer
            .stream()
            .max_messages_per_batch(batch)
            .expires(PULL_EXPIRES)
            .heartbeat(PULL_HEARTBEAT)
            .messages()
            .await
            .map_err(BusError::nats("subscribe"))?;
        Ok(messages
            .map(move |m| {
                m.map(|message| {
                    Box::new(JetStreamDelivery {
                        message,
                        stream: stream.clone(),
                    }) as Box<dyn Delivery>
                })
                .map_err(BusError::nats("pull"))
            })
            .boxed())
    }

    async fn put_dead_letter(&self, letter: &DeadLetter) -> Result<String, BusError> {
        let subject = format!(
            "{}.dlq.{}.{}",
            self.prefix,
            letter.stage.as_str(),
            letter.agent_id
        );
        let payload = serde_json::to_vec(letter).map_err(BusError::nats("encode"))?;
        let ack = self
            .js
            .publish(subject, payload.into())
            .await
            .map_err(BusError::nats("publish dead letter"))?
            .await
            .map_err(BusError::nats("dead letter ack"))?;
        Ok(ack.sequence.to_string())
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, BusError> {
        let mut dlq = self.dlq.clone();
        let state = dlq
            .info()
            .await
            .map_err(BusError::nats("dead letters"))?
            .state
            .clone();
        let mut out = Vec::new();
        if state.messages == 0 {
            return Ok(out);
        }
        for seq in state.first_sequence..=state.last_sequence {
            if let Ok(m) = dlq.get_raw_message(seq).await
                && let Some(letter) = Self::decode_letter(seq, &m.payload)
            {
                out.push(letter);
            }
        }
        Ok(out)
    }

    async fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>, BusError> {
        let Ok(seq) = id.parse::<u64>() else {
            return Ok(None);
        };
        match self.dlq.get_raw_message(seq).await {
            Ok(m) => Ok(Self::decode_letter(seq, &m.payload)),
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
            {
                Ok(None)
            }
            Err(e) => Err(BusError::nats("dead letter")(e)),
        }
    }

    async fn remove_dead_letter(&self, id: &str) -> Result<bool, BusError> {
        let Ok(seq) = id.parse::<u64>() else {
            return Ok(false);
        };
        match self.dlq.delete_message(seq).await {
            Ok(deleted) => Ok(deleted),
            Err(e) => {
                if self.dead_letter(id).await?.is_none() {
                    Ok(false)
                } else {
                    Err(BusError::nats("remove dead letter")(e))
                }
            }
        }
    }

    async fn flush(&self) -> Result<(), BusError> {
        self.js
            .client()
            .flush()
            .await
            .map_err(BusError::nats("flush"))
    }

    /// A work queue keeps exactly the messages not yet acknowledged.
    async fn backlog(&self, topic: Topic) -> Result<u64, BusError> {
        // Fetching the stream is one STREAM.INFO request, whose answer has the state.
        let name = &self.stream(topic).cached_info().config.name;
        let stream = self
            .js
            .get_stream(name)
            .await
            .map_err(BusError::nats("stream info"))?;
        Ok(stream.cached_info().state.messages)
    }

    async fn ready(&self) -> Result<(), BusError> {
        self.js
            .query_account()
            .await
            .map(|_| ())
            .map_err(BusError::nats("JetStream not answering"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_message_the_server_can_never_take_is_not_tried_again() {
        for kind in [
            PublishErrorKind::StreamNotFound,
            PublishErrorKind::TimedOut,
            PublishErrorKind::BrokenPipe,
            PublishErrorKind::MaxAckPending,
            PublishErrorKind::Other,
        ] {
            assert!(may_pass_on_retry(kind), "{kind}");
        }
        for kind in [
            PublishErrorKind::MaxPayloadExceeded,
            PublishErrorKind::WrongLastMessageId,
            PublishErrorKind::WrongLastSequence,
        ] {
            assert!(!may_pass_on_retry(kind), "{kind}");
        }
    }
}
