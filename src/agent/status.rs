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
    /// What carries the tunnel (`ssh`, `tls-alpn`, `tls-websocket`, `websocket`): whether a
    /// load balancer in front of the root's TLS port made the agent fall back to WebSocket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub carrier: Option<crate::transport::Used>,
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
    /// Why the latest attempt failed, if it did (for the condition's reason and message).
    pub last_error: Option<TunnelFailure>,
    /// The root's answer to the leaf's CA key set (a rotation's step), once one came.
    pub ca_keys: Option<CaKeysVerdict>,
    /// The newest root CA key set a proxy announced and the agent verified (protocol 1.3).
    pub root_keys: Option<RootKeys>,
}

/// The root's CA keys as a proxy announced them, signed by a key the agent trusted then: what
/// the leaf's operator keeps as the root's CA (a root CA rotation's step).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RootKeys {
    /// When the set was issued (seconds since the Unix epoch): a newer set replaces an older.
    pub issued_at: u64,
    /// The keys, in OpenSSH format.
    pub keys: Vec<String>,
}

impl RootKeys {
    /// The set to keep after `next` arrives: the newer (proxies of one root may announce
    /// different sets for a moment, during a rolling restart).
    pub fn newest(current: Option<Self>, next: Self) -> Self {
        match current {
            Some(c) if c.issued_at >= next.issued_at => c,
            _ => next,
        }
    }
}

/// What the root said of the CA key set the agent published (protocol 1.2): the leaf's
/// operator moves a rotation on once the root trusts the set.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CaKeysVerdict {
    /// When the set answered was issued (seconds since the Unix epoch).
    pub issued_at: u64,
    /// Why the root did not apply it; `None`: the root trusts exactly these keys now.
    pub refused: Option<String>,
}

impl CaKeysVerdict {
    /// The verdict to keep after `next` arrives: an acceptance of a set is not undone by a
    /// later refusal of the same set (a replica that answered while another applied it).
    pub fn fold(current: Option<Self>, next: Self) -> Self {
        match current {
            Some(c) if c.issued_at == next.issued_at && c.refused.is_none() => c,
            _ => next,
        }
    }
}

/// Why the latest attempt to open a tunnel failed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TunnelFailure {
    /// What kind of failure, and so whether waiting can mend it.
    pub kind: FailureKind,
    /// The error as the agent logged it.
    pub message: String,
}

/// The kinds of failure the leaf's status tells apart: some pass on their own (a proxy
/// restarting), others last until someone changes a certificate or the root's trust.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum FailureKind {
    /// Nothing answered at the proxy address (refused, unreachable, not resolved).
    Unreachable,
    /// The proxy did not complete the handshake in time.
    TimedOut,
    /// The proxy refused the agent's certificate (a cluster it does not know, a CA it does not
    /// trust for the cluster, a bad signature): the root's trust or the agent's identity must
    /// change.
    RefusedByProxy,
    /// The agent's own certificate is expired or not valid yet: it needs a new one.
    CertificateInvalid,
    /// The proxy's host certificate is not signed by the root CA the agent trusts, or names
    /// another cluster: the agent's root CA or its address is wrong.
    ProxyNotTrusted,
    /// The proxy and the agent speak different major protocol versions: one side must be
    /// upgraded (the message says which).
    UnsupportedVersion,
    /// Anything else (a connection lost during set-up, a protocol error): retried.
    Other,
}

impl FailureKind {
    /// Every kind.
    pub const ALL: [FailureKind; 7] = [
        FailureKind::Unreachable,
        FailureKind::TimedOut,
        FailureKind::RefusedByProxy,
        FailureKind::CertificateInvalid,
        FailureKind::ProxyNotTrusted,
        FailureKind::UnsupportedVersion,
        FailureKind::Other,
    ];

    /// Whether the failure lasts until someone acts: retrying cannot mend it.
    pub fn needs_action(self) -> bool {
        matches!(
            self,
            FailureKind::RefusedByProxy
                | FailureKind::CertificateInvalid
                | FailureKind::ProxyNotTrusted
                | FailureKind::UnsupportedVersion
        )
    }
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
