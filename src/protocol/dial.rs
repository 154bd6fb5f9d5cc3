//! Why a dial through a tunnel failed, in terms a caller can act on.

use std::fmt;

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
            _ => DialErrorKind::Other,
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
}
