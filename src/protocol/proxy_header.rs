//! The PROXY protocol header (HAProxy's spec, versions 1 and 2): how a load balancer that
//! opens its own connection to a proxy says where the client really came from.
//!
//! Behind a load balancer that does not keep source addresses (an L7 one, a Kubernetes
//! Service with `externalTrafficPolicy: Cluster`, most cloud L4 balancers in proxy mode) every
//! connection comes from the balancer's few addresses, so the per-source limits count the
//! whole internet as one source: one host holding 32 silent sockets takes the balancer's
//! whole handshake share from everyone. HAProxy (`send-proxy-v2`), AWS NLB, GCP, Azure and
//! nginx can all prepend this header; the proxy reads it, only from addresses it was told to
//! trust, and counts the connection against the client's address instead.
//!
//! The header must be read exactly, never past its end (what follows is TLS or SSH): [`next`]
//! says how many bytes to read next, without doing any I/O itself. Version 2 is 16 bytes and a
//! length; version 1 a line of at most 107 bytes, read a byte at a time (it is short, sent
//! once per connection, and the byte after it is not ours).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Version 2's first twelve bytes.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The longest version 1 line, CRLF included (the spec's bound).
pub const MAX_V1: usize = 107;

/// The most bytes after version 2's 16-byte start accepted: the addresses (at most 216 for
/// AF_UNIX) and TLVs such as AWS's VPC endpoint ID. A peer announcing more is refused.
pub const MAX_V2_BODY: usize = 1024;

/// Why a header was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("no PROXY protocol header: the connection starts {0:?}")]
    Missing(String),
    #[error("malformed PROXY protocol v1 header: {0}")]
    V1(&'static str),
    #[error("malformed PROXY protocol v2 header: {0}")]
    V2(&'static str),
    #[error("PROXY protocol v2 header announces {0} bytes, over the {MAX_V2_BODY}-byte bound")]
    TooLong(usize),
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

/// What reading a header needs next, given the bytes read so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Exactly this many more bytes: never more than the header has left, so a reader that
    /// reads exactly them never takes a byte of what follows.
    Read(usize),
    /// The header is complete: the client's address, or `None` when the balancer speaks for
    /// itself (v2 `LOCAL`, as in its health checks; v1 `UNKNOWN`; a family other than IPv4
    /// and IPv6).
    Done(Option<SocketAddr>),
}

/// What comes after `header`, the bytes read so far from the start of the connection; an
/// error as soon as they cannot start a valid header.
pub fn next(header: &[u8]) -> Result<Next, ProxyHeaderError> {
    // 12 bytes can always be read: the shortest v1 line ("PROXY UNKNOWN\r\n") has 15.
    if header.len() < V2_SIGNATURE.len() {
        return Ok(Next::Read(V2_SIGNATURE.len() - header.len()));
    }
    if header.starts_with(&V2_SIGNATURE) {
        let Some(fixed) = header.get(..16) else {
            return Ok(Next::Read(16 - header.len()));
        };
        let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        if len > MAX_V2_BODY {
            return Err(ProxyHeaderError::TooLong(len));
        }
        return match (16 + len).checked_sub(header.len()) {
            Some(0) => parse_v2(fixed[12], fixed[13], &header[16..]).map(Next::Done),
            Some(more) => Ok(Next::Read(more)),
            None => Err(ProxyHeaderError::V2("read past its announced length")),
        };
    }
    if !header.starts_with(b"PROXY ") {
        let shown: String = String::from_utf8_lossy(&header[..V2_SIGNATURE.len()])
            .chars()
            .map(|c| if c.is_control() { '.' } else { c })
            .collect();
        return Err(ProxyHeaderError::Missing(shown));
    }
    if header.ends_with(b"\r\n") {
        return parse_v1(header).map(Next::Done);
    }
    if header.len() >= MAX_V1 {
        return Err(ProxyHeaderError::V1("no CRLF within 107 bytes"));
    }
    // A byte at a time: the line's end is not known before it is read.
    Ok(Next::Read(1))
}

/// The header at the start of `bytes` (already read, such as a peeked segment) and its
/// length; [`ProxyHeaderError::Io`] (end of file) when `bytes` ends inside it.
pub fn from_bytes(bytes: &[u8]) -> Result<(Option<SocketAddr>, usize), ProxyHeaderError> {
    let mut len = 0;
    loop {
        match next(&bytes[..len])? {
            Next::Done(source) => return Ok((source, len)),
            Next::Read(more) if len + more <= bytes.len() => len += more,
            Next::Read(_) => {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
        }
    }
}

/// Parses a whole version 1 line, `PROXY TCP4 SRC DST SPORT DPORT\r\n`.
pub fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let bad = ProxyHeaderError::V1;
    let line = line.strip_suffix(b"\r\n").ok_or(bad("no CRLF"))?;
    let line = std::str::from_utf8(line).map_err(|_| bad("not ASCII"))?;
    let mut fields = line.split(' ');
    if fields.next() != Some("PROXY") {
        return Err(bad("does not start with PROXY"));
    }
    let family = fields.next().ok_or(bad("no protocol"))?;
    if family == "UNKNOWN" {
        return Ok(None);
    }
    let mut next = || fields.next().ok_or(bad("too few fields"));
    let (source, _destination, port, _destination_port) = (next()?, next()?, next()?, next()?);
    if fields.next().is_some() {
        return Err(bad("too many fields"));
    }
    let ip: IpAddr = match family {
        "TCP4" => source
            .parse::<Ipv4Addr>()
            .map_err(|_| bad("bad IPv4 source"))?
            .into(),
        "TCP6" => source
            .parse::<Ipv6Addr>()
            .map_err(|_| bad("bad IPv6 source"))?
            .into(),
        _ => return Err(bad("protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    let port = port.parse().map_err(|_| bad("bad source port"))?;
    Ok(Some(SocketAddr::new(ip, port)))
}

/// Parses version 2 after its signature: the version and command byte, the family and
/// transport byte, and the body (addresses, then TLVs, which are skipped).
pub fn parse_v2(
    version_command: u8,
    family: u8,
    body: &[u8],
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let bad = ProxyHeaderError::V2;
    if version_command >> 4 != 2 {
        return Err(bad("version is not 2"));
    }
    match version_command & 0x0f {
        0 => return Ok(None),
        1 => {}
        _ => return Err(bad("command is neither LOCAL nor PROXY")),
    }
    let source = match family {
        // TCP over IPv4: source, destination, source port, destination port.
        0x11 => {
            let a: &[u8; 12] = body
                .get(..12)
                .and_then(|a| a.try_into().ok())
                .ok_or(bad("IPv4 addresses cut short"))?;
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            SocketAddr::new(ip.into(), u16::from_be_bytes([a[8], a[9]]))
        }
        0x21 => {
            let a: &[u8; 36] = body
                .get(..36)
                .and_then(|a| a.try_into().ok())
                .ok_or(bad("IPv6 addresses cut short"))?;
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&a[..16]);
            SocketAddr::new(
                Ipv6Addr::from(ip).into(),
                u16::from_be_bytes([a[32], a[33]]),
            )
        }
        // Unspecified, UNIX or datagram: nothing to count the connection against.
        _ => return Ok(None),
    };
    Ok(Some(source))
}

#[cfg(test)]
mod tests;
