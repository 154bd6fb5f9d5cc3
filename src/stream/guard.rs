//! Closing a socket at a deadline even after another task has taken it over.
//!
//! russh's `server::run_stream` and `client::connect_stream` move the socket into a task of
//! their own (`session.run`) and hand back only a handle. Dropping the future that awaits the
//! handshake, or asking the session to disconnect, does not end that task while the first key
//! exchange is pending: russh reads no queued command until it completes. A client that sends a
//! banner (or a KEXINIT) and then nothing therefore kept its socket and task forever, after the
//! proxy had already forgotten it (576 sockets from one address, against a per-IP limit of 512,
//! in the security review).
//!
//! [`HandshakeGuard`] keeps a duplicate of the socket's file descriptor for the length of the
//! handshake. `shutdown(2)` acts on the socket, not on the descriptor, so shutting the duplicate
//! down makes the pending read in russh's task return end-of-file; the task then ends and closes
//! its own descriptor. Holding a duplicate (rather than the raw number) means a descriptor number
//! reused by the kernel after russh closed the socket can never be shut by mistake. It costs one
//! descriptor per handshake in flight, and nothing once the handshake is done.

use std::io;
use std::net::Shutdown;
use std::os::fd::AsFd;

/// A second handle on a handshaking socket: [`shutdown`](Self::shutdown) ends the connection
/// whatever task owns it. Shuts the socket down when dropped, unless
/// [`release`](Self::release)d, so that every early return (an error, a timeout dropping the
/// future) closes the connection too.
#[derive(Debug)]
pub struct HandshakeGuard {
    /// The duplicate descriptor; `None` once released.
    dup: Option<std::net::TcpStream>,
}

impl HandshakeGuard {
    /// Duplicates `socket`'s descriptor. Fails only when the process is out of descriptors.
    pub fn new(socket: &tokio::net::TcpStream) -> io::Result<Self> {
        let fd = socket.as_fd().try_clone_to_owned()?;
        Ok(Self {
            dup: Some(std::net::TcpStream::from(fd)),
        })
    }

    /// Shuts the socket down both ways: the peer sees end-of-file and whoever reads it locally
    /// does too. Idempotent.
    pub fn shutdown(&self) {
        if let Some(dup) = &self.dup {
            // ENOTCONN when the peer already left: nothing more to do.
            let _ = dup.shutdown(Shutdown::Both);
        }
    }

    /// The handshake succeeded: give the duplicate back without touching the connection.
    pub fn release(mut self) {
        self.dup = None;
    }
}

impl Drop for HandshakeGuard {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn shutdown_wakes_a_read_in_another_task_and_the_peer() {
        let (mut client, mut server) = pair().await;
        let guard = HandshakeGuard::new(&server).unwrap();
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            server.read(&mut buf).await
        });
        guard.shutdown();
        assert_eq!(
            reader.await.unwrap().unwrap(),
            0,
            "the owner's read sees EOF"
        );
        let mut buf = [0u8; 8];
        assert_eq!(client.read(&mut buf).await.unwrap(), 0, "the peer sees EOF");
    }

    #[tokio::test]
    async fn drop_shuts_and_release_does_not() {
        let (mut client, server) = pair().await;
        HandshakeGuard::new(&server).unwrap().release();
        let mut buf = [0u8; 8];
        let read =
            tokio::time::timeout(std::time::Duration::from_millis(50), client.read(&mut buf)).await;
        assert!(read.is_err(), "a released guard leaves the connection open");
        drop(HandshakeGuard::new(&server).unwrap());
        assert_eq!(client.read(&mut buf).await.unwrap(), 0);
        drop(server);
    }
}
