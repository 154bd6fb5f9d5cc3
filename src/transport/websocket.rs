//! WebSocket as a byte carrier for SSH, for roots behind an L7 load balancer.
//!
//! A load balancer that terminates TLS and forwards HTTP (haproxy `mode http`, AWS ALB, most
//! ingress controllers) drops ALPN, so the agent cannot ask for `tether-ssh` by name; but every
//! one of them passes a WebSocket upgrade through and then forwards bytes both ways. So the agent
//! sends `GET /tether/v1/tunnel` with `Upgrade: websocket`, and after `101 Switching Protocols`
//! SSH runs inside binary frames (RFC 6455):
//!
//! ```text
//!   agent ──TLS──▶ L7 LB ──HTTP──▶ proxy's TLS port
//!   GET /tether/v1/tunnel, Upgrade: websocket ──▶ 101 ──▶ [binary frame: SSH bytes]...
//! ```
//!
//! Only what a byte stream needs is implemented: binary and continuation frames carry data,
//! a ping is answered with a pong, a close frame is end-of-file; text frames and a peer that
//! breaks the masking rule are errors. Reads never buffer a whole frame: a frame's payload is
//! unmasked as it streams into the caller's buffer, so a 2^63-byte length costs nothing until
//! its bytes arrive. A write becomes one frame of at most [`MAX_FRAME`] bytes, staged in one
//! reusable buffer (the only copy: the client must mask what it sends); the frame header is 4
//! to 14 bytes, under 0.1 % of a full frame (BENCHMARKS.md has the throughput).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use tokio_util::io::poll_read_buf;

use super::http_head::{HeadError, read_head};

/// The path agents upgrade on; anything else on the TLS port is not a tunnel.
pub const PATH: &str = "/tether/v1/tunnel";

/// Largest payload one write puts in a frame: bigger than russh's packets (32 KiB), so an SSH
/// packet is rarely split, and small enough that the staging buffer stays small per tunnel.
pub const MAX_FRAME: usize = 64 * 1024;

/// Largest response head the client reads before the upgrade (status line and headers).
const MAX_HEAD: usize = 8 * 1024;

/// The read buffer's size: what is left in it after a frame is at most a header and a
/// control frame's payload (139 bytes), so a read takes nearly all of it.
const FILL: usize = 16 * 1024;

/// What RFC 6455 appends to the client's key before hashing it into the accept key.
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Why an upgrade or a frame was refused.
#[derive(Debug, thiserror::Error)]
pub enum WebSocketError {
    #[error("the WebSocket upgrade was refused: {0}")]
    Refused(String),
    #[error("the WebSocket upgrade failed: {0}")]
    Io(#[from] io::Error),
}

/// Which end of the connection this is: a client masks what it sends and must receive unmasked
/// frames; a server the other way round (RFC 6455 §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

/// The `Sec-WebSocket-Accept` value that proves a server read the client's `key`.
pub fn accept_key(key: &str) -> String {
    let mut context = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    context.update(key.trim().as_bytes());
    context.update(ACCEPT_GUID.as_bytes());
    BASE64.encode(context.finish())
}

/// The client's key, if `headers` ask for a WebSocket upgrade this server can take; else why not.
pub fn upgrade_key<'h>(headers: &'h [httparse::Header<'_>]) -> Result<&'h str, &'static str> {
    let value = |name: &str| {
        headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let has_token = |name: &str, token: &str| {
        value(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return Err("not a WebSocket upgrade (Upgrade: websocket, Connection: Upgrade)");
    }
    if value("sec-websocket-version").map(str::trim) != Some("13") {
        return Err("unsupported WebSocket version (13 is)");
    }
    match value("sec-websocket-key").map(str::trim) {
        Some(key) if BASE64.decode(key).is_ok_and(|k| k.len() == 16) => Ok(key),
        _ => Err("missing or malformed Sec-WebSocket-Key"),
    }
}

/// The server's answer to an upgrade whose key is `key`.
pub fn switching_protocols(key: &str) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(key)
    )
}

/// Upgrades `io` as a client: asks `host` for [`PATH`] and checks the server's proof.
/// The caller bounds it in time.
pub async fn connect<S>(mut io: S, host: &str) -> Result<WebSocket<S>, WebSocketError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let key = BASE64.encode(rand::random::<[u8; 16]>());
    let request = format!(
        "GET {PATH} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    io.write_all(request.as_bytes()).await?;
    io.flush().await?;
    let mut head = Vec::with_capacity(1024);
    let len = read_head(&mut io, &mut head, MAX_HEAD, |head| {
        check_answer(head, &key)
    })
    .await
    .map_err(|e| match e {
        HeadError::TooLarge => {
            WebSocketError::Refused(format!("the answer's head is over {MAX_HEAD} bytes"))
        }
        HeadError::Closed => {
            WebSocketError::Refused("the server closed the connection before answering".into())
        }
        HeadError::Io(e) => e.into(),
        HeadError::Parse(e) => e,
    })?;
    Ok(WebSocket::new(io, Role::Client, head.split_off(len)))
}

/// The length of a complete `101` answer proving `key`, `None` if more bytes are needed.
fn check_answer(head: &[u8], key: &str) -> Result<Option<usize>, WebSocketError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(head) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(WebSocketError::Refused(format!("not an HTTP answer: {e}"))),
    };
    let code = response.code.unwrap_or_default();
    if code != 101 {
        let reason = response.reason.unwrap_or_default();
        let body = String::from_utf8_lossy(&head[len..head.len().min(len + 200)]);
        let body: String = body.chars().filter(|c| !c.is_control()).collect();
        return Err(WebSocketError::Refused(format!(
            "HTTP {code} {reason}: {}",
            body.trim()
        )));
    }
    let accept = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
        .map(|h| h.value);
    if accept != Some(accept_key(key).as_bytes()) {
        return Err(WebSocketError::Refused(
            "the server's Sec-WebSocket-Accept does not prove our key".into(),
        ));
    }
    Ok(Some(len))
}

