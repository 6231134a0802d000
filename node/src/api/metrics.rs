//! `/metrics` in Prometheus text format: Raft state from openraft's metrics, counters kept by
//! the API, and the peer RPC latency histograms the transport records.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::AppState;

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub token_validations: Counter,
    pub tokens_issued: Counter,
    pub auth_failures: Counter,
}

pub fn routes() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut out = state.cluster.prometheus_text();
    let m = &state.metrics;
    for (name, help, v) in [
        (
            "shoal_api_token_validations_total",
            "Tokens validated from memory.",
            m.token_validations.get(),
        ),
        (
            "shoal_api_tokens_issued_total",
            "Tokens issued by this node.",
            m.tokens_issued.get(),
        ),
        (
            "shoal_api_auth_failures_total",
            "Failed password authentications.",
            m.auth_failures.get(),
        ),
    ] {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
        ));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
