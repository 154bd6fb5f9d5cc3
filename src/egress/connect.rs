//! The agent's outbound connect: check a dial request against the [`AllowList`], resolve
//! it at most once, and connect only to the addresses that were checked.
//!
//! Checking a name and then letting the OS resolve it again at connect time would let a
//! DNS answer change between check and use (Kubernetes CVE-2020-8562); so names are
//! resolved here, once, every resulting address is judged, and exactly those socket
//! addresses are dialled:
//!
//! ```text
//!   "db.internal:5432" --resolve once--> [a1, a2, a3]
//!                                          | permits_resolved(each)
//!                                          v
//!                                        [a1, a3] --connect in order--> first that accepts
//!                                        []       --> Forbidden "resolves only to addresses
//!                                                     no host rule may reach"
//! ```
//!
//! A host rule vouches for a name, not for whatever the name resolves to: loopback and
//! link-local answers (and the never-allowed ones) are skipped unless an address rule names
//! them (see the allow-list's module docs). Error messages go back to the root's clients
//! (403 bodies, SSH reason text), so they say what was refused and why but never repeat the
//! leaf's DNS answers; those are logged at debug level on the leaf only.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use super::allow_list::{AllowList, canonical_ip, is_numeric_host_form, never_allowed_reason};
use super::allow_list::{normalise_name, restricted_range};
use crate::protocol::{DialError, DialErrorKind};

/// A name lookup given as a function value: host and port in, socket addresses out.
type LookupFn = dyn Fn(&str, u16) -> io::Result<Vec<SocketAddr>> + Send + Sync;

/// How the connector turns a host name into addresses: the system resolver by default, or a
/// function (tests make a name resolve to chosen addresses without touching `/etc/hosts`).
#[derive(Clone, Default)]
pub struct Resolver {
    /// The replacement lookup; `None` asks the system resolver (`getaddrinfo`).
    lookup: Option<Arc<LookupFn>>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.lookup {
            None => "Resolver(system)",
            Some(_) => "Resolver(custom)",
        })
    }
}

impl Resolver {
    /// The system resolver (`getaddrinfo`, through tokio's blocking pool).
    pub fn system() -> Self {
        Self::default()
    }

    /// A resolver that answers with `lookup(host, port)`.
    pub fn from_fn(
        lookup: impl Fn(&str, u16) -> io::Result<Vec<SocketAddr>> + Send + Sync + 'static,
    ) -> Self {
        Self {
            lookup: Some(Arc::new(lookup)),
        }
    }

    /// The addresses `host` resolves to, with `port`.
    pub async fn lookup(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        match &self.lookup {
            None => Ok(tokio::net::lookup_host((host, port)).await?.collect()),
            Some(lookup) => lookup(host, port),
        }
    }
}

/// Connects to `host:port` if `allow` permits it, resolving names with the system resolver;
/// see [`connect_via`].
pub async fn connect(
    allow: &AllowList,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), DialError> {
    connect_via(&Resolver::system(), allow, host, port, timeout).await
}

/// Connects to `host:port` if `allow` permits it, within `timeout` overall (resolution
/// included), and returns the stream (with `TCP_NODELAY` set) and the address it reached.
///
/// * An IP literal (IPv6 with or without brackets) is canonicalised ([`canonical_ip`]) and
///   must pass [`AllowList::permits_ip`].
/// * A non-canonical numeric IPv4 form (`2130706433`, `0177.0.0.1`, `127.1`, ...) is refused
///   before it can reach the resolver, which would read it as an address.
/// * A name is resolved once with `resolver` and only the addresses that pass
///   [`AllowList::permits_resolved`] are dialled: with a host rule for the name, every
///   address but the restricted and never-allowed ones; without one, the addresses an
///   address rule permits.
///
/// The checked addresses are tried in resolver order until one accepts.
pub async fn connect_via(
    resolver: &Resolver,
    allow: &AllowList,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), DialError> {
    let target = Target { host, port };
    let attempt = connect_unbounded(resolver, allow, target);
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(DialError::new(
            DialErrorKind::TimedOut,
            format!("{target}: no connection within {timeout:?}"),
        )),
    }
}

/// The requested target, displayed as `host:port` (IPv6 literals in brackets) in messages.
#[derive(Clone, Copy)]
struct Target<'a> {
    host: &'a str,
    port: u16,
}

impl fmt::Display for Target<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') && !self.host.starts_with('[') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

fn forbidden(message: impl Into<String>) -> DialError {
    DialError::new(DialErrorKind::Forbidden, message)
}

async fn connect_unbounded(
    resolver: &Resolver,
    allow: &AllowList,
    target: Target<'_>,
) -> Result<(TcpStream, SocketAddr), DialError> {
    let addrs = checked_addresses(resolver, allow, target).await?;
    connect_any(target, &addrs).await
}

/// What an allow-list says of a target before any name is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precheck {
    /// An IP literal the list permits: dial this address.
    Literal(SocketAddr),
    /// A name that may be permitted: resolve it and judge each answer; `by_name` says whether
    /// a host rule vouches for it.
    Resolve { by_name: bool },
}

