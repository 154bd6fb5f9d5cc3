//! A tunnel stream: one SSH channel carrying one TCP connection's bytes, with credit-based flow
//! control so a stalled reader never stalls the SSH connection it shares with other streams.
//!
//! Each side reads its channel's messages as soon as they arrive (so russh's per-channel queue
//! never fills and never blocks the connection's session loop) and keeps them in a queue bounded
//! by the credit it has granted. Bytes are granted back only when they have been written to the
//! local side, so a reader that stops reading stops its sender after at most one window. The
//! window adapts (see [`super::window`]): 256 KiB at first, doubling up to 2 MiB while a fast
//! stream's local reader keeps up, back to 256 KiB when it backs up; the growth of all streams
//! of one tunnel comes from one budget (2 MiB), so a tunnel's memory is bounded as a whole.
//!
//! A closed stream costs nothing: once its splice returns, neither side keeps anything of it.
//! Both sides close the channel when their splice ends, so one of them always closes first, and
//! russh 0.65.1 kept, on that side, the channel's message queue (~3 KB) for the life of the
//! tunnel: 3.2 KB per dial on the agent, 0.4 KB on the proxy, freed only with the tunnel. The
//! vendored russh fixes it (vendor/README.md); `tests/soak` holds it at 0 B per dial.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::FutureExt;
use russh::ChannelMsg;
use russh::{ChannelId, ChannelReadHalf, ChannelWriteHalf};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use super::Splice;
use super::window::{Window, WindowBudget};
use crate::admin::metrics::{StreamMetrics, label};
use crate::protocol::stream::{CONTROL_EXT, StreamControl};
use crate::protocol::{DialError, DialErrorKind};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// Default credit per stream and direction at the start: what a side buffers for a stalled
/// reader of a stream that has not been moving fast. 256 KiB: fast streams grow past it, and
/// with 512 KiB eight fast streams of one tunnel held 2 MiB more on the proxy for no more
/// throughput (BENCHMARKS.md).
pub const DEFAULT_WINDOW: u32 = 256 * 1024;

/// Default cap of an adaptive window (see [`super::window`]): the most one stream buffers for a
/// stalled reader, reached only by a stream whose reader kept up while it moved 1.75 MiB.
/// 2 MiB gave one stream ~10% more than 512 KiB on loopback, 4 MiB nothing more.
pub const DEFAULT_MAX_WINDOW: u32 = 2 * 1024 * 1024;

/// Default growth budget of a tunnel (see [`WindowBudget`]): what all its streams together may
/// grant above their initial windows. Enough for one stream to reach the cap; eight fast
/// streams share it (about 512 KiB each) rather than each buffering 2 MiB.
pub const DEFAULT_TUNNEL_GROWTH: u32 = 2 * 1024 * 1024;

/// Largest chunk read from the local side at once: one SSH packet. russh encrypts up to 64
/// queued messages into one write buffer before it writes, so this bounds that buffer
/// (2 MiB; 4 MiB with 64 KiB reads, for no measurable gain).
const READ_CHUNK: usize = 32 * 1024;

/// What an idle stream's first read takes: a whole small message (an RPC, a keystroke), kept in
/// the task's own state rather than a heap buffer.
const PROBE: usize = 512;

/// Sizes of one stream's flow control.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// Credit first granted to the peer: the bound on bytes buffered for this stream's local
    /// writer until the window grows.
    pub window: u32,
    /// The most the window grows to while the local reader keeps up (no growth if ≤ `window`).
    pub max_window: u32,
    /// What the streams of one tunnel may grow above `window`, together: with `window`, the
    /// bound on what one tunnel buffers (`streams × window + tunnel_growth`).
    pub tunnel_growth: u32,
}

impl StreamLimits {
    /// What a new tunnel's streams will share: a fresh growth budget, and `metrics`, the
    /// counters of the side (proxy or agent) that holds the tunnel.
    pub fn tunnel_share(&self, metrics: StreamMetrics) -> TunnelShare {
        TunnelShare {
            budget: WindowBudget::new(u64::from(self.tunnel_growth)),
            metrics,
        }
    }
}

