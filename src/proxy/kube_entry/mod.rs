//! The root's Kubernetes endpoint (#16): every leaf's Kubernetes API, through the tunnels, at
//! `https://PROXY/clusters/LEAF/`, for kubectl and anything else that speaks to an API server.
//!
//! A request is authenticated here, the Kubernetes way: a client certificate of the root's
//! client CA (CN the user, O its groups), or a bearer token the root's API server vouches for
//! by TokenReview (ServiceAccount tokens, OIDC, whatever it accepts); in a small set-up, a
//! token of the client entry's token file. The root's RBAC then says
//! whether that user may `create` `remoteclusters/kube` on the leaf; a refusal is a 403 naming
//! the permission, and no stream to the leaf is opened. A permitted request goes to the leaf's
//! agent on a stream of its own, the caller written first and the client's `Authorization` and
//! `Impersonate-*` headers left behind; the leaf maps the caller and decides (agent::kube).
//! Every request leaves one audit record ([`audit`]).
//!
//! Bounds, as on every listener: connections in total and per source address (shared with the
//! penalties for failed authentication of the client entry), 10 s for the TLS handshake and for
//! each request head, 64 KiB of request head.
//!
//! A request goes through this proxy's own tunnels to the leaf (every proxy holds one once
//! discovery has run); a leaf with none here is a 503 that kubectl retries, not a detour through
//! a peer.

mod audit;
mod request;
mod request_info;
mod tls;

pub use tls::{KubeTlsError, server_config, server_config_with, who_of_certificate};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, info, info_span, warn};

use arc_swap::ArcSwap;

use super::access::{BearerTokens, LeafAccess, Who};
use super::client_entry::ClientTokens;
use super::client_entry::admission::{Door, DoorSettings, SourcePermit};
use super::dialer::ProxyDialer;
use crate::transport::Io;
use request::Connection;

/// Settings of the Kubernetes endpoint.
#[derive(Clone)]
pub struct KubeEntryConfig {
    /// Its TLS: certificate, key, and the client CA if client certificates are accepted.
    pub tls: Arc<rustls::ServerConfig>,
    /// Bearer tokens the root's API server reviews; `None` accepts client certificates alone.
    pub bearer: Option<Arc<dyn BearerTokens>>,
    /// The client entry's token file (for small set-ups without Kubernetes on the root): its
    /// tokens authenticate here too, as the name of their line, checked before a review.
    pub tokens: Option<Arc<ArcSwap<ClientTokens>>>,
    /// The root's rules on who may reach which leaf; `None` lets every authenticated caller
    /// through (the leaf's mapping still decides).
    pub access: Option<Arc<dyn LeafAccess>>,
    /// Connections served at once, in total.
    pub max_connections: usize,
    /// Connections one source address may hold at once.
    pub max_connections_per_ip: usize,
    /// Time for the TLS handshake, and for each request head.
    pub handshake_timeout: Duration,
}

