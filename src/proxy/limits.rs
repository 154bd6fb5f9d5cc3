//! Admission control for incoming connections: per-source and total connection counts, and
//! fair handshake slots.
//!
//! An unauthenticated connection costs a descriptor, a task and a few KiB until its handshake
//! deadline (15 s) closes it; a handshake that goes on costs ~1 ms of CPU (key exchange and a
//! certificate check). The slots are shared so that no single address can take them all:
//!
//! - **Per-source share** (`max_handshakes_per_ip`, 32): one address holds at most 32 of the
//!   256 slots. Before, the global cap (64) sat below the per-IP connection limit (512), so one
//!   host holding 64 silent sockets refused every other agent (8 of 8 dials failed in the
//!   review). Now an attacker needs 8 addresses to fill the slots, and random early drop (below)
//!   still lets others through while it tries.
//! - **Random early drop** (OpenSSH's `MaxStartups 10:30:100`, here 64:30:256): below 64
//!   handshakes in flight every connection is admitted; from 64 on, a new one is refused with
//!   probability 30 %, rising linearly to 100 % at 256. A flood then slows every source's
//!   handshakes down instead of locking everyone out at once, and a legitimate agent that
//!   retries gets in with a probability that only reaches zero at the full limit.
//! - **Per-source connections** (1,024) and **total** (20,000: twice a 10,000-leaf fleet) bound
//!   descriptors and memory.
//!
//! A NAT in front of 1,000 agents: each agent holds one tunnel per proxy replica, so the NAT's
//! address holds 1,000 connections to each proxy, under the per-source limit of 1,024. After a
//! proxy restart all 1,000 reconnect at once; 32 handshake slots at ~10-50 ms each pass several
//! hundred handshakes a second. A connection refused for handshakes in flight (the two shares
//! and random early drop) is told so before it is closed ([`crate::protocol::busy`]: "busy,
//! retry in about [`BUSY_RETRY`]"), and the agent comes back around that hint instead of
//! doubling its backoff as after a failure: the storm is spread by the proxy's capacity, not by
//! the agents' backoff cap (30 s). The NAT is whole again within seconds of the first wave,
//! with nothing refused for good. A single host behind that NAT cannot hold more than 32 of the
//! slots, and its silent sockets are closed at the deadline.
//!
//! The gauges `tether_proxy_handshakes_in_flight` and `tether_proxy_handshakes_in_flight_max`
//! (the high-water mark since start) show a storm and that the limit held; with several proxies
//! in one process (tests) they show the last one to change.
//!
//! Every count is held under one mutex, updated in O(1) per accept; handshake and connection
//! permits release their counts when dropped, so a count lives exactly as long as its holder.
//!
//! # Peers' handshakes have their own slots
//!
//! When a frozen proxy resumed, its peers' reconnects tripped the shared handshake limit on
//! every proxy (55/55/44 refusals), refusing agents too; an agent reconnect storm could as well
//! starve peers. Admission happens at accept, before anything is authenticated, so the only
//! thing knowable is the source address. Peers announce theirs (discovery: EndpointSlices or
//! `--peer ID=ADDR`), and a peer dials from the address it is announced at (its pod IP), so a
//! connection from an announced peer's address takes a slot from a separate budget of
//! `max_peer_handshakes` (64: a root runs at most 64 replicas, and a proxy opens one
//! connection per peer, so the whole peer set fits), without random early drop and without
//! touching the agents' slots; everyone else shares the slots above. Deciding the class at
//! authentication instead would come too late: the slot is taken at accept. An attacker
//! that can connect from a peer's pod IP can take at most the peers' 64 slots (still under the
//! per-source connection limit and the 15 s deadline), never the agents'. Where an agent
//! shares its address with a peer (host networking, loopback tests), it uses the peers' slots.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::config::ProxyLimits;
use crate::admin::metrics::ProxyMetrics;

