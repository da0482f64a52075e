//! Where and how a role runs: on a runtime and thread of its own (`serve`) or on the main
//! runtime, with its connections opened first and its bus flushed last.

use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use bus::Bus;
use shared::config::Settings;
use store::Store;
use tokio::task::JoinSet;

use super::connect::Backing;

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
pub(super) type Started = tokio::sync::oneshot::Sender<()>;

/// Opens a role's connections, says so through `started`, runs `role` on them, and flushes the
/// bus once the role has stopped.
pub(super) async fn with_connections<F, Fut>(
    settings: &Settings,
    backing: Backing,
    max_in_flight: usize,
    started: Started,
    role: F,
) -> Result<()>
where
    F: FnOnce(Arc<dyn Bus>, Arc<dyn Store>) -> Fut,
    Fut: Future<Output = Result<(), bus::BusError>>,
{
    let (bus, store) = backing.open(settings, max_in_flight).await?;
    // The process may have stopped waiting; the role runs all the same.
    let _ = started.send(());
    let done = role(bus.clone(), store).await;
    flush(&*bus).await;
    Ok(done?)
}

/// Where a role's tasks run: on a runtime and thread of their own (`serve`), or on the main
/// runtime.
#[derive(Clone, Copy)]
pub(super) struct Placement {
    pub apart: bool,
    pub threads: std::num::NonZeroUsize,
}

impl Placement {
    /// Starts the role that `start` builds into `tasks`, and returns the receiver its
    /// [`Started`] answers.
    pub(super) fn spawn<F, Fut>(
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
