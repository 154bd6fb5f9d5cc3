//! Unauthenticated connections that stall a handshake or hoard slots (issue #11, items 1 and 2,
//! and the client entry's token guessing of item 6). Every listener must close such a
//! connection at its deadline whatever it sent, one address must not take every slot, and the
//! proxy's descriptors must come back:
//! - [`tunnel`]: the SSH listener (in-process proxies, and the real binary where its
//!   descriptors and memory are measured);
//! - [`entry`]: the HTTP CONNECT / SOCKS5 client entry;
//! - [`admin`]: the admin endpoint;
//! - [`agent`]: the agent against a proxy that stalls.
//!
//! The attacker connects from 127.0.0.2, legitimate agents and clients from 127.0.0.1, so
//! per-source limits see two different addresses.

mod admin;
mod agent;
mod entry;
mod tunnel;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

/// The attacker's address.
pub const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// Everyone else's.
pub const HONEST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Connects to `to` from the source address `from`.
pub async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// Reads and discards until the peer closes (end-of-file or reset).
pub async fn until_closed(stream: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Keeps `slots` connections from [`ATTACKER`] to `to`, each sending `hello` and then nothing.
/// A connection is reopened when the server drops it, and at the latest after `hold` (as an
/// attacker would, just before a server-side deadline), until `stop` is cancelled; a refused
/// slot waits 250 ms before trying again, which bounds the attack's rate.
pub fn hoard(
    to: SocketAddr,
    slots: usize,
    hello: &'static [u8],
    hold: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinSet<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..slots {
        let stop = stop.clone();
        tasks.spawn(async move {
            while !stop.is_cancelled() {
                if let Ok(mut s) = connect_from(ATTACKER, to).await {
                    let _ = tokio::io::AsyncWriteExt::write_all(&mut s, hello).await;
                    tokio::select! {
                        () = until_closed(&mut s) => {}
                        () = tokio::time::sleep(hold) => {}
                        () = stop.cancelled() => return,
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
    }
    tasks
}

/// Descriptors a process holds open.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Resident set size of a process, in bytes.
pub fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * 4096
}
