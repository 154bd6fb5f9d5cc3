//! What every connection of one proxy shares, below the listener ([`super::server`]) and the
//! connection handlers (`handler`, `control`, `join`, [`super::trust`]) that all reach it: the
//! configuration, the sites and their tunnels, peers, limits and the shutdown signals. As
//! mini-redis keeps its `Db` apart from its listener and its connections, so that neither
//! imports the other.

use std::sync::Arc;

use arc_swap::ArcSwap;
use russh::server::Config as SshConfig;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::clients::ClientSessions;
use super::config::ProxyConfig;
use super::limits::ConnectionLimiter;
use super::peers::{Peer, PeerPool};
use super::quota::StreamQuota;
use super::sites::Sites;
use crate::admin::metrics::{MetricsRegistry, ProxyMetrics, StreamMetrics};
use crate::identity::fingerprint;
use crate::identity::keyset::KeySet;
use crate::protocol::control::CaKeySet;

/// State shared by every connection of one proxy.
pub struct ProxyShared {
    /// The configuration the proxy started with.
    pub config: ProxyConfig,
    /// Remote sites and their tunnels.
    pub sites: Sites,
    /// The proxies of this cluster: discovery announces them, peering dials them.
    pub peers: watch::Sender<Vec<Peer>>,
    /// Cancelled when the proxy starts draining: agents are told to reconnect elsewhere.
    pub draining: CancellationToken,
    /// Cancelled when the proxy stops: every connection closes.
    pub stopped: CancellationToken,
    /// Every task the proxy spawned, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Admission control.
    pub limiter: Arc<ConnectionLimiter>,
    /// Connections from load balancers whose PROXY header is being read, before admission
    /// can know their source: bounded by the handshake slots' count.
    pub(super) header_reads: Arc<tokio::sync::Semaphore>,
    /// Each SSH client's share of open streams.
    pub client_streams: Arc<StreamQuota>,
    /// Client sessions carrying streams, ended when the trust stops accepting them.
    pub client_sessions: Arc<ClientSessions>,
    /// Connections to peer proxies, shared by forwarded dials, and their circuit breakers.
    pub peer_pool: Arc<PeerPool>,
    /// The root's CA key set announced to every agent (a root CA rotation's step), if any.
    pub root_keys: watch::Sender<Option<Arc<CaKeySet>>>,
    /// Whether the peer set is known: false from [`ProxyServer::expect_peer_discovery`] until
    /// the first [`ProxyServer::set_peers`], so a replica is not ready before it can announce
    /// its peers.
    pub(super) peers_known: std::sync::atomic::AtomicBool,
    /// Swappable, so a renewed host certificate applies to the next connection.
    pub(super) ssh: ArcSwap<SshConfig>,
    /// This proxy's counters: its own, not another proxy's of the same process.
    pub metrics: ProxyMetrics,
    /// The counters of the streams this proxy carries.
    pub streams: StreamMetrics,
    /// What `/metrics` exports: the two sets above.
    pub(super) exported: MetricsRegistry,
}

impl ProxyShared {
    /// The root CA key set announced now (a root CA rotation's phase): when it was issued
    /// and its keys' fingerprints; null when none is.
    fn root_keys_in_force(&self) -> serde_json::Value {
        let set = self.root_keys.borrow().clone();
        let Some(read) = set.and_then(|s| KeySet::read(&s.statement).ok()) else {
            return serde_json::Value::Null;
        };
        let keys: Vec<String> = read.keys.iter().map(fingerprint).collect();
        serde_json::json!({ "issued_at": read.issued_at, "keys": keys })
    }
}

impl crate::admin::Component for ProxyShared {
    fn ready(&self) -> bool {
        !self.draining.is_cancelled()
            && self.peers_known.load(std::sync::atomic::Ordering::Acquire)
            && !self.peers.borrow().is_empty()
    }

    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "proxy": self.config.proxy_id,
            "cluster": self.config.cluster,
            "draining": self.draining.is_cancelled(),
            "peers_known": self.peers_known.load(std::sync::atomic::Ordering::Acquire),
            "peers": self.peers.borrow().iter().map(|p| &p.id).collect::<Vec<_>>(),
            "sites": self.sites.list(),
            "root_keys": self.root_keys_in_force(),
        })
    }

    fn metrics(&self) -> String {
        self.exported.encode()
    }
}

/// How a connection's handshake ended: set up, or refused with what the peer may be told
/// ([`crate::identity::AuthError::disclosed`]), which the listener sends in its disconnect.
/// The SSH handler and the control channel report it; the listener waits for it.
pub(super) type SetUp = Result<(), String>;
