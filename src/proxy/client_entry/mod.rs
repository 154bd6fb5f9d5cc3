//! The client entry: HTTP CONNECT and SOCKS5 in front of the tunnels.
//!
//! Root-side clients (curl, `ssh -o ProxyCommand='nc -X connect ...'`, SOCKS-aware tools) name a
//! target as `HOST.CLUSTER.tether:PORT`, or name the real host and choose the leaf with their
//! user name, `alice@leaf-1`, so TLS clients can verify the real certificate ([`naming`]); the
//! entry authenticates them, asks the [`Dialer`] for a connection and splices the two. Both
//! protocols share one port: a first byte of `0x05` means SOCKS5, anything else is read as HTTP.
//!
//! Every client must authenticate with a named token ([`ClientTokens`]); the name appears in the
//! logs, the token never does.
//!
//! Before authentication a client is bounded everywhere: per source address and in total
//! ([`admission`]), in time (one deadline from accept for the whole request, then bounded reply
//! writes; the socket is closed when either runs out), in memory (`max_header_bytes`), and in
//! guesses (penalties for sources that keep failing, with logs summarised, not one per guess).

pub(super) mod admission;
mod auth;
mod http;
mod naming;
mod socks;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{timeout, timeout_at};
use tracing::{Instrument, debug, error, info, info_span, warn};

pub use auth::{ClientTokens, MIN_TOKEN_LEN, TokenFileError};

use crate::protocol::Target;
use crate::stream::Splice;
use crate::transport::{Io, Prefixed};

use super::Dialer;
use super::access::{BearerTokens, Who};
use super::audit::{DialAudit, Via};
use admission::{Door, DoorSettings, SourcePermit};

/// Settings of the client entry. Built once and shared by every connection.
#[derive(Debug, Clone)]
pub struct ClientEntryConfig {
    /// Where to listen. Defaults to loopback (`127.0.0.1`, any free port) because anyone who can
    /// connect can try tokens: exposing the entry beyond the host must be a deliberate choice.
    pub listen: SocketAddr,
    /// Most connections served at once, handshaking or tunnelling. Connections beyond it are
    /// closed as soon as they are accepted (and logged) so that a flood cannot exhaust file
    /// descriptors or memory, nor starve clients already connected.
    pub max_connections: usize,
    /// Most connections one source address may hold at once (128 of the 1,024), so one host's
    /// idle sockets cannot refuse everyone else.
    pub max_connections_per_ip: usize,
    /// Failed authentications a source may make before it is refused for `auth_penalty`.
    pub auth_failures_allowed: u32,
    /// How long a source that failed too often is refused (at accept, before any byte is
    /// read); doubles with each repeat, up to 10 minutes.
    pub auth_penalty: Duration,
    /// How long a client has to finish its handshake (and to read our replies). A client that
    /// sends nothing, or too little, is dropped when it runs out so that it cannot hold a
    /// connection slot forever.
    pub handshake_timeout: Duration,
    /// Largest HTTP request head read. Bounds the memory a single client can make us hold
    /// before it has authenticated.
    pub max_header_bytes: usize,
    /// Bearer tokens checked elsewhere (in Kubernetes, the root's TokenReview), for clients
    /// not in `tokens`; `None` accepts the token file's clients alone.
    pub bearer: Option<Arc<dyn BearerTokens>>,
    /// The clients allowed in. Empty means nobody: there is no anonymous access. Shared and
    /// swapped whole, so the proxy can re-read its token file (on SIGHUP or when the file
    /// changes) while connections are being served; a removed token admits no new connection.
    pub tokens: Arc<ArcSwap<ClientTokens>>,
}

impl Default for ClientEntryConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            max_connections: 1024,
            max_connections_per_ip: 128,
            auth_failures_allowed: 5,
            auth_penalty: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            max_header_bytes: 8 * 1024,
            bearer: None,
            tokens: Arc::new(ArcSwap::from_pointee(ClientTokens::default())),
        }
    }
}

