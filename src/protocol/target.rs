//! Names of clusters and of the endpoints reached through them.
//!
//! Root-side clients name a target as `HOST.CLUSTER.tether:PORT` (the form used by the HTTP
//! CONNECT and SOCKS5 entries and by `ssh -W`), for example `db.prod.svc.leaf-1.tether:5432`.
//! `_apiserver.CLUSTER.tether` names the leaf's Kubernetes API server, whatever its address.

use std::fmt;
use std::str::FromStr;

/// The suffix that marks a tunnelled name.
pub const TETHER_SUFFIX: &str = "tether";

/// The host label that names a cluster's API server.
pub const API_SERVER_LABEL: &str = "_apiserver";

/// How the API server target travels on the wire (an address that cannot resolve).
pub const API_SERVER_WIRE_ADDRESS: &str = "@apiserver";

/// How a Kubernetes API request from the root travels on the wire (see [`Endpoint::KubeApi`]).
pub const KUBE_API_WIRE_ADDRESS: &str = "@kube";

/// Longest host name accepted anywhere (RFC 1035's limit on a full name).
pub const MAX_HOST_LEN: usize = 253;

/// Longest cluster name: one DNS label.
pub const MAX_CLUSTER_NAME_LEN: usize = 63;

/// Errors from parsing cluster names and targets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetParseError {
    #[error(
        "invalid cluster name {0:?}: use 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit"
    )]
    ClusterName(String),
    #[error(
        "invalid target {0:?}: expected HOST.CLUSTER.tether:PORT (or HOST:PORT where the cluster is given apart)"
    )]
    Shape(String),
    #[error("invalid port in {0:?}: expected 1-65535")]
    Port(String),
    #[error(
        "invalid host {0:?}: empty, too long (over 253 bytes) or containing characters a host name cannot have"
    )]
    Host(String),
}

/// A cluster's name: a DNS-1123 label, as Kubernetes object names are.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct ClusterName(String);

impl ClusterName {
    /// Validates `name` as a cluster name.
    pub fn new(name: impl Into<String>) -> Result<Self, TargetParseError> {
        let name = name.into();
        let bytes = name.as_bytes();
        let valid = !bytes.is_empty()
            && bytes.len() <= MAX_CLUSTER_NAME_LEN
            && bytes
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
            && bytes[0] != b'-'
            && bytes[bytes.len() - 1] != b'-';
        if valid {
            Ok(Self(name))
        } else {
            Err(TargetParseError::ClusterName(name))
        }
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> serde::Deserialize<'de> for ClusterName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        ClusterName::new(raw).map_err(serde::de::Error::custom)
    }
}

impl FromStr for ClusterName {
    type Err = TargetParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ClusterName::new(s)
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What to reach inside a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A host (name or IP literal, without brackets) and TCP port, resolved by the agent.
    Host { host: String, port: u16 },
    /// The cluster's own API server, at whatever address its agent is configured with
    /// (the seed's `RemoteAuthServer`).
    ApiServer,
    /// The leaf's Kubernetes API as its agent serves it to a root identity: HTTP whose caller
    /// rides first on the stream ([`crate::protocol::kube`]), answered with the leaf's own
    /// credentials and impersonation. Only the proxy's Kubernetes endpoint asks for it: no name
    /// a client can write parses to it.
    KubeApi,
}

impl Endpoint {
    /// A host endpoint, checking the host's length and characters.
    pub fn host(host: impl Into<String>, port: u16) -> Result<Self, TargetParseError> {
        let host = host.into();
        // `_apiserver` names the API server: as a host it would print as that target and mean
        // another (`[_apiserver].c.tether` round-tripped to the API server; found by fuzz/).
        if !valid_host(&host) || host.eq_ignore_ascii_case(API_SERVER_LABEL) {
            return Err(TargetParseError::Host(host));
        }
        if port == 0 {
            return Err(TargetParseError::Port(host));
        }
        Ok(Endpoint::Host { host, port })
    }

