//! Why the way to the root could not be opened, and why an egress configuration is refused.
//!
//! Every message names the hop (the forward proxy's URL, never its password) and the target,
//! because the person reading it is an operator of the leaf who must tell their proxy's
//! administrator what to allow.

use std::io;
use std::time::Duration;

/// Why [`open`](super::open) failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("invalid root address: {0}")]
    Address(String),
    #[error(transparent)]
    Carrier(#[from] super::carrier::CarrierError),
    #[error("cannot reach {addr}: {source}")]
    Direct {
        /// The address dialled.
        addr: String,
        /// Why the TCP connect failed (refused, unreachable, ...).
        source: io::Error,
    },
    #[error("cannot reach the forward proxy {proxy} (on the way to {target}): {source}")]
    ProxyUnreachable {
        /// The proxy's URL, without credentials.
        proxy: String,
        /// The root address the CONNECT was for.
        target: String,
        /// Why the TCP connect to the proxy failed.
        source: io::Error,
    },
    #[error("TLS with the forward proxy {proxy} failed (on the way to {target}): {source}")]
    ProxyTls {
        /// The proxy's URL, without credentials.
        proxy: String,
        /// The root address the CONNECT was for.
        target: String,
        /// The handshake's failure (an unknown CA: give it with `--egress-proxy-ca`).
        source: io::Error,
    },
    #[error("the forward proxy {proxy} answered {status} to CONNECT {target}: {credentials}")]
    ProxyAuth {
        /// The proxy's URL, without credentials.
        proxy: String,
        /// The root address the CONNECT was for.
        target: String,
        /// The status line it answered: a 407, or a 401 from proxies that use it for
        /// credentials they refuse (tinyproxy), said to be one.
        status: String,
        /// Which credentials it refused and where they came from, or that none were given
        /// and how to give them. Never the password.
        credentials: String,
    },
    #[error(
        "the forward proxy {proxy} forbids CONNECT {target} ({status}{detail}): its rules must allow the root's host and port"
    )]
    ProxyForbidden {
        /// The proxy's URL, without credentials.
        proxy: String,
        /// The root address the CONNECT was for.
        target: String,
        /// The status line it answered (`HTTP/1.1 403 Forbidden`; proxies word it their way).
        status: String,
        /// A short, sanitised excerpt of the proxy's answer (`: ...`), or nothing.
        detail: String,
    },
    #[error("the forward proxy {proxy} refused CONNECT {target}: {status}{detail}")]
    ProxyRefused {
        /// The proxy's URL, without credentials.
        proxy: String,
        /// The root address the CONNECT was for.
        target: String,
        /// The status line it answered (`HTTP/1.1 502 Bad Gateway`).
        status: String,
        /// A short, sanitised excerpt of the proxy's answer (`: ...`), or nothing.
        detail: String,
    },
    #[error("the forward proxy {proxy} closed the connection before answering CONNECT {target}")]
    ProxyClosed {
        /// The proxy's URL, without credentials.
        proxy: String,
        /// The root address the CONNECT was for.
        target: String,
    },
    #[error("{proxy} did not answer CONNECT {target} as an HTTP proxy would: {cause}")]
    NotHttp {
        /// The proxy's URL, without credentials.
        proxy: String,
        /// The root address the CONNECT was for.
        target: String,
        /// What it sent instead (sanitised), or what was wrong with its answer.
        cause: String,
    },
    #[error("the forward proxy {proxy} did not answer CONNECT {target} within {limit:?}")]
    ProxyTimeout {
        /// The proxy's URL, without credentials.
        proxy: String,
        /// The root address the CONNECT was for.
        target: String,
        /// The deadline of the CONNECT exchange.
        limit: Duration,
    },
    #[error("I/O with the forward proxy {proxy} failed during CONNECT {target}: {source}")]
    ProxyIo {
        /// The proxy's URL, without credentials.
        proxy: String,
        /// The root address the CONNECT was for.
        target: String,
        /// The read or write that failed.
        source: io::Error,
    },
    #[error("{0:?} is not a host:port a CONNECT request can carry")]
    BadTarget(String),
}

impl TransportError {
    /// Whether nothing listens at the address dialled directly: the root is down or
    /// restarting, which a quick retry costs nothing (the agent's pool paces those apart).
    pub fn nothing_listens(&self) -> bool {
        matches!(self, Self::Direct { source, .. } if source.kind() == io::ErrorKind::ConnectionRefused)
    }
}

/// Why an egress configuration (a proxy URL, its credentials, its CA) is refused at start-up.
/// `origin` names where the value came from: a flag, an environment variable, a Secret.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("{origin}: not a forward proxy URL: {cause}")]
    Url {
        /// The flag or variable that held it.
        origin: String,
        /// What is wrong with it (never the URL itself: it may hold a password).
        cause: String,
    },
    #[error("{origin}: credentials must be one line `user:password`: {cause}")]
    Credentials {
        /// The file, Secret or URL that held them.
        origin: String,
        /// What is wrong with them (never their text).
        cause: String,
    },
    #[error("{origin}: the forward proxy's CA: {cause}")]
    Ca {
        /// The file, Secret or variable that held it.
        origin: String,
        /// What is wrong with it.
        cause: String,
    },
    #[error("{origin}: cannot read {path}: {source}")]
    Read {
        /// The flag that named the file.
        origin: String,
        /// The file.
        path: String,
        /// Why it could not be read.
        source: io::Error,
    },
}
