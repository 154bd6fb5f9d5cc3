//! The one operation every client entry needs, reach a target in a named cluster, and the
//! proxy's way of doing it ([`ProxyDialer`]): the local cluster directly, a leaf through one of
//! its tunnels here (trying another on a path failure), or through a peer proxy that holds one.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::access::{Reach, Who};
use super::peers::{Forward, PeerStream, dial_via_peers};
use super::shared::ProxyShared;
use super::sites::{ProxyStream, TunnelDialError};
use crate::admin::metrics::label;
use crate::protocol::{DialError, DialErrorKind, Endpoint, Target};
use crate::stream::Splice;

/// Reaches targets in clusters: through a leaf's tunnel, or directly for the local cluster.
pub trait Dialer: Send + Sync + 'static {
    /// The connection handed back on success.
    type Conn: Splice;

    /// Dials `target` on behalf of a client at `client` (kept for logs and audit only: the
    /// agent never trusts it).
    fn dial(
        &self,
        target: Target,
        client: SocketAddr,
    ) -> impl Future<Output = Result<Self::Conn, DialError>> + Send;

    /// Whether client `who` may dial `target` at all: every client entry asks before
    /// [`Dialer::dial`]. Permits everything unless the dialer enforces access rules.
    fn permit(
        &self,
        who: &Who,
        target: &Target,
    ) -> impl Future<Output = Result<(), DialError>> + Send {
        let _ = (who, target);
        async { Ok(()) }
    }
}

/// Tunnels one dial tries before giving up: a leaf runs a few agent instances, and each failed
/// attempt costs at most the time to declare a tunnel dead.
const MAX_TUNNEL_ATTEMPTS: usize = 4;

/// Dials targets through tunnels, or directly in the local cluster.
#[derive(Clone)]
pub struct ProxyDialer {
    shared: Arc<ProxyShared>,
}

impl ProxyDialer {
    pub(super) fn new(shared: Arc<ProxyShared>) -> Self {
        Self { shared }
    }
}

/// A connection made by [`ProxyDialer`].
pub enum ProxyConn {
    /// Through a leaf's tunnel.
    Tunnel(ProxyStream),
    /// Straight to a server of the local cluster.
    Direct(TcpStream),
    /// Through a peer proxy that holds a tunnel to the site (boxed: it carries an SSH client).
    Peer(Box<PeerStream>),
}

impl Splice for ProxyConn {
    async fn splice<L>(self, local: L) -> io::Result<()>
    where
        L: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        match self {
            ProxyConn::Tunnel(s) => s.splice(local).await,
            ProxyConn::Direct(s) => s.splice(local).await,
            ProxyConn::Peer(s) => (*s).splice(local).await,
        }
    }
}

impl Dialer for ProxyDialer {
    type Conn = ProxyConn;

    async fn dial(&self, target: Target, client: SocketAddr) -> Result<ProxyConn, DialError> {
        let result = self.dial_anywhere(target, client).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.kind.as_str(),
        };
        self.count(outcome);
        result
    }

    /// Asks the proxy's access rules, if it has any, about dials into leaves; dials into the
    /// local cluster answer to `--direct-allow` instead.
    async fn permit(&self, who: &Who, target: &Target) -> Result<(), DialError> {
        let config = &self.shared.config;
        let Some(access) = config.access.as_ref() else {
            return Ok(());
        };
        if target.cluster == config.cluster {
            return Ok(());
        }
        access
            .check(who, &target.cluster, Reach::Dial)
            .await
            .map_err(|denied| {
                self.count(DialErrorKind::NotPermitted.as_str());
                DialError::new(DialErrorKind::NotPermitted, denied.0)
            })
    }
}

impl ProxyDialer {
    /// The proxy's metrics, for the entries that count their own requests.
    pub(super) fn metrics(&self) -> &crate::admin::metrics::ProxyMetrics {
        &self.shared.metrics
    }

