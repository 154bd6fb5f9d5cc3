//! Proxy peering: a dial that reaches a proxy holding no tunnel to the site is forwarded to a
//! peer proxy of the same cluster, over SSH with a client certificate from the root CA, so any
//! replica can serve any site as soon as one replica holds a tunnel (Teleport's RFD 48).
//!
//! A forwarded request is marked, and a proxy serves a marked request only from its own
//! tunnels, so requests never travel in circles. Each forwarded stream has its own SSH
//! connection: peering is the fallback path (while agents converge, or after a restart), and a
//! connection per stream means one slow stream can never hold up another.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rand::seq::SliceRandom;
use russh::ChannelStream;
use tracing::debug;

use crate::client::{DialClient, DialClientConfig};
use crate::identity::Identity;
use crate::protocol::control::ProxyInfo;
use crate::protocol::{ClusterName, DialError, DialErrorKind, Target};
use crate::stream::Splice;

/// The originator address that marks a dial forwarded by a peer.
pub const PEER_ORIGINATOR: &str = "tether-peer";

/// One proxy replica of this cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its ID, as discovery announces it.
    pub id: String,
    /// Where peers reach its tunnel listener; `None` if unknown (no peering to it).
    pub addr: Option<SocketAddr>,
    /// Rollout generation, passed on to agents.
    pub generation: u64,
}

impl Peer {
    /// What discovery tells agents about this peer.
    pub fn info(&self) -> ProxyInfo {
        ProxyInfo {
            id: self.id.clone(),
            generation: self.generation,
        }
    }
}

/// What a proxy needs to forward dials to its peers.
#[derive(Clone)]
pub struct PeeringConfig {
    /// A client certificate from the root CA that peers accept; swappable, so a proxy that
    /// issues its own certificates renews it without a restart.
    pub identity: Arc<ArcSwap<Identity>>,
}

impl PeeringConfig {
    pub fn new(identity: Identity) -> Self {
        Self {
            identity: Arc::new(ArcSwap::from_pointee(identity)),
        }
    }
}

/// A stream served by a peer proxy; holds the SSH connection it runs on.
pub struct PeerStream {
    _client: DialClient,
    stream: ChannelStream<russh::client::Msg>,
}

impl Splice for PeerStream {
    async fn splice<L>(mut self, mut local: L) -> std::io::Result<()>
    where
        L: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        tokio::io::copy_bidirectional(&mut self.stream, &mut local).await?;
        Ok(())
    }
}

/// Tries each peer with an address, in random order, until one serves the dial.
pub async fn dial_via_peers(
    peering: &PeeringConfig,
    peers: &[Peer],
    self_id: &str,
    cluster: &ClusterName,
    root_cas: Vec<crate::identity::PublicKey>,
    target: &Target,
    timeout: Duration,
) -> Result<PeerStream, DialError> {
    let mut candidates: Vec<(&str, SocketAddr)> = peers
        .iter()
        .filter(|p| p.id != self_id)
        .filter_map(|p| p.addr.map(|a| (p.id.as_str(), a)))
        .collect();
    candidates.shuffle(&mut rand::rng());
    let tried = candidates.len();
    for (id, addr) in candidates {
        let config = DialClientConfig {
            proxy_addr: addr.to_string(),
            root_cluster: cluster.clone(),
            root_cas: root_cas.clone(),
            identity: peering.identity.load_full(),
            timeout,
        };
        let attempt = async {
            let client = DialClient::connect(&config).await?;
            let stream = client.open(target, PEER_ORIGINATOR).await?;
            Ok::<_, crate::client::ClientError>(PeerStream {
                _client: client,
                stream,
            })
        };
        match attempt.await {
            Ok(stream) => {
                debug!(peer = id, %target, "dial forwarded to a peer");
                return Ok(stream);
            }
            Err(e) => debug!(peer = id, error = %e, "peer could not serve the dial"),
        }
    }
    Err(DialError::new(
        DialErrorKind::NoTunnel,
        format!(
            "cluster {} has no tunnel to this proxy, nor to any of its {tried} peers",
            target.cluster
        ),
    ))
}
