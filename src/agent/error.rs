//! Why an agent's tunnel could not be set up, or ended: below both the tunnel and its SSH
//! handler, which each produce some of these.

use std::time::Duration;

use super::status::{FailureKind, TunnelFailure};

/// Why a tunnel could not be set up or ended.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("could not reach the proxy at {addr}: {source}")]
    Connect {
        /// The proxy address dialled.
        addr: String,
        /// Why the TCP connect failed.
        source: std::io::Error,
    },
    /// The forward proxy on the way did not open the way (refused, unreachable, not HTTP).
    #[error(transparent)]
    Transport(crate::transport::TransportError),
    #[error("timed out after {0:?} connecting to the proxy")]
    Timeout(Duration),
    #[error("SSH: {0}")]
    Ssh(#[from] russh::Error),
    /// With the proxy's reason when it gave one (what the agent's own certificate says, or
    /// that its CA is not trusted for the cluster), so the leaf's status can name the fix.
    #[error("the proxy refused the agent's certificate{}", .0.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    AuthRefused(Option<String>),
    /// The agent's own certificate is outside its validity; found before dialling.
    #[error("{0}")]
    OwnCertificate(String),
    /// A control message that could not be encoded or read.
    #[error("control channel: {0}")]
    Frame(#[from] crate::protocol::control::ControlError),
    /// The proxy broke the protocol (what it did).
    #[error("control channel: {0}")]
    Protocol(&'static str),
    #[error("the proxy stopped answering heartbeats ({0:?} of silence)")]
    Stale(Duration),
    #[error("the proxy closed the tunnel")]
    Closed,
    #[error("the proxy is draining: {0}")]
    Drained(String),
    #[error("landed on proxy {0}, which already holds a tunnel")]
    AlreadyClaimed(String),
    #[error("refused the proxy: {0}")]
    UntrustedProxy(#[source] crate::identity::AuthError),
    #[error("the proxy is busy (too many handshakes in flight); it asks for a retry in {0:?}")]
    Busy(Duration),
    /// The proxy speaks another major protocol version (this agent found it in its welcome).
    #[error("the agent refused the proxy: {0}")]
    Version(#[source] crate::protocol::version::VersionMismatch),
    /// The proxy would not serve this agent, and said why (an unsupported protocol version).
    #[error("{0}")]
    ProxyRefused(String),
}

impl TunnelError {
    /// The kind of failure the leaf's status reports.
    pub fn kind(&self) -> FailureKind {
        match self {
            TunnelError::Connect { .. } | TunnelError::Transport(_) => FailureKind::Unreachable,
            TunnelError::Timeout(_) => FailureKind::TimedOut,
            TunnelError::AuthRefused(_) => FailureKind::RefusedByProxy,
            TunnelError::Version(_) | TunnelError::ProxyRefused(_) => {
                FailureKind::UnsupportedVersion
            }
            TunnelError::OwnCertificate(_) => FailureKind::CertificateInvalid,
            TunnelError::UntrustedProxy(_) => FailureKind::ProxyNotTrusted,
            _ => FailureKind::Other,
        }
    }

    /// This error as the status reports it.
    pub fn failure(&self) -> TunnelFailure {
        TunnelFailure {
            kind: self.kind(),
            message: self.to_string(),
        }
    }
}

impl From<crate::transport::TransportError> for TunnelError {
    /// A direct connection's failure stays `Connect` (the pool paces a refused one apart).
    fn from(e: crate::transport::TransportError) -> Self {
        match e {
            crate::transport::TransportError::Direct { addr, source } => {
                TunnelError::Connect { addr, source }
            }
            other => TunnelError::Transport(other),
        }
    }
}

impl From<crate::stream::frames::ChannelReadError> for TunnelError {
    fn from(e: crate::stream::frames::ChannelReadError) -> Self {
        use crate::stream::frames::ChannelReadError;
        match e {
            ChannelReadError::Closed => TunnelError::Closed,
            ChannelReadError::Refused => {
                TunnelError::Protocol("the proxy refused the control subsystem")
            }
            ChannelReadError::Frame(e) => TunnelError::Frame(e),
        }
    }
}
