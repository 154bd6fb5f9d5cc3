//! The control protocol's version, and how a proxy and an agent of different releases agree.
//!
//! A root and its leaves are upgraded apart (the root's proxies first, usually; hundreds of
//! leaves over weeks), so for a while both sides run different releases. Each side says the
//! protocol version it speaks in its first control message (`Hello`, `Welcome`), and both then
//! use the lower minor version of the same major:
//!
//! ```text
//!   agent   proxy   spoken   what happens
//!   1.0     1.1     1.0      the agent predates reports: the proxy keeps no inventory for it
//!   1.1     1.0     1.0      the proxy predates reports: the agent sends none
//!   1.1     1.1     1.1      reports flow (AgentMessage::Report)
//!   1.2     1.2     1.2      and a leaf may send its rotated CA keys (AgentMessage::CaKeys)
//!   1.3     1.3     1.3      and the root announces its CA keys (ProxyMessage::RootKeys)
//!   2.x     1.x     -        refused: both sides log it, and the status on each side says
//!                            which to upgrade
//! ```
//!
//! The releases before versions (protocol 1.0) sent none; a message without one is 1.0. A minor
//! version only ever *adds* messages or fields that the other side may go without, and each
//! side sends them only once the other has said it speaks that minor version. A major version
//! is a change the other side cannot go without; mixed majors are refused at hello, with a
//! message that says which side to upgrade, rather than failing later on a message one side
//! cannot read.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A control protocol version: `major.minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProtocolVersion {
    /// Sides of different majors cannot talk.
    pub major: u16,
    /// Sides of one major talk at the lower minor.
    pub minor: u16,
}

impl ProtocolVersion {
    /// What the releases before versions spoke, and what a message that names none means.
    pub const V1_0: Self = Self { major: 1, minor: 0 };
    /// Adds the agent's report of its leaf ([`super::control::AgentMessage::Report`]).
    pub const V1_1: Self = Self { major: 1, minor: 1 };
    /// Adds a leaf's rotated CA keys, signed by its CA, over the tunnel
    /// ([`super::control::AgentMessage::CaKeys`]).
    pub const V1_2: Self = Self { major: 1, minor: 2 };
    /// Adds the root's CA keys, signed by its CA, announced to agents
    /// ([`super::control::ProxyMessage::RootKeys`]).
    pub const V1_3: Self = Self { major: 1, minor: 3 };
    /// The version this build speaks.
    pub const CURRENT: Self = Self::V1_3;

    /// The version a proxy speaking `proxy` and an agent speaking `agent` use; an error when
    /// their majors differ. Both sides call it, each with what it speaks and what it was told.
    pub fn agree(proxy: Self, agent: Self) -> Result<Self, VersionMismatch> {
        if proxy.major != agent.major {
            return Err(VersionMismatch { proxy, agent });
        }
        Ok(proxy.min(agent))
    }

    /// Whether a side speaking this version understands what `feature` introduced.
    pub fn has(self, feature: Self) -> bool {
        self.major == feature.major && self.minor >= feature.minor
    }

    /// The version an optional field names, 1.0 when it is absent (1.0 sent none).
    pub fn or_first(version: Option<Self>) -> Self {
        version.unwrap_or(Self::V1_0)
    }
}

impl Default for ProtocolVersion {
    fn default() -> Self {
        Self::CURRENT
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// A version string that is not `major.minor`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("protocol version {0:?} is not MAJOR.MINOR")]
pub struct VersionParseError(String);

impl FromStr for ProtocolVersion {
    type Err = VersionParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || VersionParseError(text.chars().take(32).collect());
        let (major, minor) = text.split_once('.').ok_or_else(invalid)?;
        let number = |s: &str| {
            (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse::<u16>().ok())
                .flatten()
        };
        Ok(Self {
            major: number(major).ok_or_else(invalid)?,
            minor: number(minor).ok_or_else(invalid)?,
        })
    }
}

impl Serialize for ProtocolVersion {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ProtocolVersion {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A proxy and an agent whose protocol majors differ: what each speaks, and so which to
/// upgrade. Both sides show the same words (the agent in its tunnel's status, the proxy in the
/// leaf's `RemoteCluster`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the agent speaks protocol {agent} and the proxy {proxy}, which no release speaks together: {}",
    upgrade_advice(*proxy, *agent)
)]
pub struct VersionMismatch {
    /// What the proxy speaks.
    pub proxy: ProtocolVersion,
    /// What the agent speaks.
    pub agent: ProtocolVersion,
}

fn upgrade_advice(proxy: ProtocolVersion, agent: ProtocolVersion) -> String {
    if agent.major > proxy.major {
        format!(
            "upgrade the root's proxies to a release that speaks {}.x",
            agent.major
        )
    } else {
        format!(
            "upgrade the leaf's agent (its operator) to a release that speaks {}.x",
            proxy.major
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> ProtocolVersion {
        text.parse().unwrap()
    }

    fn agree(proxy: &str, agent: &str) -> Result<ProtocolVersion, VersionMismatch> {
        ProtocolVersion::agree(v(proxy), v(agent))
    }

    #[test]
    fn sides_of_one_major_speak_the_lower_minor() {
        assert_eq!(agree("1.1", "1.0"), Ok(v("1.0")));
        assert_eq!(agree("1.0", "1.1"), Ok(v("1.0")));
        assert_eq!(agree("1.1", "1.7"), Ok(v("1.1")));
        assert!(v("1.1").has(ProtocolVersion::V1_1));
        assert!(!v("1.0").has(ProtocolVersion::V1_1));
        assert!(!v("2.3").has(ProtocolVersion::V1_1));
    }

    #[test]
    fn another_major_is_refused_saying_which_side_to_upgrade() {
        assert_eq!(
            agree("1.1", "2.0").unwrap_err().to_string(),
            "the agent speaks protocol 2.0 and the proxy 1.1, which no release speaks \
             together: upgrade the root's proxies to a release that speaks 2.x"
        );
        assert_eq!(
            agree("2.0", "1.1").unwrap_err().to_string(),
            "the agent speaks protocol 1.1 and the proxy 2.0, which no release speaks \
             together: upgrade the leaf's agent (its operator) to a release that speaks 2.x"
        );
    }

    #[test]
    fn versions_read_and_write_as_major_dot_minor() {
        assert_eq!(serde_json::to_string(&v("1.1")).unwrap(), "\"1.1\"");
        assert_eq!(
            serde_json::from_str::<ProtocolVersion>("\"12.40\"").unwrap(),
            v("12.40")
        );
        for bad in ["1", "1.", ".1", "1.1.1", "a.b", "+1.1", "1.70000", ""] {
            assert!(bad.parse::<ProtocolVersion>().is_err(), "{bad:?}");
        }
    }
}
