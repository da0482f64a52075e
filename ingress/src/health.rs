//! Liveness, readiness and Prometheus metrics.

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};

use crate::AppState;

/// `/healthz`, `/readyz`, `/metrics`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let bus = state.bus.ready().await;
    let store = state.store.ready().await;
    match (bus, store) {
        (Ok(()), Ok(())) => (StatusCode::OK, "ready".to_owned()),
        (b, s) => {
            let mut why = Vec::new();
            if let Err(e) = b {
                why.push(e.to_string());
            }
            if let Err(e) = s {
                why.push(e.to_string());
            }
            (StatusCode::SERVICE_UNAVAILABLE, why.join("; "))
        }
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let body = state
        .metrics
        .as_ref()
        .map(|m| m.render())
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}
