//! What an agent needs to run.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use russh::keys::PublicKey;

use super::allow_list::AllowList;
use super::connect::Resolver;
use crate::identity::Identity;
use crate::protocol::ClusterName;
use crate::stream::StreamLimits;

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

impl Backoff {
    /// The delay before attempt `attempt` (0-based): uniform in [d/2, d] with
    /// d = min(max, initial × 2^attempt).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .initial
            .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
            .min(self.max);
        let half = exp / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
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
    pub allow: Arc<ArcSwap<AllowList>>,
    /// The address `_apiserver` maps to (the leaf's Kubernetes API server); `None` refuses.
    pub api_server: Option<String>,
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
}
