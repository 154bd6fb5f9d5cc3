//! SOCKS5 (RFC 1928) with username/password authentication (RFC 1929), CONNECT only.
//!
//! The username is the client's name and the password its token; "no authentication" is never
//! accepted. A username `NAME@LEAF` chooses the leaf ([`naming`](super::naming)): then the
//! target is the real host, a name or an IP address. Otherwise the target must be a domain name
//! of the form `HOST.CLUSTER.tether`, and an IP address, which cannot say which cluster it is
//! in, gets "address type not supported". Clients must resolve names through the proxy either
//! way (`curl --socks5-hostname`, `socks5h://`, `ssh -o ProxyCommand='nc -X 5 ...'`): the leaf
//! resolves them.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::naming::{self, Login};
use super::{ClientEntryConfig, HandshakeError, Request};
use crate::protocol::{DialError, DialErrorKind};
use crate::proxy::access::Who;

/// The protocol version byte; also what the entry sniffs to tell SOCKS5 from HTTP.
pub(super) const VERSION: u8 = 0x05;

const METHOD_USER_PASS: u8 = 0x02;
const METHOD_NONE_ACCEPTABLE: u8 = 0xFF;
const AUTH_VERSION: u8 = 0x01;
const CMD_CONNECT: u8 = 0x01;
const ATYP_IPV4: u8 = 0x01;
const ATYP_DOMAIN: u8 = 0x03;
const ATYP_IPV6: u8 = 0x04;

/// Reply codes (RFC 1928 §6).
pub(super) mod reply {
    pub const SUCCEEDED: u8 = 0x00;
    pub const GENERAL_FAILURE: u8 = 0x01;
    pub const NOT_ALLOWED: u8 = 0x02;
    pub const NETWORK_UNREACHABLE: u8 = 0x03;
    pub const HOST_UNREACHABLE: u8 = 0x04;
    pub const CONNECTION_REFUSED: u8 = 0x05;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x07;
    pub const ADDRESS_TYPE_NOT_SUPPORTED: u8 = 0x08;
}

/// Runs the method negotiation, authentication and request. The version byte has already been
/// read by the protocol sniffer.
pub(super) async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    config: &ClientEntryConfig,
) -> Result<Request, HandshakeError> {
    let n_methods = stream.read_u8().await?;
    let mut methods = vec![0u8; usize::from(n_methods)];
    stream.read_exact(&mut methods).await?;
    if !methods.contains(&METHOD_USER_PASS) {
        write(stream, &[VERSION, METHOD_NONE_ACCEPTABLE]).await?;
        return rejected("SOCKS5 client did not offer username/password authentication");
    }
    write(stream, &[VERSION, METHOD_USER_PASS]).await?;

    if stream.read_u8().await? != AUTH_VERSION {
        return rejected("SOCKS5 authentication: unknown subnegotiation version");
    }
    let user = read_short(stream).await?;
    let password = read_short(stream).await?;
    let login = std::str::from_utf8(&user)
        .ok()
        .and_then(|name| naming::verify_user(&config.tokens.load(), name, &password));
    let Login { user, leaf } = match login {
        Some(login) => login,
        None => {
            write(stream, &[AUTH_VERSION, 0x01]).await?;
            return Err(HandshakeError::AuthFailed("SOCKS5 authentication failed"));
        }
    };
    write(stream, &[AUTH_VERSION, 0x00]).await?;

    let mut head = [0u8; 4];
    stream.read_exact(&mut head).await?;
    let [version, command, _reserved, address_type] = head;
    if version != VERSION {
        return rejected("SOCKS5 request with a wrong version byte");
    }
    let host = match address_type {
        ATYP_IPV4 => {
            let mut ip = [0u8; 4];
            stream.read_exact(&mut ip).await?;
            Some(std::net::Ipv4Addr::from(ip).to_string().into_bytes())
        }
        ATYP_IPV6 => {
            let mut ip = [0u8; 16];
            stream.read_exact(&mut ip).await?;
            Some(std::net::Ipv6Addr::from(ip).to_string().into_bytes())
        }
        ATYP_DOMAIN => Some(read_short(stream).await?),
        _ => {
            write_reply(stream, reply::ADDRESS_TYPE_NOT_SUPPORTED).await?;
            return rejected("SOCKS5 request with an unknown address type");
        }
    };
    let port = stream.read_u16().await?;
    if command != CMD_CONNECT {
        write_reply(stream, reply::COMMAND_NOT_SUPPORTED).await?;
        return Err(HandshakeError::Rejected(format!(
            "user {user}: SOCKS5 command {command:#04x} not supported (only CONNECT)"
        )));
    }
    let Some(host) = host.filter(|_| address_type == ATYP_DOMAIN || leaf.is_some()) else {
        write_reply(stream, reply::ADDRESS_TYPE_NOT_SUPPORTED).await?;
        return Err(HandshakeError::Rejected(format!(
            "user {user}: SOCKS5 IP address target cannot name a cluster (choose the leaf with \
             the user name {user}@LEAF, or use HOST.CLUSTER.tether)"
        )));
    };
    let parsed = std::str::from_utf8(&host)
        .map_err(|_| "invalid target: the name is not UTF-8".to_owned())
        .and_then(|name| naming::target_for(name, port, leaf.as_deref()));
    match parsed {
        Ok(target) => Ok(Request {
            target,
            who: Who::named(user),
            leftover: Vec::new(),
        }),
        Err(e) => {
            write_reply(stream, reply::HOST_UNREACHABLE).await?;
            Err(HandshakeError::Rejected(format!(
                "user {user}: bad SOCKS5 target: {e}"
            )))
        }
    }
}

