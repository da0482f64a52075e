//! Typed configuration from the environment (a flag of the same name works too), validated once
//! at start so that a process with a bad setting refuses to start with a message saying which.

use std::{net::SocketAddr, path::PathBuf, time::Duration};
use store::redis::RedisTopology;

use secrecy::SecretString;

use wagate_core::retry::RetrySchedule;

/// Every setting of every role, as read from the environment by clap.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// NATS server(s), e.g. nats://127.0.0.1:4222. Unset (with WAGATE_REDIS_URL unset): embedded mode.
    #[arg(long = "nats-url", env = "WAGATE_NATS_URL", hide_env_values = true)]
    pub nats_url: Option<ServerUrl>,
    /// Replicas of every JetStream stream wagate creates (1, 3 or 5 on a cluster); a changed
    /// value is applied to existing streams at start. Set it the same on every process.
    #[arg(
        long = "nats-replicas",
        env = "WAGATE_NATS_REPLICAS",
        default_value_t = 1
    )]
    pub nats_replicas: usize,
    /// NATS `.creds` file (user JWT and nkey seed) to connect with.
    #[arg(long = "nats-creds", env = "WAGATE_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// CA bundle (PEM) that the NATS servers' TLS certificates are checked against; set, TLS
    /// to NATS is required.
    #[arg(long = "nats-tls-ca", env = "WAGATE_NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Redis, e.g. redis://127.0.0.1:6379/0. Unset (with WAGATE_NATS_URL unset): embedded mode.
    /// With WAGATE_REDIS_CLUSTER=true, a comma-separated list of Redis Cluster nodes; with
    /// WAGATE_REDIS_SENTINELS, only its password and db count (the host is Sentinel's master).
    #[arg(long = "redis-url", env = "WAGATE_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<ServerUrl>,
    /// `true`: WAGATE_REDIS_URL names Redis Cluster nodes (`redis://[:password@]host:port,…`).
    #[arg(
        long = "redis-cluster",
        env = "WAGATE_REDIS_CLUSTER",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub redis_cluster: bool,
    /// Redis Sentinels as `host:port,host:port,…`: the master is found, and followed through a
    /// failover, through them.
    #[arg(
        long = "redis-sentinels",
        env = "WAGATE_REDIS_SENTINELS",
        value_delimiter = ','
    )]
    pub redis_sentinels: Vec<String>,
    /// The name of the master the Sentinels watch.
    #[arg(
        long = "redis-sentinel-master",
        env = "WAGATE_REDIS_SENTINEL_MASTER",
        default_value = "mymaster"
    )]
    pub redis_sentinel_master: String,
    /// Data folder of embedded mode and of the ingress spool.
    #[arg(long = "data-dir", env = "WAGATE_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Base64 of the 64-byte AES-SIV master key that encrypts stored secrets.
    #[arg(long = "master-key", env = "WAGATE_MASTER_KEY", hide_env_values = true)]
    pub master_key: Option<SecretString>,
    /// Comma-separated base64 keys being rotated out: still opened, never used to seal.
    #[arg(
        long = "master-key-previous",
        env = "WAGATE_MASTER_KEY_PREVIOUS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub master_key_previous: Vec<SecretString>,
    /// Bearer token of the admin API, at least 16 characters; without it (NATS and Redis mode)
    /// the admin API answers nothing but 401.
    #[arg(
        long = "admin-token",
        env = "WAGATE_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<SecretString>,
    /// Public base URL that Twilio calls, e.g. https://bot.example.com.
    #[arg(long = "public-url", env = "WAGATE_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Webhook listener.
    #[arg(long = "listen", env = "WAGATE_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Admin API listener.
    #[arg(
        long = "admin-listen",
        env = "WAGATE_ADMIN_LISTEN",
        default_value = "127.0.0.1:8081"
    )]
    pub admin_listen: SocketAddr,
    /// Listener for /healthz, /readyz and /metrics of worker and sender processes.
    #[arg(long = "metrics-listen", env = "WAGATE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Time a client of any listener has to send a request's headers, in ms: from the
    /// connection's start, and on a kept-alive connection from the previous response (hyper
    /// starts its timer there), so it also bounds the wait for the next request. Closes
    /// connections that never finish their headers (slowloris).
    #[arg(
        long = "http-header-timeout-ms",
        env = "WAGATE_HTTP_HEADER_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub http_header_timeout_ms: u64,
    /// Time a client has to send a whole request body once its headers are in, in ms (a
    /// deadline, not a gap between bytes, so a trickle does not keep it alive).
    #[arg(
        long = "http-body-timeout-ms",
        env = "WAGATE_HTTP_BODY_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub http_body_timeout_ms: u64,
    /// A connection with no request in progress on which no byte moved for this long is
    /// closed, in ms; a kept-alive connection waits at most the shorter of this and the header
    /// timeout for its next request.
    #[arg(
        long = "http-idle-timeout-ms",
        env = "WAGATE_HTTP_IDLE_TIMEOUT_MS",
        default_value_t = 60_000
    )]
    pub http_idle_timeout_ms: u64,
    /// Connections each listener holds at once; a connection over it is closed at once.
    #[arg(
        long = "http-max-connections",
        env = "WAGATE_HTTP_MAX_CONNECTIONS",
        default_value_t = 10_000
    )]
    pub http_max_connections: usize,
    /// Twilio REST base URL.
    #[arg(
        long = "twilio-api-base",
        env = "WAGATE_TWILIO_API_BASE",
        default_value = "https://api.twilio.com"
    )]
    pub twilio_api_base: String,
    /// Twilio Messaging v2 base URL (the WhatsApp typing indicator).
    #[arg(
        long = "twilio-messaging-base",
        env = "WAGATE_TWILIO_MESSAGING_BASE",
        default_value = "https://messaging.twilio.com"
    )]
    pub twilio_messaging_base: String,
    /// Twilio Content API base URL (an agent's quick replies become content made there).
    #[arg(
        long = "twilio-content-base",
        env = "WAGATE_TWILIO_CONTENT_BASE",
        default_value = "https://content.twilio.com"
    )]
    pub twilio_content_base: String,
    /// Largest inbound medium (photo, voice note, document) a worker fetches from Twilio, in
    /// bytes; a larger one reaches the agent as a notice.
    #[arg(
        long = "media-max-bytes",
        env = "WAGATE_MEDIA_MAX_BYTES",
        default_value_t = 16 * 1024 * 1024
    )]
    pub media_max_bytes: u64,
    /// Prefix of every NATS stream, subject and Redis key, so deployments can share servers.
    #[arg(long = "prefix", env = "WAGATE_PREFIX", default_value = "wagate")]
    pub prefix: String,
    /// Conversations a worker process runs at once. A worker's replies per second are at most
    /// this divided by the agent's latency, and agents are slow (seconds per turn), so the
    /// default lets one worker hold 10,000 conversations waiting on their agent: 5,000 replies
    /// a second at 2 s. A turn waiting on its agent costs memory only (docs/limits.md).
    #[arg(
        long = "worker-concurrency",
        env = "WAGATE_WORKER_CONCURRENCY",
        default_value_t = 10_000
    )]
    pub worker_concurrency: usize,
    /// Replies a sender process posts at once.
    #[arg(
        long = "sender-concurrency",
        env = "WAGATE_SENDER_CONCURRENCY",
        default_value_t = 128
    )]
    pub sender_concurrency: usize,
    /// Messages per second of channels on the Twilio Sandbox's number (+14155238886) that
    /// set no `mps` of their own: Twilio's Sandbox sends about one every 3 seconds. Set it the
    /// same on every ingress and sender process.
    #[arg(
        long = "sandbox-mps",
        env = "WAGATE_SANDBOX_MPS",
        default_value_t = wagate_core::agent::SANDBOX_MPS
    )]
    pub sandbox_mps: f64,
    /// Most recent turns of a session that the agent sees.
    #[arg(
        long = "history-window",
        env = "WAGATE_HISTORY_WINDOW",
        default_value_t = 40
    )]
    pub history_window: usize,
    /// Time an agent backend may take for one turn, in milliseconds.
    #[arg(
        long = "agent-timeout-ms",
        env = "WAGATE_AGENT_TIMEOUT_MS",
        default_value_t = 60_000
    )]
    pub agent_timeout_ms: u64,
    /// Time a Twilio API call may take, in milliseconds.
    #[arg(
        long = "twilio-timeout-ms",
        env = "WAGATE_TWILIO_TIMEOUT_MS",
        default_value_t = 15_000
    )]
    pub twilio_timeout_ms: u64,
    /// Lease of a reply part's send guard, in milliseconds: after a sender dies mid-send, its
    /// part (and the conversation behind it) waits this long before another sender takes it
    /// over. Shorter: faster takeover after a crash. A live sender renews the lease every third
    /// of it while it posts, so a slow Twilio call does not lose the part to another sender;
    /// only a sender that cannot reach the store for a whole lease does.
    #[arg(
        long = "send-lease-ms",
        env = "WAGATE_SEND_LEASE_MS",
        default_value_t = 30_000
    )]
    pub send_lease_ms: u64,
    /// With a channel's `ordered_parts` on, how long a reply's next part waits at most for
    /// Twilio to report the previous part sent, in milliseconds. Twilio's report normally comes
    /// within a second; the wait ends there so that a lost or withheld status callback delays a
    /// reply by this much and no more.
    #[arg(
        long = "part-sent-timeout-ms",
        env = "WAGATE_PART_SENT_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub part_sent_timeout_ms: u64,
    /// Burst coalescing: how long after a user's message its turn waits for more messages of the
    /// same user to handle them as one turn, in ms. 0 adds no latency: only messages that queued
    /// up while the previous turn ran are taken together.
    #[arg(long = "coalesce-ms", env = "WAGATE_COALESCE_MS", default_value_t = 0)]
    pub coalesce_ms: u64,
    /// Most messages handled as one turn.
    #[arg(
        long = "coalesce-max",
        env = "WAGATE_COALESCE_MAX",
        default_value_t = 10
    )]
    pub coalesce_max: usize,
    /// Delays between attempts of an agent turn (e.g. "1s,5s,30s,2m"); after the last, a dead letter.
    #[arg(
        long = "agent-retry",
        env = "WAGATE_AGENT_RETRY",
        default_value = "1s,5s,30s,2m"
    )]
    pub agent_retry: RetrySchedule,
    /// Delays between attempts of a Twilio send; after the last, a dead letter.
    #[arg(
        long = "send-retry",
        env = "WAGATE_SEND_RETRY",
        default_value = "1s,5s,30s,2m,10m"
    )]
    pub send_retry: RetrySchedule,
    /// Delays between attempts to deliver an event to an agent's event webhook; after the
    /// last, a dead letter.
    #[arg(
        long = "events-retry",
        env = "WAGATE_EVENTS_RETRY",
        default_value = "1s,5s,30s,2m,10m,30m"
    )]
    pub events_retry: RetrySchedule,
    /// How long the bus drops a repeated message id, in ms (later repeats are caught by the store).
    #[arg(
        long = "dedupe-window-ms",
        env = "WAGATE_DEDUPE_WINDOW_MS",
        default_value_t = 600_000
    )]
    pub dedupe_window_ms: u64,
    /// Time ingress waits for NATS to acknowledge a message before it spools it locally, in ms.
    #[arg(
        long = "spool-after-ms",
        env = "WAGATE_SPOOL_AFTER_MS",
        default_value_t = 2_000
    )]
    pub spool_after_ms: u64,
    /// Largest size of the ingress spool in MiB; when full, webhooks answer 503 (Twilio retries).
    #[arg(
        long = "spool-max-mb",
        env = "WAGATE_SPOOL_MAX_MB",
        default_value_t = 512
    )]
    pub spool_max_mb: u64,
    /// Threads that run a role's tasks (`serve` gives ingress, worker and sender a runtime
    /// each). 1 runs a role on one thread, which costs less CPU per message (no hand-offs
    /// between threads) where wagate shares a few cores with NATS and Redis; scale such a
    /// deployment by processes. Unset: the cores shared out among the process's runtimes (a
    /// process of one role gets them all, `serve` a third each, at least one).
    #[arg(long = "threads", env = "WAGATE_THREADS")]
    pub threads: Option<std::num::NonZeroUsize>,
    /// Time given to in-flight work on SIGTERM before the process exits, in milliseconds.
    #[arg(
        long = "shutdown-grace-ms",
        env = "WAGATE_SHUTDOWN_GRACE_MS",
        default_value_t = 20_000
    )]
    pub shutdown_grace_ms: u64,
}

