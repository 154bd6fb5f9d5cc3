//! What a proxy needs to run, and the limits that keep it standing under abuse.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::identity::{Identity, TrustStore};
use crate::protocol::ClusterName;
use crate::stream::StreamLimits;

/// Heartbeat settings, as the proxy enforces them.
#[derive(Debug, Clone, Copy)]
pub struct HeartbeatPolicy {
    /// Interval used when the agent asks for none, and the proxy's own default. 15 s stays far
    /// below cloud load balancers' idle timeouts (AWS NLB 350 s, Azure 240 s, GCP 600 s).
    pub interval: Duration,
    /// Shortest interval an agent may ask for (protects the proxy from chatty agents).
    pub min_interval: Duration,
    /// Longest interval an agent may ask for (keeps offline detection timely).
    pub max_interval: Duration,
    /// A tunnel is offline, and closed, after this many intervals without a heartbeat.
    pub missed: u32,
}

impl Default for HeartbeatPolicy {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(15),
            min_interval: Duration::from_millis(50),
            max_interval: Duration::from_secs(300),
            missed: 3,
        }
    }
}

impl HeartbeatPolicy {
    /// The interval granted to an agent that asks for `requested` (zero = no preference).
    pub fn negotiate(&self, requested: Duration) -> Duration {
        if requested.is_zero() {
            self.interval
        } else {
            requested.clamp(self.min_interval, self.max_interval)
        }
    }
}

/// Limits on what agents and clients may make a proxy hold. Every excess is refused and logged.
///
/// Why these numbers (the reasoning with figures is in [`super::limits`]): an unauthenticated
/// connection is closed at `handshake_timeout` whatever it sent, so what one address can hold
/// unauthenticated is `max_handshakes_per_ip` (32) sockets for 15 s, and what all addresses can
/// hold is `max_handshakes` (256), with random early drop from 64 on. Authenticated connections
/// need a certificate; they are bounded by the per-source (1,024: a NAT of 1,000 agents) and
/// total (20,000) limits.
#[derive(Debug, Clone, Copy)]
pub struct ProxyLimits {
    /// Concurrent connections from one source IP. Many agents may share a NAT address (each
    /// holds one tunnel per replica), so this is generous; it stops one host from exhausting
    /// the proxy's descriptors.
    pub max_connections_per_ip: usize,
    /// Connections, in total. Twice the fleet one proxy is sized for (10,000 leaf tunnels,
    /// BENCHMARKS.md "Fleet"): root clients' sessions and connections still in their handshake
    /// during a reconnect storm come on top of the tunnels, and a proxy at 10,000 exactly would
    /// refuse its 10,001st leaf. At ~50 KiB per idle tunnel the cap stands for about 1 GiB, and
    /// each connection is a descriptor: `RLIMIT_NOFILE` must be above it.
    pub max_connections: usize,
    /// SSH handshakes (version exchange, key exchange, authentication) in progress at once;
    /// handshakes are the expensive part of a connection. The `full` of `MaxStartups`.
    pub max_handshakes: usize,
    /// Handshakes one source address may have in progress at once: its share of
    /// `max_handshakes`, so one host cannot take every slot.
    pub max_handshakes_per_ip: usize,
    /// Handshakes in flight from which new connections are dropped at random (the `start` of
    /// `MaxStartups`): a flood slows everyone down a little instead of locking everyone out.
    pub handshakes_early_drop_start: usize,
    /// Probability, in percent, of dropping a new connection at `handshakes_early_drop_start`
    /// handshakes in flight; it rises linearly to 100 % at `max_handshakes` (the `rate`).
    pub handshakes_early_drop_percent: u8,
    /// Time allowed from TCP accept to successful authentication and, for agents, to the
    /// control channel's hello: one deadline for the whole handshake, after which the socket
    /// is shut down whatever state the handshake is in.
    pub handshake_timeout: Duration,
    /// Open streams per tunnel; each may buffer up to one stream window.
    pub max_streams_per_tunnel: usize,
    /// Open streams one SSH client identity may hold across the proxy: a quarter of a
    /// tunnel's, so one client cannot take a tunnel's whole budget (see [`super::quota`]).
    pub max_streams_per_client: usize,
    /// How long a dial may take, agent's answer included.
    pub dial_timeout: Duration,
    /// Handshakes in progress at once from announced peers' addresses: their own slots,
    /// apart from `max_handshakes` (see [`super::limits`]).
    pub max_peer_handshakes: usize,
}

