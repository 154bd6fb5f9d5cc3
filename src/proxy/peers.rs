//! Proxy peering: a dial that reaches a proxy holding no tunnel to the site is forwarded to a
//! peer proxy of the same cluster, over SSH with a client certificate from the root CA, so any
//! replica can serve any site as soon as one replica holds a tunnel (Teleport's RFD 48).
//!
//! A forwarded request is marked, and a proxy serves a marked request only from its own
//! tunnels, so requests never travel in circles.
//!
//! # One connection per peer, kept alive, behind a circuit breaker
//!
//! Before, every forwarded dial opened its own SSH connection, tried peers in random order and
//! gave each the full dial timeout (30 s) with no memory: with one peer frozen, a third of the
//! forwarded dials took 25-35 s, and when it resumed the burst of connections tripped every
//! proxy's handshake limit. Now:
//!
//! - **One connection per peer**, shared by its forwarded streams and opened by the first dial
//!   that needs it (concurrent dials wait for that one handshake rather than each starting
//!   their own). Trade-off: russh's flow control is per connection, so a client that stops
//!   reading a forwarded stream for long can slow the others on that connection; peering is
//!   the fallback path, and a handshake per dial cost far more.
//! - **Keepalives** every [`PeerLiveness::keepalive`] (the heartbeat interval, at most 2 s):
//!   after `missed` unanswered ones the connection is closed, which fails the dials pending on
//!   it (they move to the next peer) and ends its streams (the client sees end-of-file), so a
//!   frozen peer costs a dial `keepalive × missed` (600 ms with 200 ms heartbeats, 6 s by
//!   default), not 30 s.
//! - **A circuit breaker per peer**: a peer whose connection failed or died is skipped for a
//!   cool-down (1 s, doubling to 30 s while it keeps failing). When the cool-down is over, the
//!   next dial that would use it starts a probe (a connection attempt) in the background and
//!   still skips it; a probe that connects closes the breaker. No client dial waits on a peer
//!   known to be failing.
//!
//! ```text
//!   closed ──failure──▶ open (skip for 1 s, 2 s, ... 30 s) ──cool-down over──▶ probing
//!     ▲                   ▲                                                     │
//!     └──── connected ────┼──────────────────── probe connected ◀───────────────┤
//!                         └──────────────────── probe failed ◀──────────────────┘
//! ```
//!
//! A peer that answers "no tunnel" is alive: the dial moves on without tripping its breaker.
//! A peer that answers for the leaf (forbidden, refused) ends the dial: another peer would
//! reach the same leaf and get the same answer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use rand::seq::SliceRandom;
use russh::ChannelStream;
use tracing::{debug, info, warn};

use crate::client::{ClientError, DialClient, DialClientConfig};
use crate::identity::{Identity, PublicKey};
use crate::protocol::control::ProxyInfo;
use crate::protocol::{ClusterName, DialError, DialErrorKind, Target};
use crate::stream::Splice;

/// The originator address that marks a dial forwarded by a peer.
pub const PEER_ORIGINATOR: &str = "tether-peer";

/// Longest keepalive interval on a peer connection: peers share a cluster network, so a
/// frozen one is declared dead within seconds even with 15 s agent heartbeats.
pub const MAX_PEER_KEEPALIVE: Duration = Duration::from_secs(2);

/// The first cool-down of a tripped breaker; it doubles with each failure in a row.
pub const BREAKER_BASE: Duration = Duration::from_secs(1);

/// The longest cool-down of a tripped breaker.
pub const BREAKER_MAX: Duration = Duration::from_secs(30);

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

/// How fast a dead peer connection is noticed.
#[derive(Debug, Clone, Copy)]
pub struct PeerLiveness {
    /// Silence after which a keepalive is sent.
    pub keepalive: Duration,
    /// Keepalive intervals of silence after which the connection is closed.
    pub missed: u32,
}

impl PeerLiveness {
    /// Follows the proxy's heartbeat policy, with keepalives at most [`MAX_PEER_KEEPALIVE`].
    pub fn from_heartbeat(policy: &super::HeartbeatPolicy) -> Self {
        Self {
            keepalive: policy.interval.min(MAX_PEER_KEEPALIVE),
            missed: policy.missed.max(1),
        }
    }