/// The longest HTTP timeout accepted, in ms: a day.
const MAX_HTTP_TIMEOUT_MS: u64 = 86_400_000;

/// Longest `WAGATE_PART_SENT_TIMEOUT_MS`: a part waiting for its predecessor holds a sender
/// slot, and Twilio reports `sent` within seconds when it reports at all.
const MAX_PART_SENT_TIMEOUT_MS: u64 = 300_000;

/// Shortest send-guard lease: it is renewed every third of it, and a renewal is a store round
/// trip that must fit in that time even on a busy store.
const MIN_SEND_LEASE_MS: u64 = 1_000;

/// The URL of a server wagate connects to (NATS, Redis). It may carry a password, so it shows
/// itself only redacted, in `Debug` and `Display` alike, and hands the real text only to the
/// client that connects ([`ServerUrl::expose`]).
#[derive(Clone)]
pub struct ServerUrl(SecretString);

impl ServerUrl {
    /// The URL as configured, credentials included: for connecting, never for showing.
    pub fn expose(&self) -> &str {
        use secrecy::ExposeSecret;
        self.0.expose_secret()
    }
}

impl std::str::FromStr for ServerUrl {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(SecretString::from(s.to_owned())))
    }
}

impl std::fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&wagate_core::redact::url(self.expose()))
    }
}