/// A byte stream carried in WebSocket binary frames over `S`.
pub struct WebSocket<S> {
    /// The connection the frames travel on.
    inner: S,
    /// Whether this end masks what it sends (client) or requires masked frames (server).
    role: Role,
    /// Bytes read from `inner` and not yet taken: frame headers, or payload (still masked).
    input: Vec<u8>,
    /// Where the untaken bytes of `input` start.
    input_at: usize,
    /// The data frame being read: its payload bytes not yet delivered, and its mask.
    payload: Payload,
    /// Frames staged for `inner` (a data frame, a pong, a close), written before anything new.
    output: Vec<u8>,
    /// How much of `output` `inner` has taken.
    output_at: usize,
    /// A ping's payload to answer once `output` is free.
    pong: Option<Vec<u8>>,
    /// The peer sent a close frame, or its connection ended between frames: reads see EOF.
    read_closed: bool,
    /// This end has queued its close frame.
    close_sent: bool,
}

/// The unread part of the data frame being read.
#[derive(Debug, Default, Clone, Copy)]
struct Payload {
    remaining: u64,
    mask: Option<[u8; 4]>,
    /// Bytes of the payload unmasked so far (the mask's phase).
    offset: usize,
}

/// A frame header parsed out of `input`.
struct Header {
    fin: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: u64,
    size: usize,
}

impl<S> WebSocket<S> {
    /// Frames over `inner`, which has already switched protocols; `leftover` is what was read
    /// after the upgrade's head.
    pub fn new(inner: S, role: Role, leftover: Vec<u8>) -> Self {
        Self {
            inner,
            role,
            input: leftover,
            input_at: 0,
            payload: Payload::default(),
            output: Vec::new(),
            output_at: 0,
            pong: None,
            read_closed: false,
            close_sent: false,
        }
    }

    /// The connection under the frames.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    fn buffered(&self) -> &[u8] {
        &self.input[self.input_at..]
    }

    fn consume(&mut self, n: usize) {
        self.input_at += n;
        if self.input_at == self.input.len() {
            self.input.clear();
            self.input_at = 0;
        }
    }

    /// Stages one frame for `inner` (masked if this is the client).
    fn stage(&mut self, opcode: u8, payload: &[u8]) {
        self.output.clear();
        self.output_at = 0;
        let masked = self.role == Role::Client;
        let mask_bit = if masked { 0x80 } else { 0 };
        self.output.push(0x80 | opcode);
        match payload.len() {
            n @ 0..=125 => self.output.push(mask_bit | n as u8),
            n @ 126..=0xFFFF => {
                self.output.push(mask_bit | 126);
                self.output.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                self.output.push(mask_bit | 127);
                self.output.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let body = self.output.len();
        if masked {
            let mask: [u8; 4] = rand::random();
            self.output.extend_from_slice(&mask);
            self.output.extend_from_slice(payload);
            apply_mask(&mut self.output[body + 4..], mask, 0);
        } else {
            self.output.extend_from_slice(payload);
        }
    }
}

/// XORs `data` with `mask`, starting at byte `offset` of the mask's cycle.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    let mut rotated = [0u8; 8];
    for (i, b) in rotated.iter_mut().enumerate() {
        *b = mask[(offset + i) % 4];
    }
    let word = u64::from_ne_bytes(rotated);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(bytes) ^ word).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= rotated[i];
    }
}

