//! State shared by every reconcile: the Kubernetes client, the Event recorder, and the
//! registry of running tunnels (the operator's in-memory "actual state" that reconciles move
//! towards the spec).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kube::runtime::events::Reporter;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::crd::ReverseTunnel;
use super::events::EventPublisher;
use super::resolve::Desired;
use super::root_keys::RootCaWriter;
use super::status::{Problem, SpecState, StatusWriter};
use crate::admin::metrics::OperatorMetrics;
use crate::agent::status::PoolStatus;
use crate::agent::{Agent, AgentConfig, LiveAllowList};
use crate::egress::allow_list::AllowList;
use crate::operator::controller::Backoffs;
use crate::protocol::control::CaKeySet;

/// How long stopping a tunnel waits for its tasks before leaving them to finish alone: the
/// agent's own grace for streams in flight ([`crate::agent::tunnel::LEAVE_GRACE`]) and 5 s.
const STOP_GRACE: Duration =
    crate::agent::tunnel::LEAVE_GRACE.saturating_add(Duration::from_secs(5));

/// The registry key: one entry per `ReverseTunnel` object.
pub type TunnelKey = ObjectRef<ReverseTunnel>;

/// The longest a replaced agent keeps its tunnels while its successor connects: long enough
/// for a successor to reach every proxy (each dial is bounded by the agent's 10 s connect
/// timeout), short enough that a successor that cannot connect (a refused identity) does not
/// keep the old settings alive for long.
const HANDOVER_LIMIT: Duration = Duration::from_secs(30);

/// One agent task and how to stop it.
struct AgentHandle {
    fingerprint: u64,
    /// Stops the agent; a child of its tunnel's `stop`, so removing the tunnel stops it too.
    stop: CancellationToken,
    /// Cancelled when a successor takes over: this agent's status is no longer published.
    mute: CancellationToken,
    /// This agent's own status, which a successor waits on in a handover.
    status: watch::Receiver<PoolStatus>,
    task: JoinHandle<()>,
}

/// What runs for one `ReverseTunnel`: its agent (when the spec is usable) and the task that
/// writes its status.
pub struct RunningTunnel {
    agent: Option<AgentHandle>,
    /// Agents replaced by `agent` that keep their tunnels until it holds as many (see
    /// [`hand_over`]): how to stop each at once (a spec gone bad fails closed) and its task.
    retiring: Vec<(CancellationToken, JoinHandle<()>)>,
    /// The allow-list every agent of this tunnel reads; edits are stored here, in place.
    allow: LiveAllowList,
    /// The leaf CA key set every agent of this tunnel publishes; changed in place.
    ca_keys: watch::Sender<Option<Arc<CaKeySet>>>,
    /// Numbers the handovers, so each one's end is told from another's.
    handovers: u64,
    /// What the status writer reports of the spec; shared with the handovers, which mark
    /// their end in it.
    spec: Arc<watch::Sender<SpecState>>,
    pool: Arc<watch::Sender<Option<PoolStatus>>>,
    /// The Secret the spec names as the root's CA, which [`RootCaWriter`] keeps.
    root_ca_secret: watch::Sender<String>,
    stop: CancellationToken,
    status_task: JoinHandle<()>,
    /// Keeps the root CA Secret in step with the keys the root announces.
    root_ca_task: JoinHandle<()>,
}

/// Tasks of stopped tunnels or agents, to await outside the registry lock.
#[derive(Default)]
#[must_use = "await the stopped tasks with Stopped::join"]
pub struct Stopped(Vec<JoinHandle<()>>);

impl Stopped {
    /// Waits (briefly) for the stopped tasks, so a deleted tunnel is really closed before the
    /// finalizer goes.
    pub async fn join(self) {
        for task in self.0 {
            if tokio::time::timeout(STOP_GRACE, task).await.is_err() {
                warn!("a stopped tunnel task did not finish in time");
            }
        }
    }
}

/// Shared by all reconciles of one controller run, through an `Arc`.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Publishes Events on `ReverseTunnel` objects.
    pub recorder: Arc<EventPublisher>,
    /// Where the controllers and every agent count.
    pub metrics: OperatorMetrics,
    tunnels: Mutex<HashMap<TunnelKey, RunningTunnel>>,
    /// Failed reconciles per tunnel, for the retry delay.
    pub failures: Backoffs<TunnelKey>,
    /// This replica's identity: the key of its entry in each tunnel's `status.replicas`.
    replica: String,
    /// Moves when this replica's Lease was renewed after it may have expired, so every status
    /// writer writes its entry again ([`super::liveness::ReplicaLease::run`]).
    epoch: watch::Receiver<u64>,
    /// How agents reach this cluster's API server for the root's Kubernetes requests.
    pub kube_upstream: Option<Arc<crate::agent::kube::KubeUpstream>>,
    /// The API server's version, which every agent reports to the root.
    kubernetes_version: watch::Receiver<Option<String>>,
    /// How every agent and join reaches its root (directly, or the leaf's forward proxy).
    pub route: crate::transport::Route,
    /// When each leaf CA key set this replica signs is issued: always after the last one.
    pub key_set_clock: KeySetClock,
}