    /// One more dial with this outcome in `tether_proxy_dials_total`.
    fn count(&self, outcome: &str) {
        self.shared
            .metrics
            .dials
            .get_or_create(&label("outcome", outcome))
            .inc();
    }
}

impl ProxyDialer {
    /// Locally, directly, or through a peer.
    async fn dial_anywhere(
        &self,
        target: Target,
        client: SocketAddr,
    ) -> Result<ProxyConn, DialError> {
        let config = &self.shared.config;
        if target.cluster == config.cluster {
            return self.dial_direct(&target).await.map(ProxyConn::Direct);
        }
        match self.dial_local(&target, client).await {
            Err(e) if e.kind == DialErrorKind::NoTunnel => match &config.peering {
                Some(peering) => {
                    let peers = self.shared.peers.borrow().clone();
                    let forward = Forward {
                        peering,
                        pool: &self.shared.peer_pool,
                        peers: &peers,
                        self_id: &config.proxy_id,
                        cluster: &config.cluster,
                        root_cas: config.trust.load().cas(&config.cluster).to_vec(),
                        timeout: config.limits.dial_timeout,
                    };
                    dial_via_peers(forward, &target)
                        .await
                        .map(|s| ProxyConn::Peer(Box::new(s)))
                }
                None => Err(e),
            },
            other => other,
        }
    }
}

impl ProxyDialer {
    /// Dials through this proxy's own tunnels only (never through peers): what a peer's
    /// forwarded request gets. A dial the leaf's agents would all refuse, as their reports
    /// say, is refused here without a round trip (see [`super::inventory`]). A path failure
    /// (the tunnel died, or would not open a channel) moves the dial to another tunnel of the
    /// leaf, another agent instance, within the same deadline; the agent's answer goes back to
    /// the client as it is.
    pub async fn dial_local(
        &self,
        target: &Target,
        client: SocketAddr,
    ) -> Result<ProxyConn, DialError> {
        if let Some(refused) = self.shared.sites.refusal(&target.cluster, &target.endpoint) {
            debug!(%target, reason = %refused.message, "refused by the leaf's reported allow-list");
            return Err(refused);
        }
        let limits = &self.shared.config.limits;
        let deadline = tokio::time::Instant::now() + limits.dial_timeout;
        let mut tried = Vec::new();
        let mut last: Option<DialError> = None;
        while tried.len() < MAX_TUNNEL_ATTEMPTS {
            let tunnel = match self.shared.sites.pick(&target.cluster, &tried) {
                Ok(t) => t,
                // Say why the tunnels tried failed rather than that none is left.
                Err(e) => return Err(last.unwrap_or(e)),
            };
            tried.push(tunnel.id);
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let dialled = tunnel.dial(
                &target.endpoint,
                client,
                limits.max_streams_per_tunnel,
                self.shared.config.stream,
                remaining,
            );
            match dialled.await {
                Ok(s) => return Ok(ProxyConn::Tunnel(s)),
                Err(TunnelDialError::Path(e)) => {
                    warn!(tunnel = tunnel.id, %target, error = %e, "path failure; trying another tunnel of the leaf");
                    last = Some(e);
                }
                Err(TunnelDialError::Answer(e)) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| DialError::new(DialErrorKind::NoTunnel, "no tunnel")))
    }
}

impl ProxyDialer {
    async fn dial_direct(&self, target: &Target) -> Result<TcpStream, DialError> {
        let config = &self.shared.config;
        let Some(allow) = &config.direct else {
            return Err(DialError::new(
                DialErrorKind::Forbidden,
                format!(
                    "direct dials into the local cluster {} are disabled",
                    config.cluster
                ),
            ));
        };
        let Endpoint::Host { host, port } = &target.endpoint else {
            return Err(DialError::new(
                DialErrorKind::Forbidden,
                "the local API server is not reachable through the proxy",
            ));
        };
        crate::egress::connect::connect(allow, host, *port, config.limits.dial_timeout)
            .await
            .map(|(stream, _)| stream)
    }
}
