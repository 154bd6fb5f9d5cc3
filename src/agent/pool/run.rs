//! One run of a [`Pool`]: what it keeps between wake-ups, and what it does on each. The loop
//! in [`Pool::run`] waits; each handler here reacts to one kind of wake-up: a dial done or a
//! tunnel ended ([`PoolRun::on_outcome`]), a tunnel's event ([`PoolRun::on_event`]), the
//! expiry tick ([`PoolRun::on_expiry`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{
    HEARTBEAT_STATUS_GRANULARITY, Held, Known, MAX_DUPLICATE_PAUSE, Outcome, Pool, jitter,
    nothing_listens, rejoin_at, track_convergence, union,
};
use crate::admin::metrics::label;
use crate::agent::AgentEvent;
use crate::agent::claims::Claims;
use crate::agent::error::TunnelError;
use crate::agent::status::{CaKeysVerdict, RootKeys, TunnelFailure, TunnelState};
use crate::agent::tunnel::{Tunnel, TunnelEvent};
use crate::protocol::control::LeafReport;

/// What a running pool keeps between wake-ups.
pub(super) struct PoolRun<'a> {
    /// The pool: its configuration, limits, status and events.
    pool: &'a Pool,
    /// Cancelled when the pool stops; each tunnel's stop is a child of it.
    stop: CancellationToken,
    /// Proxies held or being dialled, so two dials never keep the same proxy.
    claims: Claims,
    /// Every proxy announced, and when it last was (to forget those no longer announced).
    known: HashMap<String, Known>,
    /// What each held proxy last announced. A proxy that is gone no longer speaks for the
    /// set, so a dead replica's stale view cannot keep the pool dialling for ghosts.
    announcements: HashMap<String, HashSet<String>>,
    /// The proxies to hold: everything a live tunnel's proxy announces.
    wanted: HashSet<String>,
    /// Landings on held proxies in a row (the pause after one grows with them).
    duplicates: u32,
    /// The tunnels held, by proxy.
    held: HashMap<String, Held>,
    /// Dials and running tunnels.
    pub(super) tasks: JoinSet<Outcome>,
    /// Where tunnels send their events (heartbeats, discovery, drain).
    tunnel_tx: mpsc::Sender<TunnelEvent>,
    /// The held proxies, as each tunnel reports them to its proxy with its heartbeats.
    held_report: watch::Sender<Vec<String>>,
    /// The agent's report of its leaf, which each tunnel sends its proxy when it changes.
    leaf_report: watch::Receiver<Arc<LeafReport>>,
    /// Dials in flight.
    dialling: usize,
    /// Failed dials in a row (the back-off grows with them).
    failures: u32,
    /// Busy answers in a row from the proxies (see `protocol::busy`).
    busy: u32,
    /// No dial before this.
    pub(super) next_dial: tokio::time::Instant,
    /// Why the latest dial failed, for the status.
    last_error: Option<TunnelFailure>,
    /// The root's latest answer to the leaf's CA key set, for the status.
    ca_keys: Option<CaKeysVerdict>,
    /// The newest root key set the proxies announced, for the status.
    root_keys: Option<RootKeys>,
    /// Since when some announced proxy has been missing, if one is.
    converging: Option<tokio::time::Instant>,
}

impl<'a> PoolRun<'a> {
    /// A run of `pool` until `stop`; tunnels send their events to `tunnel_tx`.
    pub(super) fn new(
        pool: &'a Pool,
        stop: CancellationToken,
        tunnel_tx: mpsc::Sender<TunnelEvent>,
        leaf_report: watch::Receiver<Arc<LeafReport>>,
    ) -> Self {
        Self {
            pool,
            stop,
            claims: Claims::default(),
            known: HashMap::new(),
            announcements: HashMap::new(),
            wanted: HashSet::new(),
            duplicates: 0,
            held: HashMap::new(),
            tasks: JoinSet::new(),
            tunnel_tx,
            held_report: watch::channel(Vec::new()).0,
            leaf_report,
            dialling: 0,
            failures: 0,
            busy: 0,
            next_dial: tokio::time::Instant::now(),
            last_error: None,
            ca_keys: None,
            root_keys: None,
            converging: None,
        }
    }

    /// Proxies to dial: before any discovery, one until a tunnel exists; then every announced
    /// proxy not held.
    fn missing(&self) -> usize {
        if self.wanted.is_empty() {
            usize::from(
                !self
                    .held
                    .values()
                    .any(|h| h.state == TunnelState::Connected),
            )
        } else {
            self.wanted
                .iter()
                .filter(|id| !self.held.contains_key(*id))
                .count()
        }
    }

