//! Which targets an agent may dial on behalf of the root's proxy.
//!
//! The agent sits inside a leaf cluster and connects wherever the root asks; without a list
//! of permitted targets a compromised or misconfigured root could reach anything the agent's
//! pod can reach. The list is therefore default-deny: an empty [`AllowList`] permits nothing.
//!
//! Rule syntax, one rule per string:
//!
//! * `10.0.0.0/8:80,443,8000-8100`: an IPv4 network and ports;
//! * `192.168.1.5:22`: a single IPv4 address (a `/32`);
//! * `[fd00::/8]:443`, `[::1]:22`: IPv6 networks and addresses, always in brackets;
//! * `db.internal:5432`: an exact host name (case-insensitive, a trailing dot is ignored);
//! * `*.svc.cluster.local:*`: every name with one or more labels before `.svc.cluster.local`.
//!
//! Ports are `*` (any), a port `N`, a range `A-B`, or a comma-separated list of ports and
//! ranges. Port 0 is never valid.
//!
//! Some addresses are never permitted whatever the rules say (see [`never_allowed_reason`]),
//! and IPv4-mapped or IPv4-compatible IPv6 addresses are judged as the IPv4 address they
//! carry (see [`canonical_ip`]), so `::ffff:127.0.0.1` can neither bypass nor escape a rule
//! written for `127.0.0.1`.
//!
//! # DNS never widens the list
//!
//! A host rule names a *name*, and whoever answers for that name chooses the addresses: in a
//! cluster, anyone who may create an `ExternalName` Service under an allowed suffix. So a
//! host rule alone never reaches the agent's own host or its link (the agent's loopback-only
//! admin endpoint, the cloud metadata service at `169.254.169.254`):
//!
//! ```text
//!   rule                 target                 resolves to         dialled?
//!   *.svc.local:*        a.svc.local:80         10.0.0.7            yes (host rule)
//!   *.svc.local:*        evil.svc.local:80      127.0.0.1, ::1      no  (restricted, refused)
//!   *.svc.local:*        meta.svc.local:80      169.254.169.254     no  (restricted, refused)
//!   *.svc.local:*        mix.svc.local:80       127.0.0.1, 10.0.0.7 10.0.0.7 only
//!   127.0.0.1:8080       localhost:8080         127.0.0.1           yes (address rule)
//!   0.0.0.0/0:*          127.0.0.1:8080         -                   no  (rule too broad)
//! ```
//!
//! *Restricted* addresses ([`restricted_range`]) are loopback (`127.0.0.0/8`, `::1`) and
//! link-local (`169.254.0.0/16`, `fe80::/10`), in every IPv6 form that carries them
//! (IPv4-mapped, IPv4-compatible, NAT64 `64:ff9b::/96`). Only an address rule that lies
//! inside such a range (`127.0.0.1:8080`, `127.0.0.0/8:*`, `[::1]:22`,
//! `169.254.169.254/32:80`) permits them, whether the target was written as an address or
//! reached through a name; a broad network such as `0.0.0.0/0` does not. The never-allowed
//! addresses (unspecified, broadcast, multicast) stay refused whatever the rules say.
//! The connector ([`super::connect`]) resolves a name once, judges every answer with
//! [`AllowList::permits_resolved`], dials only the answers that pass, and never repeats
//! the answers in its error messages (they reach the root's clients).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

mod ranges;

pub use ranges::{
    RestrictedRange, canonical_ip, never_allowed_reason, reachable_through_names, restricted_range,
};

/// The longest host name DNS can carry, in its textual form without the trailing dot.
const MAX_NAME_LEN: usize = 253;
/// The longest DNS label.
const MAX_LABEL_LEN: usize = 63;

/// A rule that failed to parse, quoting the rule and saying what is wrong with it, so that
/// an operator can fix the configuration without guessing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid allow-list rule {rule:?}: {reason}")]
pub struct AllowListError {
    /// The rule as it was written.
    pub rule: String,
    /// What is wrong with it.
    pub reason: String,
}

impl AllowListError {
    fn new(rule: &str, reason: impl Into<String>) -> Self {
        Self {
            rule: rule.to_owned(),
            reason: reason.into(),
        }
    }
}

/// The set of rules an agent checks every dial against. The default (empty) list denies
/// everything, so forgetting to configure an agent fails closed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AllowList {
    rules: Vec<Rule>,
}

