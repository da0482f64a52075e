//! Liveness, readiness and Prometheus metrics: the process's, not a role's. They have a state of
//! their own, [`Health`], and every listener adds them: ingress's webhook and admin listeners,
//! the worker's and sender's `WAGATE_METRICS_LISTEN`, none borrowing another role's state.

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use bus::Bus;
use metrics_exporter_prometheus::PrometheusHandle;
use store::Store;

/// What `/readyz` and `/metrics` read.
#[derive(Clone)]
pub struct Health {
    /// The bus whose `ready()` answers `/readyz`.
    pub bus: Arc<dyn Bus>,
    /// The store whose `ready()` answers `/readyz`.
    pub store: Arc<dyn Store>,
    /// Renders `/metrics`; `None` when the process could not install its recorder.
    pub metrics: Option<PrometheusHandle>,
}

/// `/healthz` and `/readyz` for the public webhook listener: a 503 names the backend that is
/// not ready and nothing more. Its error (a host name, a port, a server's message) is for the
/// operator's probes on the internal listeners and the log, not for anyone on the internet.
pub fn probes<S: Clone + Send + Sync + 'static>(health: Health) -> Router<S> {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz_brief))
        .with_state(health)
}

/// `/healthz`, `/readyz` (with the backends' errors) and `/metrics`, without a bearer token:
/// for the admin listener and the worker's and sender's metrics listener, which Prometheus and
/// the orchestrator's probes reach inside the network. Not for the public webhook listener,
/// where the metrics would tell anyone the traffic and the agents.
pub fn routes<S: Clone + Send + Sync + 'static>(health: Health) -> Router<S> {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health)
}

/// How long `/readyz` waits for the bus and the store. A backend that is down does not always
/// refuse at once: a NATS request waits out the client's request timeout (10 s) while it
/// reconnects, and Kubernetes gives a probe one second by default, after which a hanging answer
/// counts as a failure anyway but ties up a connection per probe. Below that second, the probe
/// says which backend did not answer.
const READY_DEADLINE: Duration = Duration::from_millis(800);

/// The backends that are not ready, each with why.
async fn not_ready(health: &Health) -> Vec<(&'static str, String)> {
    let late = || format!("did not answer within {READY_DEADLINE:?}");
    let (bus, store) = tokio::join!(
        tokio::time::timeout(READY_DEADLINE, health.bus.ready()),
        tokio::time::timeout(READY_DEADLINE, health.store.ready()),
    );
    let mut why = Vec::new();
    match bus {
        Ok(Ok(())) => {}
        Ok(Err(e)) => why.push(("the bus", e.to_string())),
        Err(_) => why.push(("the bus", late())),
    }
    match store {
        Ok(Ok(())) => {}
        Ok(Err(e)) => why.push(("the store", e.to_string())),
        Err(_) => why.push(("the store", late())),
    }
    why
}

async fn readyz(State(health): State<Health>) -> impl IntoResponse {
    let why = not_ready(&health).await;
    if why.is_empty() {
        return (StatusCode::OK, "ready".to_owned());
    }
    let text: Vec<String> = why.iter().map(|(what, e)| format!("{what}: {e}")).collect();
    (StatusCode::SERVICE_UNAVAILABLE, text.join("; "))
}

async fn readyz_brief(State(health): State<Health>) -> impl IntoResponse {
    let why = not_ready(&health).await;
    if why.is_empty() {
        return (StatusCode::OK, "ready".to_owned());
    }
    for (what, e) in &why {
        tracing::debug!(backend = what, error = %e, "not ready");
    }
    let names: Vec<&str> = why.iter().map(|(what, _)| *what).collect();
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("not ready: {}", names.join(", ")),
    )
}

async fn metrics(State(health): State<Health>) -> impl IntoResponse {
    let body = health
        .metrics
        .as_ref()
        .map(|m| m.render())
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}
