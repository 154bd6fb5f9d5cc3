//! One connection's SSH session on the proxy, whatever carried it there (the tunnel port's
//! socket, or TLS or WebSocket on the TLS port): what it brings from accept ([`Carried`]), and
//! its handshake under one deadline from accept, then the session until it ends.
//!
//! Below both the accept loop and the TLS port, so that neither imports the other's file to
//! reach it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::handler::ConnectionHandler;
use super::limits::HandshakePermit;
use super::shared::ProxyShared;
use crate::stream::HandshakeGuard;
use crate::transport::Io;

/// How long a connection shut down at its handshake deadline may take to end, its permit
/// still held: russh's task sees end-of-file at once, so this bounds only a stuck task.
const SHUTDOWN_LINGER: Duration = Duration::from_secs(2);

/// What a connection brings to its SSH session whatever carries it (the SSH port's socket, or
/// TLS or WebSocket on the TLS port).
pub(super) struct Carried {
    /// The client's address (limits, logs, the handler's identity checks).
    pub peer: SocketAddr,
    /// Its handshake slot, given back once the session is set up.
    pub handshake: HandshakePermit,
    /// Shuts the TCP socket under the carrier down when the handshake fails or runs out.
    pub guard: HandshakeGuard,
    /// The whole handshake's deadline, measured from accept (TLS and WebSocket included).
    pub deadline: tokio::time::Instant,
}

impl Carried {
    /// A connection just accepted on either port: its deadline (from accept), its socket sends
    /// without delay (SSH's packets are small) and is guarded. `None` (and logged) only when
    /// the process is out of descriptors.
    pub(super) fn at_accept(
        socket: &TcpStream,
        peer: SocketAddr,
        handshake: HandshakePermit,
        deadline: tokio::time::Instant,
    ) -> Option<Self> {
        let _ = socket.set_nodelay(true);
        let guard = HandshakeGuard::new(socket)
            .inspect_err(
                |e| warn!(error = %e, "cannot guard the handshake; dropping the connection"),
            )
            .ok()?;
        Some(Self {
            peer,
            handshake,
            guard,
            deadline,
        })
    }
}

/// Serves one connection's SSH session. Its handshake (version exchange, key exchange,
/// authentication and, for agents, the hello) ends by `carried.deadline`: then the socket is
/// shut down whatever state the handshake is in (see [`HandshakeGuard`] for why dropping russh's
/// futures is not enough), and the connection stays counted until its session has ended.
pub(super) async fn serve_ssh<S: Io>(shared: Arc<ProxyShared>, stream: S, carried: Carried) {
    let Carried {
        peer,
        handshake,
        guard,
        deadline,
    } = carried;
    let limit = shared.config.limits.handshake_timeout;
    let (ready_tx, ready_rx) = oneshot::channel();
    let handler = ConnectionHandler::new(shared.clone(), peer, ready_tx);
    let setup = russh::server::run_stream(shared.ssh.load_full(), stream, handler);
    // On an error, the deadline or a stop, the guard's drop shuts the socket down.
    let setup = tokio::select! {
        r = tokio::time::timeout_at(deadline, setup) => r,
        () = shared.stopped.cancelled() => return,
    };
    let mut session = match setup {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return debug!(error = %e, "SSH setup failed"),
        Err(_) => {
            return warn!(timeout = ?limit, "dropped a connection that did not complete the SSH version exchange in time");
        }
    };
    let handle = session.handle();
    let ready = tokio::select! {
        r = tokio::time::timeout_at(deadline, ready_rx) => r,
        end = &mut session => {
            return debug!(result = ?end.err(), "connection ended during handshake");
        }
        // A stopping proxy does not wait for handshakes to run out their deadline.
        () = shared.stopped.cancelled() => return end_handshake(guard, &mut session).await,
    };
    match ready {
        Ok(Ok(Ok(()))) => {
            guard.release();
            drop(handshake);
        }
        Ok(Ok(Err(reason))) => {
            // The peer learns why (what its own certificate says), then the connection ends.
            let said = handle.disconnect(
                russh::Disconnect::NoMoreAuthMethodsAvailable,
                reason,
                String::new(),
            );
            // A session that ended within the linger is done: polling it again would panic
            // (it is a finished task's handle).
            if said.await.is_ok()
                && tokio::time::timeout(SHUTDOWN_LINGER, &mut session)
                    .await
                    .is_ok()
            {
                return;
            }
            return end_handshake(guard, &mut session).await;
        }
        Ok(Err(_)) => {
            debug!("the handshake ended without setting up a connection");
            return end_handshake(guard, &mut session).await;
        }
        Err(_) => {
            warn!(timeout = ?limit, "dropped a connection that did not authenticate and set up in time");
            return end_handshake(guard, &mut session).await;
        }
    }
    tokio::select! {
        end = &mut session => {
            if let Err(e) = end {
                debug!(error = %e, "connection ended with an error");
            }
        }
        () = shared.stopped.cancelled() => {
            let _ = handle.disconnect(russh::Disconnect::ByApplication, "proxy stopped".into(), String::new()).await;
        }
    }
}

/// Shuts a failed handshake's socket down and waits (bounded) for russh's task to end, so the
/// caller's connection permit is released only once the socket is closed.
async fn end_handshake<F: std::future::Future + Unpin>(guard: HandshakeGuard, session: F) {
    guard.shutdown();
    let _ = tokio::time::timeout(SHUTDOWN_LINGER, session).await;
}