/// What the streams of one tunnel share.
#[derive(Clone)]
pub struct TunnelShare {
    /// The tunnel's window growth budget.
    pub budget: Arc<WindowBudget>,
    /// The counters its streams count into (the holder's: a proxy's, an agent's).
    pub metrics: StreamMetrics,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            window: DEFAULT_WINDOW,
            max_window: DEFAULT_MAX_WINDOW,
            tunnel_growth: DEFAULT_TUNNEL_GROWTH,
        }
    }
}

/// One end of a tunnelled stream, ready to be spliced to a local socket.
pub struct TunnelStream<S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static> {
    read: ChannelReadHalf,
    write: ChannelWriteHalf<S>,
    limits: StreamLimits,
    /// What it shares with the tunnel's other streams.
    share: TunnelShare,
}

impl<S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static> TunnelStream<S> {
    /// Wraps an open channel whose dial has succeeded; `share` is its tunnel's.
    pub fn new(
        read: ChannelReadHalf,
        write: ChannelWriteHalf<S>,
        limits: StreamLimits,
        share: TunnelShare,
    ) -> Self {
        Self {
            read,
            write,
            limits,
            share,
        }
    }

    /// The dialling side: waits for the agent's answer to the dial, at most `timeout`.
    pub async fn await_dial(
        mut read: ChannelReadHalf,
        write: ChannelWriteHalf<S>,
        limits: StreamLimits,
        share: TunnelShare,
        timeout: Duration,
    ) -> Result<Self, DialError> {
        let answer = tokio::time::timeout(timeout, async {
            loop {
                match read.wait().await {
                    Some(ChannelMsg::ExtendedData { data, ext }) if ext == CONTROL_EXT => {
                        return match StreamControl::decode(&data) {
                            Ok(StreamControl::DialOk) => Ok(()),
                            Ok(StreamControl::DialFailed(e)) => Err(e),
                            Ok(other) => Err(DialError::new(
                                DialErrorKind::Other,
                                format!("agent sent {other:?} before answering the dial"),
                            )),
                            Err(e) => Err(DialError::new(
                                DialErrorKind::Other,
                                format!("agent sent a malformed answer: {e}"),
                            )),
                        };
                    }
                    Some(ChannelMsg::Close | ChannelMsg::Eof) | None => {
                        return Err(DialError::new(
                            DialErrorKind::Other,
                            "the tunnel closed before the agent answered the dial",
                        ));
                    }
                    Some(ChannelMsg::Data { .. }) => {
                        return Err(DialError::new(
                            DialErrorKind::Other,
                            "agent sent data before answering the dial",
                        ));
                    }
                    Some(_) => {}
                }
            }
        })
        .await;
        match answer {
            Ok(Ok(())) => Ok(Self::new(read, write, limits, share)),
            Ok(Err(e)) => {
                let _ = write.close().await;
                Err(e)
            }
            Err(_) => {
                let _ = write.close().await;
                Err(DialError::new(
                    DialErrorKind::TimedOut,
                    format!("the agent did not answer within {timeout:?}"),
                ))
            }
        }
    }
}

/// Counts a stream as open until dropped, whichever way the splice ends.
struct OpenStream(Gauge);

