//! What an agent needs to run.

use std::sync::Arc;
use std::time::Duration;

use russh::keys::PublicKey;
use tokio::sync::watch;

use super::kube::KubeGateway;
use crate::admin::metrics::AgentMetrics;
use crate::egress::allow_list::AllowList;
use crate::egress::connect::Resolver;
use crate::identity::Identity;
use crate::protocol::control::CaKeySet;
use crate::protocol::{ClusterName, ProtocolVersion};
use crate::stream::StreamLimits;
use crate::transport::Route;

/// The allow-list an agent enforces: swapped in place when its spec changes (new dials see the
/// new list at once, tunnels stay up), and watched by the agent's report, so the root learns
/// the new list within a round trip rather than refusing, from its cached copy, what the
/// leaf now permits.
#[derive(Clone)]
pub struct LiveAllowList(Arc<watch::Sender<Arc<AllowList>>>);

impl LiveAllowList {
    /// A list holding `list`.
    pub fn new(list: AllowList) -> Self {
        Self(Arc::new(watch::Sender::new(Arc::new(list))))
    }

    /// The list now (a dial takes it once and judges by it throughout).
    pub fn current(&self) -> Arc<AllowList> {
        self.0.borrow().clone()
    }

    /// Replaces the list when `list` differs; whether it did.
    pub fn replace(&self, list: AllowList) -> bool {
        self.0.send_if_modified(|current| {
            let changed = **current != list;
            if changed {
                *current = Arc::new(list);
            }
            changed
        })
    }

    /// Sees every replacement.
    pub fn subscribe(&self) -> watch::Receiver<Arc<AllowList>> {
        self.0.subscribe()
    }
}

/// Reconnection pacing: exponential with full jitter, so a fleet of agents that lost their
/// proxy at once does not come back at once.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// First delay.
    pub initial: Duration,
    /// Cap on the delay. A successful connection resets the delay to `initial`.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(30),
        }
    }
}

/// The longest pause after a refused connection (nothing listens at the proxy's address).
///
/// A refused SYN costs the proxy's host one reset and nothing of the proxy, which is down or
/// restarting: retrying every few seconds brings a fleet back within seconds of the restart,
/// where the general cap (30 s) left the last agents of a 10,000-leaf proxy waiting up to 30 s
/// after it was up again (BENCHMARKS.md "Fleet"). A proxy that accepts and then fails, or that
/// does not answer at all, still backs the agent off to the general cap.
pub const REFUSED_MAX: Duration = Duration::from_secs(5);

/// How many busy answers in a row grow the pause after one (×1.25 each): a proxy that stays
/// busy is asked less often, up to about 6 times its own hint.
const BUSY_GROWTH_STEPS: i32 = 8;

impl Backoff {
    /// The delay before attempt `attempt` (0-based): uniform in [d/2, d] with
    /// d = min(max, initial × 2^attempt).
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_capped(attempt, self.max)
    }

    /// The delay before attempt `attempt` after a refused connection (nothing listens):
    /// [`delay`](Self::delay) capped at [`REFUSED_MAX`].
    pub fn delay_after_refusal(&self, attempt: u32) -> Duration {
        self.delay_capped(attempt, self.max.min(REFUSED_MAX))
    }

    /// The delay after the `streak`-th busy answer in a row (0-based) whose hint was `hint`:
    /// uniform in [d/2, d] with d = min(max, hint × 1.25^streak), so a refused fleet comes back
    /// spread over the hint instead of at once.
    pub fn busy_delay(&self, hint: Duration, streak: u32) -> Duration {
        let steps = streak.min(BUSY_GROWTH_STEPS as u32) as i32;
        jittered(hint.mul_f64(1.25f64.powi(steps)).min(self.max))
    }

    /// The delay before attempt `attempt` without jitter: min(max, initial × 2^attempt). The
    /// operator's reconcile retries use it as is (one object's retries need no spreading).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        self.exponential(attempt, self.max)
    }

    fn exponential(&self, attempt: u32, cap: Duration) -> Duration {
        self.initial
            .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
            .min(cap)
    }

    fn delay_capped(&self, attempt: u32, cap: Duration) -> Duration {
        jittered(self.exponential(attempt, cap))
    }
}

/// Uniform in [d/2, d].
fn jittered(d: Duration) -> Duration {
    let half = d / 2;
    half + half.mul_f64(rand::random::<f64>())
}