/// The reply code for a failed dial:
///
/// | kind | code |
/// | --- | --- |
/// | Forbidden, NotPermitted | 0x02 connection not allowed by ruleset |
/// | NoTunnel | 0x03 network unreachable (the whole cluster is out of reach) |
/// | Unreachable, NameNotResolved | 0x04 host unreachable |
/// | TimedOut | 0x04 host unreachable (0x06 "TTL expired" would mislead users) |
/// | Refused | 0x05 connection refused |
/// | Other | 0x01 general failure |
pub(super) fn dial_error_reply(kind: DialErrorKind) -> u8 {
    match kind {
        DialErrorKind::Forbidden | DialErrorKind::NotPermitted => reply::NOT_ALLOWED,
        DialErrorKind::NoTunnel => reply::NETWORK_UNREACHABLE,
        DialErrorKind::Unreachable | DialErrorKind::NameNotResolved | DialErrorKind::TimedOut => {
            reply::HOST_UNREACHABLE
        }
        DialErrorKind::Refused => reply::CONNECTION_REFUSED,
        DialErrorKind::Other => reply::GENERAL_FAILURE,
    }
}

/// Tells the client why the dial failed (SOCKS5 has no room for the message itself).
pub(super) async fn write_dial_error<S: AsyncWrite + Unpin>(
    stream: &mut S,
    error: &DialError,
) -> std::io::Result<()> {
    write_reply(stream, dial_error_reply(error.kind)).await
}

/// Tells the client the tunnel is open. The bound address is reported as 0.0.0.0:0: there is
/// no local socket on the client's path that would mean anything to it.
pub(super) async fn write_established<S: AsyncWrite + Unpin>(
    stream: &mut S,
) -> std::io::Result<()> {
    write_reply(stream, reply::SUCCEEDED).await
}

async fn write_reply<S: AsyncWrite + Unpin>(stream: &mut S, code: u8) -> std::io::Result<()> {
    write(stream, &[VERSION, code, 0x00, ATYP_IPV4, 0, 0, 0, 0, 0, 0]).await
}

async fn write<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// Reads a length-prefixed (one byte) field.
async fn read_short<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<Vec<u8>> {
    let len = stream.read_u8().await?;
    let mut field = vec![0u8; usize::from(len)];
    stream.read_exact(&mut field).await?;
    Ok(field)
}

fn rejected(why: &str) -> Result<Request, HandshakeError> {
    Err(HandshakeError::Rejected(why.to_owned()))
}