    /// Silence after which a peer connection is declared dead.
    pub fn detection(&self) -> Duration {
        self.keepalive * self.missed
    }

    /// Time allowed to connect and authenticate to a peer: a handshake on a cluster network
    /// takes milliseconds, so a peer that takes longer than detection (at least 1 s) is
    /// treated as dead rather than waited for.
    fn connect_timeout(&self) -> Duration {
        self.detection().max(Duration::from_secs(1))
    }

    fn ssh_config(&self) -> russh::client::Config {
        russh::client::Config {
            keepalive_interval: Some(self.keepalive),
            // russh closes at the keepalive *after* `keepalive_max` unanswered ones.
            keepalive_max: self.missed.saturating_sub(1).max(1) as usize,
            ..crate::protocol::ssh::client_config()
        }
    }
}

/// A connection being set up, awaited by every dial that wants it.
type Connecting = Shared<BoxFuture<'static, Result<Arc<DialClient>, String>>>;

/// The state of the connection to one peer.
enum Conn {
    /// None, and none being set up.
    Idle,
    /// Being set up by a dial or a probe.
    Connecting(Connecting),
    /// Up (until `is_closed`).
    Up(Arc<DialClient>),
}

/// Failures of one peer in a row, and how long it is skipped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Breaker {
    /// Consecutive failures; 0 = closed (the peer is used).
    failures: u32,
    /// Skipped until then (when `failures > 0`).
    open_until: Option<Instant>,
    /// A background probe is under way.
    probing: bool,
}

/// What a dial may do with a peer now.
#[derive(Debug, PartialEq, Eq)]
enum Admit {
    /// Use it.
    Use,
    /// Skip it (failing, cooling down, or being probed).
    Skip,
    /// Skip it and start a probe.
    Probe,
}

impl Breaker {
    fn admit(&mut self, now: Instant) -> Admit {
        match self.open_until {
            None => Admit::Use,
            Some(until) if now < until || self.probing => Admit::Skip,
            Some(_) => {
                self.probing = true;
                Admit::Probe
            }
        }
    }

    fn succeeded(&mut self) {
        *self = Breaker::default();
    }

    fn failed(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        let cooldown = BREAKER_BASE
            .saturating_mul(1u32 << (self.failures - 1).min(5))
            .min(BREAKER_MAX);
        self.open_until = Some(now + cooldown);
        self.probing = false;
    }
}

/// What is known of one peer.
struct PeerLink {
    /// Where it was reached; a new address starts afresh.
    addr: SocketAddr,
    /// Its shared connection.
    conn: Conn,
    /// Whether it is being skipped.
    breaker: Breaker,
}

/// How a dial gets a peer's connection.
enum Checkout {
    /// Its connection is up.
    Ready(Arc<DialClient>),
    /// Its connection is being set up: wait for it.
    Wait(Connecting),
    /// Its breaker is open: try another peer.
    Skip,
}

/// The peer connections and breakers of one proxy.
pub struct PeerPool {
    /// Per peer ID. A std lock, held only for map operations, never across an await.
    links: Mutex<HashMap<String, PeerLink>>,
    /// Keepalive and connect timing.
    liveness: PeerLiveness,
}