impl ClientEntryConfig {
    /// The defaults, with `tokens` as the allowed clients.
    pub fn new(tokens: ClientTokens) -> Self {
        Self {
            tokens: Arc::new(ArcSwap::from_pointee(tokens)),
            ..Self::default()
        }
    }

    /// Binds [`ClientEntryConfig::listen`], ready for [`serve`].
    pub async fn bind(&self) -> io::Result<TcpListener> {
        TcpListener::bind(self.listen).await
    }
}

/// Serves clients on `listener` until `shutdown` resolves, then stops accepting and waits for the
/// connections in flight to end. Each connection runs in its own task with a tracing span naming
/// the peer (and, once known, the client's name and target).
///
/// To bound the wait for open tunnels, wrap the call in [`tokio::time::timeout`]: dropping the
/// returned future aborts every remaining connection.
pub async fn serve<D: Dialer>(
    listener: TcpListener,
    config: Arc<ClientEntryConfig>,
    dialer: Arc<D>,
    shutdown: impl Future,
) {
    serve_with(listener, None, config, dialer, shutdown).await
}

/// A connection another listener accepted and passes on: an HTTP CONNECT request on the TLS
/// port ([`crate::proxy::tls_port`]), served exactly as if it came to this entry's listener
/// (the same admission, tokens, penalties and deadline).
pub struct HandedOver {
    /// The client's stream, its request head not yet read (put back in front if it was).
    pub stream: Box<dyn Io>,
    /// The client's address, for the per-source limits and penalties, logs and audit.
    pub peer: SocketAddr,
}

/// Where another listener passes connections to the entry (bounded: a full entry closes them).
pub type HandOff = mpsc::Sender<HandedOver>;

/// A hand-off channel: give the sender to the TLS port, the receiver to [`serve_with`].
pub fn hand_off() -> (HandOff, mpsc::Receiver<HandedOver>) {
    mpsc::channel(64)
}

/// [`serve`], also serving the connections `handed` passes on.
pub async fn serve_with<D: Dialer>(
    listener: TcpListener,
    mut handed: Option<mpsc::Receiver<HandedOver>>,
    config: Arc<ClientEntryConfig>,
    dialer: Arc<D>,
    shutdown: impl Future,
) {
    let permits = Arc::new(Semaphore::new(
        config.max_connections.min(Semaphore::MAX_PERMITS),
    ));
    let door = Door::new(DoorSettings {
        max_connections_per_ip: config.max_connections_per_ip,
        auth_failures_allowed: config.auth_failures_allowed,
        auth_penalty: config.auth_penalty,
    });
    let mut tasks = JoinSet::new();
    let mut refusals = RefusalLog::default();
    let mut shutdown = pin!(shutdown);
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "client entry listening");
    }
    loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => report(done),
            Some(passed) = next_handed(&mut handed) => {
                let Some(held) = admit(&door, &permits, passed.peer, &config, &mut refusals) else {
                    continue;
                };
                let work = handle(passed.stream, passed.peer, held.0, config.clone(), dialer.clone(), held.1);
                tasks.spawn(work.instrument(client_span(passed.peer)));
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Some(held) = admit(&door, &permits, peer, &config, &mut refusals) else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let work = handle(stream, peer, held.0, config.clone(), dialer.clone(), held.1);
                    tasks.spawn(work.instrument(client_span(peer)));
                }
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    warn!(error = %e, "accepting a client connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    info!(
        open = tasks.len(),
        "client entry stopped accepting; waiting for open connections"
    );
    while let Some(done) = tasks.join_next().await {
        report(done);
    }
}