impl OpenStream {
    fn count(open: &Gauge) -> Self {
        open.inc();
        Self(open.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What one side of a stream shares between its two directions.
#[derive(Default)]
struct Shared {
    /// Bytes this side may still send (granted by the peer, not yet used).
    send_credit: AtomicU64,
    /// Woken when the peer grants credit.
    credit_arrived: Notify,
    /// Bytes written to the local side since the last grant, waiting to be granted back.
    to_grant: AtomicU64,
    /// Woken when `to_grant` grows past the batching threshold.
    grant_ready: Notify,
    /// Set once the local side reached EOF and the channel's EOF has been sent.
    uplink_eof: AtomicBool,
    /// Woken when `uplink_eof` is set.
    uplink_eof_set: Notify,
    /// Woken when the downlink has finished: both directions ended, or the peer closed.
    downlink_done: Notify,
}

impl<S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static> Splice for TunnelStream<S> {
    async fn splice<L>(self, local: L) -> io::Result<()>
    where
        L: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let TunnelStream {
            read,
            write,
            limits,
            share,
        } = self;
        let TunnelShare { budget, metrics } = share;
        let shared = Shared::default();
        let bytes_in = metrics
            .bytes
            .get_or_create(&label("direction", "in"))
            .clone();
        let bytes_out = metrics
            .bytes
            .get_or_create(&label("direction", "out"))
            .clone();
        let _open = OpenStream::count(&metrics.open);
        let (local_read, local_write) = tokio::io::split(local);
        // The first grant opens the peer's window; later ones return what was consumed.
        write
            .extended_data_bytes(CONTROL_EXT, StreamControl::Credit(limits.window).encode())
            .await
            .map_err(ssh_io)?;
        let window = Window::new(limits.window, limits.max_window, budget);
        let down = downlink(read, local_write, &shared, window, &bytes_in);
        let up = uplink(&write, local_read, &shared, &bytes_out);
        // The first error ends both directions; a clean end comes from the downlink once both
        // directions have seen EOF, or when the peer closes.
        let result = tokio::try_join!(down, up).map(|_| ());
        let _ = write.close().await;
        result
    }
}

/// Channel → local: drains the channel at once into a queue bounded by the granted window, and
/// writes the queue to the local side as fast as it accepts.
async fn downlink<W: AsyncWrite + Unpin>(
    mut read: ChannelReadHalf,
    mut local: W,
    shared: &Shared,
    mut window: Window,
    bytes: &Counter,
) -> io::Result<()> {
    let result = async {
        let mut queue: VecDeque<Bytes> = VecDeque::new();
        // Bytes the peer may still send us: what we granted (or are about to) minus what arrived.
        let mut allowance = window.size();
        let mut eof = false;
        let mut local_closed = false;
        // The peer closed the channel: nothing more will arrive.
        let mut closed = false;
        loop {
            // The peer's EOF, or its close, ends this direction once the queue is written out.
            if (eof || closed) && queue.is_empty() && !local_closed {
                local.flush().await?;
                local.shutdown().await?;
                local_closed = true;
            }
            if local_closed && (closed || shared.uplink_eof.load(Ordering::Acquire)) {
                return Ok(());
            }
            tokio::select! {
                biased;
                msg = read.wait(), if !closed => match msg {
                    Some(ChannelMsg::Data { data }) => {
                        let len = data.len() as u64;
                        if eof || len > allowance {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("peer sent {len} bytes beyond its credit of {allowance}"),
                            ));
                        }
                        allowance -= len;
                        if !data.is_empty() {
                            queue.push_back(data);
                        }
                    }
                    Some(ChannelMsg::ExtendedData { data, ext }) if ext == CONTROL_EXT => {
                        match StreamControl::decode(&data) {
                            Ok(StreamControl::Credit(n)) => {
                                shared.send_credit.fetch_add(u64::from(n), Ordering::AcqRel);
                                shared.credit_arrived.notify_one();
                            }
                            Ok(other) => {
                                return Err(io::Error::new(
                                    io::ErrorKind::InvalidData,
                                    format!("unexpected control frame {other:?} mid-stream"),
                                ));
                            }
                            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
                        }
                    }
                    Some(ChannelMsg::Eof) => eof = true,
                    Some(ChannelMsg::Close) | None => closed = true,
                    Some(_) => {}
                },
                () = shared.uplink_eof_set.notified() => {}
                written = local.write(queue.front().map(|b| &b[..]).unwrap_or(&[])), if !queue.is_empty() => {
                    let n = written?;
                    if n == 0 {
                        return Err(io::ErrorKind::WriteZero.into());
                    }
                    let mut offered = n;
                    if let Some(front) = queue.front_mut() {
                        offered = front.len();
                        front.advance(n);
                        if front.is_empty() {
                            queue.pop_front();
                        }
                    }
                    bytes.inc_by(n as u64);
                    // The consumed bytes go back to the peer, plus growth, minus shrinkage.
                    let grant = window.written(n as u64, offered as u64);
                    allowance += grant;
                    let pending = shared.to_grant.fetch_add(grant, Ordering::AcqRel) + grant;
                    if pending >= (window.size() / 4).max(1) {
                        shared.grant_ready.notify_one();
                    }
                    if queue.is_empty() {
                        local.flush().await?;
                    }
                }
            }
        }
    }
    .await;
    shared.downlink_done.notify_one();
    result
}