impl PeerPool {
    pub fn new(liveness: PeerLiveness) -> Arc<Self> {
        Arc::new(Self {
            links: Mutex::default(),
            liveness,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PeerLink>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `id` is being skipped now, for status views and tests.
    pub fn is_tripped(&self, id: &str) -> bool {
        self.lock()
            .get(id)
            .is_some_and(|l| l.breaker.open_until.is_some())
    }

    /// Forgets peers no longer announced (their connections close with their last stream).
    fn retain(&self, peers: &[(String, SocketAddr)]) {
        self.lock()
            .retain(|id, link| peers.iter().any(|(p, a)| p == id && *a == link.addr));
    }

    fn checkout(
        self: &Arc<Self>,
        id: &str,
        addr: SocketAddr,
        config: DialClientConfig,
    ) -> Checkout {
        let mut links = self.lock();
        let link = links.entry(id.to_owned()).or_insert_with(|| PeerLink {
            addr,
            conn: Conn::Idle,
            breaker: Breaker::default(),
        });
        match link.breaker.admit(Instant::now()) {
            Admit::Use => {}
            Admit::Skip => return Checkout::Skip,
            Admit::Probe => {
                let connecting = self.connect(config);
                link.conn = Conn::Connecting(connecting.clone());
                let (pool, id) = (self.clone(), id.to_owned());
                tokio::spawn(async move {
                    let result = connecting.clone().await;
                    pool.settle(&id, &connecting, &result);
                    match result {
                        Ok(_) => info!(peer = %id, "peer answered its probe; using it again"),
                        Err(e) => debug!(peer = %id, error = %e, "peer still failing"),
                    }
                });
                return Checkout::Skip;
            }
        }
        match &link.conn {
            Conn::Up(client) if !client.is_closed() => Checkout::Ready(client.clone()),
            Conn::Connecting(c) => Checkout::Wait(c.clone()),
            _ => {
                let connecting = self.connect(config);
                link.conn = Conn::Connecting(connecting.clone());
                Checkout::Wait(connecting)
            }
        }
    }

    fn connect(&self, config: DialClientConfig) -> Connecting {
        let ssh = self.liveness.ssh_config();
        async move {
            DialClient::connect_with(&config, ssh)
                .await
                .map(Arc::new)
                .map_err(|e| e.to_string())
        }
        .boxed()
        .shared()
    }

    /// Records how setting up the connection `attempt` to `id` ended. Every dial that waited
    /// for it reports it; only the first report counts, so one failure trips the breaker once.
    fn settle(&self, id: &str, attempt: &Connecting, result: &Result<Arc<DialClient>, String>) {
        let mut links = self.lock();
        let Some(link) = links.get_mut(id) else {
            return;
        };
        let current = matches!(&link.conn, Conn::Connecting(c) if c.ptr_eq(attempt));
        if !current {
            return;
        }
        match result {
            Ok(client) => {
                link.breaker.succeeded();
                link.conn = Conn::Up(client.clone());
            }
            Err(_) => {
                link.breaker.failed(Instant::now());
                link.conn = Conn::Idle;
            }
        }
    }

    /// Trips `id`'s breaker: its connection `client` died with dials pending. Counted once per
    /// connection, however many dials were pending on it.
    fn died(&self, id: &str, client: &Arc<DialClient>) {
        let mut links = self.lock();
        let Some(link) = links.get_mut(id) else {
            return;
        };
        if matches!(&link.conn, Conn::Up(c) if Arc::ptr_eq(c, client)) {
            link.breaker.failed(Instant::now());
            link.conn = Conn::Idle;
        }
    }
}

/// A stream served by a peer proxy; holds the (shared) SSH connection it runs on.
pub struct PeerStream {
    /// The connection: kept up while a stream uses it, and watched so the stream ends with it.
    client: Arc<DialClient>,
    /// The channel.
    stream: ChannelStream<russh::client::Msg>,
    /// How often to look whether the connection is still up.
    check_every: Duration,
}

impl Splice for PeerStream {
    async fn splice<L>(mut self, mut local: L) -> std::io::Result<()>
    where
        L: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (client, every) = (self.client.clone(), self.check_every);
        let died = async move {
            let mut tick = tokio::time::interval(every);
            while !client.is_closed() {
                tick.tick().await;
            }
        };
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut self.stream, &mut local) => r.map(|_| ()),
            // A channel of a dead connection may never see its end: drop the client's side.
            () = died => Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the peer proxy carrying the stream stopped answering",
            )),
        }
    }
}

/// Where and as whom a proxy forwards a dial.
pub struct Forward<'a> {
    /// The client certificate peers accept.
    pub peering: &'a PeeringConfig,
    /// Shared connections and breakers.
    pub pool: &'a Arc<PeerPool>,
    /// The proxies of this cluster, this one included (skipped by `self_id`).
    pub peers: &'a [Peer],
    /// This proxy's ID, never dialled.
    pub self_id: &'a str,
    /// This (root) cluster: peers' host certificates must name it.
    pub cluster: &'a ClusterName,
    /// CA keys trusted to sign peers' host certificates.
    pub root_cas: Vec<PublicKey>,
    /// The whole forwarded dial's budget, every peer tried included.
    pub timeout: Duration,
}

