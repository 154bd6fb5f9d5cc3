//! HTTP CONNECT: `CONNECT HOST.CLUSTER.tether:PORT HTTP/1.1` with `Proxy-Authorization`, or
//! `CONNECT HOST:PORT` with the leaf in the Basic user name (`alice@leaf-1`, see [`naming`]).
//!
//! Only CONNECT is served: the entry makes byte tunnels and never interprets what flows through
//! them. Any other method gets `405` with a line saying how to use the proxy.

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::auth::{ClientTokens, base64_decode};
use super::naming::{self, Login};
use super::{ClientEntryConfig, HandshakeError, Request};
use crate::protocol::{DialError, DialErrorKind};
use crate::proxy::access::Who;
use crate::transport::http_head::{HeadError, read_head};

/// Most header lines accepted in a request head.
const MAX_HEADERS: usize = 64;

const USAGE: &str = "tether: this proxy only tunnels with CONNECT to HOST:PORT with the leaf in \
the user name, or to HOST.CLUSTER.tether:PORT (for example `curl --proxytunnel --proxy \
http://NAME%40LEAF:TOKEN@PROXY URL`)\n";

/// What the request head said, copied out of the read buffer.
struct Head {
    /// The head's length: what follows is the client's first bytes for the target.
    len: usize,
    method: String,
    target: String,
    authorization: Option<String>,
}

/// The head at the start of `buf`, `None` while it is incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, httparse::Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(len) = req.parse(buf)? else {
        return Ok(None);
    };
    Ok(Some(Head {
        len,
        method: req.method.unwrap_or_default().to_owned(),
        target: req.path.unwrap_or_default().to_owned(),
        authorization: req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("proxy-authorization"))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::to_owned),
    }))
}

/// Reads and checks the request head. `first` is the byte already read to sniff the protocol.
/// On success, bytes the client sent after the head are in [`Request::leftover`].
pub(super) async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    first: u8,
    config: &ClientEntryConfig,
) -> Result<Request, HandshakeError> {
    let mut buf = vec![first];
    let max = config.max_header_bytes.max(1);
    let Head {
        len,
        method,
        target,
        authorization,
    } = match read_head(stream, &mut buf, max, parse_head).await {
        Ok(head) => head,
        Err(HeadError::TooLarge | HeadError::Parse(httparse::Error::TooManyHeaders)) => {
            return reject(
                stream,
                431,
                "Request Header Fields Too Large",
                "",
                "tether: request head too large\n",
                "request head too large",
            )
            .await;
        }
        Err(HeadError::Parse(_)) => {
            return reject(
                stream,
                400,
                "Bad Request",
                "",
                "tether: malformed HTTP request\n",
                "malformed HTTP request",
            )
            .await;
        }
        Err(HeadError::Closed) => return Err(HandshakeError::Closed),
        Err(HeadError::Io(e)) => return Err(e.into()),
    };

    if method != "CONNECT" {
        return reject(
            stream,
            405,
            "Method Not Allowed",
            "Allow: CONNECT\r\n",
            USAGE,
            "HTTP method other than CONNECT",
        )
        .await;
    }
    let Some((who, leaf)) = authenticate(authorization.as_deref(), config).await else {
        let result = reject(
            stream,
            407,
            "Proxy Authentication Required",
            "Proxy-Authenticate: Basic realm=\"tether\"\r\n",
            "tether: authentication required (Basic NAME:TOKEN or NAME@LEAF:TOKEN, or Bearer \
             TOKEN)\n",
            "no credentials",
        )
        .await;
        // Asking without credentials is how curl starts; only wrong ones count as a guess.
        return match (result, authorization.is_some()) {
            (Err(HandshakeError::Rejected(_)), true) => Err(HandshakeError::AuthFailed(
                "HTTP 407: authentication failed",
            )),
            (other, _) => other,
        };
    };
    let target = match naming::target_of_authority(&target, leaf.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            let body = format!("tether: {e}\n");
            let why = format!("user {}: bad target: {e}", who.user);
            return reject(stream, 400, "Bad Request", "", &body, &why).await;
        }
    };
    Ok(Request {
        target,
        who,
        leftover: buf.split_off(len),
    })
}

/// Checks a `Proxy-Authorization` value: Basic `NAME:TOKEN` or a Bearer token from the token
/// file, else a Bearer token the configured [`BearerTokens`](crate::proxy::BearerTokens)
/// accept (the root's TokenReview). The client on success, and the leaf a Basic user name
/// chose (a bearer token has no user name, hence no leaf).
async fn authenticate(
    value: Option<&str>,
    config: &ClientEntryConfig,
) -> Option<(Who, Option<String>)> {
    let (scheme, credentials) = value?.trim().split_once(' ')?;
    let credentials = credentials.trim();
    if !scheme.eq_ignore_ascii_case("bearer") {
        let login = from_basic(scheme, credentials, &config.tokens.load())?;
        return Some((Who::named(login.user), login.leaf));
    }
    if let Some(name) = config.tokens.load().verify_bearer(credentials.as_bytes()) {
        return Some((Who::named(name), None));
    }
    let who = config.bearer.as_ref()?.review(credentials).await?;
    Some((who, None))
}

/// Checks Basic `NAME:TOKEN` (or `NAME@LEAF:TOKEN`) credentials against the token file.
fn from_basic(scheme: &str, credentials: &str, tokens: &ClientTokens) -> Option<Login> {
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64_decode(credentials)?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    let name = std::str::from_utf8(&decoded[..colon]).ok()?;
    naming::verify_user(tokens, name, &decoded[colon + 1..])
}

/// Writes a complete plain-text response and reports the rejection (`why` is for the log).
async fn reject<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    reason: &str,
    headers: &str,
    body: &str,
    why: &str,
) -> Result<Request, HandshakeError> {
    respond(stream, status, reason, headers, body).await?;
    Err(HandshakeError::Rejected(format!("HTTP {status}: {why}")))
}

async fn respond<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    reason: &str,
    headers: &str,
    body: &str,
) -> std::io::Result<()> {
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\n{headers}Content-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.flush().await
}

/// The status for a failed dial:
///
/// | kind | status |
/// | --- | --- |
/// | Forbidden, NotPermitted | 403 Forbidden |
/// | NoTunnel | 503 Service Unavailable (the site's tunnel is down: retry later) |
/// | TimedOut | 504 Gateway Timeout |
/// | Refused, NameNotResolved, Unreachable, Other | 502 Bad Gateway |
pub(super) fn dial_error_status(kind: DialErrorKind) -> (u16, &'static str) {
    match kind {
        DialErrorKind::Forbidden | DialErrorKind::NotPermitted => (403, "Forbidden"),
        DialErrorKind::NoTunnel => (503, "Service Unavailable"),
        DialErrorKind::TimedOut => (504, "Gateway Timeout"),
        DialErrorKind::Refused
        | DialErrorKind::NameNotResolved
        | DialErrorKind::Unreachable
        | DialErrorKind::Other => (502, "Bad Gateway"),
    }
}

/// Tells the client why the dial failed, with the error's message as the body.
pub(super) async fn write_dial_error<S: AsyncWrite + Unpin>(
    stream: &mut S,
    error: &DialError,
) -> std::io::Result<()> {
    let (status, reason) = dial_error_status(error.kind);
    let body = format!("tether: {}\n", error.to_string().replace(['\r', '\n'], " "));
    respond(stream, status, reason, "", &body).await
}

/// Tells the client the tunnel is open.
pub(super) async fn write_established<S: AsyncWrite + Unpin>(
    stream: &mut S,
) -> std::io::Result<()> {
    stream
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    stream.flush().await
}
