//! The TLS port: everything a root serves, on one port that a cloud load balancer can put on 443.
//!
//! What a connection carries is read from its first bytes and its TLS handshake, never guessed
//! from its address:
//!
//! ```text
//!   first byte 0x16 (TLS) ──▶ ALPN tether-ssh ──────────────────────────▶ SSH (tunnels, joins,
//!          │                    │                                             peers, dial clients)
//!          │                    └ http/1.1 or none ──┐
//!          └ anything else (plain HTTP from an L7 ───┴▶ GET /tether/v1/tunnel, Upgrade:
//!            load balancer that terminated TLS)         websocket ──▶ SSH in WebSocket frames
//! ```
//!
//! Every connection, whatever it carries, is admitted by the same [`ConnectionLimiter`] as the
//! SSH port's (per source, in total, handshakes) and has one handshake deadline from accept that
//! covers TLS, the HTTP head and the SSH handshake: a client that sends one byte and stops holds
//! a slot for `handshake_timeout` (15 s) at most, and its socket is closed then. The HTTP head is
//! read into at most [`MAX_HEAD`] bytes.
//!
//! [`ConnectionLimiter`]: super::limits::ConnectionLimiter

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::client_entry::{HandOff, HandedOver};
use super::kube_entry::KubeTlsError;
use super::limits::HandshakePermit;
use super::server::{Carried, serve_ssh};
use super::shared::ProxyShared;
use crate::stream::HandshakeGuard;
use crate::transport::Prefixed;
use crate::transport::tls::{ALPN_HTTP1, ALPN_SSH};
use crate::transport::websocket::{self, Role, WebSocket};

/// Largest HTTP request head read on the TLS port before it is routed.
pub const MAX_HEAD: usize = 16 * 1024;

/// The first byte of every TLS connection (a handshake record).
const TLS_HANDSHAKE: u8 = 0x16;

/// What answers anything on the port that is not a tunnel.
const USAGE: &str = "tether: this port carries tunnels: SSH inside TLS (ALPN tether-ssh), a \
WebSocket upgrade at /tether/v1/tunnel, and HTTP CONNECT when the proxy has a client entry\n";

/// The TLS port's settings: its certificate, and the protocols it offers.
pub struct TlsPort {
    /// Accepts TLS with the port's certificate, offering `tether-ssh` then `http/1.1`.
    acceptor: TlsAcceptor,
    /// Where HTTP CONNECT requests go: the client entry, which serves them as its own (`curl
    /// --proxy https://...`); `None`: the port has no client entry and answers 404.
    client_entry: Option<HandOff>,
}

impl TlsPort {
    /// The port with `certificate` (a PEM chain) and its `key`.
    pub fn from_files(certificate: &Path, key: &Path) -> Result<Self, KubeTlsError> {
        let config = super::kube_entry::server_config(certificate, key, None)?;
        Ok(Self::with_config(&config))
    }

    /// The port with a self-signed certificate for `names`, issued now: for a first run with
    /// no certificate at hand. Agents need no trust in it (SSH inside authenticates the proxy,
    /// see [`crate::transport::tls`]); give a real one with [`TlsPort::from_files`] for clients
    /// that check it.
    pub fn self_issued(names: Vec<String>) -> Result<Self, KubeTlsError> {
        let issued = rcgen::generate_simple_self_signed(names)
            .map_err(|e| KubeTlsError::Config(format!("cannot issue a certificate: {e}")))?;
        let key = rustls_pki_types::PrivatePkcs8KeyDer::from(issued.signing_key.serialize_der());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|b| {
                b.with_no_client_auth()
                    .with_single_cert(vec![issued.cert.der().clone()], key.into())
            })
            .map_err(|e| KubeTlsError::Config(e.to_string()))?;
        Ok(Self::with_config(&config))
    }

    /// The port with the certificate of `config`; its ALPN list is replaced by the port's.
    pub fn with_config(config: &rustls::ServerConfig) -> Self {
        let mut config = config.clone();
        config.alpn_protocols = vec![ALPN_SSH.to_vec(), ALPN_HTTP1.to_vec()];
        Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            client_entry: None,
        }
    }

    /// Passes the port's HTTP CONNECT requests to a client entry (its [`hand_off`] sender).
    ///
    /// [`hand_off`]: super::client_entry::hand_off
    pub fn with_client_entry(mut self, entry: HandOff) -> Self {
        self.client_entry = Some(entry);
        self
    }
}

