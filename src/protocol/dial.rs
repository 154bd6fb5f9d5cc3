//! Why a dial through a tunnel failed, in terms a caller can act on.
//!
//! The kind travels twice: from the agent to the proxy as one byte ([`DialErrorKind::code`]),
//! and from the proxy to an SSH client (`tether dial`, a peer proxy) as the reason code of the
//! channel-open failure ([`DialErrorKind::open_failure`]). SSH's four standard codes cannot
//! tell "refused" from "timed out" or "not resolved", so each kind has a code of its own in the
//! private-use range (RFC 4250 §4.3), with the kind's text as the description an OpenSSH client
//! would print.

use std::fmt;

use russh::ChannelOpenFailure;

/// Reason codes `PRIVATE_OPEN_FAILURE + code` carry a [`DialErrorKind`]: the first code of the
/// private-use range RFC 4250 §4.3 sets aside (0xFE000000-0xFFFFFFFF).
const PRIVATE_OPEN_FAILURE: u32 = 0xFE00_0000;

/// The class of a dial failure. The agent reports it over the wire as one byte (see
/// [`DialErrorKind::code`]); unknown codes read as [`DialErrorKind::Other`] so that an older
/// proxy still understands a newer agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DialErrorKind {
    /// The agent's allow-list does not permit the target.
    Forbidden,
    /// The target host answered with a refusal (TCP RST).
    Refused,
    /// No answer within the dial timeout.
    TimedOut,
    /// The host name did not resolve (on the agent's side).
    NameNotResolved,
    /// No route to the target network or host.
    Unreachable,
    /// The site is unknown to this proxy or has no live tunnel.
    NoTunnel,
    /// The root's access rules (Kubernetes RBAC on the leaf's `RemoteCluster`) do not let
    /// this client dial the leaf: refused at the root, before any channel to the leaf opens.
    NotPermitted,
    /// Anything else; the message says what.
    Other,
}

impl DialErrorKind {
    /// The one-byte code used on the wire.
    pub fn code(self) -> u8 {
        match self {
            DialErrorKind::Forbidden => 1,
            DialErrorKind::Refused => 2,
            DialErrorKind::TimedOut => 3,
            DialErrorKind::NameNotResolved => 4,
            DialErrorKind::Unreachable => 5,
            DialErrorKind::NoTunnel => 6,
            DialErrorKind::NotPermitted => 7,
            DialErrorKind::Other => 255,
        }
    }

    /// The inverse of [`DialErrorKind::code`]; unknown codes map to `Other`.
    pub fn from_code(code: u8) -> Self {
        match code {
            1 => DialErrorKind::Forbidden,
            2 => DialErrorKind::Refused,
            3 => DialErrorKind::TimedOut,
            4 => DialErrorKind::NameNotResolved,
            5 => DialErrorKind::Unreachable,
            6 => DialErrorKind::NoTunnel,
            7 => DialErrorKind::NotPermitted,
            _ => DialErrorKind::Other,
        }
    }

    /// The channel-open failure an SSH server answers a dial that failed this way with.
    pub fn open_failure(self) -> ChannelOpenFailure {
        ChannelOpenFailure::Other {
            code: PRIVATE_OPEN_FAILURE + u32::from(self.code()),
            reason: self.to_string(),
        }
    }

    /// The kind an SSH client reads from a channel-open failure; `None` for the standard codes,
    /// which the proxy keeps for refusals that are not a failed dial (a stream quota, a channel
    /// type it does not serve, a shutdown).
    pub fn from_open_failure(failure: &ChannelOpenFailure) -> Option<Self> {
        match failure {
            ChannelOpenFailure::Other { code, .. } => code
                .checked_sub(PRIVATE_OPEN_FAILURE)
                .and_then(|code| u8::try_from(code).ok())
                .map(DialErrorKind::from_code),
            _ => None,
        }
    }

    /// A short lowercase label, stable enough for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            DialErrorKind::Forbidden => "forbidden",
            DialErrorKind::Refused => "refused",
            DialErrorKind::TimedOut => "timed_out",
            DialErrorKind::NameNotResolved => "name_not_resolved",
            DialErrorKind::Unreachable => "unreachable",
            DialErrorKind::NoTunnel => "no_tunnel",
            DialErrorKind::NotPermitted => "not_permitted",
            DialErrorKind::Other => "error",
        }
    }
}

