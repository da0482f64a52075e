//! Running the roles: connect the bus and the store, start the listeners and consumers of the
//! roles asked for, log one line when ready, and on SIGTERM stop taking work and give in-flight
//! work the configured grace period.
//!
//! `serve` runs the worker and the sender each on a runtime and thread of their own, with their
//! own NATS and Redis connections: three roles in one process then cost what three processes
//! cost, without tasks of one role waiting behind another's on a shared scheduler
//! (docs/benchmarks.md, change 12).

use std::{net::SocketAddr, sync::Arc};

use anyhow::{Context, Result, anyhow};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use secrecy::SecretString;
use shared::embedded::{Embedded, EmbeddedOptions};
use shared::{
    bus::{
        Bus,
        jetstream::{JetStreamBus, JetStreamOptions},
    },
    config::{Backends, ServerUrl, Settings},
    crypto::Keyring,
    directory::ChannelDirectory,
    dispatch::{Coalesce, DispatchConfig},
    key_check,
    shutdown::{self, Shutdown},
    store::{Store, redis::RedisStore},
};
use tokio::task::JoinSet;

use crate::{Roles, first_start, http};

struct Deps {
    bus: Arc<dyn Bus>,
    store: Arc<dyn Store>,
    keyring: Arc<Keyring>,
    directory: Arc<ChannelDirectory>,
    admin_token: Option<SecretString>,
}

async fn connect(settings: &Settings, roles: Roles) -> Result<Deps> {
    let mut master = settings.master_key.clone();
    let mut admin_token = settings.admin_token.clone();
    let (bus, store): (Arc<dyn Bus>, Arc<dyn Store>) = match settings.backends()? {
        Backends::Distributed {
            nats_url,
            redis_url,
        } => {
            let max_in_flight = settings.worker_concurrency.max(settings.sender_concurrency);
            connect_remote(settings, &nats_url, &redis_url, max_in_flight).await?
        }
        Backends::Embedded => {
            if roles != Roles::ALL {
                return Err(anyhow!(
                    "embedded mode runs every role in one process: use `wagate serve`, or set WAGATE_NATS_URL and WAGATE_REDIS_URL to run roles apart"
                ));
            }
            let dir = settings.data_dir.clone();
            let options = EmbeddedOptions {
                duplicate_window: std::time::Duration::from_millis(
                    settings.dedupe_window_ms.max(1000),
                ),
            };
            let embedded =
                tokio::task::spawn_blocking(move || Embedded::open(&dir, options)).await??;
            if master.is_none() {
                master = Some(first_start::secret_file(
                    &settings.data_dir,
                    "master.key",
                    "master key",
                    Keyring::generate_key,
                )?);
            }
            if admin_token.is_none() {
                admin_token = Some(first_start::secret_file(
                    &settings.data_dir,
                    "admin.token",
                    "admin token",
                    first_start::generate_token,
                )?);
                if let Some(token) = &admin_token {
                    let file = settings.data_dir.join("admin.token");
                    shared::config::check_admin_token(token, &file.display().to_string())?;
                }
            }
            (Arc::new(embedded.bus), Arc::new(embedded.store))
        }
    };
    if roles.ingress && admin_token.is_none() {
        tracing::warn!(
            "WAGATE_ADMIN_TOKEN is not set: the admin API answers 401 to every call until it is"
        );
    }
    // Embedded mode is for trying wagate, often behind a tunnel whose URL changes; a deployment
    // behind a load balancer should say where Twilio reaches it.
    if roles.ingress && settings.nats_url.is_some() && settings.public_url.is_none() {
        tracing::warn!(
            "WAGATE_PUBLIC_URL is not set: signatures are checked against the URL rebuilt from each request's Host and X-Forwarded-Proto, which fails behind a proxy that rewrites them; set it to the base URL configured in Twilio"
        );
    }
    let master = master.as_ref().ok_or_else(|| {
        anyhow!(
            "WAGATE_MASTER_KEY is required with NATS and Redis: create one with `wagate keygen`"
        )
    })?;
    let keyring = Arc::new(
        Keyring::from_base64(master, &settings.master_key_previous).context("WAGATE_MASTER_KEY")?,
    );
    check_master_key(&*store, &keyring).await?;
    let directory = ChannelDirectory::new(store.clone(), keyring.clone());
    Ok(Deps {
        bus,
        store,
        keyring,
        directory,
        admin_token,
    })
}

