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
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::AgentEvent;
use super::claims::Claims;
use super::config::AgentConfig;
use super::error::TunnelError;
use super::status::{PoolStatus, ProxyTunnelStatus, TunnelFailure, TunnelState};
use super::tunnel::{Tunnel, TunnelEvent};
use crate::admin::metrics::{AgentMetrics, label};
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
    stop: CancellationToken,
}

/// Why the pool woke up.
enum Outcome {
    Dialled(Result<Tunnel, TunnelError>),
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
        let claims = Claims::default();
        let mut known: HashMap<String, Known> = HashMap::new();
        // What each held proxy last announced. A proxy that is gone no longer speaks for the
        // set, so a dead replica's stale view cannot keep the pool dialling for ghosts.
        let mut announcements: HashMap<String, HashSet<String>> = HashMap::new();
        // The proxies to hold: everything a live tunnel's proxy announces.
        let mut wanted: HashSet<String> = HashSet::new();
        let mut duplicates = 0u32;
        let mut held: HashMap<String, Held> = HashMap::new();
        let mut tasks: JoinSet<Outcome> = JoinSet::new();
        let (tunnel_tx, mut tunnel_rx) = mpsc::channel::<TunnelEvent>(256);
        let held_report = watch::channel(Vec::<String>::new()).0;
        let mut dialling = 0usize;
        let mut failures = 0u32;
        // Busy answers in a row from the proxies (see `protocol::busy`).
        let mut busy = 0u32;
        let mut next_dial = tokio::time::Instant::now();
        let mut last_error: Option<TunnelFailure> = None;
        let mut converging: Option<tokio::time::Instant> = None;
        let mut expiry =
            tokio::time::interval((self.limits.forget_after / 4).max(Duration::from_millis(10)));

