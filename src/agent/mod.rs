//! The leaf side: agents that dial out to the root's proxies and serve dials through them.
//!
//! An [`Agent`] keeps tunnels to a proxy address alive: each [`Tunnel`] verifies the proxy's
//! host certificate, authenticates with the agent's own, keeps heartbeats and serves dials; the
//! [`pool::Pool`] holds one tunnel per proxy that discovery announces and reconnects with
//! jittered exponential backoff whenever one fails (the seed's `Agent` and `AgentPool`).

pub mod claims;
pub mod config;
mod error;
mod handler;
pub mod join;
pub mod kube;
pub mod pool;
pub mod report;
pub mod status;
pub mod tunnel;

use std::sync::Arc;

use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

pub use config::{AgentConfig, Backoff, LiveAllowList};
pub use error::TunnelError;
pub use pool::PoolLimits;
pub use status::{PoolStatus, ProxyTunnelStatus, TunnelState};
pub use tunnel::{Tunnel, TunnelEvent};

/// An agent's state changes, for logs, status and tests (the seed's `ConnectedEvent`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// Dialling the proxy address.
    Connecting,
    /// A tunnel to this proxy is up, over `carrier` (`ssh`, `tls-alpn`, `tls-websocket`,
    /// `websocket`: what the root address and the load balancer in front led to).
    Connected { proxy_id: String, carrier: String },
    /// The tunnel failed or closed; a reconnect follows unless the agent is closing.
    Disconnected { reason: String },
    /// The agent has stopped for good.
    Closed,
}

/// An agent for one tunnel target: a [`pool::Pool`] that holds a tunnel to every proxy the
/// target's load balancer leads to.
pub struct Agent {
    pool: pool::Pool,
    /// The agent's counters, for `/metrics` (registered when asked: an operator runs a
    /// thousand agents and exports their shared set itself).
    metrics: crate::admin::metrics::AgentMetrics,
}

impl Agent {
    /// An agent with `config` and default pacing; nothing runs until [`Agent::run`].
    pub fn new(config: AgentConfig) -> Self {
        Self::with_limits(config, pool::PoolLimits::default())
    }

    /// An agent with explicit pool pacing.
    pub fn with_limits(config: AgentConfig, limits: pool::PoolLimits) -> Self {
        Self {
            metrics: config.metrics.clone(),
            pool: pool::Pool::new(Arc::new(config), limits),
        }
    }

    /// Subscribes to state changes.
    pub fn events(&self) -> broadcast::Receiver<AgentEvent> {
        self.pool.events()
    }

    /// The tunnels held, per proxy; updated on every change.
    pub fn status(&self) -> watch::Receiver<PoolStatus> {
        self.pool.status()
    }

    /// Connections made to the target so far.
    pub fn attempts(&self) -> u64 {
        self.pool.attempts()
    }

    /// Runs until `stop` is cancelled.
    pub async fn run(&self, stop: CancellationToken) {
        self.pool.run(stop).await
    }
}

impl crate::admin::Component for Agent {
    fn ready(&self) -> bool {
        self.pool.status().borrow().connected() > 0
    }

    fn status(&self) -> serde_json::Value {
        serde_json::to_value(&*self.pool.status().borrow()).unwrap_or_default()
    }

    fn metrics(&self) -> String {
        crate::admin::metrics::MetricsRegistry::default()
            .agent(&self.metrics)
            .encode()
    }
}