/// Refuses to start with a master key that the stored data was not sealed with (every webhook
/// would fail while `/readyz` said ready), and finishes a key rotation; see
/// [`shared::key_check`].
async fn check_master_key(store: &dyn Store, keyring: &Keyring) -> Result<()> {
    let verified = key_check::verify(store, keyring).await?;
    if verified.resealed > 0 {
        tracing::info!(
            secrets = verified.resealed,
            "sealed stored secrets again with the new master key"
        );
    }
    if verified.rotated {
        tracing::info!(
            key_id = keyring.primary_id(),
            "master key rotation finished: the old keys (WAGATE_MASTER_KEY_PREVIOUS) are no longer needed"
        );
    } else if verified.unreadable > 0 {
        tracing::warn!(
            secrets = verified.unreadable,
            "stored secrets that open with none of the master keys held stay as they are, and so does the key check: set them again through the admin API"
        );
    }
    Ok(())
}

/// Connects to NATS and Redis; `max_in_flight` bounds the deliveries the bus holds at once.
async fn connect_remote(
    settings: &Settings,
    nats_url: &ServerUrl,
    redis_url: &ServerUrl,
    max_in_flight: usize,
) -> Result<(Arc<dyn Bus>, Arc<dyn Store>)> {
    let options = JetStreamOptions {
        prefix: settings.prefix.clone(),
        max_in_flight,
        duplicate_window: std::time::Duration::from_millis(settings.dedupe_window_ms.max(1000)),
    };
    let bus = JetStreamBus::connect(nats_url.expose(), options).await?;
    let store = RedisStore::connect(redis_url.expose(), &settings.prefix).await?;
    Ok((Arc::new(bus), Arc::new(store)))
}

/// Where a role's bus and store come from.
#[derive(Clone)]
enum Backing {
    /// The process's own: embedded mode, or a process that runs one role.
    Shared {
        bus: Arc<dyn Bus>,
        store: Arc<dyn Store>,
    },
    /// A role on a runtime of its own connects its own: a NATS or Redis connection is driven by
    /// a task on the runtime that opened it, so sharing one would hand every call to the other
    /// runtime's thread and back.
    Own {
        nats_url: ServerUrl,
        redis_url: ServerUrl,
    },
}

impl Backing {
    async fn open(
        self,
        settings: &Settings,
        max_in_flight: usize,
    ) -> Result<(Arc<dyn Bus>, Arc<dyn Store>)> {
        match self {
            Backing::Shared { bus, store } => Ok((bus, store)),
            Backing::Own {
                nats_url,
                redis_url,
            } => connect_remote(settings, &nats_url, &redis_url, max_in_flight).await,
        }
    }
}

/// What every role of a process shares, whatever runtime it runs on.
#[derive(Clone)]
struct Common {
    settings: Arc<Settings>,
    keyring: Arc<Keyring>,
    directory: Arc<ChannelDirectory>,
}

impl Common {
    fn dispatch(&self, concurrency: usize, coalesce: Option<Coalesce>) -> DispatchConfig {
        DispatchConfig {
            concurrency,
            shutdown_grace: self.settings.shutdown_grace(),
            coalesce,
        }
    }
}

/// How long a role waits, after it stopped, for what it sent to leave the process.
const FLUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Flushes a role's bus before its runtime ends: acks are sent, not confirmed, so the last
/// ones may still sit in the connection's buffer.
async fn flush(bus: &dyn Bus) {
    match tokio::time::timeout(FLUSH_WAIT, bus.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not flush the last acks; their messages come back after the ack wait");
        }
        Err(_) => {
            tracing::warn!(
                "the last acks did not leave in time; their messages come back after the ack wait"
            );
        }
    }
}

/// Told by a role once its connections are open, so that `wagate ready` is logged only then.
type Started = tokio::sync::oneshot::Sender<()>;

