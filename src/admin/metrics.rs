//! Prometheus metrics, as handles: each component (a proxy, an agent's side of a process, the
//! operator's controllers, the streams either side carries) gets its own set at construction
//! and counts into it; the process registers the sets it runs into one [`MetricsRegistry`],
//! which `/metrics` encodes. So a proxy exports proxy series only, and two proxies in one
//! process (tests, the demo) count apart.
//!
//! Label values are bounded: sites are clusters in the trust store, outcomes and reasons are
//! fixed sets, directions are two. Nothing is labelled by address, stream or proxy ID.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// One label, with a static name.
pub type Labels = Vec<(&'static str, String)>;

/// A one-label set.
pub fn label(name: &'static str, value: impl Into<String>) -> Labels {
    vec![(name, value.into())]
}

/// A proxy's series (`tether_proxy_*`).
#[derive(Debug, Clone, Default)]
pub struct ProxyMetrics {
    /// Tunnels held, per site.
    pub tunnels: Family<Labels, Gauge>,
    /// Dials by outcome (`ok` or a dial error kind).
    pub dials: Family<Labels, Counter>,
    /// Connections refused at the door, by reason.
    pub refused: Family<Labels, Counter>,
    /// Heartbeats received.
    pub heartbeats: Counter,
    /// Connections held now (authenticated or not), against `--max-connections`.
    pub connections: Gauge,
    /// SSH handshakes in flight now, against `--max-handshakes`.
    pub handshakes: Gauge,
    /// The most handshakes ever in flight at once; after a reconnect storm it shows whether
    /// the limit held and how close the storm came.
    pub handshakes_peak: Gauge,
    /// Join exchanges served, by outcome (`joined` or a refusal reason: a fixed set).
    pub joins: Family<Labels, Counter>,
    /// Kubernetes API requests through the root, by decision (`ok`, or why the root refused
    /// or failed: a fixed set; what the leaf answered is in the audit record).
    pub kube_requests: Family<Labels, Counter>,
    /// Connection tasks that panicked: always a bug (the log says where); counted so that an
    /// alert, and a test, can see one that the process survived.
    pub connection_panics: Counter,
}

impl ProxyMetrics {
    fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("proxy");
        r.register("tunnels", "Tunnels held, per site", self.tunnels.clone());
        r.register("dials", "Dials by outcome", self.dials.clone());
        r.register(
            "connection_panics",
            "Connection tasks that panicked (a bug; the log says where)",
            self.connection_panics.clone(),
        );
        r.register(
            "refused_connections",
            "Connections refused by the limits, by reason",
            self.refused.clone(),
        );
        r.register(
            "heartbeats",
            "Heartbeats received from agents",
            self.heartbeats.clone(),
        );
        r.register(
            "connections",
            "Connections held, authenticated or not",
            self.connections.clone(),
        );
        r.register(
            "handshakes_in_flight",
            "SSH handshakes in flight",
            self.handshakes.clone(),
        );
        r.register(
            "handshakes_in_flight_max",
            "The most SSH handshakes ever in flight at once",
            self.handshakes_peak.clone(),
        );
        r.register("joins", "Join exchanges, by outcome", self.joins.clone());
        r.register(
            "kube_requests",
            "Kubernetes API requests through the root, by decision",
            self.kube_requests.clone(),
        );
    }
}

/// The series of the streams one side carries (`tether_stream_bytes`, `tether_streams_open`).
#[derive(Debug, Clone, Default)]
pub struct StreamMetrics {
    /// Bytes carried by tunnel streams, by direction (`in` from the tunnel, `out` to it).
    pub bytes: Family<Labels, Counter>,
    /// Tunnel streams open now.
    pub open: Gauge,
}

impl StreamMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "stream_bytes",
            "Bytes carried by tunnel streams, by direction",
            self.bytes.clone(),
        );
        registry.register("streams_open", "Tunnel streams open", self.open.clone());
    }
}