impl AllowList {
    /// Parses every rule, failing on the first invalid one, so that a typo in the
    /// configuration stops the agent instead of silently narrowing or widening the list.
    pub fn parse<I, S>(rules: I) -> Result<Self, AllowListError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let rules = rules
            .into_iter()
            .map(|rule| rule.as_ref().parse())
            .collect::<Result<Vec<Rule>, _>>()?;
        Ok(Self { rules })
    }

    /// The rules, in the order they were given, for logging and status reports.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether the list has no rules (and so permits nothing).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether a connection to `ip` port `port` is permitted by an address rule.
    ///
    /// The address is canonicalised first ([`canonical_ip`]) and never-allowed addresses
    /// ([`never_allowed_reason`]) are refused whatever the rules say. Host-name rules play no
    /// part here: an address is judged by what it is, not by which name led to it.
    ///
    /// A restricted address ([`restricted_range`]: loopback, link-local) is permitted only by
    /// a rule whose whole network lies inside its restricted range, so that a broad rule such
    /// as `0.0.0.0/0:*` or `10.0.0.0/8` plus a typo never reaches the agent's own host or the
    /// cloud metadata service; `127.0.0.1:8080` or `127.0.0.0/8:*` must be written out.
    pub fn permits_ip(&self, ip: IpAddr, port: u16) -> bool {
        let ip = canonical_ip(ip);
        if port == 0 || never_allowed_reason(ip).is_some() {
            return false;
        }
        let restricted = restricted_range(ip);
        self.rules.iter().any(|rule| match &rule.host {
            RuleHost::Net(net) => {
                net.contains(&ip)
                    && rule.ports.contains(port)
                    && restricted.is_none_or(|range| range.net.contains(net))
            }
            RuleHost::Name(_) | RuleHost::Suffix(_) => false,
        })
    }

    /// Whether `ip`, one of the addresses a name resolved to, may be dialled on `port`.
    /// `by_name` says whether a host rule permitted the name ([`AllowList::permits_name`]).
    ///
    /// An address rule permitting `ip` is always enough. A host rule vouches only for
    /// addresses that are neither never-allowed nor restricted ([`restricted_range`]):
    /// whoever controls the name's DNS answers must not be able to point it at the agent's
    /// own host or link.
    pub fn permits_resolved(&self, by_name: bool, ip: IpAddr, port: u16) -> bool {
        self.permits_ip(ip, port) || (by_name && reachable_through_names(ip))
    }

    /// Whether a host-name rule permits `name` port `port`. Only name rules count: a name
    /// that is not permitted here may still be dialled if every address it resolves to is
    /// permitted by [`AllowList::permits_ip`].
    ///
    /// The comparison is case-insensitive and ignores one trailing dot; names that are not
    /// syntactically valid DNS names are never permitted.
    pub fn permits_name(&self, name: &str, port: u16) -> bool {
        if port == 0 {
            return false;
        }
        let Some(name) = normalise_name(name) else {
            return false;
        };
        if is_numeric_host_form(&name) {
            return false;
        }
        self.rules.iter().any(|rule| {
            let host_matches = match &rule.host {
                RuleHost::Net(_) => false,
                RuleHost::Name(exact) => *exact == name,
                // `suffix` starts with a dot, so a match leaves at least one whole label
                // before it (labels are never empty in a normalised name).
                RuleHost::Suffix(suffix) => {
                    name.len() > suffix.len() && name.ends_with(suffix.as_str())
                }
            };
            host_matches && rule.ports.contains(port)
        })
    }

    /// Whether some address rule covers `port` at all. Lets the connector refuse a name
    /// without resolving it when no resolved address could possibly be permitted, so that
    /// a default-deny agent does not even leak DNS queries.
    pub(crate) fn has_ip_rule_for_port(&self, port: u16) -> bool {
        port != 0
            && self
                .rules
                .iter()
                .any(|rule| matches!(rule.host, RuleHost::Net(_)) && rule.ports.contains(port))
    }
}

/// One allow-list entry: which hosts and which ports on them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    host: RuleHost,
    ports: Ports,
}

/// The host part of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RuleHost {
    /// An IP network (a single address is a full-length prefix).
    Net(IpNet),
    /// An exact host name, lowercase, without a trailing dot.
    Name(String),
    /// A wildcard: the suffix including its leading dot (`.svc.cluster.local`), lowercase.
    Suffix(String),
}

/// The port part of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ports {
    /// `*`: every port from 1 to 65535.
    Any,
    /// Inclusive ranges; a single port is a range of one.
    List(Vec<(u16, u16)>),
}

impl Ports {
    fn contains(&self, port: u16) -> bool {
        port != 0
            && match self {
                Ports::Any => true,
                Ports::List(ranges) => ranges.iter().any(|&(lo, hi)| lo <= port && port <= hi),
            }
    }