/// Serves one connection of the TLS port (the SSH port's is `server::serve_tcp`).
pub(super) async fn serve(
    shared: Arc<ProxyShared>,
    port: Arc<TlsPort>,
    socket: TcpStream,
    peer: SocketAddr,
    handshake: HandshakePermit,
) {
    let deadline = Instant::now() + shared.config.limits.handshake_timeout;
    let _ = socket.set_nodelay(true);
    let guard = match HandshakeGuard::new(&socket) {
        Ok(g) => g,
        Err(e) => return warn!(error = %e, "cannot guard the handshake; dropping the connection"),
    };
    let carried = Carried {
        peer,
        handshake,
        guard,
        deadline,
    };
    let mut first = [0u8; 1];
    let peeked = tokio::select! {
        r = timeout_at(deadline, socket.peek(&mut first)) => r,
        () = shared.stopped.cancelled() => return,
    };
    if !matches!(peeked, Ok(Ok(1))) {
        return debug!("the connection sent nothing before it ended or ran out of time");
    }
    if first[0] != TLS_HANDSHAKE {
        return serve_http(shared, &port, socket, carried).await;
    }
    let accepted = tokio::select! {
        r = timeout_at(deadline, port.acceptor.accept(socket)) => r,
        () = shared.stopped.cancelled() => return,
    };
    let tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return debug!(error = %e, "TLS handshake failed"),
        Err(_) => return debug!("TLS handshake timed out"),
    };
    if tls.get_ref().1.alpn_protocol() == Some(ALPN_SSH) {
        debug!(carrier = "tls", "SSH inside TLS (ALPN tether-ssh)");
        serve_ssh(shared, tls, carried).await
    } else {
        serve_http(shared, &port, tls, carried).await
    }
}

/// Serves an HTTP connection: a WebSocket upgrade to [`websocket::PATH`] becomes an SSH
/// connection; anything else is answered with how to use the port, and closed.
async fn serve_http<S>(shared: Arc<ProxyShared>, port: &TlsPort, mut io: S, carried: Carried)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let deadline = carried.deadline;
    let head = tokio::select! {
        r = timeout_at(deadline, read_head(&mut io)) => r,
        () = shared.stopped.cancelled() => return,
    };
    let (mut head, len) = match head {
        Ok(Ok(Head::Complete(head, len))) => (head, len),
        Ok(Ok(Head::TooLarge)) => {
            return answer(io, deadline, 431, "Request Header Fields Too Large").await;
        }
        Ok(Ok(Head::Invalid)) => return answer(io, deadline, 400, "Bad Request").await,
        Ok(Err(e)) => return debug!(error = %e, "reading an HTTP head failed"),
        Err(_) => return debug!("the HTTP head did not arrive in time"),
    };
    let upgrade = {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&head) {
            Ok(httparse::Status::Complete(_))
                if request.method == Some("GET") && request.path == Some(websocket::PATH) =>
            {
                websocket::upgrade_key(request.headers).map(str::to_owned)
            }
            Ok(httparse::Status::Complete(_)) if request.method == Some("CONNECT") => {
                Err("connect")
            }
            _ => Err("no route"),
        }
    };
    if let (Err("connect"), Some(entry)) = (&upgrade, &port.client_entry) {
        // The client entry reads the head again, and owns the connection from now on.
        carried.guard.release();
        let passed = HandedOver {
            stream: Box::new(Prefixed::new(head, Box::new(io))),
            peer: carried.peer,
        };
        if entry.try_send(passed).is_err() {
            debug!("the client entry is not taking connections; closing one");
        }
        return;
    }
    let key = match upgrade {
        Ok(key) => key,
        Err("no route" | "connect") => return answer(io, deadline, 404, "Not Found").await,
        Err(why) => {
            debug!(why, "refused a WebSocket upgrade");
            return answer(io, deadline, 400, "Bad Request").await;
        }
    };
    let reply = websocket::switching_protocols(&key);
    if !matches!(
        timeout_at(deadline, write_all(&mut io, reply.as_bytes())).await,
        Ok(Ok(()))
    ) {
        return debug!("the WebSocket upgrade's answer could not be written in time");
    }
    debug!(carrier = "websocket", "SSH in WebSocket frames");
    let leftover = head.split_off(len);
    serve_ssh(shared, WebSocket::new(io, Role::Server, leftover), carried).await
}

/// An HTTP request head, as far as it was read.
enum Head {
    /// The bytes read, and the head's length (what follows belongs to the connection).
    Complete(Vec<u8>, usize),
    /// Over [`MAX_HEAD`] bytes, or too many headers.
    TooLarge,
    /// Not HTTP.
    Invalid,
}

/// Reads one HTTP request head, at most [`MAX_HEAD`] bytes of it.
async fn read_head<S: AsyncRead + Unpin>(io: &mut S) -> std::io::Result<Head> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        match httparse::Request::new(&mut headers).parse(&buf) {
            Ok(httparse::Status::Complete(len)) => return Ok(Head::Complete(buf, len)),
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
                return Ok(Head::TooLarge);
            }
            Err(_) => return Ok(Head::Invalid),
        }
        let start = buf.len();
        buf.resize(MAX_HEAD, 0);
        let n = io.read(&mut buf[start..]).await?;
        buf.truncate(start + n);
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

async fn write_all<S: AsyncWrite + Unpin>(io: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    io.write_all(bytes).await?;
    io.flush().await
}

/// Answers `status` with the port's usage and closes, all by `deadline`.
async fn answer<S: AsyncWrite + Unpin>(mut io: S, deadline: Instant, status: u16, reason: &str) {
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{USAGE}",
        USAGE.len()
    );
    let _ = timeout_at(deadline, async {
        write_all(&mut io, response.as_bytes()).await?;
        io.shutdown().await
    })
    .await;
}