/// The next connection passed on, if there is a hand-off; never resolves if there is none.
async fn next_handed(handed: &mut Option<mpsc::Receiver<HandedOver>>) -> Option<HandedOver> {
    match handed {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

/// Admits a connection from `peer`: its source's share and a slot of the total, and its
/// handshake deadline from now; `None` (the caller drops the connection) when refused.
fn admit(
    door: &Arc<Door>,
    total: &Arc<Semaphore>,
    peer: SocketAddr,
    config: &ClientEntryConfig,
    refusals: &mut RefusalLog,
) -> Option<(tokio::time::Instant, Permits)> {
    let deadline = tokio::time::Instant::now() + config.handshake_timeout;
    let source = door.admit(peer.ip()).ok()?;
    let Ok(permit) = total.clone().try_acquire_owned() else {
        refusals.note(peer, config.max_connections);
        return None;
    };
    let held = Permits {
        _total: permit,
        _source: source,
        door: door.clone(),
    };
    Some((deadline, held))
}

fn client_span(peer: SocketAddr) -> tracing::Span {
    info_span!(
        "client",
        %peer,
        user = tracing::field::Empty,
        target = tracing::field::Empty,
    )
}

fn report(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        error!("a client connection task panicked");
    }
}

/// Logs refused connections at most once a second, with a count of those not logged.
#[derive(Default)]
struct RefusalLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RefusalLog {
    fn note(&mut self, peer: SocketAddr, max: usize) {
        let now = Instant::now();
        if self
            .last
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            warn!(%peer, max_connections = max, also_refused = self.suppressed,
                "connection limit reached; refusing client");
            self.last = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
    }
}

/// Which protocol a client spoke, to answer it in kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http,
    Socks5,
}

/// What a successful handshake yields.
struct Request {
    target: Target,
    /// The authenticated client.
    who: Who,
    /// Bytes the client sent after its request, to be delivered through the tunnel first.
    leftover: Vec<u8>,
}

/// What a connection holds while it lives: its slot in the total and in its source's share,
/// and the door to report failed authentications to.
struct Permits {
    /// One of `max_connections`.
    _total: OwnedSemaphorePermit,
    /// One of the source's `max_connections_per_ip`.
    _source: SourcePermit,
    /// Where failed authentications count towards a penalty.
    door: Arc<Door>,
}

/// Why a handshake did not produce a request.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    /// The client was told no (the reply is already written); the text is for the log.
    #[error("{0}")]
    Rejected(String),
    /// The client's credentials were wrong (the reply is already written): counts towards the
    /// source's penalty, and is logged at debug level only, since a guesser would flood the log.
    #[error("{0}")]
    AuthFailed(&'static str),
    /// The client hung up before finishing.
    #[error("client closed the connection during the handshake")]
    Closed,
    #[error(transparent)]
    Io(io::Error),
}

/// The handshakes over any byte stream, for the fuzz targets in `fuzz/` (not a stable API).
/// The entry reads these bytes from unauthenticated clients, so they are fuzzed end to end.
#[doc(hidden)]
pub mod fuzzing {
    use tokio::io::{AsyncRead, AsyncWrite};

    use super::{ClientEntryConfig, Request, Target, http, socks};

    /// A handshake's outcome: the target, the client's name and the bytes after the request;
    /// or why not, as the log would say it.
    pub type Outcome = Result<(Target, String, Vec<u8>), String>;

    /// The HTTP CONNECT handshake, `first` being the byte the protocol sniffer already read.
    pub async fn http_handshake<S: AsyncRead + AsyncWrite + Unpin>(
        stream: &mut S,
        first: u8,
        config: &ClientEntryConfig,
    ) -> Outcome {
        outcome(http::handshake(stream, first, config).await)
    }

    /// The SOCKS5 handshake after the version byte.
    pub async fn socks_handshake<S: AsyncRead + AsyncWrite + Unpin>(
        stream: &mut S,
        config: &ClientEntryConfig,
    ) -> Outcome {
        outcome(socks::handshake(stream, config).await)
    }