impl fmt::Display for DialErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            DialErrorKind::Forbidden => "forbidden by the agent's allow-list",
            DialErrorKind::Refused => "connection refused",
            DialErrorKind::TimedOut => "timed out",
            DialErrorKind::NameNotResolved => "name not resolved",
            DialErrorKind::Unreachable => "unreachable",
            DialErrorKind::NoTunnel => "no tunnel to the site",
            DialErrorKind::NotPermitted => "not permitted by the root's access rules",
            DialErrorKind::Other => "dial failed",
        };
        f.write_str(text)
    }
}

/// A failed dial: its class and a human-readable message naming what was dialled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct DialError {
    /// What kind of failure, for callers that branch on it (HTTP status, SOCKS reply code).
    pub kind: DialErrorKind,
    /// Details for a person; never contains secrets.
    pub message: String,
}

impl DialError {
    /// A dial error of `kind` with `message`.
    pub fn new(kind: DialErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// An agent's answer to `_apiserver` when it has no API server address: the agent's own
    /// words, and the root's when the agents' reports say so.
    pub fn no_api_server() -> Self {
        Self::new(DialErrorKind::Forbidden, "this agent exposes no API server")
    }

    /// An agent's answer to a Kubernetes request when it maps no root caller; also the root's,
    /// from the agents' reports.
    pub fn no_kube_api(cluster: &super::ClusterName) -> Self {
        Self::new(
            DialErrorKind::Forbidden,
            format!(
                "cluster {cluster} serves no Kubernetes API to the root: its agent has no access mapping"
            ),
        )
    }

    /// The channel-open failure an SSH server answers this failed dial with. The description
    /// is the kind's text, except for [`DialErrorKind::NotPermitted`]: the client needs to
    /// know which permission it lacks, and that names nothing but itself and the leaf (other
    /// messages may name addresses inside a leaf the client need not see).
    pub fn open_failure(&self) -> ChannelOpenFailure {
        let mut failure = self.kind.open_failure();
        if let (ChannelOpenFailure::Other { reason, .. }, DialErrorKind::NotPermitted) =
            (&mut failure, self.kind)
        {
            reason.clone_from(&self.message);
        }
        failure
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KINDS: [DialErrorKind; 8] = [
        DialErrorKind::Forbidden,
        DialErrorKind::Refused,
        DialErrorKind::TimedOut,
        DialErrorKind::NameNotResolved,
        DialErrorKind::Unreachable,
        DialErrorKind::NoTunnel,
        DialErrorKind::NotPermitted,
        DialErrorKind::Other,
    ];

    #[test]
    fn every_kind_survives_an_ssh_open_failure() {
        for kind in KINDS {
            let failure = kind.open_failure();
            assert!(
                failure.code() >= PRIVATE_OPEN_FAILURE,
                "{kind:?}: {failure:?}"
            );
            assert_eq!(failure.description(), kind.to_string());
            assert_eq!(DialErrorKind::from_open_failure(&failure), Some(kind));
        }
    }

    #[test]
    fn standard_and_foreign_codes_are_not_dial_failures() {
        let standard = [
            ChannelOpenFailure::AdministrativelyProhibited,
            ChannelOpenFailure::ConnectFailed,
            ChannelOpenFailure::UnknownChannelType,
            ChannelOpenFailure::ResourceShortage,
        ];
        for failure in standard {
            assert_eq!(
                DialErrorKind::from_open_failure(&failure),
                None,
                "{failure:?}"
            );
        }
        for code in [
            5,
            PRIVATE_OPEN_FAILURE - 1,
            PRIVATE_OPEN_FAILURE + 300,
            u32::MAX,
        ] {
            let other = ChannelOpenFailure::Other {
                code,
                reason: String::new(),
            };
            assert_eq!(
                DialErrorKind::from_open_failure(&other),
                None,
                "code {code:#x}"
            );
        }
    }
}
