//! The worker role: turns run against the agents, replies published for the sender.

use anyhow::Result;
use shared::{dispatch::Coalesce, shutdown::Shutdown};

use super::{
    Common,
    connect::Backing,
    placement::{Started, with_connections},
};

pub(super) async fn worker_role(
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
