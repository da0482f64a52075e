//! One W3C trace per inbound message, across processes. Ingress starts the trace when it
//! accepts a webhook; the message's `traceparent` travels in its envelope, because the envelope
//! is what every path keeps (JetStream, the ingress spool, the embedded bus, dead letters and
//! their replay), and in JetStream's `traceparent` message header as well, for tools that
//! follow traces through NATS. The worker's turn and the sender's posts continue the trace
//! from the envelope. Every span of a message records its `trace_id` as a field, so that JSON
//! logs carry it on each line whether or not spans are exported.
//!
//! The ids come from one of two layers the binary installs: OpenTelemetry's when spans are
//! exported, or [`IdsLayer`] when they are not. OpenTelemetry's layer builds a span's data
//! (name, attributes, events, timings) for the exporter on every span, sampled or not, which
//! cost more per reply than the rest of a turn's logging; `IdsLayer` gives a traced span its two
//! ids and nothing else. Without either layer (unit tests, a library user) these functions do
//! nothing and messages carry no `traceparent`.

use opentelemetry::{
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{SpanId, TraceContextExt, TraceId},
};
use opentelemetry_sdk::{
    propagation::TraceContextPropagator,
    trace::{IdGenerator as _, RandomIdGenerator},
};
use tracing::{Span, Subscriber, span};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{Registry, layer::Context, registry::LookupSpan};

/// The W3C header (and envelope field) name.
pub const TRACEPARENT: &str = "traceparent";

/// The field that makes a span the root of a trace under [`IdsLayer`]: the spans that start or
/// continue a message's trace declare it (as `Empty`, filled by [`record_trace_id`]).
const TRACE_ID_FIELD: &str = "trace_id";

/// A span's place in a trace, kept in its extensions by [`IdsLayer`].
#[derive(Clone, Copy)]
struct Ids {
    trace: TraceId,
    span: SpanId,
}

/// Gives W3C ids to the spans of traces, for logs and propagation, when no span is exported: a
/// span that declares a `trace_id` field starts a trace (which [`continue_trace`] may join to a
/// remote one), and the spans inside it belong to the same trace with ids of their own. Other
/// spans get nothing, and cost nothing more.
pub struct IdsLayer;

impl<S> tracing_subscriber::Layer<S> for IdsLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let inherited = span
            .parent()
            .and_then(|parent| parent.extensions().get::<Ids>().map(|ids| ids.trace));
        let trace = match inherited {
            Some(trace) => trace,
            None if attrs.metadata().fields().field(TRACE_ID_FIELD).is_some() => {
                RandomIdGenerator::default().new_trace_id()
            }
            None => return,
        };
        let span_id = RandomIdGenerator::default().new_span_id();
        span.extensions_mut().insert(Ids {
            trace,
            span: span_id,
        });
    }
}

/// Runs `f` on the ids [`IdsLayer`] gave `span`; `None` when it gave none or is not installed.
fn with_ids<R>(span: &Span, f: impl FnOnce(&mut Ids) -> R) -> Option<R> {
    span.with_subscriber(|(id, dispatch)| {
        let registry = dispatch.downcast_ref::<Registry>()?;
        let data = registry.span(id)?;
        let mut extensions = data.extensions_mut();
        extensions.get_mut::<Ids>().map(f)
    })
    .flatten()
}

/// The trace and span id of `span`, from whichever layer gave them; `None` outside a trace.
fn ids_of(span: &Span) -> Option<Ids> {
    if let Some(ids) = with_ids(span, |ids| *ids) {
        return Some(ids);
    }
    let cx = span.context();
    let context = cx.span().span_context().clone();
    context.is_valid().then(|| Ids {
        trace: context.trace_id(),
        span: context.span_id(),
    })
}

/// The `traceparent` that makes the next role's spans children of `span`; `None` when `span`
/// belongs to no trace.
pub fn traceparent(span: &Span) -> Option<String> {
    if let Some(ids) = with_ids(span, |ids| *ids) {
        // Not sampled: nothing of this process is exported, as the OpenTelemetry layer says
        // under its always-off sampler.
        return Some(format!("00-{}-{}-00", ids.trace, ids.span));
    }
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
        let remote = parent.span().span_context().clone();
        if remote.is_valid() {
            let joined = with_ids(span, |ids| ids.trace = remote.trace_id());
            if joined.is_none() {
                // Fails only for a span already started, which the caller's order rules out,
                // or without a layer, where there is no trace to continue.
                let _ = span.set_parent(parent);
            }
        }
    }
    record_trace_id(span);
}

/// Records the trace id of `span` in its `trace_id` field (declared `Empty` by the caller).
pub fn record_trace_id(span: &Span) {
    if let Some(ids) = ids_of(span) {
        span.record(TRACE_ID_FIELD, tracing::field::display(ids.trace));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::layer::SubscriberExt;

    /// Runs `test` once under OpenTelemetry's layer and once under [`IdsLayer`]: the functions
    /// of this module must behave alike under both.
    fn with_each_layer(test: impl Fn()) {
        let provider = SdkTracerProvider::builder().build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), &test);
        tracing::subscriber::with_default(tracing_subscriber::registry().with(IdsLayer), &test);
    }

    fn trace_of(span: &Span) -> TraceId {
        ids_of(span).expect("a traced span").trace
    }

    #[test]
    fn a_child_continues_its_parents_trace() {
        with_each_layer(|| {
            let root = tracing::info_span!("root", trace_id = tracing::field::Empty);
            record_trace_id(&root);
            let parent = traceparent(&root).expect("a traceparent");
            let child = tracing::info_span!("child", trace_id = tracing::field::Empty);
            continue_trace(&child, Some(&parent));
            assert_eq!(trace_of(&child), trace_of(&root));
            assert_ne!(trace_of(&child), TraceId::INVALID);
            let again = traceparent(&child).expect("a traceparent");
            assert_eq!(again[3..35], parent[3..35], "same trace id");
            assert_ne!(again[36..52], parent[36..52], "another span id");
        });
    }

    #[test]
    fn spans_inside_a_traced_span_share_its_trace_and_other_roots_start_their_own() {
        with_each_layer(|| {
            let first = tracing::info_span!("first", trace_id = tracing::field::Empty);
            let inner = first.in_scope(|| tracing::info_span!("inner"));
            assert_eq!(trace_of(&inner), trace_of(&first));
            assert_ne!(
                traceparent(&inner).expect("a traceparent")[36..52],
                traceparent(&first).expect("a traceparent")[36..52],
                "a span id of its own"
            );
            let second = tracing::info_span!("second", trace_id = tracing::field::Empty);
            assert_ne!(trace_of(&second), trace_of(&first));
        });
    }

    #[test]
    fn garbage_starts_a_new_trace() {
        with_each_layer(|| {
            for bad in [
                "",
                "00-zz-yy-01",
                "00-00000000000000000000000000000000-0000000000000000-01",
            ] {
                let span = tracing::info_span!("s", trace_id = tracing::field::Empty);
                continue_trace(&span, Some(bad));
                assert_ne!(trace_of(&span), TraceId::INVALID, "{bad:?}");
            }
        });
    }

    #[test]
    fn a_span_outside_any_trace_has_no_traceparent_under_the_ids_layer() {
        let subscriber = tracing_subscriber::registry().with(IdsLayer);
        tracing::subscriber::with_default(subscriber, || {
            assert_eq!(traceparent(&tracing::info_span!("untraced")), None);
        });
    }

    #[test]
    fn without_a_layer_there_is_no_traceparent() {
        let span = tracing::info_span!("s");
        assert_eq!(traceparent(&span), None);
    }
}
