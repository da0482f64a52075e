//! Running the roles: connect the bus and the store, start the listeners and consumers of the
//! roles asked for, log one line when ready, and on SIGTERM stop taking work and give in-flight
//! work the configured grace period.
//!
//! `serve` runs the worker and the sender each on a runtime and thread of their own, with their
//! own NATS and Redis connections: three roles in one process then cost what three processes
//! cost, without tasks of one role waiting behind another's on a shared scheduler
//! (docs/benchmarks.md, change 12).
//!
//! - [`connect`]: the bus, the store, the master key check.
//! - [`placement`]: a role on its own runtime or the main one, connected, then flushed.
//! - [`worker`] and [`sender`]: what each of those roles runs.

mod connect;
mod placement;
mod sender;
mod worker;

use std::sync::Arc;

use anyhow::{Result, anyhow};
use bus::Bus;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use shared::{
    config::{Backends, Settings},
    directory::ChannelDirectory,
    dispatch::{Coalesce, DispatchConfig},
    shutdown::{self, Shutdown},
};
use tokio::task::JoinSet;
use wagate_core::crypto::Keyring;

use crate::{Roles, listeners};
use connect::{Backing, connect};
use placement::Placement;

/// What a role is started with.
struct Launch {
    common: Common,
    backing: Backing,
    shutdown: Shutdown,
    started: placement::Started,
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

/// Bucket bounds of every `_seconds` histogram: from a webhook's few milliseconds to a slow
/// model's minute. Without bounds the exporter writes summaries, whose quantiles cannot be added
/// up across processes; with one set for all, a dashboard compares stages on the same scale.
const LATENCY_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

fn install_metrics() -> Option<PrometheusHandle> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
        .ok()?
        .install_recorder()
        .ok()
}

/// How long, in a staged shutdown, the sender keeps taking deliveries after the worker
/// stopped: JetStream hands a published reply to a waiting pull within milliseconds.
const REPLY_SETTLE: std::time::Duration = std::time::Duration::from_millis(250);

/// Runs `roles` until shutdown or until one of them fails.
pub async fn run(settings: Settings, roles: Roles) -> Result<()> {
    settings.validate()?;
    let deps = connect(&settings, roles).await?;
    let metrics = install_metrics();
    if roles.ingress {
        ingress::register_metrics();
    }
    if roles.worker {
        ::worker::register_metrics();
    }
    if roles.sender {
        ::sender::register_metrics();
    }
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
    let health = crate::health::Health {
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
    let ingress_state = roles.ingress.then(|| ingress::AppState {
        bus: ingress_bus,
        store: deps.store.clone(),
        directory: deps.directory.clone(),
        keyring: deps.keyring.clone(),
        admin_token: deps.admin_token.clone().map(Arc::new),
        public_url: settings.public_base().map(Arc::from),
        webhook_port: settings.listen.port(),
        sandbox_mps: settings.sandbox_mps,
        console: ingress::console::ConsoleState::default(),
    });
    let listeners::Bound {
        listening,
        sign_in_link,
    } = listeners::start(&settings, ingress_state, health, &shutdown, &mut listeners).await?;
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
            worker::worker_role(Launch {
                common,
                backing,
                shutdown: s,
                started,
            })
        }));
    }
    if roles.sender {
        let (common, backing, s) = (common.clone(), backing.clone(), sender_shutdown.clone());
        starting.push(
            placement.spawn(&mut sender_tasks, "sender", move |started| {
                sender::sender_role(Launch {
                    common,
                    backing,
                    shutdown: s,
                    started,
                })
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
        // As Jupyter does: a link that signs the browser in once, printed on the terminal (not
        // logged: logs are often shipped elsewhere, and the link is a credential until used).
        if let Some(link) = sign_in_link {
            println!(
                "Console: open {link} to sign in (the link works once, for 15 minutes; later, sign in with the admin token)"
            );
        }
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