/// Tries each usable peer, in random order, until one serves the dial, all within `timeout`.
pub async fn dial_via_peers(fwd: Forward<'_>, target: &Target) -> Result<PeerStream, DialError> {
    let mut candidates: Vec<(String, SocketAddr)> = fwd
        .peers
        .iter()
        .filter(|p| p.id != fwd.self_id)
        .filter_map(|p| p.addr.map(|a| (p.id.clone(), a)))
        .collect();
    fwd.pool.retain(&candidates);
    candidates.shuffle(&mut rand::rng());
    let deadline = tokio::time::Instant::now() + fwd.timeout;
    let (mut skipped, mut failed) = (0, 0);
    for (id, addr) in &candidates {
        let config = DialClientConfig {
            proxy_addr: addr.to_string(),
            route: crate::transport::Route::direct(),
            root_cluster: fwd.cluster.clone(),
            root_cas: fwd.root_cas.clone(),
            identity: fwd.peering.identity.load_full(),
            timeout: fwd.pool.liveness.connect_timeout(),
        };
        let client = match fwd.pool.checkout(id, *addr, config) {
            Checkout::Skip => {
                skipped += 1;
                continue;
            }
            Checkout::Ready(client) => client,
            Checkout::Wait(connecting) => {
                let waited = tokio::time::timeout_at(deadline, connecting.clone()).await;
                let Ok(result) = waited else {
                    break;
                };
                fwd.pool.settle(id, &connecting, &result);
                match result {
                    Ok(client) => client,
                    Err(e) => {
                        warn!(peer = %id, error = %e, "cannot reach the peer; skipping it for a while");
                        failed += 1;
                        continue;
                    }
                }
            }
        };
        let Ok(opened) =
            tokio::time::timeout_at(deadline, client.open(target, PEER_ORIGINATOR)).await
        else {
            break;
        };
        match opened {
            Ok(stream) => {
                debug!(peer = %id, %target, "dial forwarded to a peer");
                return Ok(PeerStream {
                    client,
                    stream,
                    check_every: fwd.pool.liveness.keepalive,
                });
            }
            Err(_) if client.is_closed() => {
                warn!(peer = %id, %target, "the peer's connection died with the dial pending; skipping it for a while");
                fwd.pool.died(id, &client);
                failed += 1;
            }
            // Alive, without a tunnel to the site: the next peer may have one.
            Err(ClientError::Dial {
                kind: DialErrorKind::NoTunnel,
                ..
            }) => debug!(peer = %id, "peer has no tunnel to the site"),
            // The peer's agent tried the dial: its answer is the answer.
            Err(ClientError::Dial { kind, .. }) => {
                return Err(DialError::new(
                    kind,
                    format!("{target}: {kind} (answered through peer {id})"),
                ));
            }
            Err(e) => {
                return Err(DialError::new(
                    DialErrorKind::Other,
                    format!("peer {id}: {e}"),
                ));
            }
        }
    }
    if tokio::time::Instant::now() >= deadline {
        return Err(DialError::new(
            DialErrorKind::TimedOut,
            format!(
                "no peer served the dial to {target} within {:?}",
                fwd.timeout
            ),
        ));
    }
    Err(DialError::new(
        DialErrorKind::NoTunnel,
        format!(
            "cluster {} has no tunnel to this proxy, nor to any of its {} peers ({failed} failed, {skipped} skipped as failing)",
            target.cluster,
            candidates.len()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_breaker_skips_a_failing_peer_then_probes_it_once() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        assert_eq!(b.admit(t0), Admit::Use);
        b.failed(t0);
        assert_eq!(b.admit(t0 + Duration::from_millis(500)), Admit::Skip);
        assert_eq!(b.admit(t0 + BREAKER_BASE), Admit::Probe);
        assert_eq!(
            b.admit(t0 + BREAKER_BASE),
            Admit::Skip,
            "one probe at a time"
        );
        b.failed(t0 + BREAKER_BASE);
        // Twice as long after the second failure.
        let second = t0 + BREAKER_BASE;
        assert_eq!(b.admit(second + BREAKER_BASE), Admit::Skip);
        assert_eq!(b.admit(second + 2 * BREAKER_BASE), Admit::Probe);
        b.succeeded();
        assert_eq!(b.admit(second), Admit::Use);
    }

    #[test]
    fn the_cool_down_is_capped() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        for _ in 0..40 {
            b.failed(t0);
        }
        assert_eq!(b.open_until, Some(t0 + BREAKER_MAX));
    }
}