/// Counts connections per source IP and in total, and shares handshake slots fairly.
pub struct ConnectionLimiter {
    /// The limits enforced.
    limits: ProxyLimits,
    /// Every count, under one lock so an admission sees a consistent picture.
    state: Mutex<Counts>,
    /// When a refusal was last logged, and how many were not logged since: a flood must not
    /// become a flood of log lines (one a second at most).
    refusal_log: Mutex<(Option<std::time::Instant>, u64)>,
    /// Where the counts are exported (the proxy's connection and handshake gauges).
    metrics: ProxyMetrics,
}

/// What the limiter counts.
#[derive(Default)]
struct Counts {
    /// Per source address; an entry is removed when both its counts reach zero.
    per_ip: HashMap<IpAddr, SourceCounts>,
    /// Connections held, all sources together.
    connections: usize,
    /// Handshakes in flight, all sources together (peers' excepted).
    handshakes: usize,
    /// Handshakes in flight from announced peers' addresses.
    peer_handshakes: usize,
    /// The addresses peers are announced at: their handshakes take the peers' slots.
    peer_sources: HashSet<IpAddr>,
    /// The most handshakes ever in flight at once: what shows, after a reconnect storm, that
    /// the limit held (exported as `tether_proxy_handshakes_in_flight_max`).
    handshakes_peak: usize,
}

/// One source address's share.
#[derive(Default, Clone, Copy)]
struct SourceCounts {
    /// Its connections, authenticated or not.
    connections: usize,
    /// Its handshakes in flight.
    handshakes: usize,
}

/// Why a connection was refused at the door.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("{ip} already has {limit} connections, its limit")]
    PerIp { ip: IpAddr, limit: usize },
    #[error("the proxy already holds {limit} connections, its limit")]
    Total { limit: usize },
    #[error("{limit} handshakes are already in progress, the limit")]
    Handshakes { limit: usize },
    #[error("{ip} already has {limit} handshakes in progress, its share")]
    HandshakesPerIp { ip: IpAddr, limit: usize },
    #[error("{in_flight} handshakes in progress: dropped early at random (above {start})")]
    EarlyDrop { in_flight: usize, start: usize },
    #[error("{limit} handshakes from peer proxies are already in progress, their limit")]
    PeerHandshakes { limit: usize },
    /// From a listed load balancer (`--proxy-protocol-from`), before its client is known.
    #[error("no valid PROXY protocol header from a listed load balancer: {0}")]
    ProxyHeader(String),
}

/// What a refused agent is told to wait before its next try when the proxy is only busy
/// (see [`crate::protocol::busy`]); the agent spreads its retry around it. At ~300 handshakes a
/// second on a 2-core proxy, a thousand refused agents coming back within 1-2 s keep the slots
/// full without growing the queue, and a retry that meets the door again costs the proxy an
/// accept and a close (tens of microseconds).
pub const BUSY_RETRY: Duration = Duration::from_secs(2);

impl Refusal {
    /// The retry hint to give the refused peer: `Some` when the refusal is about handshakes
    /// in flight (a storm or a flood passes), `None` for the connection limits (a full proxy
    /// stays full, and the agent's own backoff applies).
    pub fn retry_hint(&self) -> Option<Duration> {
        match self {
            Refusal::Handshakes { .. }
            | Refusal::HandshakesPerIp { .. }
            | Refusal::PeerHandshakes { .. }
            | Refusal::EarlyDrop { .. } => Some(BUSY_RETRY),
            Refusal::PerIp { .. } | Refusal::Total { .. } | Refusal::ProxyHeader(_) => None,
        }
    }

    /// A fixed label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::PerIp { .. } => "per_ip",
            Refusal::Total { .. } => "total",
            Refusal::Handshakes { .. } => "handshakes",
            Refusal::HandshakesPerIp { .. } => "handshakes_per_ip",
            Refusal::EarlyDrop { .. } => "early_drop",
            Refusal::PeerHandshakes { .. } => "peer_handshakes",
            Refusal::ProxyHeader(_) => "proxy_header",
        }
    }
}

/// Held for as long as a connection lives; releases its count on drop.
pub struct ConnectionPermit {
    /// Where the count is kept.
    limiter: Arc<ConnectionLimiter>,
    /// Whose count it is.
    ip: IpAddr,
}