/// Judges `host:port` against `allow` without resolving anything: an IP literal is permitted
/// or not, and a name no rule could permit (no host rule names it, and no address rule covers
/// the port) is refused without asking DNS. The agent starts every dial here; the root asks
/// the same with the allow-list its agents report, so a dial they would refuse is refused at
/// the root, with the agent's words, and without a round trip.
pub fn precheck(allow: &AllowList, host: &str, port: u16) -> Result<Precheck, DialError> {
    let target = Target { host, port };
    if let Some(ip) = ip_literal(host) {
        return checked_literal(allow, SocketAddr::new(canonical_ip(ip), port))
            .map(Precheck::Literal);
    }
    if is_numeric_host_form(host) {
        return Err(forbidden(format!(
            "{target}: {host:?} is an ambiguous numeric address form; \
             use a dotted-quad IPv4 address"
        )));
    }
    if normalise_name(host).is_none() {
        return Err(forbidden(format!("{target}: not a valid host name")));
    }
    let by_name = allow.permits_name(host, port);
    if !by_name && !allow.has_ip_rule_for_port(port) {
        return Err(forbidden(format!(
            "{target} is not in the agent's allow-list"
        )));
    }
    Ok(Precheck::Resolve { by_name })
}

/// The socket addresses `target` may be dialled at, in order; never empty on success.
async fn checked_addresses(
    resolver: &Resolver,
    allow: &AllowList,
    target: Target<'_>,
) -> Result<Vec<SocketAddr>, DialError> {
    let by_name = match precheck(allow, target.host, target.port)? {
        Precheck::Literal(addr) => return Ok(vec![addr]),
        Precheck::Resolve { by_name } => by_name,
    };
    let port = target.port;
    let resolved = resolve(resolver, target).await?;
    let (permitted, refused): (Vec<SocketAddr>, Vec<SocketAddr>) = resolved
        .iter()
        .partition(|addr| allow.permits_resolved(by_name, addr.ip(), port));
    if !refused.is_empty() {
        // The answers stay on the leaf: they may describe its private network.
        tracing::debug!(%target, ?refused, ?permitted, "skipping resolved addresses the allow-list refuses");
    }
    if permitted.is_empty() {
        return Err(forbidden(if by_name {
            format!(
                "{target} resolves only to addresses no host rule may reach \
                 (loopback, link-local, unspecified, broadcast or multicast); \
                 only an address rule naming them permits them"
            )
        } else {
            format!("{target} resolves only to addresses outside the agent's allow-list")
        }));
    }
    Ok(permitted)
}

/// The one address an IP-literal target may be dialled at, if `allow` permits it.
fn checked_literal(allow: &AllowList, addr: SocketAddr) -> Result<SocketAddr, DialError> {
    if let Some(reason) = never_allowed_reason(addr.ip()) {
        return Err(forbidden(format!(
            "{addr} is {reason}, which the agent never dials"
        )));
    }
    if allow.permits_ip(addr.ip(), addr.port()) {
        return Ok(addr);
    }
    Err(forbidden(match restricted_range(addr.ip()) {
        Some(range) => format!(
            "{addr} is not in the agent's allow-list ({} addresses need an address rule \
             inside {})",
            range.what, range.net
        ),
        None => format!("{addr} is not in the agent's allow-list"),
    }))
}

/// `host` as an IP literal: anything `std` parses as an address, and IPv6 in brackets.
fn ip_literal(host: &str) -> Option<IpAddr> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(ip);
    }
    let inside = host.strip_prefix('[')?.strip_suffix(']')?;
    inside.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
}

/// Resolves `target` once, canonicalising and de-duplicating the answers in order.
async fn resolve(resolver: &Resolver, target: Target<'_>) -> Result<Vec<SocketAddr>, DialError> {
    let answers = resolver
        .lookup(target.host, target.port)
        .await
        .map_err(|err| {
            DialError::new(
                DialErrorKind::NameNotResolved,
                format!("{target}: cannot resolve {}: {err}", target.host),
            )
        })?;
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for addr in answers {
        let addr = SocketAddr::new(canonical_ip(addr.ip()), addr.port());
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    if addrs.is_empty() {
        return Err(DialError::new(
            DialErrorKind::NameNotResolved,
            format!("{target}: {} has no addresses", target.host),
        ));
    }
    Ok(addrs)
}

/// Tries each checked address in order; the error of the last attempt wins.
async fn connect_any(
    target: Target<'_>,
    addrs: &[SocketAddr],
) -> Result<(TcpStream, SocketAddr), DialError> {
    let mut last = None;
    for &addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                stream.set_nodelay(true).map_err(|err| {
                    DialError::new(
                        DialErrorKind::Other,
                        format!("{target}: cannot set TCP_NODELAY: {err}"),
                    )
                })?;
                return Ok((stream, addr));
            }
            Err(err) => {
                tracing::debug!(%target, %addr, error = %err, "connect attempt failed");
                last = Some((addr, err));
            }
        }
    }
    Err(match last {
        Some((addr, err)) => io_error(target, addr, &err),
        None => DialError::new(
            DialErrorKind::Other,
            format!("{target}: no address to dial"),
        ),
    })
}

/// Maps a connect error to the dial error a caller can act on. The message names the
/// target as requested, never the address a name resolved to (logged at debug instead).
fn io_error(target: Target<'_>, addr: SocketAddr, err: &io::Error) -> DialError {
    let kind = match err.kind() {
        io::ErrorKind::ConnectionRefused => DialErrorKind::Refused,
        io::ErrorKind::TimedOut => DialErrorKind::TimedOut,
        io::ErrorKind::HostUnreachable
        | io::ErrorKind::NetworkUnreachable
        | io::ErrorKind::NetworkDown => DialErrorKind::Unreachable,
        _ => DialErrorKind::Other,
    };
    tracing::debug!(%target, %addr, error = %err, "dial failed");
    DialError::new(kind, format!("{target}: {err}"))
}

#[cfg(test)]
mod tests;