/// Issue times of the leaf CA key sets this replica signs, per TrustedCluster.
///
/// The root applies a key set only if it was issued after the one it holds (seconds), so a
/// replay cannot take a leaf back. A reconcile reads its TrustedCluster from a cache that may
/// not hold its own last status write yet; from that stale status, the set published last
/// looked older than it was, and a rotation whose phases ran within one second signed a new
/// set with the same issue time as the one the root had just applied, refused for good
/// (tests/ca_rotation.rs failed so in CI). Remembering what was issued keeps the times rising
/// whatever the cache says.
#[derive(Default)]
pub struct KeySetClock(Mutex<HashMap<String, u64>>);

impl KeySetClock {
    /// The issue time of a new key set for `owner` (namespace/name): now, but after
    /// `published` (the last set its status shows) and after every set issued here for it.
    pub fn next(&self, owner: &str, published: Option<u64>) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut issued = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let last = issued.entry(owner.to_owned()).or_default();
        *last = now
            .max(published.map_or(0, |p| p.saturating_add(1)))
            .max(last.saturating_add(1));
        *last
    }
}

impl Context {
    /// A context with an empty registry; `replica` names this replica in Events, in the
    /// status entries it writes (again whenever `epoch` moves) and in its agents' reports,
    /// which carry `kubernetes_version`.
    pub fn new(
        client: Client,
        replica: String,
        epoch: watch::Receiver<u64>,
        metrics: OperatorMetrics,
        kube_upstream: Option<Arc<crate::agent::kube::KubeUpstream>>,
        kubernetes_version: watch::Receiver<Option<String>>,
        route: crate::transport::Route,
    ) -> Self {
        let reporter = Reporter {
            controller: super::FIELD_MANAGER.to_owned(),
            instance: Some(replica.clone()),
        };
        Self {
            recorder: Arc::new(EventPublisher::new(client.clone(), reporter)),
            metrics,
            client,
            tunnels: Mutex::default(),
            failures: Backoffs::default(),
            replica,
            epoch,
            kube_upstream,
            kubernetes_version,
            route,
            key_set_clock: KeySetClock::default(),
        }
    }

    fn tunnels(&self) -> MutexGuard<'_, HashMap<TunnelKey, RunningTunnel>> {
        self.tunnels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether an agent runs for `key` (for tests and metrics).
    pub fn is_running(&self, key: &TunnelKey) -> bool {
        self.tunnels().get(key).is_some_and(|t| t.agent.is_some())
    }

    /// Whether anything runs for `key` (an agent, or a status task reporting a problem).
    pub fn is_known(&self, key: &TunnelKey) -> bool {
        self.tunnels().contains_key(key)
    }

