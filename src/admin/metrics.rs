//! Prometheus metrics, one registry per process.
//!
//! Label values are bounded: sites are clusters in the trust store, outcomes and reasons are
//! fixed sets, directions are two. Nothing is labelled by address, stream or proxy ID.

use std::sync::LazyLock;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// One label, with a static name.
pub type Labels = Vec<(&'static str, String)>;

/// Every metric Tether exports.
pub struct Metrics {
    registry: Registry,
    /// Proxy: tunnels held per site.
    pub proxy_tunnels: Family<Labels, Gauge>,
    /// Proxy: dials by outcome (`ok` or a dial error kind).
    pub proxy_dials: Family<Labels, Counter>,
    /// Proxy: connections refused at the door, by reason.
    pub proxy_refused: Family<Labels, Counter>,
    /// Proxy: heartbeats received.
    pub proxy_heartbeats: Counter,
    /// Proxy: connections held now (authenticated or not), against `--max-connections`.
    pub proxy_connections: Gauge,
    /// Proxy: SSH handshakes in flight now, against `--max-handshakes`.
    pub proxy_handshakes: Gauge,
    /// Proxy: the most handshakes ever in flight at once; after a reconnect storm it shows
    /// whether the limit held and how close the storm came.
    pub proxy_handshakes_peak: Gauge,
    /// Both: bytes carried by tunnel streams, by direction (`in` from the tunnel, `out` to it).
    pub stream_bytes: Family<Labels, Counter>,
    /// Both: tunnel streams open now.
    pub streams_open: Gauge,
    /// Agent: tunnels held now.
    pub agent_tunnels: Gauge,
    /// Agent: connections made to the proxies' address, by result (`connected`, `duplicate`,
    /// `busy`, `failed`).
    pub agent_dials: Family<Labels, Counter>,
    /// Agent: heartbeat round-trip time, seconds.
    pub agent_heartbeat_rtt: Histogram,
    /// Agent: dials served for the proxy, by outcome.
    pub agent_served: Family<Labels, Counter>,
    /// Proxies the agent was told of but holds no tunnel to.
    pub agent_proxies_missing: Gauge,
    /// Time from the moment a proxy was missing until the agent held every announced proxy.
    pub agent_convergence: Histogram,
    /// Join exchanges served, by outcome (`joined` or a refusal reason: a fixed set).
    pub proxy_joins: Family<Labels, Counter>,
    /// Reconciles, by controller and result (`ok`, `error`).
    pub operator_reconciles: Family<Labels, Counter>,
    /// Reconcile durations, by controller.
    pub operator_reconcile_duration: Family<Labels, Histogram, fn() -> Histogram>,
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("tether");
        let m = Metrics {
            proxy_tunnels: Family::default(),
            proxy_dials: Family::default(),
            proxy_refused: Family::default(),
            proxy_heartbeats: Counter::default(),
            proxy_connections: Gauge::default(),
            proxy_handshakes: Gauge::default(),
            proxy_handshakes_peak: Gauge::default(),
            stream_bytes: Family::default(),
            streams_open: Gauge::default(),
            agent_tunnels: Gauge::default(),
            agent_dials: Family::default(),
            agent_heartbeat_rtt: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            agent_served: Family::default(),
            agent_proxies_missing: Gauge::default(),
            agent_convergence: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            proxy_joins: Family::default(),
            operator_reconciles: Family::default(),
            operator_reconcile_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 16))
            }),
            registry: Registry::default(),
        };
        registry.register(
            "proxy_tunnels",
            "Tunnels held, per site",
            m.proxy_tunnels.clone(),
        );
        registry.register("proxy_dials", "Dials by outcome", m.proxy_dials.clone());
        registry.register(
            "proxy_refused_connections",
            "Connections refused by the limits, by reason",
            m.proxy_refused.clone(),
        );
        registry.register(
            "proxy_heartbeats",
            "Heartbeats received from agents",
            m.proxy_heartbeats.clone(),
        );
        registry.register(
            "proxy_connections",
            "Connections held, authenticated or not",
            m.proxy_connections.clone(),
        );
        registry.register(
            "proxy_handshakes_in_flight",
            "SSH handshakes in flight",
            m.proxy_handshakes.clone(),
        );
        registry.register(
            "proxy_handshakes_in_flight_max",
            "The most SSH handshakes ever in flight at once",
            m.proxy_handshakes_peak.clone(),
        );
        registry.register(
            "stream_bytes",
            "Bytes carried by tunnel streams, by direction",
            m.stream_bytes.clone(),
        );
        registry.register(
            "streams_open",
            "Tunnel streams open",
            m.streams_open.clone(),
        );
        registry.register(
            "agent_tunnels",
            "Tunnels the agent holds",
            m.agent_tunnels.clone(),
        );
        registry.register(
            "agent_dials",
            "Connections to the proxies' address, by result",
            m.agent_dials.clone(),
        );
        registry.register(
            "agent_heartbeat_rtt_seconds",
            "Heartbeat round-trip time",
            m.agent_heartbeat_rtt.clone(),
        );
        registry.register(
            "agent_served_dials",
            "Dials served for the proxy, by outcome",
            m.agent_served.clone(),
        );
        registry.register(
            "agent_proxies_missing",
            "Announced proxies the agent holds no tunnel to",
            m.agent_proxies_missing.clone(),
        );
        registry.register(
            "agent_convergence_seconds",
            "Time until the agent held a tunnel to every announced proxy again",
            m.agent_convergence.clone(),
        );
        registry.register(
            "proxy_joins",
            "Join exchanges, by outcome",
            m.proxy_joins.clone(),
        );
        registry.register(
            "operator_reconciles",
            "Reconciles, by controller and result",
            m.operator_reconciles.clone(),
        );
        registry.register(
            "operator_reconcile_duration_seconds",
            "Reconcile durations, by controller",
            m.operator_reconcile_duration.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// A one-label set.
pub fn label(name: &'static str, value: impl Into<String>) -> Labels {
    vec![(name, value.into())]
}