    fn outcome(result: Result<Request, super::HandshakeError>) -> Outcome {
        result
            .map(|r| (r.target, r.who.user, r.leftover))
            .map_err(|e| e.to_string())
    }
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            HandshakeError::Closed
        } else {
            HandshakeError::Io(e)
        }
    }
}

async fn handle<D: Dialer, S: Io>(
    mut stream: S,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
    config: Arc<ClientEntryConfig>,
    dialer: Arc<D>,
    permits: Permits,
) {
    let limit = config.handshake_timeout;
    let handshake = timeout_at(deadline, async {
        let first = stream.read_u8().await?;
        if first == socks::VERSION {
            Ok((
                Protocol::Socks5,
                socks::handshake(&mut stream, &config).await?,
            ))
        } else {
            Ok((
                Protocol::Http,
                http::handshake(&mut stream, first, &config).await?,
            ))
        }
    })
    .await;
    let (protocol, request) = match handshake {
        Ok(Ok(accepted)) => accepted,
        Err(_) => return info!(timeout = ?limit, "handshake timed out; dropping client"),
        Ok(Err(HandshakeError::AuthFailed(why))) => {
            debug!(reason = why, "client authentication failed");
            permits.door.auth_failed(peer.ip());
            return close_gracefully(stream, limit).await;
        }
        Ok(Err(HandshakeError::Rejected(why))) => {
            info!(reason = %why, "client rejected");
            return close_gracefully(stream, limit).await;
        }
        Ok(Err(e)) => return debug!(error = %e, "handshake failed"),
    };
    let Request {
        target,
        who,
        leftover,
    } = request;
    let user = &who.user;
    let span = tracing::Span::current();
    span.record("user", user.as_str());
    span.record("target", tracing::field::display(&target));

    let via = match protocol {
        Protocol::Http => Via::HttpConnect,
        Protocol::Socks5 => Via::Socks5,
    };
    let audit = DialAudit::start(user, via, peer, &target);
    let dialled = match dialer.permit(&who, &target).await {
        Ok(()) => dialer.dial(target, peer).await,
        Err(refused) => Err(refused),
    };
    match dialled {
        Err(e) => {
            info!(kind = e.kind.as_str(), error = %e.message, "dial failed");
            audit.refused(&e);
            let write = async {
                match protocol {
                    Protocol::Http => http::write_dial_error(&mut stream, &e).await,
                    Protocol::Socks5 => socks::write_dial_error(&mut stream, &e).await,
                }
            };
            if let Ok(Ok(())) = timeout(limit, write).await {
                close_gracefully(stream, limit).await;
            }
        }
        Ok(conn) => {
            let write = async {
                match protocol {
                    Protocol::Http => http::write_established(&mut stream).await,
                    Protocol::Socks5 => socks::write_established(&mut stream).await,
                }
            };
            match timeout(limit, write).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    audit.ended(&Err(e));
                    return debug!("client gone before the tunnel opened");
                }
                Err(_) => {
                    let late = std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client did not read the reply",
                    );
                    audit.ended(&Err(late));
                    return info!("client did not read the reply; dropping it");
                }
            }
            info!("tunnel open");
            let ended = conn
                .splice(audit.count(Prefixed::new(leftover, stream)))
                .await;
            match &ended {
                Ok(()) => info!("tunnel closed"),
                Err(e) => info!(error = %e, "tunnel ended with an error"),
            }
            audit.ended(&ended);
        }
    }
}

/// Closes after an error reply without losing it: send FIN, then read (and discard) what the
/// client still sends for a moment, because closing a socket with unread input sends a reset
/// that can destroy the reply before the client reads it.
async fn close_gracefully<S: Io>(mut stream: S, limit: Duration) {
    const MAX_DRAIN: usize = 64 * 1024;
    if stream.shutdown().await.is_err() {
        return;
    }
    let drain = async {
        let mut sink = [0u8; 4096];
        let mut total = 0;
        while total < MAX_DRAIN {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = timeout(limit.min(Duration::from_secs(2)), drain).await;
}
