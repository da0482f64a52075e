//! Running the roles: connect the bus and the store, start the listeners and consumers of the
//! roles asked for, log one line when ready, and on SIGTERM stop taking work and give in-flight
//! work the configured grace period.

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
    config::{Backends, Settings},
    crypto::Keyring,
    directory::ChannelDirectory,
    dispatch::{Coalesce, DispatchConfig},
    shutdown::{self, Shutdown},
    store::{Store, redis::RedisStore},
};
use tokio::task::JoinSet;

use crate::{Roles, first_start};

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
            let options = JetStreamOptions {
                prefix: settings.prefix.clone(),
                max_in_flight: settings.worker_concurrency.max(settings.sender_concurrency),
                duplicate_window: std::time::Duration::from_millis(
                    settings.dedupe_window_ms.max(1000),
                ),
            };
            let bus = JetStreamBus::connect(&nats_url, options).await?;
            let store = RedisStore::connect(&redis_url, &settings.prefix).await?;
            (Arc::new(bus), Arc::new(store))
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
            }
            (Arc::new(embedded.bus), Arc::new(embedded.store))
        }
    };
    let master = master.as_ref().ok_or_else(|| {
        anyhow!(
            "WAGATE_MASTER_KEY is required with NATS and Redis: create one with `wagate keygen`"
        )
    })?;
    let keyring = Arc::new(
        Keyring::from_base64(master, &settings.master_key_previous).context("WAGATE_MASTER_KEY")?,
    );
    let directory = ChannelDirectory::new(store.clone(), keyring.clone());
    Ok(Deps {
        bus,
        store,
        keyring,
        directory,
        admin_token,
    })
}

async fn bind(addr: SocketAddr, what: &str) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
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
    let state = ingress::AppState {
        bus: ingress_bus,
        store: deps.store.clone(),
        directory: deps.directory.clone(),
        keyring: deps.keyring.clone(),
        admin_token: deps.admin_token.clone().map(Arc::new),
        public_url: settings.public_base().map(Arc::from),
        webhook_port: settings.listen.port(),
        metrics,
    };
    // Shutdown is staged: ingress and worker stop taking work first; the sender keeps posting
    // until the worker's in-flight turns are done, so their replies go out before the exit.
    let sender_shutdown = Shutdown::new();
    let mut tasks: JoinSet<Result<()>> = JoinSet::new();
    let mut sender_tasks: JoinSet<Result<()>> = JoinSet::new();
    let mut listening = Vec::new();
    if roles.ingress {
        let webhooks = bind(settings.listen, "WAGATE_LISTEN").await?;
        let admin = bind(settings.admin_listen, "WAGATE_ADMIN_LISTEN").await?;
        listening.push(format!("webhooks on {}", webhooks.local_addr()?));
        listening.push(format!("admin API on {}", admin.local_addr()?));
        tasks.spawn(serve_http(
            webhooks,
            ingress::webhook_router(state.clone()),
            shutdown.clone(),
        ));
        tasks.spawn(serve_http(
            admin,
            ingress::admin_router(state.clone()),
            shutdown.clone(),
        ));
    } else if let Some(addr) = settings.metrics_listen {
        let listener = bind(addr, "WAGATE_METRICS_LISTEN").await?;
        listening.push(format!("health and metrics on {}", listener.local_addr()?));
        let router = ingress::health::routes().with_state(state.clone());
        tasks.spawn(serve_http(listener, router, shutdown.clone()));
    }
    let dispatch = |concurrency, coalesce| DispatchConfig {
        concurrency,
        shutdown_grace: settings.shutdown_grace(),
        coalesce,
    };
    if roles.worker {
        let ctx = worker::TurnContext {
            bus: deps.bus.clone(),
            store: deps.store.clone(),
            directory: deps.directory.clone(),
            runner: worker::agent::AgentRunner::new(
                deps.keyring.clone(),
                settings.agent_timeout(),
                settings.worker_concurrency,
            ),
            history_window: settings.history_window,
            retry: settings.agent_retry.clone(),
        };
        let coalesce = Coalesce {
            window: std::time::Duration::from_millis(settings.coalesce_ms),
            max: settings.coalesce_max.max(1),
        };
        let config = dispatch(settings.worker_concurrency, Some(coalesce));
        let s = shutdown.clone();
        tasks.spawn(async move { Ok(worker::run(ctx, config, s).await?) });
    }
    if roles.sender {
        let ctx = sender::SendContext {
            bus: deps.bus.clone(),
            store: deps.store.clone(),
            directory: deps.directory.clone(),
            client: sender::twilio_client::TwilioClient::new(
                &settings.twilio_api_base,
                settings.twilio_timeout(),
            ),
            public_url: settings.public_base().map(str::to_owned),
            retry: settings.send_retry.clone(),
            twilio_timeout: settings.twilio_timeout(),
        };
        let config = dispatch(settings.sender_concurrency, None);
        let s = sender_shutdown.clone();
        sender_tasks.spawn(async move { Ok(sender::run(ctx, config, s).await?) });
    }
    let role_names: Vec<&str> = [
        ("ingress", roles.ingress),
        ("worker", roles.worker),
        ("sender", roles.sender),
    ]
    .into_iter()
    .filter_map(|(n, on)| on.then_some(n))
    .collect();
    tracing::info!(roles = %role_names.join(","), listening = %listening.join(", "), "wagate ready");

    let mut failure = None;
    tokio::select! {
        _ = shutdown::signal() => tracing::info!("shutting down"),
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
    if let Err(e) = tokio::time::timeout_at(deadline, deps.bus.flush())
        .await
        .unwrap_or(Ok(()))
    {
        tracing::warn!(error = %e, "could not flush the last acks; their messages come back after the ack wait");
    }
    if front.is_err() || back.is_err() {
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

async fn serve_http(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown: Shutdown,
) -> Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .context("HTTP server failed")
}
