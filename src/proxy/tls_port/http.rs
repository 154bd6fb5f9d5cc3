//! HTTP on the TLS port: one request head read (at most [`MAX_HEAD`] bytes, by the handshake
//! deadline), then the connection goes where the head says, and the head with it:
//!
//! | request | served by |
//! | --- | --- |
//! | `GET /tether/v1/tunnel`, `Upgrade: websocket` | SSH in WebSocket frames, here |
//! | `CONNECT HOST:PORT` | the client entry, if the proxy has one |
//! | anything else, over TLS | the Kubernetes endpoint, if the proxy has one |
//! | anything else | a 404 saying how to use the port |
//!
//! Kubernetes requests must come over TLS: a bearer token or a client certificate is never
//! asked for in the clear.

use std::sync::Arc;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout_at};
use tracing::debug;

use super::TlsPort;
use crate::proxy::access::Who;
use crate::proxy::client_entry::HandedOver;
use crate::proxy::kube_entry::KubeHandedOver;
use crate::proxy::session::{Carried, serve_ssh};
use crate::proxy::shared::ProxyShared;
use crate::transport::http_head::{HeadError, read_head};
use crate::transport::websocket::{self, Role, WebSocket};
use crate::transport::{Io, Prefixed};

/// Largest HTTP request head read on the TLS port before it is routed.
pub const MAX_HEAD: usize = 16 * 1024;

/// What answers anything on the port that is not served.
const USAGE: &str = "tether: this port carries tunnels: SSH inside TLS (ALPN tether-ssh), a \
WebSocket upgrade at /tether/v1/tunnel, HTTP CONNECT when the proxy has a client entry, and \
the Kubernetes endpoint (over TLS) when it has one\n";

/// How the connection reached the HTTP layer.
pub(super) enum Over {
    /// Plain HTTP (from an L7 load balancer that terminated TLS).
    Plain,
    /// TLS here; who its client certificate names, if it showed one the port verified.
    Tls { certificate: Option<Who> },
}

/// Where a request head sends the connection.
enum Route {
    /// A WebSocket upgrade to the tunnel path, with the client's key.
    Tunnel(String),
    /// A WebSocket upgrade to the tunnel path this port cannot take, and why.
    BadUpgrade(&'static str),
    /// HTTP CONNECT: the client entry's.
    Connect,
    /// Anything else: the Kubernetes endpoint's, over TLS.
    Other,
}

fn route(head: &[u8]) -> Route {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    if !matches!(request.parse(head), Ok(httparse::Status::Complete(_))) {
        return Route::Other;
    }
    match (request.method, request.path) {
        (Some("GET"), Some(websocket::PATH)) => match websocket::upgrade_key(request.headers) {
            Ok(key) => Route::Tunnel(key.to_owned()),
            Err(why) => Route::BadUpgrade(why),
        },
        (Some("CONNECT"), _) => Route::Connect,
        _ => Route::Other,
    }
}

/// Serves an HTTP connection of the TLS port (the module docs say where each request goes).
pub(super) async fn serve<S: Io>(
    shared: Arc<ProxyShared>,
    port: &TlsPort,
    mut io: S,
    carried: Carried,
    over: Over,
) {
    let deadline = carried.deadline;
    let mut head = Vec::with_capacity(1024);
    let read = tokio::select! {
        r = timeout_at(deadline, read_head(&mut io, &mut head, MAX_HEAD, head_len)) => r,
        () = shared.stopped.cancelled() => return,
    };
    let len = match read {
        Ok(Ok(len)) => len,
        Ok(Err(HeadError::TooLarge | HeadError::Parse(httparse::Error::TooManyHeaders))) => {
            return answer(io, deadline, 431, "Request Header Fields Too Large").await;
        }
        Ok(Err(HeadError::Parse(_))) => return answer(io, deadline, 400, "Bad Request").await,
        Ok(Err(HeadError::Closed)) => return debug!("closed before its HTTP head ended"),
        Ok(Err(HeadError::Io(e))) => return debug!(error = %e, "reading an HTTP head failed"),
        Err(_) => return debug!("the HTTP head did not arrive in time"),
    };
    let peer = carried.peer;
    match (route(&head[..len]), over) {
        (Route::Tunnel(key), _) => {
            let leftover = head.split_off(len);
            upgrade(shared, io, &key, leftover, carried).await
        }
        (Route::BadUpgrade(why), _) => {
            debug!(why, "refused a WebSocket upgrade");
            answer(io, deadline, 400, "Bad Request").await
        }
        (Route::Connect, _) if port.client_entry.is_some() => {
            // The client entry reads the head again, and owns the connection from now on.
            carried.guard.release();
            let stream = Box::new(Prefixed::new(head, Box::new(io) as Box<dyn Io>));
            let passed = HandedOver { stream, peer };
            if port
                .client_entry
                .as_ref()
                .is_some_and(|e| e.try_send(passed).is_err())
            {
                debug!("the client entry is not taking connections; closing one");
            }
        }
        (Route::Other, Over::Tls { certificate }) if port.kube.is_some() => {
            carried.guard.release();
            let stream = Box::new(Prefixed::new(head, Box::new(io) as Box<dyn Io>));
            let passed = KubeHandedOver {
                stream,
                peer,
                certificate,
            };
            if port
                .kube
                .as_ref()
                .is_some_and(|k| k.try_send(passed).is_err())
            {
                debug!("the Kubernetes endpoint is not taking connections; closing one");
            }
        }
        _ => answer(io, deadline, 404, "Not Found").await,
    }
}

/// Answers a WebSocket upgrade and serves SSH in its frames; `leftover` is what the client
/// sent after its request head.
async fn upgrade<S: Io>(
    shared: Arc<ProxyShared>,
    mut io: S,
    key: &str,
    leftover: Vec<u8>,
    carried: Carried,
) {
    let reply = websocket::switching_protocols(key);
    let written = timeout_at(carried.deadline, write_all(&mut io, reply.as_bytes())).await;
    if !matches!(written, Ok(Ok(()))) {
        return debug!("the WebSocket upgrade's answer could not be written in time");
    }
    debug!(carrier = "websocket", "SSH in WebSocket frames");
    serve_ssh(shared, WebSocket::new(io, Role::Server, leftover), carried).await
}

/// The length of the complete request head at the start of `buf`, `None` while incomplete.
fn head_len(buf: &[u8]) -> Result<Option<usize>, httparse::Error> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    Ok(match httparse::Request::new(&mut headers).parse(buf)? {
        httparse::Status::Complete(len) => Some(len),
        httparse::Status::Partial => None,
    })
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