    fn parse(rule: &str, text: &str) -> Result<Self, AllowListError> {
        if text == "*" {
            return Ok(Ports::Any);
        }
        if text.is_empty() {
            return Err(AllowListError::new(
                rule,
                "no ports after ':' (use '*' for any port)",
            ));
        }
        let mut ranges = Vec::new();
        for item in text.split(',') {
            let item = item.trim();
            if item.is_empty() {
                return Err(AllowListError::new(rule, "empty entry in the port list"));
            }
            if item == "*" {
                return Err(AllowListError::new(
                    rule,
                    "'*' must be the whole port list, not one entry of it",
                ));
            }
            let range = match item.split_once('-') {
                Some((lo, hi)) => {
                    let lo = parse_port(rule, lo.trim())?;
                    let hi = parse_port(rule, hi.trim())?;
                    if lo > hi {
                        return Err(AllowListError::new(
                            rule,
                            format!("port range {lo}-{hi} runs backwards"),
                        ));
                    }
                    (lo, hi)
                }
                None => {
                    let port = parse_port(rule, item)?;
                    (port, port)
                }
            };
            ranges.push(range);
        }
        Ok(Ports::List(ranges))
    }
}

fn parse_port(rule: &str, text: &str) -> Result<u16, AllowListError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AllowListError::new(
            rule,
            format!("{text:?} is not a port number"),
        ));
    }
    match text.parse::<u16>() {
        Ok(0) => Err(AllowListError::new(rule, "port 0 is not a valid port")),
        Ok(port) => Ok(port),
        Err(_) => Err(AllowListError::new(
            rule,
            format!("port {text} is out of range (1-65535)"),
        )),
    }
}

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ports::Any => f.write_str("*"),
            Ports::List(ranges) => {
                for (i, &(lo, hi)) in ranges.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    if lo == hi {
                        write!(f, "{lo}")?;
                    } else {
                        write!(f, "{lo}-{hi}")?;
                    }
                }
                Ok(())
            }
        }
    }
}

impl FromStr for Rule {
    type Err = AllowListError;

    fn from_str(rule: &str) -> Result<Self, Self::Err> {
        let text = rule.trim();
        if text.is_empty() {
            return Err(AllowListError::new(rule, "empty rule"));
        }
        let (host_text, ports_text, bracketed) = if let Some(rest) = text.strip_prefix('[') {
            let Some((inside, after)) = rest.split_once(']') else {
                return Err(AllowListError::new(rule, "'[' without a matching ']'"));
            };
            let Some(ports) = after.strip_prefix(':') else {
                return Err(AllowListError::new(
                    rule,
                    "expected ':PORTS' after the bracketed address",
                ));
            };
            (inside, ports, true)
        } else {
            let Some((host, ports)) = text.rsplit_once(':') else {
                return Err(AllowListError::new(
                    rule,
                    "missing ':PORTS' (use ':*' for any port)",
                ));
            };
            if host.contains(':') {
                return Err(AllowListError::new(
                    rule,
                    "IPv6 addresses must be written in brackets, e.g. [fd00::/8]:443",
                ));
            }
            (host, ports, false)
        };
        let host = parse_rule_host(rule, host_text.trim(), bracketed)?;
        let ports = Ports::parse(rule, ports_text.trim())?;
        Ok(Rule { host, ports })
    }
}