/// Configuration of one agent (one tunnel target).
#[derive(Clone)]
pub struct AgentConfig {
    /// This leaf cluster's name; the agent's certificate carries it.
    pub cluster: ClusterName,
    /// The root cluster's name; proxy host certificates must name it.
    pub root_cluster: ClusterName,
    /// The proxies' address (`host:port`), resolved again on every attempt so a changed
    /// load-balancer address is followed.
    pub proxy_addr: String,
    /// The agent's key and user certificate.
    pub identity: Arc<Identity>,
    /// CA keys trusted to sign the root's proxy host certificates.
    pub root_cas: Vec<PublicKey>,
    /// What the root may reach. Swappable: new dials see a new list at once, tunnels stay up.
    pub allow: LiveAllowList,
    /// The address `_apiserver` maps to (the leaf's Kubernetes API server); `None` refuses.
    pub api_server: Option<String>,
    /// The leaf's Kubernetes API as root callers get it (their mapping, and the agent's way to
    /// its API server); `None` refuses the root's Kubernetes requests.
    pub kube: Option<Arc<KubeGateway>>,
    /// Heartbeat interval asked of the proxy.
    pub heartbeat_interval: Duration,
    /// Timeout for connecting to the proxy and completing the handshake.
    pub connect_timeout: Duration,
    /// Timeout for connecting to a dialled target.
    pub dial_timeout: Duration,
    /// How dialled host names are resolved: the system resolver, or a fixed answer in tests
    /// that make a name resolve to chosen addresses (the allow-list judges every answer).
    pub resolver: Resolver,
    /// Reconnection pacing.
    pub backoff: Backoff,
    /// Flow control of each stream.
    pub stream: StreamLimits,
    /// Where the agent counts (its streams included): a process running many agents (the
    /// operator) hands them all one set.
    pub metrics: AgentMetrics,
    /// Who runs this agent (the leaf operator's pod, or the host): how the root tells the
    /// leaf's agents apart in its inventory.
    pub replica: String,
    /// The leaf's Kubernetes API server version, for the root's inventory; kept current by
    /// whoever knows it (the operator asks its API server). `None`: not known.
    pub kubernetes_version: watch::Receiver<Option<String>>,
    /// The control protocol version the agent speaks at most: this build's, or an older one
    /// of its major, as an agent of an earlier release would (tests of version skew).
    pub protocol: ProtocolVersion,
    /// The leaf's CA key set to publish to the root, signed by its CA (a rotation's step):
    /// every tunnel sends the newest to its proxy. `None`: nothing to publish.
    pub ca_keys: watch::Receiver<Option<Arc<CaKeySet>>>,
    /// How the proxy address is reached: directly, or through the leaf's forward proxy (a leaf
    /// often has no other way out).
    pub route: Route,
}

/// This host's name, the replica name of an agent that is given none: `$HOSTNAME` (a pod's
/// name), else the kernel's host name, else "agent".
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| crate::protocol::control::printable_name(h))
        .unwrap_or_else(|| "agent".to_owned())
}

impl AgentConfig {
    /// An agent of `cluster` dialling `proxy_addr` as `identity`, trusting `root_cas` to sign
    /// the proxies of `root_cluster`, the root allowed to reach `allow`; the rest at its
    /// default: 15 s heartbeats, 10 s to connect to the proxy and to a target, the system
    /// resolver, the default back-off and stream limits, counters of its own, no API server,
    /// the host's name as its replica, this build's protocol, a direct route.
    pub fn new(
        cluster: ClusterName,
        root_cluster: ClusterName,
        proxy_addr: impl Into<String>,
        identity: Arc<Identity>,
        root_cas: Vec<PublicKey>,
        allow: AllowList,
    ) -> Self {
        Self {
            cluster,
            root_cluster,
            proxy_addr: proxy_addr.into(),
            identity,
            root_cas,
            allow: LiveAllowList::new(allow),
            api_server: None,
            kube: None,
            heartbeat_interval: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(10),
            dial_timeout: Duration::from_secs(10),
            resolver: Resolver::default(),
            backoff: Backoff::default(),
            stream: StreamLimits::default(),
            metrics: AgentMetrics::default(),
            replica: host_name(),
            kubernetes_version: watch::channel(None).1,
            protocol: ProtocolVersion::CURRENT,
            ca_keys: watch::channel(None).1,
            route: Route::direct(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        for attempt in 0..40 {
            let d = b.delay(attempt);
            let cap = Duration::from_millis(100 << attempt.min(4)).min(Duration::from_secs(1));
            assert!(
                d >= cap / 2 && d <= cap,
                "attempt {attempt}: {d:?} vs {cap:?}"
            );
        }
    }

    #[test]
    fn a_refused_connection_is_retried_within_seconds() {
        let b = Backoff::default();
        for _ in 0..100 {
            let d = b.delay_after_refusal(30);
            assert!(d >= REFUSED_MAX / 2 && d <= REFUSED_MAX, "{d:?}");
            assert!(b.delay(30) >= b.max / 2);
        }
    }

    #[test]
    fn busy_answers_follow_the_hint_and_grow_slowly() {
        let b = Backoff::default();
        let hint = Duration::from_secs(2);
        for _ in 0..100 {
            let first = b.busy_delay(hint, 0);
            assert!(first >= hint / 2 && first <= hint, "{first:?}");
            let late = b.busy_delay(hint, 1000);
            let cap = hint.mul_f64(1.25f64.powi(BUSY_GROWTH_STEPS));
            assert!(late >= cap / 2 && late <= cap, "{late:?}");
        }
    }
}