    /// Starts dials while some proxy is missing and the pacing allows; returns whether more
    /// are due (the loop then wakes at `next_dial`).
    pub(super) fn dial_missing(&mut self) -> bool {
        let missing = self.missing();
        let pool = self.pool;
        self.converging = track_convergence(&pool.config.metrics, self.converging, missing);
        let most = missing.min(pool.limits.max_concurrent_dials);
        while self.dialling < most && tokio::time::Instant::now() >= self.next_dial {
            self.dialling += 1;
            pool.attempts.fetch_add(1, Ordering::Relaxed);
            let _ = pool.events.send(AgentEvent::Connecting);
            let (config, claims) = (pool.config.clone(), self.claims.clone());
            self.tasks.spawn(
                async move {
                    Outcome::Dialled(
                        Tunnel::connect_claiming(config, Some(claims))
                            .await
                            .map(Box::new),
                    )
                }
                .instrument(info_span!("dial_proxy")),
            );
        }
        self.dialling < most
    }

    /// Publishes the status, and the held proxies for the tunnels' heartbeats.
    pub(super) fn report(&mut self) {
        self.pool.publish(
            &self.wanted,
            &self.held,
            &self.last_error,
            (&self.ca_keys, &self.root_keys),
        );
        let mut holding: Vec<String> = self
            .held
            .iter()
            .filter(|(_, h)| h.state == TunnelState::Connected)
            .map(|(id, _)| id.clone())
            .collect();
        holding.sort();
        self.held_report.send_if_modified(|current| {
            let changed = *current != holding;
            if changed {
                *current = holding;
            }
            changed
        });
    }

