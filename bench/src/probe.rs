//! The limit probe of P1: the least a correct webhook receiver can do on this machine. It reads
//! the form, checks the signature with one HMAC-SHA1, publishes the raw body to a JetStream
//! work-queue stream like wagate's (file storage, MessageSid as `Nats-Msg-Id`), awaits the ack
//! and answers empty TwiML. No channel lookup, no envelope, no metrics, no logs: what wagate
//! adds on top of this is what P1's ratio measures.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use async_nats::jetstream::{
    self,
    message::PublishMessage,
    stream::{Config, RetentionPolicy, StorageType},
};
use axum::{
    Router,
    body::Bytes,
    extract::{OriginalUri, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};

use crate::load::AUTH_TOKEN;

struct Probe {
    js: jetstream::Context,
    base: String,
}

/// Runs the probe on `listen` until killed.
pub async fn serve(listen: SocketAddr, nats_url: &str) -> Result<()> {
    let client = async_nats::connect(nats_url)
        .await
        .context("the probe cannot reach NATS")?;
    let js = jetstream::new(client);
    js.get_or_create_stream(Config {
        name: "PROBE_INBOUND".into(),
        subjects: vec!["probe.inbound.>".into()],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        duplicate_window: Duration::from_secs(600),
        allow_direct: true,
        ..Default::default()
    })
    .await
    .context("the probe cannot create its stream")?;
    let probe = Arc::new(Probe {
        js,
        base: format!("http://{listen}"),
    });
    let app = Router::new()
        .route("/webhooks/twilio/whatsapp/{agent}", post(webhook))
        .with_state(probe);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

async fn webhook(
    State(probe): State<Arc<Probe>>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Ok(form) = twilio::form::parse(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let url = format!("{}{}", probe.base, uri.path());
    let expected = twilio::signature::compute_signature(AUTH_TOKEN.as_bytes(), &url, &form);
    let given = headers
        .get("x-twilio-signature")
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if given != expected.as_bytes() {
        return StatusCode::FORBIDDEN.into_response();
    }
    let Some(sid) = twilio::form::first(&form, "MessageSid") else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let from = twilio::form::first(&form, "WaId").unwrap_or("unknown");
    let published = probe
        .js
        .send_publish(
            format!("probe.inbound.{from}"),
            PublishMessage::build()
                .payload(body.clone())
                .message_id(sid),
        )
        .await;
    let acked = match published {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    };
    if !acked {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    (
        [(header::CONTENT_TYPE, "text/xml")],
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response></Response>",
    )
        .into_response()
}
