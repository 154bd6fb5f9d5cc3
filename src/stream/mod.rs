//! Flow-controlled byte streams over SSH channels.

use std::future::Future;
use std::io;

use tokio::io::{AsyncRead, AsyncWrite};

/// A connection that can be joined to a local byte stream, copying both ways until both sides
/// have finished, honouring half-close. Implemented by tunnel streams and by plain TCP streams
/// (direct clusters, tests).
pub trait Splice: Send + 'static {
    /// Copies between `self` and `local` until both directions have ended or one side fails.
    fn splice<L>(self, local: L) -> impl Future<Output = io::Result<()>> + Send
    where
        L: AsyncRead + AsyncWrite + Unpin + Send + 'static;
}

impl Splice for tokio::net::TcpStream {
    async fn splice<L>(mut self, mut local: L) -> io::Result<()>
    where
        L: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        tokio::io::copy_bidirectional(&mut self, &mut local).await?;
        Ok(())
    }
}

pub mod frames;
pub mod guard;
pub mod tunnel;
pub mod upgrade;
mod window;

/// Freed memory glibc's allocator may keep at the top of a heap before giving it back.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: std::ffi::c_int = 4 * 1024 * 1024;

/// Tunes the allocator for the data path; call once at process start (the `tether` binary does).
///
/// Every SSH packet russh receives becomes a freshly allocated, zero-filled 32 KiB buffer, freed
/// once the stream has written it out. With glibc's default trim threshold (128 KiB) each burst
/// of frees hands the top of a thread's heap back to the kernel (`madvise`) and the next packets
/// fault the same pages in again: page faults, page clearing and TLB shootdowns were ~8% of the
/// proxy's and agent's CPU under load. Keeping up to 4 MiB of freed memory per heap removes that
/// churn; idle memory is unchanged (nothing is allocated up front). A no-op off glibc.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
        unsafe extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        // SAFETY: mallopt only sets an allocator parameter; any value is valid for this one.
        unsafe {
            mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    }
}

pub use guard::HandshakeGuard;
pub use tunnel::{StreamLimits, TunnelShare, TunnelStream};
pub use window::WindowBudget;