    /// The registry entry of `rt`, created (with its status task) if missing.
    fn entry<'a>(
        &self,
        tunnels: &'a mut HashMap<TunnelKey, RunningTunnel>,
        rt: &ReverseTunnel,
    ) -> &'a mut RunningTunnel {
        let key = ObjectRef::from_obj(rt);
        tunnels.entry(key).or_insert_with(|| {
            let namespace = rt.namespace().unwrap_or_default();
            let (spec_tx, spec_rx) = watch::channel(SpecState::default());
            let (pool_tx, pool_rx) = watch::channel(None);
            let stop = CancellationToken::new();
            let writer = StatusWriter {
                api: Api::namespaced(self.client.clone(), &namespace),
                name: rt.name_any(),
                replica: self.replica.clone(),
                epoch: self.epoch.clone(),
            };
            let (root_ca_secret, name) = watch::channel(rt.spec.root_ca_secret_ref.name.clone());
            let root_ca_writer = RootCaWriter {
                api: Api::namespaced(self.client.clone(), &namespace),
                name,
            };
            let root_ca_task = tokio::spawn(root_ca_writer.run(pool_tx.subscribe(), stop.clone()));
            let status_task = tokio::spawn(writer.run(spec_rx, pool_rx, stop.clone()));
            RunningTunnel {
                root_ca_secret,
                root_ca_task,
                agent: None,
                retiring: Vec::new(),
                allow: LiveAllowList::new(AllowList::default()),
                ca_keys: watch::channel(None).0,
                handovers: 0,
                spec: Arc::new(spec_tx),
                pool: Arc::new(pool_tx),
                stop,
                status_task,
            }
        })
    }

    /// Makes the running agent of `rt` match `desired`: starts it, hands over to a new one
    /// when the connection settings changed (the old one stops once the new one holds its
    /// tunnels: [`hand_over`]), and swaps a changed allow-list in place.
    pub fn ensure_running(&self, rt: &ReverseTunnel, desired: Desired) {
        let mut tunnels = self.tunnels();
        let tunnel = self.entry(&mut tunnels, rt);
        let root_ca_secret = &rt.spec.root_ca_secret_ref.name;
        tunnel.root_ca_secret.send_if_modified(|name| {
            let changed = name != root_ca_secret;
            name.clone_from(root_ca_secret);
            changed
        });
        let rules = desired.allow.rules().len();
        if tunnel.allow.replace(desired.allow) {
            info!(name = %rt.name_any(), rules, "allow-list updated in place");
        }
        tunnel.ca_keys.send_if_modified(|keys| {
            let changed = *keys != desired.ca_keys;
            keys.clone_from(&desired.ca_keys);
            changed
        });
        let current = tunnel.agent.as_ref().map(|a| a.fingerprint);
        let mut handover = None;
        if current != Some(desired.fingerprint) {
            let mut config = desired.config;
            config.allow = tunnel.allow.clone();
            config.ca_keys = tunnel.ca_keys.subscribe();
            config.metrics = self.metrics.agents.clone();
            config.replica = self.replica.clone();
            config.kubernetes_version = self.kubernetes_version.clone();
            let successor = start_agent(
                config,
                desired.fingerprint,
                tunnel.pool.clone(),
                tunnel.stop.child_token(),
            );
            let ready = successor.status.clone();
            if let Some(old) = tunnel.agent.replace(successor) {
                info!(name = %rt.name_any(), "connection settings changed; the new agent takes over once it holds as many tunnels");
                old.mute.cancel();
                tunnel.retiring.retain(|(_, task)| !task.is_finished());
                tunnel.handovers += 1;
                let number = tunnel.handovers;
                handover = Some(number);
                let stop = old.stop.clone();
                let ended = Handover {
                    number,
                    spec: tunnel.spec.clone(),
                };
                tunnel
                    .retiring
                    .push((stop, tokio::spawn(hand_over(old, ready, ended))));
            }
        }
        tunnel.spec.send_if_modified(|s| {
            let mut next = SpecState {
                generation: rt.metadata.generation,
                problem: None,
                identity_ca: Some(desired.identity_ca),
                handovers: std::mem::take(&mut s.handovers),
            };
            next.handovers.extend(handover);
            let changed = *s != next;
            *s = next;
            changed
        });
    }

    /// Stops the agent of `rt` (fail closed) and reports `problem` in its status.
    pub fn ensure_failed(&self, rt: &ReverseTunnel, problem: Problem) -> Stopped {
        let mut tunnels = self.tunnels();
        let tunnel = self.entry(&mut tunnels, rt);
        let mut stopped = Stopped::default();
        if let Some(old) = tunnel.agent.take() {
            warn!(name = %rt.name_any(), reason = problem.reason, "stopping the agent: {}", problem.message);
            old.stop.cancel();
            stopped.0.push(old.task);
        }
        for (stop, task) in tunnel.retiring.drain(..) {
            stop.cancel();
            stopped.0.push(task);
        }
        tunnel.pool.send_replace(None);
        tunnel.spec.send_if_modified(|s| {
            let next = SpecState {
                generation: rt.metadata.generation,
                problem: Some(problem),
                ..SpecState::default()
            };
            let changed = *s != next;
            *s = next;
            changed
        });
        stopped
    }

    /// Stops everything running for `key` and forgets it (deletion, malformed object).
    pub fn remove(&self, key: &TunnelKey) -> Stopped {
        let removed = self.tunnels().remove(key);
        self.failures.succeeded(key);
        let mut stopped = Stopped::default();
        if let Some(tunnel) = removed {
            stop_tunnel(tunnel, &mut stopped);
        }
        stopped
    }

    /// Stops what runs for every tunnel not in `live` (objects deleted while the watch was
    /// away: a relist shows them gone without a delete event).
    pub fn retain(&self, live: &std::collections::HashSet<TunnelKey>) -> Stopped {
        let gone: Vec<TunnelKey> = self
            .tunnels()
            .keys()
            .filter(|k| !live.contains(*k))
            .cloned()
            .collect();
        let mut stopped = Stopped::default();
        for key in gone {
            stopped.0.extend(self.remove(&key).0);
        }
        stopped
    }

    /// Stops every tunnel (shutdown). Objects keep their finalizers and the other replicas'
    /// agents keep carrying them.
    pub fn remove_all(&self) -> Stopped {
        let all: Vec<RunningTunnel> = self.tunnels().drain().map(|(_, t)| t).collect();
        let mut stopped = Stopped::default();
        for tunnel in all {
            stop_tunnel(tunnel, &mut stopped);
        }
        stopped
    }
}