impl Default for ProxyLimits {
    fn default() -> Self {
        Self {
            max_connections_per_ip: 1024,
            max_connections: 20_000,
            max_handshakes: 256,
            max_handshakes_per_ip: 32,
            handshakes_early_drop_start: 64,
            handshakes_early_drop_percent: 30,
            handshake_timeout: Duration::from_secs(15),
            max_streams_per_tunnel: 4096,
            max_streams_per_client: 1024,
            dial_timeout: Duration::from_secs(30),
            max_peer_handshakes: 64,
        }
    }
}

/// Configuration of one proxy replica.
#[derive(Clone)]
pub struct ProxyConfig {
    /// This root cluster's name; also names the direct (local) cluster.
    pub cluster: ClusterName,
    /// This replica's ID, as in its host certificate's principal `<id>.<cluster>`.
    pub proxy_id: String,
    /// Where agents and `tether dial` clients connect.
    pub listen: SocketAddr,
    /// The host key and certificate presented to agents.
    pub host_identity: Arc<Identity>,
    /// Cluster name → CA keys accepted for agents; the root's own CA signs client certificates.
    /// Read here, replaced only through [`ProxyServer::update_trust`](super::ProxyServer::update_trust),
    /// which re-checks every tunnel so a revoked or re-keyed leaf loses its tunnels at once.
    pub trust: Arc<ArcSwap<TrustStore>>,
    /// Heartbeat enforcement.
    pub heartbeat: HeartbeatPolicy,
    /// Connection, handshake and stream limits.
    pub limits: ProxyLimits,
    /// Flow control of each stream.
    pub stream: StreamLimits,
    /// Whether clients may dial the local cluster directly, and where (the seed's
    /// `DirectCluster`). `None` refuses dials to the local cluster.
    pub direct: Option<Arc<crate::egress::allow_list::AllowList>>,
    /// How to forward dials to peer proxies when this one holds no tunnel to the site;
    /// `None` disables peering.
    pub peering: Option<super::peers::PeeringConfig>,
    /// Where join tokens are checked and joined leaves recorded; `None` refuses joins (and
    /// keeps SSH authentication certificate-only).
    pub join: Option<Arc<dyn super::authority::JoinAuthority>>,
    /// Who may dial which leaf (in Kubernetes, RBAC on `remoteclusters/dial`); `None` lets
    /// every authenticated client dial every leaf (the leaf's allow-list still applies).
    pub access: Option<Arc<dyn super::access::LeafAccess>>,
    /// Load balancers whose PROXY protocol header names the client (see [`Balancers`]);
    /// empty: no connection is read for one.
    pub balancers: Balancers,
    /// The control protocol version this proxy speaks at most: this build's
    /// ([`ProtocolVersion::CURRENT`](crate::protocol::ProtocolVersion::CURRENT)), or an older
    /// one of its major, as a proxy of an earlier release would (tests of version skew).
    pub protocol: crate::protocol::ProtocolVersion,
}

/// The load balancers in front of the proxy that prepend a PROXY protocol header
/// (`--proxy-protocol-from`; [`crate::protocol::proxy_header`] says why). A connection from
/// one of these addresses must start with a header, and counts against the client it names;
/// a connection from anywhere else is never read for one, so a client cannot claim another's
/// address. Addresses, not names: DNS cannot widen the list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Balancers(Vec<ipnet::IpNet>);

impl Balancers {
    /// The balancers in `nets`.
    pub fn new(nets: Vec<ipnet::IpNet>) -> Self {
        Self(nets)
    }

    /// Whether a connection from `ip` comes through a listed balancer (an IPv4 address
    /// accepted on a dual-stack socket counts as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// Whether any balancer is listed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
