//! A TCP relay the test controls: pausing it black-holes the path (no byte passes either way,
//! no connection is closed), as a dead link or a silently dropping firewall would.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A relay to one target; forwarding stops while paused. Its tasks end with the runtime.
pub struct Relay {
    /// Where to connect instead of the target.
    pub addr: SocketAddr,
    /// `true` while paused.
    paused: watch::Sender<bool>,
}

impl Relay {
    /// Relays every connection to `addr` on to `target`.
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("addr");
        let (paused, _) = watch::channel(false);
        let watch = paused.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let paused = watch.subscribe();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (ir, iw) = inbound.into_split();
                    let (or, ow) = outbound.into_split();
                    let _ = tokio::join!(pump(ir, ow, paused.clone()), pump(or, iw, paused));
                });
            }
        });
        Relay { addr, paused }
    }

    /// Stops forwarding: bytes sent either way are held (and, once the kernel buffers are
    /// full, the senders block), connections stay open.
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    /// Forwards again, held bytes first.
    pub fn resume(&self) {
        self.paused.send_replace(false);
    }
}

/// Copies `from` to `to`, reading nothing and writing nothing while paused.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut paused: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let resumed = paused.wait_for(|p| !*p).await.is_ok();
        if !resumed {
            return;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(n) => n,
            },
            // Paused while waiting to read: go back and wait for the resume.
            closed = async { paused.wait_for(|p| *p).await.is_err() } => {
                if closed {
                    return;
                }
                continue;
            }
        };
        // Paused after the read: hold the bytes until the resume.
        let resumed = paused.wait_for(|p| !*p).await.is_ok();
        if !resumed || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