        loop {
            // Dial while some proxy is missing: before any discovery, until one tunnel exists.
            let missing = if wanted.is_empty() {
                usize::from(!held.values().any(|h| h.state == TunnelState::Connected))
            } else {
                wanted.iter().filter(|id| !held.contains_key(*id)).count()
            };
            converging = track_convergence(&self.config.metrics, converging, missing);
            while dialling < missing.min(self.limits.max_concurrent_dials)
                && tokio::time::Instant::now() >= next_dial
            {
                dialling += 1;
                self.attempts.fetch_add(1, Ordering::Relaxed);
                let _ = self.events.send(AgentEvent::Connecting);
                let (config, claims) = (self.config.clone(), claims.clone());
                tasks.spawn(
                    async move {
                        Outcome::Dialled(Tunnel::connect_claiming(config, Some(claims)).await)
                    }
                    .instrument(info_span!("dial_proxy")),
                );
            }
            self.publish(&wanted, &held, &last_error);
            let mut holding: Vec<String> = held
                .iter()
                .filter(|(_, h)| h.state == TunnelState::Connected)
                .map(|(id, _)| id.clone())
                .collect();
            holding.sort();
            held_report.send_if_modified(|current| {
                let changed = *current != holding;
                if changed {
                    *current = holding;
                }
                changed
            });

            let wait_for_dial = dialling < missing.min(self.limits.max_concurrent_dials);
            tokio::select! {
                () = stop.cancelled() => break,
                Some(joined) = tasks.join_next() => {
                    let Ok(outcome) = joined else { continue };
                    match outcome {
                        Outcome::Dialled(Ok(tunnel)) => {
                            dialling -= 1;
                            self.config.metrics.dials.get_or_create(&label("result", "connected")).inc();
                            self.config.metrics.tunnels.inc();
                            failures = 0;
                            busy = 0;
                            duplicates = 0;
                            last_error = None;
                            let proxy_id = tunnel.proxy_id.clone();
                            info!(proxy = %proxy_id, "holding a tunnel");
                            let tunnel_stop = stop.child_token();
                            held.insert(proxy_id.clone(), Held {
                                state: TunnelState::Connected,
                                since: SystemTime::now(),
                                last_heartbeat: Some(SystemTime::now()),
                                stop: tunnel_stop.clone(),
                            });
                            let _ = self.events.send(AgentEvent::Connected { proxy_id: proxy_id.clone() });
                            let tx = tunnel_tx.clone();
                            let tunnel = tunnel.report_held(held_report.subscribe());
                            tasks.spawn(async move {
                                let result = tunnel.run(tunnel_stop, Some(tx)).await;
                                Outcome::Ended { proxy_id, result }
                            }.instrument(info_span!("tunnel")));
                        }
                        Outcome::Dialled(Err(TunnelError::AlreadyClaimed(id))) => {
                            dialling -= 1;
                            self.config.metrics.dials.get_or_create(&label("result", "duplicate")).inc();
                            debug!(proxy = %id, "landed on a held proxy");
                            // A load balancer that keeps choosing held proxies is slowed down
                            // against, not hammered: the pause grows ×1.5 per repeat, up to 5 s.
                            let pause = self
                                .limits
                                .duplicate_jitter
                                .mul_f64(1.5f64.powi(duplicates.min(20) as i32))
                                .min(MAX_DUPLICATE_PAUSE);
                            duplicates = duplicates.saturating_add(1);
                            next_dial = tokio::time::Instant::now() + jitter(pause);
                        }
                        Outcome::Dialled(Err(TunnelError::Busy(hint))) => {
                            dialling -= 1;
                            self.config.metrics.dials.get_or_create(&label("result", "busy")).inc();
                            debug!(?hint, "the proxy is busy");
                            // Not a failure: the proxy is up and paces its handshakes.
                            next_dial = tokio::time::Instant::now() + self.config.backoff.busy_delay(hint, busy);
                            busy = busy.saturating_add(1);
                        }
                        Outcome::Dialled(Err(e)) => {
                            dialling -= 1;
                            self.config.metrics.dials.get_or_create(&label("result", "failed")).inc();
                            warn!(error = %e, "could not open a tunnel");
                            let backoff = &self.config.backoff;
                            let delay = if nothing_listens(&e) {
                                backoff.delay_after_refusal(failures)
                            } else {
                                backoff.delay(failures)
                            };
                            next_dial = tokio::time::Instant::now() + delay;
                            last_error = Some(e.failure());
                            failures = failures.saturating_add(1);
                        }
                        Outcome::Ended { proxy_id, result } => {
                            let reason = match &result {
                                Ok(()) => "stopped".to_owned(),
                                Err(e) => e.to_string(),
                            };
                            match &result {
                                Ok(()) => {}
                                // A rolling update: the proxy moved its agents on; routine.
                                Err(TunnelError::Drained(why)) => info!(proxy = %proxy_id, reason = %why, "the proxy drained the tunnel; dialling again"),
                                Err(e) => warn!(proxy = %proxy_id, error = %e, "tunnel lost"),
                            }
                            held.remove(&proxy_id);
                            self.config.metrics.tunnels.dec();
                            if announcements.remove(&proxy_id).is_some() {
                                wanted = union(&announcements);
                            }
                            let _ = self.events.send(AgentEvent::Disconnected { reason });
                            next_dial = next_dial.max(tokio::time::Instant::now() + jitter(self.limits.duplicate_jitter));
                        }
                    }
                }
                Some(event) = tunnel_rx.recv() => {
                    if let TunnelEvent::Heartbeat { proxy_id } = &event
                        && let Some(h) = held.get_mut(proxy_id)
                    {
                        let now = SystemTime::now();
                        let stale = h.last_heartbeat.is_none_or(|t| {
                            now.duration_since(t).unwrap_or_default() >= HEARTBEAT_STATUS_GRANULARITY
                        });
                        if stale {
                            h.last_heartbeat = Some(now);
                        }
                    }
                    if let TunnelEvent::Draining { proxy_id } = &event
                        && let Some(h) = held.get_mut(proxy_id)
                    {
                        // Not wanted less: once it closes, the pool redials, and the load
                        // balancer leads to the replica's successor, or to it after a restart.
                        h.state = TunnelState::Draining;
                    }
                    // A tunnel's last events may still be queued when it has ended: a proxy
                    // that is gone must not speak for the set again.
                    if let TunnelEvent::Discovery { proxy_id, proxies } = event
                        && held.contains_key(&proxy_id)
                    {
                        debug!(from = %proxy_id, count = proxies.len(), "discovery");
                        let announced: HashSet<String> = proxies.iter().map(|p| p.id.clone()).collect();
                        announcements.insert(proxy_id, announced);
                        let now_wanted = union(&announcements);
                        if now_wanted != wanted {
                            if let Some(at) = rejoin_at(&wanted, &now_wanted, &held, self.limits.rejoin_jitter) {
                                // The pause built up while it was gone no longer applies.
                                failures = 0;
                                next_dial = at;
                            }
                            duplicates = 0;
                            wanted = now_wanted;
                        }
                        self.discovered(&mut known, proxies);
                    }
                }
                _ = expiry.tick() => {
                    let forget_after = self.limits.forget_after;
                    known.retain(|id, k| {
                        let keep = wanted.contains(id) || k.last_announced.elapsed() < forget_after;
                        if !keep {
                            info!(proxy = %id, "forgetting a proxy no longer announced");
                            if let Some(h) = held.get(id) {
                                h.stop.cancel();
                            }
                        }
                        keep
                    });
                }
                () = tokio::time::sleep_until(next_dial), if wait_for_dial => {}
            }
        }
        for h in held.values() {
            h.stop.cancel();
        }
        while let Some(joined) = tasks.join_next().await {
            // A dial that completed after the stop: the proxy may already have sent a dial
            // through the new tunnel, so it leaves like the others rather than being dropped.
            if let Ok(Outcome::Dialled(Ok(tunnel))) = joined {
                let stop = stop.clone();
                tasks.spawn(async move {
                    let proxy_id = tunnel.proxy_id.clone();
                    let result = tunnel.run(stop, None).await;
                    Outcome::Ended { proxy_id, result }
                });
            }
        }
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
                },
                None => ProxyTunnelStatus {
                    proxy_id: id.clone(),
                    state: TunnelState::Connecting,
                    connected_since: None,
                    last_heartbeat: None,
                },
            })
            .collect();
        proxies.sort_by(|a, b| a.proxy_id.cmp(&b.proxy_id));
        let status = PoolStatus {
            expected: wanted.len().max(held.len()),
            discovered: !wanted.is_empty(),
            proxies,
            last_error: last_error.clone(),
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
