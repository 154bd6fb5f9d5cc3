//! The agent pool (the seed's `AgentPool` with discovering agents): for one tunnel target, hold
//! exactly one tunnel to every live proxy, reaching them only through the load-balanced address.
//!
//! The first tunnel's proxy announces its peers (discovery). While some announced proxy has no
//! tunnel, the pool keeps dialling the load balancer, a bounded number of dials at a time; a
//! dial that lands on a proxy already held is refused during key exchange and costs one TCP and
//! key-exchange round. Landing on held proxies is normal and retried after a short jitter;
//! real failures back off exponentially, so a fleet does not stampede a restarting root
//! (Teleport's RFD 48). A proxy newly announced (a replica restarted or added, whose peers
//! announce it once it is ready) is dialled within `rejoin_jitter` (300 ms) whatever back-off
//! the outage built up. Proxies no longer announced are forgotten after `forget_after` and
//! their tunnels closed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

mod run;

use run::PoolRun;

use super::AgentEvent;
use super::config::AgentConfig;
use super::error::TunnelError;
use super::status::{
    CaKeysVerdict, PoolStatus, ProxyTunnelStatus, RootKeys, TunnelFailure, TunnelState,
};
use super::tunnel::{Tunnel, TunnelEvent};
use crate::admin::metrics::AgentMetrics;
use crate::protocol::control::ProxyInfo;

/// How the pool paces itself.
#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    /// Dials in flight at once. Small, so an agent never floods a load balancer or a NAT
    /// gateway's port table.
    pub max_concurrent_dials: usize,
    /// Upper bound of the random pause after landing on an already-held proxy.
    pub duplicate_jitter: Duration,
    /// A proxy not announced by any discovery for this long is forgotten and its tunnel
    /// closed. Discovery repeats every 2 minutes, so the default survives a lost message.
    pub forget_after: Duration,
    /// Upper bound of the random pause before dialling a proxy that has just been announced
    /// (a replica that restarted or joined): short, so it gets its tunnel within a second of
    /// being ready; random, so a fleet does not arrive in one instant.
    pub rejoin_jitter: Duration,
}

impl Default for PoolLimits {
    fn default() -> Self {
        Self {
            max_concurrent_dials: 2,
            duplicate_jitter: Duration::from_millis(50),
            forget_after: Duration::from_secs(300),
            rejoin_jitter: Duration::from_millis(300),
        }
    }
}

/// The longest pause between dials that keep landing on held proxies.
const MAX_DUPLICATE_PAUSE: Duration = Duration::from_secs(5);

/// A proxy the pool knows of.
struct Known {
    last_announced: Instant,
}

/// How stale a reported heartbeat time may get before the status is refreshed. Coarse, so that
/// status written to Kubernetes changes when something happens, not on every heartbeat.
pub const HEARTBEAT_STATUS_GRANULARITY: Duration = Duration::from_secs(300);

/// A tunnel the pool holds.
struct Held {
    state: TunnelState,
    since: SystemTime,
    /// When the proxy last answered a heartbeat, refreshed every
    /// [`HEARTBEAT_STATUS_GRANULARITY`].
    last_heartbeat: Option<SystemTime>,
    /// What carries the tunnel, for the status.
    carrier: crate::transport::Used,
    stop: CancellationToken,
}

/// Why the pool woke up.
enum Outcome {
    /// A dial's result; the tunnel boxed, as it is far larger than the other outcome.
    Dialled(Result<Box<Tunnel>, TunnelError>),
    Ended {
        proxy_id: String,
        result: Result<(), TunnelError>,
    },
}

/// Keeps one tunnel per live proxy for one target.
pub struct Pool {
    config: Arc<AgentConfig>,
    limits: PoolLimits,
    events: broadcast::Sender<AgentEvent>,
    status: watch::Sender<PoolStatus>,
    attempts: AtomicU64,
}

impl Pool {
    /// A pool for `config`; nothing runs until [`Pool::run`].
    pub fn new(config: Arc<AgentConfig>, limits: PoolLimits) -> Self {
        Self {
            config,
            limits,
            events: broadcast::channel(256).0,
            status: watch::channel(PoolStatus::default()).0,
            attempts: AtomicU64::new(0),
        }
    }

    /// Subscribes to tunnel state changes.
    pub fn events(&self) -> broadcast::Receiver<AgentEvent> {
        self.events.subscribe()
    }

    /// The current status; changes whenever a tunnel or the proxy set does.
    pub fn status(&self) -> watch::Receiver<PoolStatus> {
        self.status.subscribe()
    }

