//! Reading one HTTP head, bounded: the one loop behind the four places that read a head from
//! a peer who may be hostile or broken (the client entry's CONNECT, the TLS port's request,
//! the WebSocket upgrade's answer, a forward proxy's answer to CONNECT).
//!
//! Each of them wants the same three things: never hold more than a bound (a peer that sends
//! headers forever gets "too large", not our memory), never block past the head's end when
//! the head is complete (the bytes after it belong to the tunnel, so they are returned, not
//! dropped), and tell "closed before the head ended" apart from a read error. What a head
//! *means* differs, so the caller passes its parser; the deadline is the caller's too.
//!
//! Bytes are read into the buffer's spare capacity, never zero-filled first: a client that
//! sends its head a byte at a time costs a read call per byte, not a 16 KiB memset per byte.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Why no head came.
#[derive(Debug)]
pub enum HeadError<E> {
    /// `max` bytes were read and the head had not ended.
    TooLarge,
    /// The peer closed before the head ended.
    Closed,
    /// The read failed.
    Io(std::io::Error),
    /// The parser refused what was read.
    Parse(E),
}

/// How much a read asks for at most: heads are a few hundred bytes.
const READ_CHUNK: usize = 4096;

/// Reads from `io` into `buf` (which may already hold bytes, such as a sniffed first byte)
/// until `parse` finds a complete head (`Ok(Some(_))`), at most `max` bytes in all.
///
/// `parse` sees the whole buffer each time and answers `Ok(None)` while the head is
/// incomplete. On success, `buf` holds the head and whatever came with it.
pub async fn read_head<S, T, E>(
    io: &mut S,
    buf: &mut Vec<u8>,
    max: usize,
    mut parse: impl FnMut(&[u8]) -> Result<Option<T>, E>,
) -> Result<T, HeadError<E>>
where
    S: AsyncRead + Unpin,
{
    loop {
        if let Some(head) = parse(buf).map_err(HeadError::Parse)? {
            return Ok(head);
        }
        let room = max.saturating_sub(buf.len());
        if room == 0 {
            return Err(HeadError::TooLarge);
        }
        buf.reserve(room.min(READ_CHUNK));
        let mut limited = (&mut *io).take(room as u64);
        let n = limited.read_buf(buf).await.map_err(HeadError::Io)?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Complete at the blank line; `Err` on a byte that is not ASCII.
    fn blank_line(buf: &[u8]) -> Result<Option<usize>, u8> {
        if let Some(bad) = buf.iter().find(|b| !b.is_ascii()) {
            return Err(*bad);
        }
        Ok(buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|at| at + 4))
    }

    #[tokio::test]
    async fn a_head_sent_a_byte_at_a_time_is_read_with_what_follows_it() {
        let (mut client, mut server) = tokio::io::duplex(1);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            client.write_all(b"GET / HTTP/1.1\r\n\r\nafter").await
        });
        let mut buf = Vec::new();
        let len = read_head(&mut server, &mut buf, 64, blank_line)
            .await
            .expect("head");
        assert_eq!(&buf[..len], b"GET / HTTP/1.1\r\n\r\n");
        // Through a one-byte pipe the head's last byte came alone: nothing past it was taken.
        assert_eq!(buf.len(), len);
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.expect("rest");
        writer.await.expect("join").expect("write");
        assert_eq!(rest, b"after");
    }

    #[tokio::test]
    async fn a_head_longer_than_the_bound_is_too_large_and_never_read_past_it() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        use tokio::io::AsyncWriteExt;
        client.write_all(&[b'a'; 100]).await.expect("write");
        let mut buf = Vec::new();
        let result = read_head(&mut server, &mut buf, 10, blank_line).await;
        assert!(matches!(result, Err(HeadError::TooLarge)), "{result:?}");
        assert_eq!(buf.len(), 10);
    }

    #[tokio::test]
    async fn a_peer_that_closes_early_is_closed_and_bad_bytes_are_the_parsers() {
        let mut buf = b"G".to_vec();
        let result = read_head(&mut &b"ET /"[..], &mut buf, 64, blank_line).await;
        assert!(matches!(result, Err(HeadError::Closed)), "{result:?}");
        assert_eq!(buf, b"GET /");

        let mut buf = Vec::new();
        let result = read_head(&mut &b"GET \xff"[..], &mut buf, 64, blank_line).await;
        assert!(matches!(result, Err(HeadError::Parse(0xff))), "{result:?}");
    }
}