    /// A dial finished or a tunnel ended.
    pub(super) fn on_outcome(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Dialled(result) => {
                self.dialling -= 1;
                match result {
                    Ok(tunnel) => self.hold(*tunnel),
                    Err(e) => self.dial_failed(e),
                }
            }
            Outcome::Ended { proxy_id, result } => self.ended(proxy_id, result),
        }
    }

    /// Holds a new tunnel and runs it.
    fn hold(&mut self, tunnel: Tunnel) {
        let metrics = &self.pool.config.metrics;
        metrics
            .dials
            .get_or_create(&label("result", "connected"))
            .inc();
        metrics.tunnels.inc();
        (self.failures, self.busy, self.duplicates) = (0, 0, 0);
        self.last_error = None;
        let proxy_id = tunnel.proxy_id.clone();
        info!(proxy = %proxy_id, carrier = %tunnel.carrier, "holding a tunnel");
        let tunnel_stop = self.stop.child_token();
        self.held.insert(
            proxy_id.clone(),
            Held {
                state: TunnelState::Connected,
                since: SystemTime::now(),
                last_heartbeat: Some(SystemTime::now()),
                carrier: tunnel.carrier,
                stop: tunnel_stop.clone(),
            },
        );
        let _ = self.pool.events.send(AgentEvent::Connected {
            proxy_id: proxy_id.clone(),
            carrier: tunnel.carrier.to_string(),
        });
        let tx = self.tunnel_tx.clone();
        let tunnel = tunnel
            .report_held(self.held_report.subscribe())
            .report_leaf(self.leaf_report.clone());
        self.tasks.spawn(
            async move {
                let result = tunnel.run(tunnel_stop, Some(tx)).await;
                Outcome::Ended { proxy_id, result }
            }
            .instrument(info_span!("tunnel")),
        );
    }

    /// Paces the next dial after one that held nothing.
    fn dial_failed(&mut self, error: TunnelError) {
        let (pool, now) = (self.pool, tokio::time::Instant::now());
        let count = |result: &str| {
            pool.config
                .metrics
                .dials
                .get_or_create(&label("result", result))
                .inc();
        };
        match error {
            TunnelError::AlreadyClaimed(id) => {
                count("duplicate");
                debug!(proxy = %id, "landed on a held proxy");
                // A load balancer that keeps choosing held proxies is slowed down against,
                // not hammered: the pause grows ×1.5 per repeat, up to 5 s.
                let pause = pool
                    .limits
                    .duplicate_jitter
                    .mul_f64(1.5f64.powi(self.duplicates.min(20) as i32))
                    .min(MAX_DUPLICATE_PAUSE);
                self.duplicates = self.duplicates.saturating_add(1);
                self.next_dial = now + jitter(pause);
            }
            TunnelError::Busy(hint) => {
                count("busy");
                debug!(?hint, "the proxy is busy");
                // Not a failure: the proxy is up and paces its handshakes.
                self.next_dial = now + pool.config.backoff.busy_delay(hint, self.busy);
                self.busy = self.busy.saturating_add(1);
            }
            e => {
                count("failed");
                warn!(error = %e, "could not open a tunnel");
                let backoff = &pool.config.backoff;
                let delay = if nothing_listens(&e) {
                    backoff.delay_after_refusal(self.failures)
                } else {
                    backoff.delay(self.failures)
                };
                self.next_dial = now + delay;
                self.last_error = Some(e.failure());
                self.failures = self.failures.saturating_add(1);
            }
        }
    }

    /// A tunnel ended: forget it, and what its proxy announced.
    fn ended(&mut self, proxy_id: String, result: Result<(), TunnelError>) {
        let reason = match &result {
            Ok(()) => "stopped".to_owned(),
            Err(e) => e.to_string(),
        };
        match &result {
            Ok(()) => {}
            // A rolling update: the proxy moved its agents on; routine.
            Err(TunnelError::Drained(why)) => {
                info!(proxy = %proxy_id, reason = %why, "the proxy drained the tunnel; dialling again");
            }
            Err(e) => warn!(proxy = %proxy_id, error = %e, "tunnel lost"),
        }
        self.held.remove(&proxy_id);
        self.pool.config.metrics.tunnels.dec();
        if self.announcements.remove(&proxy_id).is_some() {
            self.wanted = union(&self.announcements);
        }
        let _ = self.pool.events.send(AgentEvent::Disconnected { reason });
        let pause = tokio::time::Instant::now() + jitter(self.pool.limits.duplicate_jitter);
        self.next_dial = self.next_dial.max(pause);
    }

    /// A tunnel's event: a heartbeat (for the status), a drain, or the proxies it announces.
    pub(super) fn on_event(&mut self, event: TunnelEvent) {
        match event {
            TunnelEvent::Heartbeat { proxy_id } => {
                if let Some(h) = self.held.get_mut(&proxy_id) {
                    let now = SystemTime::now();
                    let stale = h.last_heartbeat.is_none_or(|t| {
                        now.duration_since(t).unwrap_or_default() >= HEARTBEAT_STATUS_GRANULARITY
                    });
                    if stale {
                        h.last_heartbeat = Some(now);
                    }
                }
            }
            TunnelEvent::Draining { proxy_id } => {
                // Not wanted less: once it closes, the pool redials, and the load balancer
                // leads to the replica's successor, or to it after a restart.
                if let Some(h) = self.held.get_mut(&proxy_id) {
                    h.state = TunnelState::Draining;
                }
            }
            // A tunnel's last events may still be queued when it has ended: a proxy that is
            // gone must not speak for the set again.
            TunnelEvent::Discovery { proxy_id, proxies } if self.held.contains_key(&proxy_id) => {
                debug!(from = %proxy_id, count = proxies.len(), "discovery");
                let announced: HashSet<String> = proxies.iter().map(|p| p.id.clone()).collect();
                self.announcements.insert(proxy_id, announced);
                let now_wanted = union(&self.announcements);
                if now_wanted != self.wanted {
                    let rejoin = self.pool.limits.rejoin_jitter;
                    if let Some(at) = rejoin_at(&self.wanted, &now_wanted, &self.held, rejoin) {
                        // The pause built up while it was gone no longer applies.
                        self.failures = 0;
                        self.next_dial = at;
                    }
                    self.duplicates = 0;
                    self.wanted = now_wanted;
                }
                self.pool.discovered(&mut self.known, proxies);
            }
            TunnelEvent::CaKeys(verdict) => {
                self.ca_keys = Some(CaKeysVerdict::fold(self.ca_keys.take(), verdict));
            }
            TunnelEvent::RootKeys(keys) => {
                self.root_keys = Some(RootKeys::newest(self.root_keys.take(), keys));
            }
            _ => {}
        }
    }

    /// Forgets proxies no longer announced, closing their tunnels.
    pub(super) fn on_expiry(&mut self) {
        let forget_after = self.pool.limits.forget_after;
        let (wanted, held) = (&self.wanted, &self.held);
        self.known.retain(|id, k| {
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

    /// After the stop: closes every tunnel and waits for every task.
    pub(super) async fn close(mut self) {
        for h in self.held.values() {
            h.stop.cancel();
        }
        while let Some(joined) = self.tasks.join_next().await {
            // A dial that completed after the stop: the proxy may already have sent a dial
            // through the new tunnel, so it leaves like the others rather than being dropped.
            if let Ok(Outcome::Dialled(Ok(tunnel))) = joined {
                let stop = self.stop.clone();
                self.tasks.spawn(async move {
                    let proxy_id = tunnel.proxy_id.clone();
                    let result = tunnel.run(stop, None).await;
                    Outcome::Ended { proxy_id, result }
                });
            }
        }
    }
}