impl KubeEntryConfig {
    /// The defaults (1,024 connections, 128 per address, 10 s) with `tls`.
    pub fn new(tls: Arc<rustls::ServerConfig>) -> Self {
        Self {
            tls,
            bearer: None,
            tokens: None,
            access: None,
            max_connections: 1024,
            max_connections_per_ip: 128,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Largest request head (request line and headers) read.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// What every request of the endpoint shares.
struct KubeEntry {
    bearer: Option<Arc<dyn BearerTokens>>,
    tokens: Option<Arc<ArcSwap<ClientTokens>>>,
    access: Option<Arc<dyn LeafAccess>>,
    /// Reaches a leaf's agent through this proxy's tunnels.
    dialer: ProxyDialer,
    /// Connections per source, and penalties for failed authentication.
    door: Arc<Door>,
}

/// Serves the endpoint on `listener` until `shutdown` resolves; connections still open then are
/// closed (a watch ends and kubectl starts it again elsewhere).
pub async fn serve(
    listener: TcpListener,
    config: KubeEntryConfig,
    dialer: ProxyDialer,
    shutdown: impl std::future::Future,
) {
    serve_with(listener, None, config, dialer, shutdown).await
}

/// A request the TLS port ([`crate::proxy::tls_port`]) read and passes on, its TLS already
/// done there: served like this endpoint's own connections (same admission and deadlines).
pub struct KubeHandedOver {
    /// The decrypted stream, the request head put back in front.
    pub stream: Box<dyn Io>,
    /// The client's address: its per-source share, penalties, audit.
    pub peer: SocketAddr,
    /// Who the client certificate the TLS port verified names, if one was shown.
    pub certificate: Option<Who>,
}

/// Where the TLS port passes Kubernetes requests (bounded: a full endpoint closes them).
pub type KubeHandOff = mpsc::Sender<KubeHandedOver>;

/// A hand-off channel: the sender for the TLS port, the receiver for [`serve_with`].
pub fn hand_off() -> (KubeHandOff, mpsc::Receiver<KubeHandedOver>) {
    mpsc::channel(64)
}

/// [`serve`], also serving what `handed` passes on.
pub async fn serve_with(
    listener: TcpListener,
    mut handed: Option<mpsc::Receiver<KubeHandedOver>>,
    config: KubeEntryConfig,
    dialer: ProxyDialer,
    shutdown: impl std::future::Future,
) {
    let acceptor = TlsAcceptor::from(config.tls.clone());
    let total = Arc::new(Semaphore::new(
        config.max_connections.min(Semaphore::MAX_PERMITS),
    ));
    let entry = Arc::new(KubeEntry {
        bearer: config.bearer.clone(),
        tokens: config.tokens.clone(),
        access: config.access.clone(),
        dialer,
        door: Door::new(DoorSettings {
            max_connections_per_ip: config.max_connections_per_ip,
            auth_failures_allowed: 5,
            auth_penalty: Duration::from_secs(30),
        }),
    });
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            Some(passed) = next_handed(&mut handed) => {
                let from = passed.peer;
                let Some(held) = admit(&entry, &total, from) else { continue };
                let connection = Arc::new(Connection { from, certificate: passed.certificate });
                let served = serve_http(entry.clone(), passed.stream, connection, config.handshake_timeout, held);
                connections.spawn(served.instrument(info_span!("kube", %from, port = "tls")));
            }
            accepted = listener.accept() => match accepted {
                Ok((socket, from)) => {
                    let Some(held) = admit(&entry, &total, from) else { continue };
                    let served = serve_connection(
                        entry.clone(), acceptor.clone(), socket, from, config.handshake_timeout, held,
                    );
                    connections.spawn(served.instrument(info_span!("kube", %from)));
                }
                Err(e) => {
                    warn!(error = %e, "accepting a Kubernetes connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    info!(
        open = connections.len(),
        "Kubernetes endpoint stopped; closing its connections"
    );
}

/// The next request passed on, if there is a hand-off; never resolves if there is none.
async fn next_handed(
    handed: &mut Option<mpsc::Receiver<KubeHandedOver>>,
) -> Option<KubeHandedOver> {
    match handed {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

/// What a connection holds while served: a slot of the total, and of its source's share.
type Held = (OwnedSemaphorePermit, SourcePermit);

/// Admits a connection from `from`, or `None` (it is closed) when its source or the endpoint
/// is full, or its source is serving a penalty.
fn admit(entry: &KubeEntry, total: &Arc<Semaphore>, from: SocketAddr) -> Option<Held> {
    let source = entry.door.admit(from.ip()).ok()?;
    let Ok(permit) = total.clone().try_acquire_owned() else {
        debug!(%from, "Kubernetes endpoint full; closing a new connection");
        return None;
    };
    Some((permit, source))
}

/// One TLS connection: its handshake within the deadline, then its requests in turn.
async fn serve_connection(
    entry: Arc<KubeEntry>,
    acceptor: TlsAcceptor,
    socket: TcpStream,
    from: SocketAddr,
    timeout: Duration,
    held: Held,
) {
    let _ = socket.set_nodelay(true);
    let tls = match tokio::time::timeout(timeout, acceptor.accept(socket)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!(error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            debug!("TLS handshake timed out");
            return;
        }
    };
    let certificate = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| who_of_certificate(leaf));
    let connection = Arc::new(Connection { from, certificate });
    serve_http(entry, tls, connection, timeout, held).await
}

/// A connection's requests in turn, after its TLS.
async fn serve_http<S: Io>(
    entry: Arc<KubeEntry>,
    stream: S,
    connection: Arc<Connection>,
    timeout: Duration,
    _held: Held,
) {
    let service = service_fn(move |request| {
        let (entry, connection) = (entry.clone(), connection.clone());
        async move {
            Ok::<_, std::convert::Infallible>(request::handle(entry, connection, request).await)
        }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
    if let Err(e) = served {
        debug!(error = %e, "Kubernetes connection ended with an error");
    }
}
