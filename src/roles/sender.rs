//! The sender role: replies posted to Twilio's Messages API.

use anyhow::Result;
use shared::shutdown::Shutdown;

use super::{
    Common,
    connect::Backing,
    placement::{Started, with_connections},
};

pub(super) async fn sender_role(
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
