//! The admin endpoint: health, readiness and a status view, on its own (loopback by default)
//! listener so that it is never exposed with the tunnel port.
//!
//! - `GET /healthz`: the process is serving (200).
//! - `GET /readyz`: 200 when the component can do its job (a proxy: listening, with its peers
//!   known; an agent: holding at least one tunnel per target), 503 otherwise.
//! - `GET /status`: the component's status as JSON (a proxy: its sites, their tunnels, and which
//!   proxies hold each site's tunnels; an agent: its tunnels per proxy).
//! - `GET /metrics`: Prometheus text format (see [`metrics`]).
//!
//! Anyone who can reach the port can connect, so every connection is bounded
//! ([`AdminLimits`]): at most 64 at once (a connection beyond is closed at accept: probes and a
//! scraper need a handful), 5 s to send a request head (an idle keep-alive connection is closed
//! after 5 s too), 30 s in all. Before, idle sockets were kept forever: 130 of them starved the
//! tunnel listener of a proxy limited to 128 descriptors. The chart binds the endpoint to the
//! pod's IP, not 0.0.0.0, so it is not reachable through other interfaces of the pod either.

pub mod metrics;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, warn};

/// What one admin endpoint lets its clients hold.
#[derive(Debug, Clone, Copy)]
pub struct AdminLimits {
    /// Connections served at once; more are closed at accept.
    pub max_connections: usize,
    /// Time to send a request head, from connect or from the previous response: closes idle
    /// and slow-loris connections.
    pub header_read_timeout: Duration,
    /// Longest a connection may live, whatever it does (a client that never reads its
    /// response included).
    pub max_connection_time: Duration,
}

impl Default for AdminLimits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            header_read_timeout: Duration::from_secs(5),
            max_connection_time: Duration::from_secs(30),
        }
    }
}

/// Parses `--admin-listen`: `IP:PORT`, also with an IPv6 address written without brackets, as
/// Kubernetes' downward API gives a pod's IP (`$(POD_IP):9090` then works on IPv6 pods).
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let (ip, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("{text:?} is not IP:PORT"))?;
    let ip: std::net::IpAddr = ip
        .parse()
        .map_err(|e| format!("{text:?}: the address {ip:?} is invalid: {e}"))?;
    let port: u16 = port
        .parse()
        .map_err(|e| format!("{text:?}: the port {port:?} is invalid: {e}"))?;
    Ok(SocketAddr::new(ip, port))
}

/// What the admin endpoint asks of the component it serves.
pub trait Component: Send + Sync + 'static {
    /// Whether the component can do its job now.
    fn ready(&self) -> bool;
    /// The component's status, for people and tools.
    fn status(&self) -> serde_json::Value;
    /// Its metrics in Prometheus text format (its own handles: see [`metrics`]).
    fn metrics(&self) -> String;
}

/// Serves the admin endpoint on `listener` until `shutdown` resolves, with the default
/// [`AdminLimits`].
pub async fn serve<C: Component>(
    listener: TcpListener,
    component: Arc<C>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, component, AdminLimits::default(), shutdown).await
}

/// Serves the admin endpoint within `limits` until `shutdown` resolves; connections still open
/// then are closed.
pub async fn serve_with<C: Component>(
    listener: TcpListener,
    component: Arc<C>,
    limits: AdminLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(component);
    let slots = Arc::new(Semaphore::new(
        limits.max_connections.clamp(1, Semaphore::MAX_PERMITS),
    ));
    let mut connections = JoinSet::new();
    let mut refused = RefusalCount::default();
    let mut shutdown = pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => return Ok(()),
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (socket, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Usually out of descriptors: back off instead of spinning.
                warn!(error = %e, "admin endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused.note(peer, limits.max_connections);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        connections.spawn(async move {
            let _slot = slot;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(TokioIo::new(socket), service);
            match tokio::time::timeout(limits.max_connection_time, conn).await {
                Ok(Err(e)) => debug!(%peer, error = %e, "admin connection ended"),
                Err(_) => debug!(%peer, "admin connection closed at its time limit"),
                Ok(Ok(())) => {}
            }
        });
    }
}

/// Logs refused admin connections at most once a second, with a count.
#[derive(Default)]
struct RefusalCount {
    /// When the last line was written.
    last: Option<std::time::Instant>,
    /// Refusals since then.
    since: u64,
}

impl RefusalCount {
    fn note(&mut self, peer: SocketAddr, max: usize) {
        self.since += 1;
        let now = std::time::Instant::now();
        if self
            .last
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            warn!(%peer, max_connections = max, refused = self.since,
                "admin endpoint: connection limit reached; refusing");
            self.last = Some(now);
            self.since = 0;
        }
    }
}

fn router<C: Component>(component: Arc<C>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz::<C>))
        .route("/status", get(status::<C>))
        .route(
            "/metrics",
            get(|State(c): State<Arc<C>>| async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    c.metrics(),
                )
            }),
        )
        .with_state(component)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_with_and_without_brackets() {
        assert_eq!(
            parse_listen("10.0.0.7:9090"),
            Ok("10.0.0.7:9090".parse().unwrap())
        );
        assert_eq!(
            parse_listen("[fd00::7]:9090"),
            Ok("[fd00::7]:9090".parse().unwrap())
        );
        assert_eq!(
            parse_listen("fd00::7:9090"),
            Ok("[fd00::7]:9090".parse().unwrap())
        );
        assert!(parse_listen("fd00::7").unwrap_err().contains("fd00::7"));
        assert!(parse_listen("$(POD_IP):9090").is_err());
    }
}