fn parse_rule_host(rule: &str, text: &str, bracketed: bool) -> Result<RuleHost, AllowListError> {
    if text.is_empty() {
        return Err(AllowListError::new(rule, "no host before ':'"));
    }
    if bracketed {
        let net = if text.contains('/') {
            text.parse::<Ipv6Net>().map_err(|_| {
                AllowListError::new(rule, format!("{text:?} is not an IPv6 network"))
            })?
        } else {
            let ip = text.parse::<Ipv6Addr>().map_err(|_| {
                AllowListError::new(
                    rule,
                    format!("{text:?} is not an IPv6 address (brackets are only for IPv6)"),
                )
            })?;
            Ipv6Net::from(ip)
        };
        if net != net.trunc() {
            return Err(AllowListError::new(
                rule,
                format!("{net} has host bits set; did you mean {}?", net.trunc()),
            ));
        }
        if mapped_v6_net(net) {
            return Err(AllowListError::new(
                rule,
                "IPv4-mapped or IPv4-compatible IPv6 addresses are judged as IPv4; \
                 write the rule in IPv4 form",
            ));
        }
        return Ok(RuleHost::Net(IpNet::V6(net)));
    }
    if text.contains('/') {
        let net = text
            .parse::<Ipv4Net>()
            .map_err(|_| AllowListError::new(rule, format!("{text:?} is not an IPv4 network")))?;
        if net != net.trunc() {
            return Err(AllowListError::new(
                rule,
                format!("{net} has host bits set; did you mean {}?", net.trunc()),
            ));
        }
        return Ok(RuleHost::Net(IpNet::V4(net)));
    }
    if let Ok(ip) = text.parse::<Ipv4Addr>() {
        return Ok(RuleHost::Net(IpNet::V4(Ipv4Net::from(ip))));
    }
    if text == "*" || text == "*." {
        return Err(AllowListError::new(
            rule,
            "'*' alone is not allowed as a host; list networks (e.g. 0.0.0.0/0) or name \
             suffixes (e.g. *.example.com) explicitly",
        ));
    }
    let (wildcard, name_text) = match text.strip_prefix("*.") {
        Some(suffix) => (true, suffix),
        None => (false, text),
    };
    if name_text.contains('*') {
        return Err(AllowListError::new(
            rule,
            "'*' is only allowed as the whole first label, as in *.example.com",
        ));
    }
    let Some(name) = normalise_name(name_text) else {
        return Err(AllowListError::new(
            rule,
            format!(
                "{name_text:?} is not a valid host name (labels of letters, digits, '-' \
                 and '_', each 1-{MAX_LABEL_LEN} long, at most {MAX_NAME_LEN} in all)"
            ),
        ));
    };
    if is_numeric_host_form(&name) {
        return Err(AllowListError::new(
            rule,
            format!(
                "{name_text:?} is an ambiguous numeric address form; write the address \
                 as a dotted quad (a.b.c.d)"
            ),
        ));
    }
    Ok(if wildcard {
        RuleHost::Suffix(format!(".{name}"))
    } else {
        RuleHost::Name(name)
    })
}

/// Whether a v6 rule lies within the IPv4-mapped (`::ffff:0:0/96`) or IPv4-compatible
/// (`::/96`, less `::` and `::1`) ranges; such addresses are always judged as IPv4, so a v6
/// rule for them could never match and would only mislead.
fn mapped_v6_net(net: Ipv6Net) -> bool {
    if net.prefix_len() < 96 {
        return false;
    }
    let segments = net.network().segments();
    let mapped = segments[..5] == [0; 5] && segments[5] == 0xffff;
    let compatible = segments[..6] == [0; 6]
        && !(net.prefix_len() == 128 && net.network() <= Ipv6Addr::LOCALHOST);
    mapped || compatible
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            RuleHost::Net(IpNet::V4(net)) if net.prefix_len() == 32 => write!(f, "{}", net.addr()),
            RuleHost::Net(IpNet::V4(net)) => write!(f, "{net}"),
            RuleHost::Net(IpNet::V6(net)) if net.prefix_len() == 128 => {
                write!(f, "[{}]", net.addr())
            }
            RuleHost::Net(IpNet::V6(net)) => write!(f, "[{net}]"),
            RuleHost::Name(name) => f.write_str(name),
            RuleHost::Suffix(suffix) => write!(f, "*{suffix}"),
        }?;
        write!(f, ":{}", self.ports)
    }
}

impl Serialize for Rule {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rule {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// `name` lowercased without one trailing dot, if it is a syntactically valid DNS name
/// (labels of ASCII letters, digits, `-` and `_`, 1-63 long, at most 253 in all).
pub(crate) fn normalise_name(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return None;
    }
    let valid = name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= MAX_LABEL_LEN
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    valid.then(|| name.to_ascii_lowercase())
}

/// Whether `host` is a numeric IPv4 form that `inet_aton` (and so `getaddrinfo`) would read
/// as an address although it is not a canonical dotted quad: `2130706433`, `0177.0.0.1`,
/// `0x7f.1`, `127.1` and mixtures. Such forms are refused outright so that no rule check on
/// the text can be bypassed by the resolver's own interpretation of it.
///
/// Every dot-separated part being a decimal, octal or hex number (a trailing dot ignored) is
/// enough; no real host name looks like that, since top-level domains are never numeric.
pub(crate) fn is_numeric_host_form(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.split('.').all(|part| {
            let digits = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X"));
            match digits {
                Some(hex) => hex.bytes().all(|b| b.is_ascii_hexdigit()),
                None => !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()),
            }
        })
}

#[cfg(test)]
mod tests;
