//! What an agent (or pool of agents) reports about its tunnels, for Kubernetes status, metrics
//! and tests. Plain data: no Kubernetes types here.

use std::time::SystemTime;

/// The state of the tunnel to one proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "PascalCase")]
pub enum TunnelState {
    /// Dialling, or waiting to redial after a failure.
    Connecting,
    /// Up: heartbeats flow, dials are served.
    Connected,
    /// The proxy asked the agent to leave (drain); a tunnel elsewhere replaces it.
    Draining,
}

/// One proxy the agent holds, or wants to hold, a tunnel to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProxyTunnelStatus {
    /// The proxy's ID, from its host certificate.
    pub proxy_id: String,
    /// Where the tunnel is.
    pub state: TunnelState,
    /// When the current tunnel came up.
    pub connected_since: Option<SystemTime>,
    /// When the proxy last answered a heartbeat.
    pub last_heartbeat: Option<SystemTime>,
}

/// The whole picture for one tunnel target (one proxy address).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PoolStatus {
    /// One entry per known proxy, sorted by ID.
    pub proxies: Vec<ProxyTunnelStatus>,
    /// How many proxies discovery says exist (at least 1 once any proxy answered).
    pub expected: usize,
    /// Whether any proxy has announced the set yet; until then `expected` is a guess.
    pub discovered: bool,
    /// The last error, if the latest attempt failed (for a condition message).
    pub last_error: Option<String>,
}

impl PoolStatus {
    /// Proxies with a live tunnel.
    pub fn connected(&self) -> usize {
        self.proxies
            .iter()
            .filter(|p| p.state == TunnelState::Connected)
            .count()
    }
}
