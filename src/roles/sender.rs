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
    let events_http = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .build()?;
    with_connections(
        settings,
        launch.backing,
        settings.sender_concurrency,
        launch.started,
        |bus, store| {
            let ctx = sender::SendContext {
                bus,
                pacer: sender::pacing::Pacer::new(store.clone(), settings.sandbox_mps),
                store,
                directory: common.directory.clone(),
                client,
                content,
                public_url: settings.public_base().map(str::to_owned),
                retry: settings.send_retry.clone(),
                twilio_timeout: settings.twilio_timeout(),
                send_lease: settings.send_lease(),
                part_sent_timeout: settings.part_sent_timeout(),
            };
            let events = sender::events::EventSender {
                bus: ctx.bus.clone(),
                directory: common.directory.clone(),
                http: events_http.clone(),
                retry: settings.events_retry.clone(),
                timeout: settings.twilio_timeout(),
            };
            let config = common.dispatch(settings.sender_concurrency, None);
            sender::run(ctx, events, config, launch.shutdown)
        },
    )
    .await
}
