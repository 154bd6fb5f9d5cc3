//! A stopping agent (its operator replica got SIGTERM) loses no byte of the streams it
//! carries: it says it is leaving, keeps its tunnel and heartbeats, and the proxy closes the
//! tunnel once the last stream on it has ended (`agent::tunnel::Tunnel::run`).
//!
//! Before, the agent closed the tunnel itself once its own end of every stream had finished.
//! A stream's end on the agent is not its end on the proxy: here the agent has sent the whole
//! response (it fits in one credit window) while the client has not read it yet, so the proxy
//! still holds most of it. Closing the connection then made the proxy's stream fail on its
//! next credit grant and drop the rest: the client saw a clean end after ~64 of 200 KiB. The
//! rolling-restart test (`tests/operator_ha`) saw the same as 1 long stream in 12 ending
//! without its last echo.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::support::{Rig, attach, leaf, wait_for, within};

/// The response: larger than a few credit grants (64 KiB each), smaller than the first window
/// (256 KiB), so the agent sends all of it without the client reading anything.
const RESPONSE: usize = 200 * 1024;

/// A server that reads its client's request to the end, answers [`RESPONSE`] bytes and closes;
/// its flag turns true once it has written and closed.
async fn respond_after_eof() -> (SocketAddr, watch::Receiver<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (done, answered) = watch::channel(false);
    tokio::spawn(async move {
        let Ok((mut socket, _)) = listener.accept().await else {
            return;
        };
        let mut request = Vec::new();
        socket.read_to_end(&mut request).await.expect("request");
        socket.write_all(&response()).await.expect("response");
        socket.shutdown().await.expect("shutdown");
        drop(socket);
        let _ = done.send(true);
    });
    (addr, answered)
}

fn response() -> Vec<u8> {
    (0..RESPONSE as u32).map(|i| (i % 251) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_agent_keeps_its_tunnel_until_the_proxy_has_written_out_every_stream() {
    let (target, mut answered) = respond_after_eof().await;
    let rig = Rig::start(
        &[format!("127.0.0.1/32:{}", target.port())],
        |_| {},
        |agent| agent.heartbeat_interval = Duration::from_millis(100),
    )
    .await;
    let conn = rig.dial(target).await.expect("dial");
    // A small pipe: the proxy can write out only a little before the client reads.
    let (mut client, _splice) = attach(conn, 16 * 1024);
    client.write_all(b"request").await.expect("request");
    client.shutdown().await.expect("half-close");
    within(
        "the target's answer",
        Duration::from_secs(10),
        answered.wait_for(|a| *a),
    )
    .await
    .expect("target");

    // The agent's end of the stream is over (the target closed); the client has read nothing.
    rig.stop.cancel();
    let sites = rig.proxy.sites();
    wait_for(
        "the proxy to see the agent leave",
        Duration::from_secs(10),
        || {
            let tunnels = sites.tunnels_of(&leaf());
            !tunnels.is_empty() && tunnels.iter().all(|t| t.is_leaving())
        },
    )
    .await;
    let leaving_seen = Instant::now();
    // Either the agent has closed the tunnel (the bug), or it is still there past the point
    // where the proxy's watchdog would have declared it dead had the agent stopped its
    // heartbeats when it said it leaves: the proxy has a stream to finish on it.
    wait_for(
        "the leaving agent's tunnel kept alive past the heartbeat timeout, or closed",
        Duration::from_secs(10),
        || match sites.tunnels_of(&leaf()).first() {
            None => true,
            Some(t) => {
                leaving_seen.elapsed() > t.offline_after
                    && t.since_heartbeat() < leaving_seen.elapsed()
            }
        },
    )
    .await;
    assert!(
        sites.tunnels_of(&leaf()).iter().all(|t| t.is_usable()),
        "the proxy declared the leaving agent's tunnel dead"
    );
    let mut received = Vec::new();
    within(
        "the response",
        Duration::from_secs(10),
        client.read_to_end(&mut received),
    )
    .await
    .expect("read");
    assert!(
        received == response(),
        "the stream ended cleanly after {} of {RESPONSE} bytes: the agent closed its tunnel \
         before the proxy had written the stream out",
        received.len()
    );
    // With the stream over, the proxy lets the agent go.
    wait_for(
        "the proxy to close the tunnel",
        Duration::from_secs(10),
        || sites.tunnels_of(&leaf()).is_empty(),
    )
    .await;
}