/// Opens a role's connections, says so through `started`, runs `role` on them, and flushes the
/// bus once the role has stopped.
async fn with_connections<F, Fut>(
    settings: &Settings,
    backing: Backing,
    max_in_flight: usize,
    started: Started,
    role: F,
) -> Result<()>
where
    F: FnOnce(Arc<dyn Bus>, Arc<dyn Store>) -> Fut,
    Fut: Future<Output = Result<(), shared::bus::BusError>>,
{
    let (bus, store) = backing.open(settings, max_in_flight).await?;
    // The process may have stopped waiting; the role runs all the same.
    let _ = started.send(());
    let done = role(bus.clone(), store).await;
    flush(&*bus).await;
    Ok(done?)
}

async fn worker_role(
    common: Common,
    backing: Backing,
    shutdown: Shutdown,
    started: Started,
) -> Result<()> {
    let settings = &common.settings;
    let runner = worker::agent::AgentRunner::new(
        common.keyring.clone(),
        settings.agent_timeout(),
        settings.worker_concurrency,
    )?;
    with_connections(
        settings,
        backing,
        settings.worker_concurrency,
        started,
        |bus, store| {
            let ctx = worker::TurnContext {
                bus,
                store,
                directory: common.directory.clone(),
                runner,
                history_window: settings.history_window,
                retry: settings.agent_retry.clone(),
            };
            let coalesce = Coalesce {
                window: std::time::Duration::from_millis(settings.coalesce_ms),
                max: settings.coalesce_max.max(1),
            };
            let config = common.dispatch(settings.worker_concurrency, Some(coalesce));
            worker::run(ctx, config, shutdown)
        },
    )
    .await
}

async fn sender_role(
    common: Common,
    backing: Backing,
    shutdown: Shutdown,
    started: Started,
) -> Result<()> {
    let settings = &common.settings;
    let client = sender::twilio_client::TwilioClient::new(
        &settings.twilio_api_base,
        settings.twilio_timeout(),
    )
    .map_err(anyhow::Error::msg)?;
    with_connections(
        settings,
        backing,
        settings.sender_concurrency,
        started,
        |bus, store| {
            let ctx = sender::SendContext {
                bus,
                store,
                directory: common.directory.clone(),
                client,
                public_url: settings.public_base().map(str::to_owned),
                retry: settings.send_retry.clone(),
                twilio_timeout: settings.twilio_timeout(),
                send_lease: settings.send_lease(),
            };
            let config = common.dispatch(settings.sender_concurrency, None);
            sender::run(ctx, config, shutdown)
        },
    )
    .await
}

/// Where a role's tasks run: on a runtime and thread of their own (`serve`), or on the main
/// runtime.
#[derive(Clone, Copy)]
struct Placement {
    apart: bool,
    threads: std::num::NonZeroUsize,
}

impl Placement {
    /// Starts the role that `start` builds into `tasks`, and returns the receiver its
    /// [`Started`] answers.
    fn spawn<F, Fut>(
        self,
        tasks: &mut JoinSet<Result<()>>,
        name: &'static str,
        start: F,
    ) -> tokio::sync::oneshot::Receiver<()>
    where
        F: FnOnce(Started) -> Fut + Send + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        let (started, receiver) = tokio::sync::oneshot::channel();
        if self.apart {
            tasks.spawn(on_own_runtime(name, self.threads, move || start(started)));
        } else {
            tasks.spawn(start(started));
        }
        receiver
    }
}

/// Runs a role on a runtime of its own, on a thread of its own, and resolves when it ends.
/// `start` builds the role's future on that runtime, so that the connections it opens are
/// driven there.
async fn on_own_runtime<F, Fut>(
    name: &'static str,
    threads: std::num::NonZeroUsize,
    start: F,
) -> Result<()>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<()>>,
{
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("wagate-{name}"))
        .spawn(move || {
            let done = match crate::runtime(threads) {
                Ok(runtime) => runtime.block_on(start()),
                Err(e) => Err(anyhow!("cannot start the {name}'s runtime: {e}")),
            };
            // Nobody listens any more once the shutdown deadline has passed.
            let _ = done_tx.send(done);
        })
        .with_context(|| format!("cannot start the {name}'s thread"))?;
    done_rx
        .await
        .unwrap_or_else(|_| Err(anyhow!("the {name} panicked")))
}

