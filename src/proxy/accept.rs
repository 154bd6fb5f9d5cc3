//! The accept loop both of the proxy's ports share: admission at accept, then one task per
//! connection serving the port's protocol.
//!
//! Admission ([`super::limits`]) is decided by the source address before anything is read,
//! so a silent socket costs only a descriptor and a small task until its deadline. Behind a
//! listed load balancer ([`Balancers`](super::config::Balancers)) the source is in the
//! PROXY protocol header instead: such a connection first reads its header in a task of its
//! own, bounded by its own count (as many as the handshake slots: a balancer sends the
//! header with its first segment, so they are held for a round trip, not for the handshake),
//! and by the same deadline from accept, then is admitted as the client it names. A header
//! that is missing, malformed or late closes the socket.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout_at};
use tracing::{Instrument, error, info_span, warn};

use super::limits::{ConnectionPermit, HandshakePermit, Refusal};
use super::session::{Carried, serve_ssh};
use super::shared::ProxyShared;
use super::tls_port::TlsPort;
use crate::admin::metrics::label;
use crate::protocol::busy;
use crate::protocol::proxy_header::{self, Next, ProxyHeaderError};

/// What a listener of the proxy serves.
#[derive(Clone)]
pub(super) enum Port {
    /// The SSH port: the socket carries SSH.
    Ssh,
    /// The TLS port: SSH by ALPN or in WebSocket frames, and HTTP ([`super::tls_port`]).
    Tls(Arc<TlsPort>),
}

/// Accepts connections on `listener` until the proxy drains. Both ports share one
/// [`ConnectionLimiter`](super::limits::ConnectionLimiter): a source's connections and
/// handshakes count whichever port it uses.
pub(super) async fn accept_loop(shared: Arc<ProxyShared>, listener: TcpListener, port: Port) {
    loop {
        let accepted = tokio::select! {
            () = shared.draining.cancelled() => return,
            a = listener.accept() => a,
        };
        let (socket, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Running out of file descriptors is transient; don't spin on it.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let deadline = Instant::now() + shared.config.limits.handshake_timeout;
        if shared.config.balancers.contains(peer.ip()) {
            through_balancer(&shared, socket, peer, &port, deadline);
        } else if let Some(permits) = admit(&shared, &socket, peer, &port) {
            let span = info_span!("connection", %peer);
            let served = serve(
                shared.clone(),
                socket,
                peer,
                port.clone(),
                permits,
                deadline,
            );
            shared.tasks.spawn(served.instrument(span));
        }
    }
}

/// Admits a connection from `peer` or refuses it (counted, logged at most once a second, an
/// agent on the SSH port told when to retry).
fn admit(
    shared: &ProxyShared,
    socket: &TcpStream,
    peer: SocketAddr,
    port: &Port,
) -> Option<(ConnectionPermit, HandshakePermit)> {
    let refusal = match shared.limiter.admit(peer.ip()) {
        Ok(permits) => return Some(permits),
        Err(refusal) => refusal,
    };
    count_refusal(shared, peer, &refusal);
    // A busy line is SSH's; on the TLS port a refused client just sees the close.
    if let (Some(retry), Port::Ssh) = (refusal.retry_hint(), port) {
        // Never waits: a fresh socket's send buffer has room for one line, and a peer that
        // cannot take it just sees the close.
        let _ = socket.try_write(&busy::busy_line(retry));
    }
    None
}

/// A connection from a listed load balancer: its PROXY header is read in its own task, then
/// it is admitted and served as the client the header names.
fn through_balancer(
    shared: &Arc<ProxyShared>,
    mut socket: TcpStream,
    balancer: SocketAddr,
    port: &Port,
    deadline: Instant,
) {
    let Ok(reading) = shared.header_reads.clone().try_acquire_owned() else {
        return refuse_header(shared, balancer, "too many PROXY headers being read");
    };
    let tasks = shared.tasks.clone();
    let (shared, port) = (shared.clone(), port.clone());
    let task = async move {
        let header = tokio::select! {
            r = timeout_at(deadline, read_proxy_header(&mut socket)) => r,
            () = shared.stopped.cancelled() => return,
        };
        drop(reading);
        let peer = match header {
            // LOCAL or UNKNOWN: the balancer speaks for itself (a health check).
            Ok(Ok(client)) => client.unwrap_or(balancer),
            Ok(Err(e)) => return refuse_header(&shared, balancer, &e.to_string()),
            Err(_) => return refuse_header(&shared, balancer, "no PROXY header by the deadline"),
        };
        if let Some(permits) = admit(&shared, &socket, peer, &port) {
            let span = info_span!("connection", %peer);
            // Boxed: this task then holds only a pointer for the connection's life.
            let served = serve(shared, socket, peer, port, permits, deadline);
            Box::pin(served.instrument(span)).await;
        }
    };
    tasks.spawn(task.instrument(info_span!("balancer", %balancer)));
}

/// Reads the PROXY header at the start of `socket`, exactly: what follows is TLS's or SSH's.
async fn read_proxy_header(socket: &mut TcpStream) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut header = Vec::with_capacity(64);
    loop {
        match proxy_header::next(&header)? {
            Next::Done(source) => return Ok(source),
            Next::Read(more) => {
                let at = header.len();
                header.resize(at + more, 0);
                socket.read_exact(&mut header[at..]).await?;
            }
        }
    }
}

/// Counts a refused connection, and logs it at most once a second (a flood of refusals, or
/// a balancer whose health checks send no header, must not become a flood of log lines).
fn count_refusal(shared: &ProxyShared, peer: SocketAddr, refusal: &Refusal) {
    shared
        .metrics
        .refused
        .get_or_create(&label("reason", refusal.label()))
        .inc();
    shared.limiter.log_refusal(peer, refusal);
}

/// Closes a connection from a balancer for its header: counted and logged like any refusal.
fn refuse_header(shared: &ProxyShared, balancer: SocketAddr, why: &str) {
    count_refusal(shared, balancer, &Refusal::ProxyHeader(why.to_owned()));
}

/// Serves one admitted connection; a panic in it is counted and logged, never the process's.
async fn serve(
    shared: Arc<ProxyShared>,
    socket: TcpStream,
    peer: SocketAddr,
    port: Port,
    (permit, handshake): (ConnectionPermit, HandshakePermit),
    deadline: Instant,
) {
    let _permit = permit;
    let metrics = shared.metrics.clone();
    let served = async move {
        let Some(carried) = Carried::at_accept(&socket, peer, handshake, deadline) else {
            return;
        };
        match port {
            Port::Ssh => serve_ssh(shared, socket, carried).await,
            // Boxed: the TLS port's future (TLS, an HTTP head, WebSocket) is far larger than
            // the SSH port's, and a task holds its future for the connection's life: unboxed,
            // every SSH-port tunnel would carry its size (+14.6 KiB per idle tunnel,
            // tests/idle).
            Port::Tls(tls) => Box::pin(super::tls_port::serve(shared, tls, socket, carried)).await,
        }
    };
    if let Err(panic) = AssertUnwindSafe(served).catch_unwind().await {
        metrics.connection_panics.inc();
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        error!(panic = %what, "a connection task panicked (a bug; please report it)");
    }
}