impl std::fmt::Debug for ServerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerUrl({self})")
    }
}

/// Where the bus and the store live.
#[derive(Debug, Clone)]
pub enum Backends {
    /// NATS JetStream and Redis: the way to scale across processes and machines.
    Distributed {
        /// NATS URL(s).
        nats_url: ServerUrl,
        /// Redis URL.
        redis_url: ServerUrl,
    },
    /// Both in one local data file; one process.
    Embedded,
}

/// Shortest admin token accepted: an empty token would let every caller in (no
/// `Authorization` compares equal to it), and a short one is guessed quickly.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 16;

/// Refuses an admin token that is empty or shorter than [`MIN_ADMIN_TOKEN_CHARS`]: no
/// configuration may mean "no authentication". `source` names where the token came from.
pub fn check_admin_token(token: &SecretString, source: &str) -> Result<(), ConfigError> {
    use secrecy::ExposeSecret;
    let chars = token.expose_secret().chars().count();
    if chars < MIN_ADMIN_TOKEN_CHARS {
        return Err(ConfigError(format!(
            "{source} is {}: the admin token must be at least {MIN_ADMIN_TOKEN_CHARS} characters (unset it in embedded mode to have one generated)",
            if chars == 0 {
                "empty".to_owned()
            } else {
                format!("only {chars} characters")
            }
        )));
    }
    Ok(())
}