/// Connections the kernel queues for a listener before the accept loop takes them (capped by
/// `net.core.somaxconn`). tokio's 1024 overflows under a burst of connections while the accept
/// loop catches up, and then a client (a health check among them) is not answered until its
/// SYN is sent again a second later.
const LISTEN_BACKLOG: u32 = 4096;

async fn bind(addr: SocketAddr, what: &str) -> Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    };
    socket
        .and_then(|s| {
            // As std and tokio do on Unix: a restart can bind while old connections linger.
            #[cfg(unix)]
            s.set_reuseaddr(true)?;
            s.bind(addr)?;
            s.listen(LISTEN_BACKLOG)
        })
        .with_context(|| format!("cannot listen on {addr} ({what}); is the port taken?"))
}

fn install_metrics() -> Option<PrometheusHandle> {
    PrometheusBuilder::new().install_recorder().ok()
}

/// How long, in a staged shutdown, the sender keeps taking deliveries after the worker
/// stopped: JetStream hands a published reply to a waiting pull within milliseconds.
const REPLY_SETTLE: std::time::Duration = std::time::Duration::from_millis(250);

/// Runs `roles` until shutdown or until one of them fails.
pub async fn run(settings: Settings, roles: Roles) -> Result<()> {
    settings.validate()?;
    let deps = connect(&settings, roles).await?;
    let metrics = install_metrics();
    let shutdown = Shutdown::new();
    deps.directory.clone().watch(shutdown.clone()).await?;
    // Ingress keeps what it accepted in a local spool while NATS is away.
    let ingress_bus: Arc<dyn Bus> =
        if roles.ingress && matches!(settings.backends()?, Backends::Distributed { .. }) {
            ingress::spool::SpooledBus::open(
                deps.bus.clone(),
                &settings.data_dir.join("spool.redb"),
                settings.spool_max_mb.saturating_mul(1 << 20),
                std::time::Duration::from_millis(settings.spool_after_ms),
                shutdown.clone(),
            )?
        } else {
            deps.bus.clone()
        };
    let health = ingress::health::Health {
        bus: ingress_bus.clone(),
        store: deps.store.clone(),
        metrics,
    };
    // Shutdown is staged: ingress and worker stop taking work first; the sender keeps posting
    // until the worker's in-flight turns are done, so their replies go out before the exit.
    // The listeners drain beside them, each within the grace whatever its clients do, so that a
    // held connection delays neither the sender's turn nor the exit.
    let sender_shutdown = Shutdown::new();
    let mut listeners: JoinSet<Result<()>> = JoinSet::new();
    let mut tasks: JoinSet<Result<()>> = JoinSet::new();
    let mut sender_tasks: JoinSet<Result<()>> = JoinSet::new();
    let mut listening = Vec::new();
    let limits = http::Limits::of(&settings);
    if roles.ingress {
        let state = ingress::AppState {
            bus: ingress_bus,
            store: deps.store.clone(),
            directory: deps.directory.clone(),
            keyring: deps.keyring.clone(),
            admin_token: deps.admin_token.clone().map(Arc::new),
            public_url: settings.public_base().map(Arc::from),
            webhook_port: settings.listen.port(),
        };
        let webhooks = bind(settings.listen, "WAGATE_LISTEN").await?;
        let admin = bind(settings.admin_listen, "WAGATE_ADMIN_LISTEN").await?;
        listening.push(format!("webhooks on {}", webhooks.local_addr()?));
        listening.push(format!("admin API on {}", admin.local_addr()?));
        listeners.spawn(http::serve(
            webhooks,
            "WAGATE_LISTEN",
            ingress::webhook_router(state.clone(), health.clone()),
            limits,
            shutdown.clone(),
            settings.shutdown_grace(),
        ));
        listeners.spawn(http::serve(
            admin,
            "WAGATE_ADMIN_LISTEN",
            ingress::admin_router(state, health),
            limits,
            shutdown.clone(),
            settings.shutdown_grace(),
        ));
    } else if let Some(addr) = settings.metrics_listen {
        let listener = bind(addr, "WAGATE_METRICS_LISTEN").await?;
        listening.push(format!("health and metrics on {}", listener.local_addr()?));
        listeners.spawn(http::serve(
            listener,
            "WAGATE_METRICS_LISTEN",
            ingress::health::routes(health),
            limits,
            shutdown.clone(),
            settings.shutdown_grace(),
        ));
    }
    let common = Common {
        settings: Arc::new(settings.clone()),
        keyring: deps.keyring.clone(),
        directory: deps.directory.clone(),
    };
    // One process with several roles (`serve`) gives the worker and the sender a runtime each;
    // a process of one role runs it on the main runtime.
    let apart = roles.apart();
    let placement = Placement {
        apart,
        threads: roles.threads(settings.threads),
    };
    let backing = match settings.backends()? {
        Backends::Distributed {
            nats_url,
            redis_url,
        } if apart => Backing::Own {
            nats_url,
            redis_url,
        },
        _ => Backing::Shared {
            bus: deps.bus.clone(),
            store: deps.store.clone(),
        },
    };
    let mut starting = Vec::new();
    if roles.worker {
        let (common, backing, s) = (common.clone(), backing.clone(), shutdown.clone());
        starting.push(placement.spawn(&mut tasks, "worker", move |started| {
            worker_role(common, backing, s, started)
        }));
    }
    if roles.sender {
        let (common, backing, s) = (common.clone(), backing.clone(), sender_shutdown.clone());
        starting.push(
            placement.spawn(&mut sender_tasks, "sender", move |started| {
                sender_role(common, backing, s, started)
            }),
        );
    }
    // A role that could not start has dropped its `started`; its error ends the wait below.
    let mut all_started = true;
    for start in starting {
        all_started &= start.await.is_ok();
    }
    let role_names: Vec<&str> = [
        ("ingress", roles.ingress),
        ("worker", roles.worker),
        ("sender", roles.sender),
    ]
    .into_iter()
    .filter_map(|(n, on)| on.then_some(n))
    .collect();
    if all_started {
        tracing::info!(roles = %role_names.join(","), listening = %listening.join(", "), "wagate ready");
    }

    let mut failure = None;
    tokio::select! {
        _ = shutdown::signal() => tracing::info!("shutting down"),
        Some(done) = listeners.join_next() => failure = Some(task_failure(done)),
        Some(done) = tasks.join_next() => failure = Some(task_failure(done)),
        Some(done) = sender_tasks.join_next() => failure = Some(task_failure(done)),
    }
    let deadline =
        tokio::time::Instant::now() + settings.shutdown_grace() + std::time::Duration::from_secs(1);
    shutdown.cancel();
    let front = tokio::time::timeout_at(deadline, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    // The replies of the turns that just finished were published, not yet delivered: the
    // sender goes on taking deliveries for a moment, so it starts sending them before it stops.
    if roles.worker && roles.sender {
        tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + REPLY_SETTLE)).await;
    }
    sender_shutdown.cancel();
    let back = tokio::time::timeout_at(deadline, async {
        while sender_tasks.join_next().await.is_some() {}
    })
    .await;
    let http = tokio::time::timeout_at(deadline, async {
        while listeners.join_next().await.is_some() {}
    })
    .await;
    if front.is_err() || back.is_err() || http.is_err() {
        tracing::warn!(
            "shutdown deadline passed; exiting with work in flight (it will be redelivered)"
        );
    }
    match failure {
        Some(e) => Err(e),
        None => {
            tracing::info!("stopped");
            Ok(())
        }
    }
}

fn task_failure(done: Result<Result<()>, tokio::task::JoinError>) -> anyhow::Error {
    match done {
        Ok(Ok(())) => anyhow!("a role stopped unexpectedly"),
        Ok(Err(e)) => e,
        Err(e) => anyhow!("a role panicked: {e}"),
    }
}
