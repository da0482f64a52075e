//! One W3C trace per inbound message, across processes. Ingress starts the trace when it
//! accepts a webhook; the message's `traceparent` travels in its envelope, because the envelope
//! is what every path keeps (JetStream, the ingress spool, the embedded bus, dead letters and
//! their replay), and in JetStream's `traceparent` message header as well, for tools that
//! follow traces through NATS. The worker's turn and the sender's posts continue the trace
//! from the envelope. Every
//! span of a message records its `trace_id` as a field, so that JSON logs carry it on each
//! line whether or not spans are exported.
//!
//! The ids come from the OpenTelemetry layer the binary installs; without it (unit tests, a
//! library user) these functions do nothing and messages carry no `traceparent`.

use opentelemetry::{
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{TraceContextExt, TraceId},
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header (and envelope field) name.
pub const TRACEPARENT: &str = "traceparent";

/// The `traceparent` that makes the next role's spans children of `span`; `None` when `span`
/// belongs to no trace.
pub fn traceparent(span: &Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = Traceparent(None);
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.0
}

/// The one header of the W3C propagator that a message carries, in and out: a map for the
/// propagator to write its headers into and read them from would cost an allocation per
/// message and role for nothing (`tracestate` is not carried).
struct Traceparent<T>(Option<T>);

impl Injector for Traceparent<String> {
    fn set(&mut self, key: &str, value: String) {
        if key == TRACEPARENT {
            self.0 = Some(value);
        }
    }
}

impl Extractor for Traceparent<&str> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.filter(|_| key == TRACEPARENT)
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

/// Makes `span` (just created, not yet entered) a child of the span `traceparent` names, and
/// records its `trace_id`. A missing or malformed `traceparent` (a message of an older process,
/// or bytes from outside) starts a new trace instead: tracing never refuses a message.
pub fn continue_trace(span: &Span, traceparent: Option<&str>) {
    if let Some(value) = traceparent {
        let parent = TraceContextPropagator::new().extract(&Traceparent(Some(value)));
        if parent.span().span_context().is_valid() {
            // Fails only for a span already started, which the caller's order rules out, or
            // without the layer, where there is no trace to continue.
            let _ = span.set_parent(parent);
        }
    }
    record_trace_id(span);
}

/// Records the trace id of `span` in its `trace_id` field (declared `Empty` by the caller).
pub fn record_trace_id(span: &Span) {
    let id = span.context().span().span_context().trace_id();
    if id != TraceId::INVALID {
        span.record("trace_id", tracing::field::display(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::layer::SubscriberExt;

    fn with_layer(test: impl FnOnce()) {
        let provider = SdkTracerProvider::builder().build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, test);
    }

    #[test]
    fn a_child_continues_its_parents_trace() {
        with_layer(|| {
            let root = tracing::info_span!("root", trace_id = tracing::field::Empty);
            record_trace_id(&root);
            let parent = traceparent(&root).expect("a traceparent");
            let child = tracing::info_span!("child", trace_id = tracing::field::Empty);
            continue_trace(&child, Some(&parent));
            let trace_of = |s: &Span| s.context().span().span_context().trace_id();
            assert_eq!(trace_of(&child), trace_of(&root));
            assert_ne!(trace_of(&child), TraceId::INVALID);
            let again = traceparent(&child).expect("a traceparent");
            assert_eq!(again[3..35], parent[3..35], "same trace id");
            assert_ne!(again[36..52], parent[36..52], "another span id");
        });
    }

    #[test]
    fn garbage_starts_a_new_trace() {
        with_layer(|| {
            for bad in [
                "",
                "00-zz-yy-01",
                "00-00000000000000000000000000000000-0000000000000000-01",
            ] {
                let span = tracing::info_span!("s", trace_id = tracing::field::Empty);
                continue_trace(&span, Some(bad));
                let id = span.context().span().span_context().trace_id();
                assert_ne!(id, TraceId::INVALID, "{bad:?}");
            }
        });
    }

    #[test]
    fn without_the_layer_there_is_no_traceparent() {
        let span = tracing::info_span!("s");
        assert_eq!(traceparent(&span), None);
    }
}