/// A setting that cannot work; the text names the variable and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Settings {
    /// Which backends to use; exactly one of the two URLs being set is an error.
    pub fn backends(&self) -> Result<Backends, ConfigError> {
        match (&self.nats_url, &self.redis_url) {
            (Some(n), Some(r)) => Ok(Backends::Distributed {
                nats_url: n.clone(),
                redis_url: r.clone(),
            }),
            (None, None) => Ok(Backends::Embedded),
            (Some(_), None) => Err(ConfigError(
                "WAGATE_NATS_URL is set but WAGATE_REDIS_URL is not: set both (NATS + Redis mode) or neither (embedded mode)".into(),
            )),
            (None, Some(_)) => Err(ConfigError(
                "WAGATE_REDIS_URL is set but WAGATE_NATS_URL is not: set both (NATS + Redis mode) or neither (embedded mode)".into(),
            )),
        }
    }

    /// How the Redis of WAGATE_REDIS_URL is reached: one server, a Redis Cluster, or the master
    /// that Sentinel names.
    pub fn redis_topology(&self) -> Result<RedisTopology, ConfigError> {
        let sentinels: Vec<String> = self
            .redis_sentinels
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        match (self.redis_cluster, sentinels.is_empty()) {
            (true, false) => Err(ConfigError(
                "WAGATE_REDIS_CLUSTER=true and WAGATE_REDIS_SENTINELS are both set: a Redis Cluster does not use Sentinel; set one of them".into(),
            )),
            (true, true) => Ok(RedisTopology::Cluster),
            (false, true) => Ok(RedisTopology::Single),
            (false, false) => {
                if let Some(bad) = sentinels.iter().find(|s| {
                    s.rsplit_once(':')
                        .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
                }) {
                    return Err(ConfigError(format!(
                        "WAGATE_REDIS_SENTINELS must be host:port,host:port,…; {bad:?} is not a host:port"
                    )));
                }
                if self.redis_sentinel_master.trim().is_empty() {
                    return Err(ConfigError(
                        "WAGATE_REDIS_SENTINEL_MASTER must not be empty".into(),
                    ));
                }
                Ok(RedisTopology::Sentinel {
                    sentinels,
                    master: self.redis_sentinel_master.trim().to_owned(),
                })
            }
        }
    }

    /// Checks what can be checked without connecting to anything.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.backends()?;
        if !(1..=5).contains(&self.nats_replicas) {
            return Err(ConfigError(
                "WAGATE_NATS_REPLICAS must be from 1 to 5 (JetStream's limit; 3 on a 3-node cluster)"
                    .into(),
            ));
        }
        self.redis_topology()?;
        if let Some(token) = &self.admin_token {
            check_admin_token(token, "WAGATE_ADMIN_TOKEN")?;
        }
        let prefix_ok = !self.prefix.is_empty()
            && self.prefix.len() <= 32
            && self
                .prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !prefix_ok {
            return Err(ConfigError(
                "WAGATE_PREFIX must be 1-32 characters of A-Z, a-z, 0-9, '_' or '-'".into(),
            ));
        }
        if let Some(url) = &self.public_url
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            return Err(ConfigError(
                "WAGATE_PUBLIC_URL must start with https:// (or http://), e.g. https://bot.example.com".into(),
            ));
        }
        for (name, value) in [
            ("WAGATE_TWILIO_API_BASE", &self.twilio_api_base),
            ("WAGATE_TWILIO_MESSAGING_BASE", &self.twilio_messaging_base),
            ("WAGATE_TWILIO_CONTENT_BASE", &self.twilio_content_base),
        ] {
            if !(value.starts_with("https://") || value.starts_with("http://")) {
                return Err(ConfigError(format!("{name} must be an http(s) URL")));
            }
        }
        if self.worker_concurrency == 0 || self.sender_concurrency == 0 {
            return Err(ConfigError(
                "WAGATE_WORKER_CONCURRENCY and WAGATE_SENDER_CONCURRENCY must be at least 1".into(),
            ));
        }
        if !(wagate_core::agent::MIN_MPS..=wagate_core::agent::MAX_MPS).contains(&self.sandbox_mps)
        {
            return Err(ConfigError(format!(
                "WAGATE_SANDBOX_MPS must be from {:.4} (one message a minute) to {}",
                wagate_core::agent::MIN_MPS,
                wagate_core::agent::MAX_MPS
            )));
        }
        if self.send_lease_ms < MIN_SEND_LEASE_MS {
            return Err(ConfigError(format!(
                "WAGATE_SEND_LEASE_MS must be at least {MIN_SEND_LEASE_MS}: a shorter lease leaves too little time to renew it"
            )));
        }
        if self.part_sent_timeout_ms > MAX_PART_SENT_TIMEOUT_MS {
            return Err(ConfigError(format!(
                "WAGATE_PART_SENT_TIMEOUT_MS must be at most {MAX_PART_SENT_TIMEOUT_MS} (5 minutes): a waiting part holds one of the sender's slots"
            )));
        }
        if self.history_window == 0 {
            return Err(ConfigError(
                "WAGATE_HISTORY_WINDOW must be at least 1".into(),
            ));
        }
        for (value, name) in [
            (self.http_header_timeout_ms, "WAGATE_HTTP_HEADER_TIMEOUT_MS"),
            (self.http_body_timeout_ms, "WAGATE_HTTP_BODY_TIMEOUT_MS"),
            (self.http_idle_timeout_ms, "WAGATE_HTTP_IDLE_TIMEOUT_MS"),
        ] {
            // Zero would be no time at all (there is no "off": slow clients would hold
            // connections for ever); above a day, deadlines stop being meaningful.
            if !(1..=MAX_HTTP_TIMEOUT_MS).contains(&value) {
                return Err(ConfigError(format!(
                    "{name} must be from 1 to {MAX_HTTP_TIMEOUT_MS} (a day)"
                )));
            }
        }
        if !(1..=tokio::sync::Semaphore::MAX_PERMITS).contains(&self.http_max_connections) {
            return Err(ConfigError(format!(
                "WAGATE_HTTP_MAX_CONNECTIONS must be from 1 to {}",
                tokio::sync::Semaphore::MAX_PERMITS
            )));
        }
        Ok(())
    }

    /// The public base URL without a trailing slash, when configured.
    pub fn public_base(&self) -> Option<&str> {
        self.public_url.as_deref().map(|u| u.trim_end_matches('/'))
    }

    /// Agent turn timeout.
    pub fn agent_timeout(&self) -> Duration {
        Duration::from_millis(self.agent_timeout_ms)
    }

    /// Twilio call timeout.
    pub fn twilio_timeout(&self) -> Duration {
        Duration::from_millis(self.twilio_timeout_ms)
    }

    /// Lease of a reply part's send guard.
    pub fn send_lease(&self) -> Duration {
        Duration::from_millis(self.send_lease_ms)
    }

    /// Longest wait of an ordered part for its predecessor's `sent`.
    pub fn part_sent_timeout(&self) -> Duration {
        Duration::from_millis(self.part_sent_timeout_ms)
    }

    /// Shutdown deadline.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}