/// Held while a connection's handshake is in flight; releases its slot on drop.
pub struct HandshakePermit {
    /// Where the slot is kept.
    limiter: Arc<ConnectionLimiter>,
    /// Whose share it counts against.
    ip: IpAddr,
    /// Whether it took one of the peers' slots rather than the shared ones.
    peer: bool,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.limiter
            .release(self.ip, |c| &mut c.connections, |t| &mut t.connections);
    }
}

impl Drop for HandshakePermit {
    fn drop(&mut self) {
        if self.peer {
            let mut state = self.limiter.lock();
            state.peer_handshakes = state.peer_handshakes.saturating_sub(1);
        } else {
            self.limiter
                .release(self.ip, |c| &mut c.handshakes, |t| &mut t.handshakes);
        }
    }
}

impl ConnectionLimiter {
    /// A limiter enforcing `limits`.
    pub fn new(limits: ProxyLimits) -> Arc<Self> {
        Self::with_metrics(limits, ProxyMetrics::default())
    }

    /// A limiter enforcing `limits`, exporting its counts to `metrics`.
    pub fn with_metrics(limits: ProxyLimits, metrics: ProxyMetrics) -> Arc<Self> {
        Arc::new(Self {
            limits,
            state: Mutex::new(Counts::default()),
            refusal_log: Mutex::new((None, 0)),
            metrics,
        })
    }

    /// Admits a connection from `ip`, or says why not. The handshake permit is released when the
    /// handshake ends; the connection permit when the connection does.
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
    ) -> Result<(ConnectionPermit, HandshakePermit), Refusal> {
        self.admit_with(ip, rand::random::<f64>())
    }

    /// [`admit`](Self::admit) with the random draw (in `[0, 1)`) given, for tests.
    fn admit_with(
        self: &Arc<Self>,
        ip: IpAddr,
        draw: f64,
    ) -> Result<(ConnectionPermit, HandshakePermit), Refusal> {
        let l = &self.limits;
        let mut state = self.lock();
        let source = state.per_ip.get(&ip).copied().unwrap_or_default();
        let peer = state.peer_sources.contains(&ip);
        if peer {
            if state.peer_handshakes >= l.max_peer_handshakes {
                return Err(Refusal::PeerHandshakes {
                    limit: l.max_peer_handshakes,
                });
            }
        } else if state.handshakes >= l.max_handshakes {
            return Err(Refusal::Handshakes {
                limit: l.max_handshakes,
            });
        }
        if !peer && source.handshakes >= l.max_handshakes_per_ip {
            return Err(Refusal::HandshakesPerIp {
                ip,
                limit: l.max_handshakes_per_ip,
            });
        }
        if !peer && draw < drop_probability(state.handshakes, l) {
            return Err(Refusal::EarlyDrop {
                in_flight: state.handshakes,
                start: l.handshakes_early_drop_start,
            });
        }
        if state.connections >= l.max_connections {
            return Err(Refusal::Total {
                limit: l.max_connections,
            });
        }
        if source.connections >= l.max_connections_per_ip {
            return Err(Refusal::PerIp {
                ip,
                limit: l.max_connections_per_ip,
            });
        }
        state.connections += 1;
        if peer {
            state.peer_handshakes += 1;
        } else {
            state.handshakes += 1;
            state.handshakes_peak = state.handshakes_peak.max(state.handshakes);
        }
        publish(&self.metrics, &state);
        let entry = state.per_ip.entry(ip).or_default();
        entry.connections += 1;
        entry.handshakes += usize::from(!peer);
        drop(state);
        Ok((
            ConnectionPermit {
                limiter: self.clone(),
                ip,
            },
            HandshakePermit {
                limiter: self.clone(),
                ip,
                peer,
            },
        ))
    }

    /// Replaces the addresses peers are announced at (see the module doc): connections from
    /// them take the peers' handshake slots.
    pub fn set_peer_sources(&self, sources: HashSet<IpAddr>) {
        self.lock().peer_sources = sources;
    }

    /// Handshakes from peers' addresses in flight now, for metrics and tests.
    pub fn peer_handshakes(&self) -> usize {
        self.lock().peer_handshakes
    }

    /// Logs a refusal, at most one line a second with the count of those not logged.
    pub fn log_refusal(&self, peer: std::net::SocketAddr, refusal: &Refusal) {
        let now = std::time::Instant::now();
        let mut log = self.refusal_log.lock().unwrap_or_else(|p| p.into_inner());
        if log
            .0
            .is_none_or(|t| now.duration_since(t) >= std::time::Duration::from_secs(1))
        {
            tracing::warn!(%peer, reason = %refusal, also_refused = log.1, "connection refused");
            *log = (Some(now), 0);
        } else {
            log.1 += 1;
        }
    }

    /// Connections held now, for metrics and tests.
    pub fn connections(&self) -> usize {
        self.lock().connections
    }

    /// Handshakes in flight now, for metrics and tests.
    pub fn handshakes(&self) -> usize {
        self.lock().handshakes
    }

    /// The most handshakes that were ever in flight at once.
    pub fn handshakes_peak(&self) -> usize {
        self.lock().handshakes_peak
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one off a source's count (`field`) and off the total (`total`).
    fn release(
        &self,
        ip: IpAddr,
        field: impl Fn(&mut SourceCounts) -> &mut usize,
        total: impl Fn(&mut Counts) -> &mut usize,
    ) {
        let mut state = self.lock();
        let t = total(&mut state);
        *t = t.saturating_sub(1);
        publish(&self.metrics, &state);
        if let Some(source) = state.per_ip.get_mut(&ip) {
            let n = field(source);
            *n = n.saturating_sub(1);
            if source.connections == 0 && source.handshakes == 0 {
                state.per_ip.remove(&ip);
            }
        }
    }
}