fn stop_tunnel(tunnel: RunningTunnel, stopped: &mut Stopped) {
    // Every agent's token is a child of this one: the current and the retiring stop.
    tunnel.stop.cancel();
    if let Some(agent) = tunnel.agent {
        stopped.0.push(agent.task);
    }
    stopped
        .0
        .extend(tunnel.retiring.into_iter().map(|(_, task)| task));
    stopped.0.push(tunnel.status_task);
    stopped.0.push(tunnel.root_ca_task);
}

/// Lets `old` keep its tunnels until its successor, whose status is `successor`, holds as
/// many as it did (or [`HANDOVER_LIMIT`] passes), then stops it: new settings (a renewed or
/// re-issued certificate, a new root CA, another address) never leave the leaf without a
/// tunnel, even with one operator replica. Stopping, `old` leaves as on any stop: the proxy
/// sends its dials to the successor's tunnels and closes the old ones once their streams end.
/// One handover, to mark its end in the status writer's spec.
struct Handover {
    number: u64,
    spec: Arc<watch::Sender<SpecState>>,
}

impl Drop for Handover {
    /// The old agent is gone (or abandoned): its identity no longer holds tunnels.
    fn drop(&mut self) {
        self.spec
            .send_if_modified(|s| s.handovers.remove(&self.number));
    }
}

async fn hand_over(old: AgentHandle, mut successor: watch::Receiver<PoolStatus>, _ended: Handover) {
    let held = old.status.borrow().connected().max(1);
    let ready = successor.wait_for(|s| s.connected() >= held);
    tokio::select! {
        _ = tokio::time::timeout(HANDOVER_LIMIT, ready) => {}
        () = old.stop.cancelled() => {}
    }
    old.stop.cancel();
    if tokio::time::timeout(STOP_GRACE, old.task).await.is_err() {
        warn!("a replaced agent did not finish in time");
    }
}

/// Runs an agent until `stop` is cancelled, folding its status into `pool` until it is muted.
fn start_agent(
    config: AgentConfig,
    fingerprint: u64,
    pool: Arc<watch::Sender<Option<PoolStatus>>>,
    stop: CancellationToken,
) -> AgentHandle {
    let agent = Agent::new(config);
    let own_status = agent.status();
    let mut status = agent.status();
    let mute = CancellationToken::new();
    pool.send_replace(None);
    let task = tokio::spawn({
        let (stop, mute) = (stop.clone(), mute.clone());
        async move {
            let run = agent.run(stop.clone());
            tokio::pin!(run);
            loop {
                tokio::select! {
                    biased;
                    () = &mut run => break,
                    changed = status.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        if !stop.is_cancelled() && !mute.is_cancelled() {
                            let latest = status.borrow_and_update().clone();
                            pool.send_if_modified(|p| {
                                let changed = p.as_ref() != Some(&latest);
                                *p = Some(latest);
                                changed
                            });
                        }
                    }
                }
            }
        }
    });
    AgentHandle {
        fingerprint,
        stop,
        mute,
        status: own_status,
        task,
    }
}

#[cfg(test)]
mod tests {
    use super::KeySetClock;

    #[test]
    fn key_sets_are_issued_in_order_whatever_a_stale_status_says() {
        let clock = KeySetClock::default();
        let first = clock.next("leaf/to-root", None);
        // Within the same second, from a status that does not show `first` yet.
        let second = clock.next("leaf/to-root", None);
        assert!(second > first, "{second} after {first}");
        assert!(clock.next("leaf/to-root", Some(first)) > second);
        // A published set from the future (another replica's clock) is passed too.
        assert_eq!(clock.next("leaf/to-root", Some(u64::MAX - 1)), u64::MAX);
        // And nothing overflows at the end of time.
        assert_eq!(clock.next("leaf/to-root", Some(u64::MAX)), u64::MAX);
        // Each TrustedCluster has its own order.
        assert!(clock.next("other/to-root", None) <= second);
    }
}