    /// Parses `HOST:PORT`, `[V6]:PORT` or `_apiserver[:PORT]`, as `tether dial` takes them.
    pub fn parse(text: &str) -> Result<Self, TargetParseError> {
        if text == API_SERVER_LABEL {
            return Ok(Endpoint::ApiServer);
        }
        // The API server is wherever the agent was told it is, so a port is only a formality;
        // but it must be a port (`_apiserver:garbage` names nothing).
        if let Some(port) = text
            .strip_prefix(API_SERVER_LABEL)
            .and_then(|r| r.strip_prefix(':'))
        {
            return match port.parse::<u16>() {
                Ok(_) => Ok(Endpoint::ApiServer),
                Err(_) => Err(TargetParseError::Port(text.to_owned())),
            };
        }
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| TargetParseError::Shape(text.to_owned()))?;
        let port: u16 = port
            .parse()
            .map_err(|_| TargetParseError::Port(text.to_owned()))?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        Endpoint::host(host, port)
    }

    /// The (address, port) pair carried in a `forwarded-tcpip` channel open.
    pub fn to_wire(&self) -> (&str, u32) {
        match self {
            Endpoint::Host { host, port } => (host.as_str(), u32::from(*port)),
            Endpoint::ApiServer => (API_SERVER_WIRE_ADDRESS, 0),
            Endpoint::KubeApi => (KUBE_API_WIRE_ADDRESS, 0),
        }
    }

    /// Reads the (address, port) pair of a `forwarded-tcpip` channel open.
    pub fn from_wire(address: &str, port: u32) -> Result<Self, TargetParseError> {
        if address == API_SERVER_WIRE_ADDRESS {
            return Ok(Endpoint::ApiServer);
        }
        if address == KUBE_API_WIRE_ADDRESS {
            return Ok(Endpoint::KubeApi);
        }
        let port = u16::try_from(port).map_err(|_| TargetParseError::Port(address.to_owned()))?;
        Endpoint::host(address, port)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Host { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Endpoint::Host { host, port } => write!(f, "{host}:{port}"),
            Endpoint::ApiServer => f.write_str("the API server"),
            Endpoint::KubeApi => f.write_str("the Kubernetes API"),
        }
    }
}

/// An endpoint in a named cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub cluster: ClusterName,
    pub endpoint: Endpoint,
}

impl Target {
    /// Parses a client-facing address: `HOST.CLUSTER.tether` with a separate port, as the HTTP
    /// CONNECT and SOCKS5 entries receive it. The host may be a bracketed IPv6 literal. Names are
    /// case-insensitive and come back lowercased.
    pub fn from_name(name: &str, port: u16) -> Result<Self, TargetParseError> {
        let shape = || TargetParseError::Shape(format!("{name}:{port}"));
        let lowered = name.trim_end_matches('.').to_ascii_lowercase();
        let rest = lowered
            .strip_suffix(TETHER_SUFFIX)
            .and_then(|r| r.strip_suffix('.'))
            .ok_or_else(shape)?;
        let (host, cluster) = rest.rsplit_once('.').ok_or_else(shape)?;
        let cluster = ClusterName::new(cluster)?;
        if host == API_SERVER_LABEL {
            return Ok(Target {
                cluster,
                endpoint: Endpoint::ApiServer,
            });
        }
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        Ok(Target {
            cluster,
            endpoint: Endpoint::host(host, port)?,
        })
    }

    /// Parses `HOST.CLUSTER.tether:PORT` (or `[V6].CLUSTER.tether:PORT`).
    pub fn parse(address: &str) -> Result<Self, TargetParseError> {
        let (name, port) = address
            .rsplit_once(':')
            .ok_or_else(|| TargetParseError::Shape(address.to_owned()))?;
        let port: u16 = port
            .parse()
            .map_err(|_| TargetParseError::Port(address.to_owned()))?;
        Target::from_name(name, port)
    }
}

/// Whether `name` (a host, without the port) is in the tunnelled form `HOST.CLUSTER.tether`
/// (any case, an optional trailing dot): such a name always names its cluster itself, and a
/// name without the suffix is a real host whose cluster must be given apart.
pub fn is_tether_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    let Some(split) = name.len().checked_sub(TETHER_SUFFIX.len() + 1) else {
        return false;
    };
    name.is_char_boundary(split) && name[split..].eq_ignore_ascii_case(&format!(".{TETHER_SUFFIX}"))
}

impl Target {
    /// The client-facing name, `HOST.CLUSTER.tether` (the inverse of [`Target::from_name`]),
    /// and the port (0 for the API server, whose port the agent knows).
    pub fn to_name(&self) -> (String, u16) {
        match &self.endpoint {
            Endpoint::Host { host, port } if host.contains(':') => {
                (format!("[{host}].{}.{TETHER_SUFFIX}", self.cluster), *port)
            }
            Endpoint::Host { host, port } => {
                (format!("{host}.{}.{TETHER_SUFFIX}", self.cluster), *port)
            }
            Endpoint::ApiServer => (
                format!("{API_SERVER_LABEL}.{}.{TETHER_SUFFIX}", self.cluster),
                0,
            ),
            // No client name reaches it; this one parses to no target (its port is 0).
            Endpoint::KubeApi => (format!("_kube.{}.{TETHER_SUFFIX}", self.cluster), 0),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} in cluster {}", self.endpoint, self.cluster)
    }
}

fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= MAX_HOST_LEN
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_host_cluster_port() {
        let t = Target::parse("db.prod.svc.leaf-1.tether:5432").unwrap();
        assert_eq!(t.cluster.as_str(), "leaf-1");
        assert_eq!(
            t.endpoint,
            Endpoint::Host {
                host: "db.prod.svc".into(),
                port: 5432
            }
        );
    }

    #[test]
    fn parses_ipv6_and_api_server() {
        let t = Target::parse("[fd00::1].leaf.tether:80").unwrap();
        assert_eq!(
            t.endpoint,
            Endpoint::Host {
                host: "fd00::1".into(),
                port: 80
            }
        );
        let t = Target::parse("_apiserver.leaf.tether:443").unwrap();
        assert_eq!(t.endpoint, Endpoint::ApiServer);
        for name in [
            "[fd00::1].leaf.tether",
            "db.x.leaf.tether",
            "_apiserver.leaf.tether",
        ] {
            let t = Target::from_name(name, 80).unwrap();
            assert_eq!(t.to_name().0, name);
        }
    }

    #[test]
    fn rejects_bad_shapes_with_reasons() {
        assert!(matches!(
            Target::parse("db.leaf:80"),
            Err(TargetParseError::Shape(_))
        ));
        assert!(matches!(
            Target::parse("db.Leaf_1.tether:80"),
            Err(TargetParseError::ClusterName(_))
        ));
        assert!(matches!(
            Target::parse("db.leaf.tether:0"),
            Err(TargetParseError::Port(_))
        ));
        assert!(matches!(
            Target::parse("db.leaf.tether:99999"),
            Err(TargetParseError::Port(_))
        ));
        assert!(matches!(
            Target::parse("a b.leaf.tether:80"),
            Err(TargetParseError::Host(_))
        ));
    }

    #[test]
    fn parses_host_port_forms() {
        assert_eq!(
            Endpoint::parse("db:5432").unwrap(),
            Endpoint::host("db", 5432).unwrap()
        );
        assert_eq!(
            Endpoint::parse("[::1]:22").unwrap(),
            Endpoint::host("::1", 22).unwrap()
        );
        assert_eq!(Endpoint::parse("_apiserver").unwrap(), Endpoint::ApiServer);
        assert!(Endpoint::parse("db").is_err());
    }

    #[test]
    fn the_api_server_label_is_never_a_host() {
        for bad in [
            Target::from_name("[_apiserver].leaf.tether", 80),
            Target::from_name("[_APIserver].leaf.tether", 80),
        ] {
            assert!(matches!(bad, Err(TargetParseError::Host(_))), "{bad:?}");
        }
        assert!(Endpoint::parse("[_apiserver]:80").is_err());
        assert!(Endpoint::parse("_apiserver:garbage").is_err());
        assert!(Endpoint::parse("_apiserver:").is_err());
        assert_eq!(
            Endpoint::parse("_apiserver:443").unwrap(),
            Endpoint::ApiServer
        );
        assert!(Endpoint::from_wire("_apiserver", 80).is_err());
        assert_eq!(
            Target::from_name("_apiserver.leaf.tether", 80)
                .unwrap()
                .endpoint,
            Endpoint::ApiServer
        );
    }

    #[test]
    fn tells_tunnelled_names_from_real_hosts() {
        for name in ["web.leaf.tether", "WEB.Leaf.TETHER.", "[::1].leaf.tether"] {
            assert!(is_tether_name(name), "{name}");
        }
        for name in ["web.internal", "tether", ".tether-x", "x.tethers", "", "é"] {
            assert!(!is_tether_name(name), "{name}");
        }
    }

    #[test]
    fn wire_form_round_trips() {
        for e in [Endpoint::ApiServer, Endpoint::host("10.0.0.1", 22).unwrap()] {
            let (a, p) = e.to_wire();
            assert_eq!(Endpoint::from_wire(a, p).unwrap(), e);
        }
        assert!(Endpoint::from_wire("x", 70000).is_err());
    }
}