/// Exports the counts (called under the lock, so the gauges follow the counts in order).
fn publish(metrics: &ProxyMetrics, state: &Counts) {
    metrics.connections.set(state.connections as i64);
    metrics.handshakes.set(state.handshakes as i64);
    metrics.handshakes_peak.set(state.handshakes_peak as i64);
}

/// OpenSSH's `MaxStartups start:rate:full`: 0 below `start`, `rate` at `start`, rising linearly
/// to 1 at `full`.
fn drop_probability(in_flight: usize, l: &ProxyLimits) -> f64 {
    let (start, full) = (l.handshakes_early_drop_start, l.max_handshakes);
    if in_flight < start || full <= start {
        return 0.0;
    }
    let rate = f64::from(l.handshakes_early_drop_percent.min(100)) / 100.0;
    let beyond = (in_flight - start) as f64 / (full - start) as f64;
    (rate + (1.0 - rate) * beyond).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn enforces_per_ip_and_total_connections() {
        let limiter = ConnectionLimiter::new(ProxyLimits {
            max_connections_per_ip: 2,
            max_connections: 3,
            ..ProxyLimits::default()
        });
        let (a, b) = (ip("127.0.0.1"), ip("127.0.0.2"));
        let p1 = limiter.admit(a).unwrap();
        let _p2 = limiter.admit(a).unwrap();
        assert!(matches!(limiter.admit(a), Err(Refusal::PerIp { .. })));
        let _p3 = limiter.admit(b).unwrap();
        assert!(matches!(limiter.admit(b), Err(Refusal::Total { .. })));
        drop(p1);
        assert_eq!(limiter.connections(), 2);
        assert!(limiter.admit(a).is_ok());
    }

    #[test]
    fn one_source_gets_only_its_share_of_handshakes() {
        let limiter = ConnectionLimiter::new(ProxyLimits {
            max_handshakes: 8,
            max_handshakes_per_ip: 2,
            handshakes_early_drop_start: 8,
            ..ProxyLimits::default()
        });
        let (a, b) = (ip("127.0.0.2"), ip("127.0.0.1"));
        let (_c1, h1) = limiter.admit(a).unwrap();
        let _held = limiter.admit(a).unwrap();
        assert!(matches!(
            limiter.admit(a),
            Err(Refusal::HandshakesPerIp { .. })
        ));
        assert!(limiter.admit(b).is_ok(), "another source still gets in");
        // The connection stays counted after its handshake; the slot is free again.
        drop(h1);
        assert_eq!(limiter.handshakes(), 1);
        assert_eq!(limiter.connections(), 2);
        assert!(limiter.admit(a).is_ok());
    }

    #[test]
    fn early_drop_rises_from_start_to_full() {
        let l = ProxyLimits {
            max_handshakes: 100,
            handshakes_early_drop_start: 10,
            handshakes_early_drop_percent: 30,
            ..ProxyLimits::default()
        };
        assert_eq!(drop_probability(9, &l), 0.0);
        assert!((drop_probability(10, &l) - 0.3).abs() < 1e-9);
        assert!((drop_probability(55, &l) - 0.65).abs() < 1e-9);
        assert_eq!(drop_probability(100, &l), 1.0);

        let limiter = ConnectionLimiter::new(ProxyLimits {
            max_handshakes: 4,
            max_handshakes_per_ip: 4,
            handshakes_early_drop_start: 2,
            handshakes_early_drop_percent: 50,
            ..ProxyLimits::default()
        });
        let a = ip("127.0.0.1");
        let _h: Vec<_> = (0..2)
            .map(|_| limiter.admit_with(a, 0.0).unwrap())
            .collect();
        assert!(matches!(
            limiter.admit_with(a, 0.49),
            Err(Refusal::EarlyDrop { .. })
        ));
        assert!(limiter.admit_with(a, 0.51).is_ok());
        assert_eq!(
            Refusal::EarlyDrop {
                in_flight: 3,
                start: 2
            }
            .label(),
            "early_drop"
        );
    }

    #[test]
    fn peers_and_agents_do_not_take_each_other_s_handshake_slots() {
        let limiter = ConnectionLimiter::new(ProxyLimits {
            max_handshakes: 2,
            max_handshakes_per_ip: 2,
            handshakes_early_drop_start: 2,
            max_peer_handshakes: 2,
            ..ProxyLimits::default()
        });
        let (peer, agents) = (ip("127.0.0.7"), ip("127.0.0.1"));
        limiter.set_peer_sources(HashSet::from([peer]));
        // Agents fill the shared slots; a peer still gets in.
        let _agents: Vec<_> = (0..2).map(|_| limiter.admit(agents).unwrap()).collect();
        assert!(matches!(
            limiter.admit(agents),
            Err(Refusal::Handshakes { .. })
        ));
        let (_c1, h1) = limiter.admit(peer).unwrap();
        let _p2 = limiter.admit(peer).unwrap();
        // A burst of peers fills only the peers' slots.
        assert!(matches!(
            limiter.admit(peer),
            Err(Refusal::PeerHandshakes { .. })
        ));
        assert_eq!((limiter.handshakes(), limiter.peer_handshakes()), (2, 2));
        drop(h1);
        assert_eq!(limiter.peer_handshakes(), 1);
        assert_eq!(limiter.handshakes(), 2, "the agents' count is untouched");
        assert!(limiter.admit(peer).is_ok());
    }

    #[test]
    fn the_peak_of_handshakes_in_flight_outlives_them() {
        let limiter = ConnectionLimiter::new(ProxyLimits::default());
        let held: Vec<_> = (1..=3)
            .map(|i| limiter.admit(ip(&format!("127.0.0.{i}"))).unwrap())
            .collect();
        assert_eq!(limiter.handshakes_peak(), 3);
        drop(held);
        assert_eq!(limiter.handshakes(), 0);
        assert_eq!(limiter.handshakes_peak(), 3, "the high-water mark stays");
        let _one = limiter.admit(ip("127.0.0.1")).unwrap();
        assert_eq!(limiter.handshakes_peak(), 3);
    }

    #[test]
    fn the_full_limit_refuses_everyone() {
        let limiter = ConnectionLimiter::new(ProxyLimits {
            max_handshakes: 1,
            max_handshakes_per_ip: 1,
            handshakes_early_drop_start: 1,
            ..ProxyLimits::default()
        });
        let a = ip("127.0.0.1");
        let (_conn, handshake) = limiter.admit(a).unwrap();
        assert!(matches!(
            limiter.admit(ip("127.0.0.3")),
            Err(Refusal::Handshakes { .. })
        ));
        drop(handshake);
        assert!(limiter.admit(a).is_ok());
    }
}
