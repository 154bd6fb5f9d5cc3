//! `NO_PROXY`: which root addresses an agent dials directly although a forward proxy is set.
//!
//! The rules are those of Go's `golang.org/x/net/http/httpproxy` (what kubectl, client-go and
//! most Kubernetes tooling follow), so one `NO_PROXY` means the same to the operator and to the
//! tools beside it:
//!
//! - `*` alone: never use the proxy;
//! - an IP address (`10.0.0.5`, `[::1]`), optionally with `:port`: that address;
//! - a CIDR (`10.0.0.0/8`): every IP address in it (only when the root is named by an IP: no
//!   name is resolved to decide);
//! - `example.com` (or `*.example.com`): the name and every name under it; `.example.com`: only
//!   the names under it. Optionally with `:port`.
//!
//! One difference, on purpose: Go never proxies `localhost` or a loopback address; here they
//! are proxied unless listed. A root on loopback is rare outside tests, and a rule the user
//! cannot see is worse than one line in `NO_PROXY`.

use std::net::IpAddr;

use ipnet::IpNet;

/// The parsed `NO_PROXY` list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoProxy {
    /// `*`: every address is dialled directly.
    all: bool,
    /// Single addresses, with the port they are limited to (`None`: any).
    ips: Vec<(IpAddr, Option<u16>)>,
    /// Networks; Go ignores a port on them, so do we.
    nets: Vec<IpNet>,
    /// Domain rules: the suffix (with its leading dot), whether the bare name matches too, and
    /// the port they are limited to.
    domains: Vec<DomainRule>,
}

/// One domain entry of the list.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DomainRule {
    /// `.example.com`, lower case: a host ending with it matches.
    suffix: String,
    /// Whether `example.com` itself matches (the entry had no leading dot).
    bare: bool,
    /// The port the rule is limited to (`None`: any).
    port: Option<u16>,
}

impl NoProxy {
    /// Parses a comma-separated list. Unparsable entries are skipped, as Go does: a typo in one
    /// entry must not send every dial through the proxy, nor stop the agent.
    pub fn parse(list: &str) -> Self {
        let mut rules = Self::default();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            rules.add(&entry.to_ascii_lowercase());
        }
        rules
    }

    /// Whether the list is empty (every address goes through the proxy).
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    fn add(&mut self, entry: &str) {
        if entry == "*" {
            self.all = true;
            return;
        }
        if let Ok(net) = entry.parse::<IpNet>() {
            self.nets.push(net);
            return;
        }
        let (host, port) = split_port(entry);
        if port == Some(None) {
            return; // "host:junk": skipped
        }
        let port = port.flatten();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = host.parse::<IpAddr>() {
            self.ips.push((ip, port));
            return;
        }
        let host = host.strip_prefix('*').unwrap_or(host);
        if host.is_empty() || host == "." {
            return;
        }
        let (suffix, bare) = match host.starts_with('.') {
            true => (host.to_owned(), false),
            false => (format!(".{host}"), true),
        };
        self.domains.push(DomainRule { suffix, bare, port });
    }

    /// Whether `addr` (`host:port`, the root's address as configured) is dialled directly.
    pub fn bypasses(&self, addr: &str) -> bool {
        if self.all {
            return true;
        }
        let (host, port) = split_port(addr);
        let port = port.flatten();
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if let Ok(ip) = host.parse::<IpAddr>() {
            return self.ips.iter().any(|(i, p)| *i == ip && port_ok(*p, port))
                || self.nets.iter().any(|n| n.contains(&ip))
                || self.domains.iter().any(|d| d.matches(&host, port));
        }
        self.domains.iter().any(|d| d.matches(&host, port))
    }
}

impl DomainRule {
    fn matches(&self, host: &str, port: Option<u16>) -> bool {
        let name = host.ends_with(&self.suffix) || (self.bare && host == &self.suffix[1..]);
        name && port_ok(self.port, port)
    }
}

/// A rule without a port matches any; one with a port only that port.
fn port_ok(rule: Option<u16>, port: Option<u16>) -> bool {
    rule.is_none() || rule == port
}

/// Splits `host:port`, `[v6]:port`, `[v6]`, a bare IPv6 address or a bare host. The port is
/// `None` when there is none, `Some(None)` when it is not a number.
fn split_port(s: &str) -> (&str, Option<Option<u16>>) {
    if let Some(rest) = s.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((host, tail)) => match tail.strip_prefix(':') {
                Some(port) => (host, Some(port.parse().ok())),
                None => (host, None),
            },
            None => (s, None),
        };
    }
    match s.rsplit_once(':') {
        // Two colons or more without brackets: a bare IPv6 address.
        Some((host, _)) if host.contains(':') => (s, None),
        Some((host, port)) => (host, Some(port.parse().ok())),
        None => (s, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn direct(list: &str, addr: &str) -> bool {
        NoProxy::parse(list).bypasses(addr)
    }

    #[test]
    fn star_bypasses_everything() {
        assert!(direct("*", "root.example.com:443"));
        assert!(direct(" foo , * ", "10.0.0.1:3024"));
    }

    #[test]
    fn a_name_matches_itself_and_below_a_dotted_one_only_below() {
        assert!(direct("example.com", "example.com:443"));
        assert!(direct("example.com", "root.example.com:443"));
        assert!(direct("*.example.com", "root.example.com:443"));
        assert!(!direct("example.com", "badexample.com:443"));
        assert!(!direct(".example.com", "example.com:443"));
        assert!(direct(".example.com", "a.b.example.com:443"));
        assert!(direct("EXAMPLE.com", "Root.Example.COM.:443"));
    }

    #[test]
    fn ports_narrow_a_rule() {
        assert!(direct("example.com:3024", "root.example.com:3024"));
        assert!(!direct("example.com:3024", "root.example.com:443"));
        assert!(direct("10.0.0.5:3024", "10.0.0.5:3024"));
        assert!(!direct("10.0.0.5:3024", "10.0.0.5:443"));
        assert!(direct("[::1]:3024", "[::1]:3024"));
    }

    #[test]
    fn addresses_and_networks_match_ip_roots_only() {
        assert!(direct("10.0.0.5", "10.0.0.5:3024"));
        assert!(!direct("10.0.0.5", "10.0.0.6:3024"));
        assert!(direct("10.0.0.0/8", "10.200.1.1:3024"));
        assert!(!direct("10.0.0.0/8", "11.0.0.1:3024"));
        assert!(direct("fd00::/8", "[fd00::1]:3024"));
        assert!(direct("::1", "[::1]:3024"));
        // No name is resolved to match a network.
        assert!(!direct("127.0.0.0/8", "localhost:3024"));
    }

    #[test]
    fn loopback_is_proxied_unless_listed() {
        assert!(!direct("", "127.0.0.1:3024"));
        assert!(!direct("example.com", "localhost:3024"));
        assert!(direct("localhost", "localhost:3024"));
        assert!(direct("127.0.0.1", "127.0.0.1:3024"));
    }

    #[test]
    fn junk_entries_are_skipped_not_fatal() {
        let rules = NoProxy::parse(",, host:notaport , . , *. ,example.com");
        assert!(rules.bypasses("a.example.com:1"));
        assert!(!rules.bypasses("host:1"));
        assert!(NoProxy::parse(" , ").is_empty());
    }
}