    /// Dials made so far (each TCP connection to the target counts once).
    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Relaxed)
    }

    /// Runs until `stop` is cancelled; then closes every tunnel.
    pub async fn run(&self, stop: CancellationToken) {
        let (tunnel_tx, mut tunnel_rx) = mpsc::channel::<TunnelEvent>(256);
        let mut expiry =
            tokio::time::interval((self.limits.forget_after / 4).max(Duration::from_millis(10)));
        let (leaf_report, keep_report) = super::report::follow(self.config.clone());
        let keeper = tokio::spawn(keep_report);
        let mut run = PoolRun::new(self, stop.clone(), tunnel_tx, leaf_report);
        loop {
            let wait_for_dial = run.dial_missing();
            run.report();
            tokio::select! {
                () = stop.cancelled() => break,
                Some(joined) = run.tasks.join_next() => {
                    if let Ok(outcome) = joined {
                        run.on_outcome(outcome);
                    }
                }
                Some(event) = tunnel_rx.recv() => run.on_event(event),
                _ = expiry.tick() => run.on_expiry(),
                () = tokio::time::sleep_until(run.next_dial), if wait_for_dial => {}
            }
        }
        run.close().await;
        keeper.abort();
        self.status.send_replace(PoolStatus::default());
        let _ = self.events.send(AgentEvent::Closed);
    }

    fn discovered(&self, known: &mut HashMap<String, Known>, proxies: Vec<ProxyInfo>) {
        let now = Instant::now();
        for p in proxies {
            known.insert(
                p.id,
                Known {
                    last_announced: now,
                },
            );
        }
    }

    fn publish(
        &self,
        wanted: &HashSet<String>,
        held: &HashMap<String, Held>,
        last_error: &Option<TunnelFailure>,
        (ca_keys, root_keys): (&Option<CaKeysVerdict>, &Option<RootKeys>),
    ) {
        let mut ids: Vec<&String> = wanted.iter().chain(held.keys()).collect();
        ids.sort();
        ids.dedup();
        let mut proxies: Vec<ProxyTunnelStatus> = ids
            .into_iter()
            .map(|id| match held.get(id) {
                Some(h) => ProxyTunnelStatus {
                    proxy_id: id.clone(),
                    state: h.state,
                    connected_since: Some(h.since),
                    last_heartbeat: h.last_heartbeat,
                    carrier: Some(h.carrier),
                },
                None => ProxyTunnelStatus {
                    proxy_id: id.clone(),
                    state: TunnelState::Connecting,
                    connected_since: None,
                    last_heartbeat: None,
                    carrier: None,
                },
            })
            .collect();
        proxies.sort_by(|a, b| a.proxy_id.cmp(&b.proxy_id));
        let status = PoolStatus {
            expected: wanted.len().max(held.len()),
            discovered: !wanted.is_empty(),
            proxies,
            last_error: last_error.clone(),
            ca_keys: ca_keys.clone(),
            root_keys: root_keys.clone(),
        };
        self.status.send_if_modified(|current| {
            let changed = *current != status;
            if changed {
                *current = status;
            }
            changed
        });
    }
}

/// Updates the convergence metrics: `since` is when a proxy went missing, if one is.
fn track_convergence(
    metrics: &AgentMetrics,
    since: Option<tokio::time::Instant>,
    missing: usize,
) -> Option<tokio::time::Instant> {
    metrics.proxies_missing.set(missing as i64);
    match (since, missing) {
        (None, 0) => None,
        (None, _) => Some(tokio::time::Instant::now()),
        (Some(start), 0) => {
            metrics.convergence.observe(start.elapsed().as_secs_f64());
            None
        }
        (Some(start), _) => Some(start),
    }
}

/// Every proxy any live tunnel's proxy announces.
fn union(announcements: &HashMap<String, HashSet<String>>) -> HashSet<String> {
    announcements.values().flatten().cloned().collect()
}

/// When to dial after the announced set changed from `before` to `after`: soon (within
/// `jitter`) if it gained a proxy the pool does not hold, `None` if the pacing stands.
///
/// A restarted replica is announced again by its peers as soon as it is ready (its endpoint
/// turns ready). Until then the pool's dials through the load balancer were landing on the dead
/// replica (failures: exponential back-off up to 30 s) or on held ones (duplicates: up to 5 s),
/// so without this the restarted proxy waited 0.3-10.3 s for its tunnel (issue #13). The jitter
/// keeps a fleet that learns of the replica at the same moment from arriving in one burst; the
/// proxy's handshake admission paces what still arrives together.
fn rejoin_at(
    before: &HashSet<String>,
    after: &HashSet<String>,
    held: &HashMap<String, Held>,
    jitter_max: Duration,
) -> Option<tokio::time::Instant> {
    let gained = after
        .iter()
        .any(|id| !before.contains(id) && !held.contains_key(id));
    gained.then(|| tokio::time::Instant::now() + jitter(jitter_max))
}

/// Whether the proxy's address refused the connection: nothing listens there (the proxy is
/// down or restarting), which a retry costs it nothing (see [`super::config::REFUSED_MAX`]).
fn nothing_listens(error: &TunnelError) -> bool {
    matches!(error, TunnelError::Connect { source, .. }
        if source.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// A uniformly random duration in [0, max].
fn jitter(max: Duration) -> Duration {
    max.mul_f64(rand::random::<f64>())
}