/// An agent's series (`tether_agent_*`); the operator's agents share one set.
#[derive(Debug, Clone)]
pub struct AgentMetrics {
    /// Tunnels held now.
    pub tunnels: Gauge,
    /// Connections made to the proxies' address, by result (`connected`, `duplicate`, `busy`,
    /// `failed`).
    pub dials: Family<Labels, Counter>,
    /// Heartbeat round-trip time, seconds.
    pub heartbeat_rtt: Histogram,
    /// Dials served for the proxy, by outcome.
    pub served: Family<Labels, Counter>,
    /// Proxies the agent was told of but holds no tunnel to.
    pub proxies_missing: Gauge,
    /// Time from the moment a proxy was missing until the agent held every announced proxy.
    pub convergence: Histogram,
    /// The streams the agents carry.
    pub streams: StreamMetrics,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self {
            tunnels: Gauge::default(),
            dials: Family::default(),
            heartbeat_rtt: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            served: Family::default(),
            proxies_missing: Gauge::default(),
            convergence: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            streams: StreamMetrics::default(),
        }
    }
}

impl AgentMetrics {
    fn register(&self, registry: &mut Registry) {
        self.streams.register(registry);
        let r = registry.sub_registry_with_prefix("agent");
        r.register("tunnels", "Tunnels the agent holds", self.tunnels.clone());
        r.register(
            "dials",
            "Connections to the proxies' address, by result",
            self.dials.clone(),
        );
        r.register(
            "heartbeat_rtt_seconds",
            "Heartbeat round-trip time",
            self.heartbeat_rtt.clone(),
        );
        r.register(
            "served_dials",
            "Dials served for the proxy, by outcome",
            self.served.clone(),
        );
        r.register(
            "proxies_missing",
            "Announced proxies the agent holds no tunnel to",
            self.proxies_missing.clone(),
        );
        r.register(
            "convergence_seconds",
            "Time until the agent held a tunnel to every announced proxy again",
            self.convergence.clone(),
        );
    }
}

/// The operator's series: its controllers' (`tether_operator_*`) and its agents'.
#[derive(Debug, Clone)]
pub struct OperatorMetrics {
    /// The agents the operator runs, all of them together.
    pub agents: AgentMetrics,
    /// Reconciles, by controller and result (`ok`, `error`).
    pub reconciles: Family<Labels, Counter>,
    /// Reconcile durations, by controller.
    pub reconcile_duration: Family<Labels, Histogram, fn() -> Histogram>,
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        Self {
            agents: AgentMetrics::default(),
            reconciles: Family::default(),
            reconcile_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 16))
            }),
        }
    }
}

impl OperatorMetrics {
    fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("operator");
        r.register(
            "reconciles",
            "Reconciles, by controller and result",
            self.reconciles.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Reconcile durations, by controller",
            self.reconcile_duration.clone(),
        );
    }
}

/// The metrics one process exports: the sets of the components it runs, under `tether_`.
#[derive(Debug)]
pub struct MetricsRegistry {
    registry: Registry,
}

impl Default for MetricsRegistry {
    fn default() -> Self {
        Self {
            registry: Registry::with_prefix("tether"),
        }
    }
}

impl MetricsRegistry {
    /// Exports a proxy's series (and those of the streams it carries).
    pub fn proxy(mut self, proxy: &ProxyMetrics, streams: &StreamMetrics) -> Self {
        proxy.register(&mut self.registry);
        streams.register(&mut self.registry);
        self
    }

    /// Exports an agent's series, its streams' included.
    pub fn agent(mut self, agent: &AgentMetrics) -> Self {
        agent.register(&mut self.registry);
        self
    }

    /// Exports the operator controllers' series, and those of the agents it runs.
    pub fn operator(mut self, operator: &OperatorMetrics) -> Self {
        operator.agents.register(&mut self.registry);
        operator.register(&mut self.registry);
        self
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