/// Local → channel: reads the local side only while the peer has granted credit, and returns
/// grants for what the downlink consumed.
async fn uplink<S, R>(
    write: &ChannelWriteHalf<S>,
    mut local: R,
    shared: &Shared,
    bytes: &Counter,
) -> io::Result<()>
where
    S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static,
    R: AsyncRead + Unpin,
{
    let mut local_eof = false;
    let mut busy = false;
    let mut buf = BytesMut::new();
    loop {
        tokio::select! {
            biased;
            () = shared.downlink_done.notified() => return Ok(()),
            () = shared.grant_ready.notified() => {
                let grant = shared.to_grant.swap(0, Ordering::AcqRel);
                if grant > 0 {
                    let grant = u32::try_from(grant).unwrap_or(u32::MAX);
                    write
                        .extended_data_bytes(CONTROL_EXT, StreamControl::Credit(grant).encode())
                        .await
                        .map_err(ssh_io)?;
                }
            }
            chunk = read_with_credit(&mut local, shared, &mut busy, &mut buf), if !local_eof => {
                match chunk? {
                    None => {
                        local_eof = true;
                        write.eof().await.map_err(ssh_io)?;
                        shared.uplink_eof.store(true, Ordering::Release);
                        shared.uplink_eof_set.notify_one();
                    }
                    Some(data) => {
                        shared.send_credit.fetch_sub(data.len() as u64, Ordering::AcqRel);
                        bytes.inc_by(data.len() as u64);
                        write.data_bytes(data).await.map_err(ssh_io)?;
                    }
                }
            }
        }
    }
}

/// Waits for send credit, then reads at most that much from the local side. `None` at EOF.
/// Cancel-safe: nothing is taken from the local side until a read completes.
///
/// An idle stream waits with a small probe rather than a full buffer, so thousands of idle
/// streams cost no read buffers; a stream that is moving data (`busy`) reads straight into
/// `buf`, which it keeps and reuses: once russh has encrypted the previous chunk and dropped it,
/// `reserve` reclaims the same allocation, so a busy stream does not allocate (and page-fault in)
/// a fresh 64 KiB buffer per read. The probe is large enough for a whole small message, so a
/// request/response exchange costs one read per message rather than two.
async fn read_with_credit<R: AsyncRead + Unpin>(
    local: &mut R,
    shared: &Shared,
    busy: &mut bool,
    buf: &mut BytesMut,
) -> io::Result<Option<Bytes>> {
    let credit = loop {
        let credit = shared.send_credit.load(Ordering::Acquire);
        if credit > 0 {
            break credit;
        }
        shared.credit_arrived.notified().await;
    };
    let size = (credit as usize).min(READ_CHUNK);
    if *busy {
        buf.reserve(size);
        let n = local.read_buf(&mut (&mut *buf).limit(size)).await?;
        *busy = n == size;
        let data = buf.split().freeze();
        if !*busy {
            // Going idle: give the buffer back rather than hold it while nothing moves.
            *buf = BytesMut::new();
        }
        return Ok((n > 0).then_some(data));
    }
    let mut probe = [0u8; PROBE];
    let first = local.read(&mut probe[..PROBE.min(size)]).await?;
    if first == 0 {
        return Ok(None);
    }
    if first < PROBE.min(size) {
        return Ok(Some(Bytes::copy_from_slice(&probe[..first])));
    }
    let mut more = BytesMut::with_capacity(size);
    more.extend_from_slice(&probe[..first]);
    // Take whatever else is already there without waiting for more.
    if let Some(read) = local
        .read_buf(&mut (&mut more).limit(size - first))
        .now_or_never()
    {
        let n = read?;
        *busy = first + n == size;
    }
    if *busy {
        // Keep the allocation for the reads that follow.
        let data = more.split().freeze();
        *buf = more;
        return Ok(Some(data));
    }
    Ok(Some(more.freeze()))
}

fn ssh_io(e: russh::Error) -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, e)
}
