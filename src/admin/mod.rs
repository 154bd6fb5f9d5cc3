//! The admin endpoint: health, readiness and a status view, on its own (loopback by default)
//! listener so that it is never exposed with the tunnel port.
//!
//! - `GET /healthz`: the process is serving (200).
//! - `GET /readyz`: 200 when the component can do its job (a proxy: listening, with its peers
//!   known; an agent: holding at least one tunnel per target), 503 otherwise.
//! - `GET /status`: the component's status as JSON (a proxy: its sites, their tunnels, and which
//!   proxies hold each site's tunnels; an agent: its tunnels per proxy).
//! - `GET /metrics`: Prometheus text format (see [`metrics`]).

pub mod metrics;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use tokio::net::TcpListener;

/// What the admin endpoint asks of the component it serves.
pub trait Component: Send + Sync + 'static {
    /// Whether the component can do its job now.
    fn ready(&self) -> bool;
    /// The component's status, for people and tools.
    fn status(&self) -> serde_json::Value;
}

/// Serves the admin endpoint on `listener` until `shutdown` resolves.
pub async fn serve<C: Component>(
    listener: TcpListener,
    component: Arc<C>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz::<C>))
        .route("/status", get(status::<C>))
        .route(
            "/metrics",
            get(|| async {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    metrics::METRICS.encode(),
                )
            }),
        )
        .with_state(component);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn readyz<C: Component>(State(c): State<Arc<C>>) -> impl IntoResponse {
    if c.ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn status<C: Component>(State(c): State<Arc<C>>) -> Json<serde_json::Value> {
    Json(c.status())
}
