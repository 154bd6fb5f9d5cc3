//! One audit record per dial a client asks of this proxy (#16): who asked, through which entry
//! and from where, which leaf and target, what was decided and why, the bytes each way and how
//! long it lasted.
//!
//! Records are log events of their own target, [`TARGET`], with fields only (no free text to
//! parse): `tether proxy --audit-log FILE` writes them there as JSON lines, apart from the
//! operational log; without it they join the log. Nothing secret goes in: names, addresses, a
//! dial error's kind and message (what the client was told, or what the proxy logged), never
//! a token or a key.
//!
//! ```text
//! {"timestamp":"…","level":"INFO","fields":{"message":"dial","who":"alice","via":"ssh",
//!  "from":"10.0.0.7:51234","leaf":"leaf-1","target":"db.internal:5432","decision":"ok",
//!  "bytes_up":611,"bytes_down":20480,"duration_ms":1204},"target":"tether::audit"}
//! ```

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::protocol::{DialError, Target};

/// The log target of audit records.
pub const TARGET: &str = "tether::audit";

/// How a dial reached this proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A `direct-tcpip` channel of a client's SSH connection (`tether dial`).
    Ssh,
    /// A dial a peer proxy forwarded (its own record names the client).
    Peer,
    /// The client entry's HTTP CONNECT.
    HttpConnect,
    /// The client entry's SOCKS5.
    Socks5,
}

impl Via {
    fn as_str(self) -> &'static str {
        match self {
            Via::Ssh => "ssh",
            Via::Peer => "peer",
            Via::HttpConnect => "http-connect",
            Via::Socks5 => "socks5",
        }
    }
}

/// A dial under way, recorded when it ends.
pub struct DialAudit {
    /// The client's name (certificate principal, or the token's name).
    who: String,
    /// Through which entry.
    via: Via,
    /// The client's address.
    from: SocketAddr,
    /// What it asked for.
    target: Target,
    /// When it asked.
    started: Instant,
    /// Bytes from the client to the target, and back, once the stream runs.
    bytes: Arc<Bytes>,
}

/// The bytes a stream carried, counted by [`Counted`].
#[derive(Default)]
struct Bytes {
    up: AtomicU64,
    down: AtomicU64,
}

impl DialAudit {
    /// Starts the record of `who`'s dial of `target`.
    pub fn start(who: &str, via: Via, from: SocketAddr, target: &Target) -> Self {
        Self {
            who: who.to_owned(),
            via,
            from,
            target: target.clone(),
            started: Instant::now(),
            bytes: Arc::default(),
        }
    }

    /// Wraps the client's side of the stream to count its bytes for the record.
    pub fn count<S>(&self, client: S) -> Counted<S> {
        Counted {
            inner: client,
            bytes: self.bytes.clone(),
        }
    }

    /// Records a dial that was refused or failed.
    pub fn refused(self, error: &DialError) {
        self.emit(error.kind.as_str(), &error.message);
    }

    /// Records a dial the proxy turned down before dialling (`decision`, e.g. `quota`).
    pub fn denied(self, decision: &str, reason: &str) {
        self.emit(decision, reason);
    }

    /// Records a stream that ran and ended (`ended` says how).
    pub fn ended(self, ended: &io::Result<()>) {
        let reason = match ended {
            Ok(()) => String::new(),
            Err(e) => e.to_string(),
        };
        self.emit("ok", &reason);
    }

    fn emit(self, decision: &str, reason: &str) {
        tracing::info!(
            target: TARGET,
            who = %self.who,
            via = self.via.as_str(),
            from = %self.from,
            leaf = %self.target.cluster,
            target = %self.target.endpoint,
            decision,
            reason,
            bytes_up = self.bytes.up.load(Ordering::Relaxed),
            bytes_down = self.bytes.down.load(Ordering::Relaxed),
            duration_ms = self.started.elapsed().as_millis() as u64,
            "dial"
        );
    }
}

/// A client stream whose bytes each way are counted for its [`DialAudit`].
pub struct Counted<S> {
    inner: S,
    bytes: Arc<Bytes>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        self.bytes.up.fetch_add(read, Ordering::Relaxed);
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            self.bytes.down.fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
