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

pub mod tunnel;

pub use tunnel::{StreamLimits, TunnelStream};
