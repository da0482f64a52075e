//! The worker role: turns run against the agents, replies published for the sender.

use anyhow::Result;
use shared::dispatch::Coalesce;

use super::{Launch, placement::with_connections};

/// Time limit of fetching one inbound medium from Twilio (its API, then its CDN).
const MEDIA_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

pub(super) async fn worker_role(launch: Launch) -> Result<()> {
    let common = launch.common;
    let settings = &common.settings;
    let runner = worker::agent::AgentRunner::new(
        common.keyring.clone(),
        settings.agent_timeout(),
        settings.worker_concurrency,
    )?;
    let media = worker::media::MediaFetcher::new(
        &settings.twilio_api_base,
        settings.media_max_bytes,
        MEDIA_TIMEOUT,
    )?;
    let typing = worker::typing::Typing::new(&settings.twilio_messaging_base)?;
    with_connections(
        settings,
        launch.backing,
        settings.worker_concurrency,
        launch.started,
        |bus, store| {
            let ctx = worker::TurnContext {
                bus,
                store,
                directory: common.directory.clone(),
                runner,
                history_window: settings.history_window,
                retry: settings.agent_retry.clone(),
                media,
                typing,
                begins: Default::default(),
            };
            let coalesce = Coalesce {
                window: std::time::Duration::from_millis(settings.coalesce_ms),
                max: settings.coalesce_max.max(1),
            };
            let config = common.dispatch(settings.worker_concurrency, Some(coalesce));
            worker::run(ctx, config, launch.shutdown)
        },
    )
    .await
}
