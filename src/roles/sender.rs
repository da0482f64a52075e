//! The sender role: replies posted to Twilio's Messages API.

use anyhow::Result;

use super::{Launch, placement::with_connections};

pub(super) async fn sender_role(launch: Launch) -> Result<()> {
    let common = launch.common;
    let settings = &common.settings;
    let client = sender::twilio_client::TwilioClient::new(
        &settings.twilio_api_base,
        settings.twilio_timeout(),
    )?;
    let content = sender::content::ContentClient::new(
        &settings.twilio_content_base,
        settings.twilio_timeout(),
    )?;
    with_connections(
        settings,
        launch.backing,
        settings.sender_concurrency,
        launch.started,
        |bus, store| {
            let ctx = sender::SendContext {
                bus,
                store,
                directory: common.directory.clone(),
                client,
                content,
                public_url: settings.public_base().map(str::to_owned),
                retry: settings.send_retry.clone(),
                twilio_timeout: settings.twilio_timeout(),
                send_lease: settings.send_lease(),
            };
            let config = common.dispatch(settings.sender_concurrency, None);
            sender::run(ctx, config, launch.shutdown)
        },
    )
    .await
}
