//! Standard output that really closes, for `tether dial` as an ssh `ProxyCommand`.
//!
//! When the far end of a dial goes away (its target closed, or the tunnel carrying it died),
//! the stream ends and the dial shuts its output down. Tokio's `Stdout` treats a shutdown as a
//! flush: descriptor 1 stays open, so the ssh reading from it never sees end-of-file and the
//! session hangs until someone kills it (712 s in the review, though the proxy had closed the
//! stream at once). [`ClosingStdout`] flushes and then closes the pipe: descriptor 1 is pointed
//! at `/dev/null` (so it stays a valid descriptor for anything that still writes), which drops
//! the process's last reference to the pipe. ssh then sees end-of-file, ends the session and
//! closes our standard input, and the dial exits.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncWrite, Stdout};

/// [`tokio::io::Stdout`] whose shutdown closes the underlying pipe or file.
pub struct ClosingStdout {
    /// Where bytes go until the shutdown.
    inner: Stdout,
    /// Whether descriptor 1 has been closed already (a shutdown is idempotent).
    closed: bool,
}

impl ClosingStdout {
    /// This process's standard output.
    pub fn new() -> Self {
        Self {
            inner: tokio::io::stdout(),
            closed: false,
        }
    }
}

impl AsyncWrite for ClosingStdout {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        if !self.closed {
            self.closed = true;
            close_stdout()?;
        }
        Poll::Ready(Ok(()))
    }
}

/// Replaces descriptor 1 with `/dev/null`, closing whatever it was.
fn close_stdout() -> io::Result<()> {
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    // SAFETY: dup2 takes two descriptors we own (ours to /dev/null, and the process's standard
    // output) and touches no memory; descriptor 1 stays valid afterwards.
    if unsafe { libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
