//! Logs and traces of the process. Logs go to stderr as text, or as one JSON object a line
//! with `WAGATE_LOG_FORMAT=json`, where the fields of the spans an event is in are on the top
//! level: so every line about a message carries its `trace_id` (wagate_core::trace). Spans are
//! always given W3C ids, so that logs can be joined across processes; they are exported over
//! OTLP (http/protobuf, or http/json) only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, under
//! the role's `service.name`, by OpenTelemetry's layer. Otherwise wagate_core's `IdsLayer`
//! gives the ids alone, at a fraction of the cost per span.

use anyhow::{Context, bail};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::{
    Resource,
    trace::{BatchSpanProcessor, Sampler, SdkTracerProvider},
};
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};
use wagate_core::trace::IdsLayer;

/// Keeps the exporter running, if spans are exported; dropping it sends the spans still queued.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(Err(e)) = self.provider.as_ref().map(SdkTracerProvider::shutdown) {
            eprintln!("wagate: could not send the last spans: {e}");
        }
    }
}

/// Installs logging and tracing for a process named `service` (`wagate-ingress`, …).
pub fn init(service: &'static str) -> anyhow::Result<Telemetry> {
    let provider = tracer_provider(service)?;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,async_nats=warn"));
    let json = match std::env::var("WAGATE_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") | Err(_) => false,
        Ok(other) => bail!("WAGATE_LOG_FORMAT is {other:?}: use text or json"),
    };
    let logs = if json {
        json_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .flatten_span_list_on_top_level(true)
            .boxed()
    } else {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .boxed()
    };
    let spans = match &provider {
        Some(provider) => tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("wagate"))
            .with_threads(false)
            .boxed(),
        None => IdsLayer.boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(spans)
        .try_init()
        .context("installing the log subscriber")?;
    Ok(Telemetry { provider })
}

/// Samples every trace and exports it in batches when a collector is configured; `None`
/// otherwise, as there is nothing to export.
fn tracer_provider(service: &'static str) -> anyhow::Result<Option<SdkTracerProvider>> {
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_default();
    let traces_endpoint = std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").unwrap_or_default();
    if endpoint.is_empty() && traces_endpoint.is_empty() {
        return Ok(None);
    }
    let resource = Resource::builder().with_service_name(service).build();
    // Chosen here, not left to the exporter: with both encodings built in, its default would
    // be JSON, and OTLP's (and INTERFACE.md's) is protobuf.
    let protocol = match std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref() {
        Ok("http/protobuf") | Err(_) => Protocol::HttpBinary,
        Ok("http/json") => Protocol::HttpJson,
        Ok(other) => bail!(
            "OTEL_EXPORTER_OTLP_PROTOCOL is {other:?}: wagate exports over http/protobuf (the default) or http/json"
        ),
    };
    // The endpoint, headers and timeout are read from the standard OTEL_EXPORTER_OTLP_*
    // variables by the exporter itself.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol)
        .build()
        .context("configuring the OTLP span exporter (OTEL_EXPORTER_OTLP_*)")?;
    Ok(Some(
        SdkTracerProvider::builder()
            .with_resource(resource)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
            .with_span_processor(BatchSpanProcessor::builder(exporter).build())
            .build(),
    ))
}
