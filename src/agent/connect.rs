//! The agent's outbound connect: check a dial request against the [`AllowList`], resolve
//! it at most once, and connect only to the addresses that were checked.
//!
//! Checking a name and then letting the OS resolve it again at connect time would let a
//! DNS answer change between check and use; so names are resolved here, the resulting
//! addresses are judged, and exactly those socket addresses are dialled.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;

use super::allow_list::{
    AllowList, canonical_ip, is_numeric_host_form, never_allowed_reason, normalise_name,
};
use crate::protocol::{DialError, DialErrorKind};

/// Connects to `host:port` if `allow` permits it, within `timeout` overall (resolution
/// included), and returns the stream (with `TCP_NODELAY` set) and the address it reached.
///
/// * An IP literal (IPv6 with or without brackets) is canonicalised ([`canonical_ip`]) and
///   must pass [`AllowList::permits_ip`].
/// * A non-canonical numeric IPv4 form (`2130706433`, `0177.0.0.1`, `127.1`, ...) is refused
///   before it can reach the resolver, which would read it as an address.
/// * A name permitted by a host rule is resolved and every resolved address except the
///   never-allowed ones may be dialled; any other name is resolved and only addresses that
///   [`AllowList::permits_ip`] are dialled.
///
/// The checked addresses are tried in resolver order until one accepts.
pub async fn connect(
    allow: &AllowList,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), DialError> {
    let target = Target { host, port };
    match tokio::time::timeout(timeout, connect_unbounded(allow, target)).await {
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
    allow: &AllowList,
    target: Target<'_>,
) -> Result<(TcpStream, SocketAddr), DialError> {
    let addrs = checked_addresses(allow, target).await?;
    connect_any(target, &addrs).await
}

/// The socket addresses `target` may be dialled at, in order; never empty on success.
async fn checked_addresses(
    allow: &AllowList,
    target: Target<'_>,
) -> Result<Vec<SocketAddr>, DialError> {
    let Target { host, port } = target;
    if let Some(ip) = ip_literal(host) {
        let addr = SocketAddr::new(canonical_ip(ip), port);
        if let Some(reason) = never_allowed_reason(addr.ip()) {
            return Err(forbidden(format!(
                "{addr} is {reason}, which the agent never dials"
            )));
        }
        if !allow.permits_ip(addr.ip(), port) {
            return Err(forbidden(format!(
                "{addr} is not in the agent's allow-list"
            )));
        }
        return Ok(vec![addr]);
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
        // No resolved address could be permitted: refuse without asking DNS.
        return Err(forbidden(format!(
            "{target} is not in the agent's allow-list"
        )));
    }
    let resolved = resolve(target).await?;
    let (permitted, refused): (Vec<SocketAddr>, Vec<SocketAddr>) =
        resolved.iter().partition(|addr| {
            if by_name {
                never_allowed_reason(addr.ip()).is_none()
            } else {
                allow.permits_ip(addr.ip(), port)
            }
        });
    if permitted.is_empty() {
        let list = refused
            .iter()
            .map(|addr| addr.ip().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let message = if by_name {
            format!("{host} resolves only to {list}, which the agent never dials (port {port})")
        } else if refused.len() == 1 {
            format!(
                "{host} resolves to {list}, which is not in the agent's allow-list for port {port}"
            )
        } else {
            format!(
                "{host} resolves to {list}, none of which is in the agent's allow-list for port {port}"
            )
        };
        return Err(forbidden(message));
    }
    if !refused.is_empty() {
        tracing::debug!(%target, ?refused, "skipping resolved addresses the allow-list refuses");
    }
    Ok(permitted)
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
async fn resolve(target: Target<'_>) -> Result<Vec<SocketAddr>, DialError> {
    let answers = tokio::net::lookup_host((target.host, target.port))
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

/// Maps a connect error to the dial error a caller can act on.
fn io_error(target: Target<'_>, addr: SocketAddr, err: &io::Error) -> DialError {
    let kind = match err.kind() {
        io::ErrorKind::ConnectionRefused => DialErrorKind::Refused,
        io::ErrorKind::TimedOut => DialErrorKind::TimedOut,
        io::ErrorKind::HostUnreachable
        | io::ErrorKind::NetworkUnreachable
        | io::ErrorKind::NetworkDown => DialErrorKind::Unreachable,
        _ => DialErrorKind::Other,
    };
    let via = if ip_literal(target.host) == Some(addr.ip()) {
        String::new()
    } else {
        format!(" (at {addr})")
    };
    DialError::new(kind, format!("{target}{via}: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const TIMEOUT: Duration = Duration::from_secs(5);

    fn list(rules: &[String]) -> AllowList {
        match AllowList::parse(rules) {
            Ok(list) => list,
            Err(err) => panic!("{err}"),
        }
    }

    /// A loopback listener that echoes one line, and its port.
    async fn echo_server() -> (u16, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local addr").port();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    if let Ok(n) = stream.read(&mut buf).await {
                        let _ = stream.write_all(&buf[..n]).await;
                    }
                });
            }
        });
        (port, task)
    }

    /// A loopback port with nothing listening on it.
    async fn closed_port() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local addr").port();
        drop(listener);
        port
    }

    async fn expect_err(allow: &AllowList, host: &str, port: u16) -> DialError {
        match connect(allow, host, port, TIMEOUT).await {
            Ok((_, addr)) => panic!("{host}:{port} connected to {addr}"),
            Err(err) => err,
        }
    }

    async fn round_trip(mut stream: TcpStream) {
        stream.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"ping");
    }

    #[tokio::test]
    async fn connects_to_permitted_ip() {
        let (port, server) = echo_server().await;
        let allow = list(&[format!("127.0.0.1:{port}")]);
        let (stream, addr) = connect(&allow, "127.0.0.1", port, TIMEOUT)
            .await
            .expect("connect");
        assert_eq!(addr, SocketAddr::from(([127, 0, 0, 1], port)));
        assert!(stream.nodelay().expect("nodelay"));
        round_trip(stream).await;
        server.abort();
    }

    #[tokio::test]
    async fn default_list_denies() {
        let (port, server) = echo_server().await;
        let allow = AllowList::default();
        for host in ["127.0.0.1", "localhost"] {
            let err = expect_err(&allow, host, port).await;
            assert_eq!(err.kind, DialErrorKind::Forbidden, "{err}");
        }
        server.abort();
    }

    #[tokio::test]
    async fn ip_not_in_list_is_forbidden() {
        let allow = list(&["127.0.0.1/32:80".to_owned()]);
        let err = expect_err(&allow, "127.0.0.2", 80).await;
        assert_eq!(err.kind, DialErrorKind::Forbidden);
        assert_eq!(err.message, "127.0.0.2:80 is not in the agent's allow-list");
        // A port outside the rule's ports.
        let err = expect_err(&allow, "127.0.0.1", 81).await;
        assert_eq!(err.kind, DialErrorKind::Forbidden);
        assert!(err.message.contains("127.0.0.1:81"), "{err}");
    }

    #[tokio::test]
    async fn never_allowed_and_mapped_addresses() {
        let tens = list(&["10.0.0.0/8:*".to_owned(), "0.0.0.0/0:*".to_owned()]);
        for host in ["0.0.0.0", "::", "[::]", "255.255.255.255", "224.0.0.1"] {
            let err = expect_err(&tens, host, 80).await;
            assert_eq!(err.kind, DialErrorKind::Forbidden, "{host}: {err}");
            assert!(err.message.contains("never dials"), "{err}");
        }
        let tens = list(&["10.0.0.0/8:*".to_owned()]);
        for host in ["::ffff:127.0.0.1", "[::ffff:127.0.0.1]"] {
            let err = expect_err(&tens, host, 80).await;
            assert_eq!(err.kind, DialErrorKind::Forbidden, "{err}");
            assert_eq!(err.message, "127.0.0.1:80 is not in the agent's allow-list");
        }

        let (port, server) = echo_server().await;
        let loopback = list(&[format!("127.0.0.1/32:{port}")]);
        for host in ["::ffff:127.0.0.1", "[::ffff:127.0.0.1]"] {
            let (stream, addr) = connect(&loopback, host, port, TIMEOUT).await.expect(host);
            assert_eq!(addr, SocketAddr::from(([127, 0, 0, 1], port)));
            round_trip(stream).await;
        }
        server.abort();
    }

    #[tokio::test]
    async fn numeric_forms_never_reach_the_resolver() {
        let allow = list(&["127.0.0.0/8:*".to_owned()]);
        for host in [
            "2130706433",
            "0177.0.0.1",
            "0x7f.0.0.1",
            "0x7f.1",
            "127.1",
            "017700000001",
            "0x7f.0.1",
            "127.000.0.1",
        ] {
            let err = expect_err(&allow, host, 80).await;
            assert_eq!(err.kind, DialErrorKind::Forbidden, "{host}: {err}");
            assert!(err.message.contains("ambiguous numeric"), "{err}");
        }
    }

    #[tokio::test]
    async fn invalid_names_are_forbidden() {
        let allow = list(&["0.0.0.0/0:*".to_owned()]);
        for host in ["", "bad host", "127.0.0.1 x", "a..b", "fe80::1%lo"] {
            let err = expect_err(&allow, host, 80).await;
            assert_eq!(err.kind, DialErrorKind::Forbidden, "{host:?}: {err}");
        }
    }

    #[tokio::test]
    async fn name_resolving_outside_the_list_is_forbidden() {
        let (port, server) = echo_server().await;
        let allow = list(&["10.0.0.0/8:*".to_owned()]);
        let err = expect_err(&allow, "localhost", port).await;
        assert_eq!(err.kind, DialErrorKind::Forbidden, "{err}");
        assert!(err.message.starts_with("localhost resolves to "), "{err}");
        assert!(
            err.message.contains("not in the agent's allow-list"),
            "{err}"
        );
        server.abort();
    }

    #[tokio::test]
    async fn name_whose_addresses_are_permitted_connects() {
        let (port, server) = echo_server().await;
        let allow = list(&[format!("127.0.0.1:{port}")]);
        let (stream, addr) = connect(&allow, "localhost", port, TIMEOUT)
            .await
            .expect("connect");
        assert_eq!(addr, SocketAddr::from(([127, 0, 0, 1], port)));
        round_trip(stream).await;
        server.abort();
    }

    #[tokio::test]
    async fn host_rule_connects() {
        let (port, server) = echo_server().await;
        let allow = list(&[format!("localhost:{port}")]);
        let (stream, addr) = connect(&allow, "LocalHost", port, TIMEOUT)
            .await
            .expect("connect");
        assert!(addr.ip().is_loopback(), "{addr}");
        assert!(stream.nodelay().expect("nodelay"));
        round_trip(stream).await;
        let err = expect_err(&allow, "localhost", port.wrapping_add(1).max(1)).await;
        assert_eq!(err.kind, DialErrorKind::Forbidden, "{err}");
        server.abort();
    }

    #[tokio::test]
    async fn refused() {
        let port = closed_port().await;
        let allow = list(&[format!("127.0.0.1:{port}"), format!("localhost:{port}")]);
        for host in ["127.0.0.1", "localhost"] {
            let err = expect_err(&allow, host, port).await;
            assert_eq!(err.kind, DialErrorKind::Refused, "{err}");
            assert!(err.message.contains(&format!("{host}:{port}")), "{err}");
        }
    }

    #[tokio::test]
    async fn unresolvable_name() {
        let allow = list(&["*.invalid:*".to_owned()]);
        let err = expect_err(&allow, "nonexistent.invalid", 80).await;
        assert_eq!(err.kind, DialErrorKind::NameNotResolved, "{err}");
        assert!(err.message.contains("nonexistent.invalid"), "{err}");
    }

    #[tokio::test]
    async fn overall_timeout() {
        // A loopback listener that never accepts, with its accept queue filled: Linux then
        // drops further SYNs, so a connect hangs without any traffic leaving the machine.
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind");
        let listener = socket.listen(0).expect("listen");
        let port = listener.local_addr().expect("local addr").port();
        let mut fillers = Vec::new();
        for _ in 0..16 {
            let attempt = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port)));
            match tokio::time::timeout(Duration::from_millis(200), attempt).await {
                Ok(Ok(stream)) => fillers.push(stream),
                Ok(Err(_)) | Err(_) => break,
            }
        }
        let allow = list(&[format!("localhost:{port}")]);
        let timeout = Duration::from_millis(300);
        let err = match connect(&allow, "localhost", port, timeout).await {
            Ok((_, addr)) => panic!("connected to {addr}"),
            Err(err) => err,
        };
        assert_eq!(err.kind, DialErrorKind::TimedOut, "{err}");
        assert!(err.message.contains(&format!("localhost:{port}")), "{err}");
        drop(listener);
    }

    #[test]
    fn io_errors_map_to_kinds() {
        let target = Target {
            host: "db",
            port: 5432,
        };
        let addr = SocketAddr::from(([10, 0, 0, 1], 5432));
        let cases = [
            (io::ErrorKind::ConnectionRefused, DialErrorKind::Refused),
            (io::ErrorKind::TimedOut, DialErrorKind::TimedOut),
            (io::ErrorKind::HostUnreachable, DialErrorKind::Unreachable),
            (
                io::ErrorKind::NetworkUnreachable,
                DialErrorKind::Unreachable,
            ),
            (io::ErrorKind::PermissionDenied, DialErrorKind::Other),
        ];
        for (io_kind, kind) in cases {
            let err = io_error(target, addr, &io::Error::from(io_kind));
            assert_eq!(err.kind, kind);
            assert!(
                err.message.starts_with("db:5432 (at 10.0.0.1:5432): "),
                "{err}"
            );
        }
        let err = io_error(
            Target {
                host: "10.0.0.1",
                port: 5432,
            },
            addr,
            &io::Error::from_raw_os_error(113),
        );
        assert_eq!(err.kind, DialErrorKind::Unreachable);
        assert!(err.message.starts_with("10.0.0.1:5432: "), "{err}");
        assert_eq!(
            Target {
                host: "::1",
                port: 22
            }
            .to_string(),
            "[::1]:22"
        );
    }
}