fn parse_header(bytes: &[u8]) -> Option<Header> {
    let (&first, rest) = bytes.split_first()?;
    let (&second, rest) = rest.split_first()?;
    let (len, mut size) = match second & 0x7F {
        126 => (
            u64::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?)),
            4,
        ),
        127 => (u64::from_be_bytes(rest.get(..8)?.try_into().ok()?), 10),
        n => (u64::from(n), 2),
    };
    let mask = if second & 0x80 != 0 {
        let key = bytes.get(size..size + 4)?.try_into().ok()?;
        size += 4;
        Some(key)
    } else {
        None
    };
    Some(Header {
        fin: first & 0x80 != 0,
        opcode: first & 0x0F,
        mask,
        len,
        size,
    })
}

fn protocol_error(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("WebSocket: {why}"))
}

impl<S: AsyncRead + AsyncWrite + Unpin> WebSocket<S> {
    /// Reads more of `inner` into `input`; `false` at end-of-file.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if self.input_at > 0 {
            self.input.drain(..self.input_at);
            self.input_at = 0;
        }
        // Into spare capacity, not zero-filled first (this runs once per read of the
        // connection), and up to FILL in all, so the buffer stays one size for good.
        self.input.reserve(FILL.saturating_sub(self.input.len()));
        let n = ready!(poll_read_buf(
            Pin::new(&mut self.inner),
            cx,
            &mut self.input
        ))?;
        Poll::Ready(Ok(n > 0))
    }

    /// Takes the next frame header; data frames set `payload`, control frames are handled.
    /// `Ready(Ok(false))` when the stream has ended.
    fn poll_next_frame(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        loop {
            let Some(header) = parse_header(self.buffered()) else {
                if !ready!(self.poll_fill(cx))? {
                    if self.buffered().is_empty() {
                        return Poll::Ready(Ok(false));
                    }
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                }
                continue;
            };
            if header.mask.is_some() != (self.role == Role::Server) {
                return Poll::Ready(Err(protocol_error("frame masking is the wrong way round")));
            }
            match header.opcode {
                0x0 | 0x2 => {
                    self.consume(header.size);
                    self.payload = Payload {
                        remaining: header.len,
                        mask: header.mask,
                        offset: 0,
                    };
                    return Poll::Ready(Ok(true));
                }
                0x8..=0xA => {
                    if !header.fin || header.len > 125 {
                        return Poll::Ready(Err(protocol_error("oversized control frame")));
                    }
                    let end = header.size + header.len as usize;
                    if self.buffered().len() < end {
                        if !ready!(self.poll_fill(cx))? {
                            return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                        }
                        continue;
                    }
                    let mut body = self.buffered()[header.size..end].to_vec();
                    if let Some(mask) = header.mask {
                        apply_mask(&mut body, mask, 0);
                    }
                    self.consume(end);
                    match header.opcode {
                        0x8 => return Poll::Ready(Ok(false)),
                        0x9 => self.pong = Some(body),
                        _ => {}
                    }
                }
                _ => return Poll::Ready(Err(protocol_error("text or unknown frame"))),
            }
        }
    }

    /// Writes staged frames (and a pending pong) until `inner` takes no more.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            while self.output_at < self.output.len() {
                let n = ready!(
                    Pin::new(&mut self.inner).poll_write(cx, &self.output[self.output_at..])
                )?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.output_at += n;
            }
            match self.pong.take() {
                Some(body) => self.stage(0xA, &body),
                None => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WebSocket<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.payload.remaining == 0 {
            if this.read_closed || !ready!(this.poll_next_frame(cx))? {
                this.read_closed = true;
                return Poll::Ready(Ok(()));
            }
        }
        // A pong waits for the next write, or is pushed now if nothing else is staged.
        if this.pong.is_some() && this.output_at == this.output.len() {
            let _ = this.poll_drain(cx)?;
        }
        let want = (buf.remaining() as u64).min(this.payload.remaining) as usize;
        let before = buf.filled().len();
        if this.buffered().is_empty() {
            // Straight from the connection into the caller's buffer: no copy of our own.
            let mut limited = ReadBuf::new(buf.initialize_unfilled_to(want));
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut limited))?;
            let n = limited.filled().len();
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            buf.advance(n);
        } else {
            let n = want.min(this.buffered().len());
            buf.put_slice(&this.buffered()[..n]);
            this.consume(n);
        }
        let filled = &mut buf.filled_mut()[before..];
        if let Some(mask) = this.payload.mask {
            apply_mask(filled, mask, this.payload.offset);
        }
        this.payload.offset = (this.payload.offset + filled.len()) % 4;
        this.payload.remaining -= filled.len() as u64;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WebSocket<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        if this.close_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let n = buf.len().min(MAX_FRAME);
        this.stage(0x2, &buf[..n]);
        // Push what `inner` takes now; the rest goes at the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        if !self.close_sent {
            self.close_sent = true;
            self.stage(0x8, &[]);
            ready!(self.poll_drain(cx))?;
        }
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
