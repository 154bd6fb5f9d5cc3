//! Bytes through the tunnel: integrity, half-close, many streams, and a stalled reader.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

fn allow_loopback() -> Vec<String> {
    vec!["127.0.0.1/32:*".to_owned()]
}

#[tokio::test]
async fn bytes_round_trip_and_half_close_is_honoured() {
    let rig = Rig::start(&allow_loopback(), |_| {}, |_| {}).await;
    let echo = echo_server().await.expect("echo");
    let (mut stream, task) = attach(rig.dial(echo).await.expect("dial"), 64 * 1024);
    // Half-close: after our EOF the echo server still sends everything back, then its EOF.
    let back = within(
        "echo",
        Duration::from_secs(10),
        echo_round_trip(&mut stream, b"hello"),
    )
    .await;
    assert_eq!(back, b"hello");
    within("splice ends", Duration::from_secs(10), task)
        .await
        .expect("splice task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfers_each_way_at_once_arrive_intact() {
    const SIZE: usize = 256 * 1024 * 1024;
    let rig = Rig::start(&allow_loopback(), |_| {}, |_| {}).await;
    let echo = echo_server().await.expect("echo");
    let (stream, task) = attach(rig.dial(echo).await.expect("dial"), 256 * 1024);
    let (mut reader, mut writer) = tokio::io::split(stream);
    let send = tokio::spawn(async move {
        let mut hash = Sha256::new();
        let mut chunk = vec![0u8; 256 * 1024];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut sent = 0;
        while sent < SIZE {
            for b in chunk.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *b = state as u8;
            }
            writer.write_all(&chunk).await.expect("write");
            hash.update(&chunk);
            sent += chunk.len();
        }
        writer.shutdown().await.expect("shutdown");
        hash.finalize()
    });
    let receive = tokio::spawn(async move {
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut received = 0usize;
        loop {
            let n = reader.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            received += n;
        }
        (received, hash.finalize())
    });
    let sent_hash = within("send 256 MiB", Duration::from_secs(300), send)
        .await
        .expect("sender");
    let (received, received_hash) = within("receive 256 MiB", Duration::from_secs(300), receive)
        .await
        .expect("receiver");
    assert_eq!(received, SIZE);
    assert_eq!(sent_hash, received_hash, "the bytes came back changed");
    within("splice ends", Duration::from_secs(10), task)
        .await
        .expect("splice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_streams_share_one_tunnel() {
    let rig = Rig::start(&allow_loopback(), |_| {}, |_| {}).await;
    let echo = echo_server().await.expect("echo");
    // Open all streams first so they are truly concurrent, then exchange on each.
    let mut streams = Vec::new();
    for _ in 0..1000 {
        streams.push(attach(rig.dial(echo).await.expect("dial"), 4096));
    }
    let open = rig.proxy.site(&leaf()).expect("site").tunnels[0].open_streams;
    assert_eq!(open, 1000, "all streams open at once on the one tunnel");
    let mut checks = Vec::new();
    for (i, (mut stream, task)) in streams.into_iter().enumerate() {
        checks.push(tokio::spawn(async move {
            let message = format!("stream {i}");
            let back = echo_round_trip(&mut stream, message.as_bytes()).await;
            assert_eq!(back, message.as_bytes());
            task.await.expect("splice");
        }));
    }
    within("1000 echoes", Duration::from_secs(60), async {
        for c in checks {
            c.await.expect("stream check");
        }
    })
    .await;
    let sites = rig.proxy.sites();
    wait_for("streams to be released", Duration::from_secs(10), || {
        sites.get(&leaf()).expect("site").tunnels[0].open_streams == 0
    })
    .await;
}

/// Waits (up to 30 s) until the bytes `what` has moved, counted in `count`, stop growing
/// between two looks 300 ms apart, and returns that count: a stream held back by flow control
/// shows only as a count that no longer moves.
async fn until_held_back(what: &str, count: &AtomicU64) -> u64 {
    let mut last = u64::MAX;
    within(
        &format!("{what} to be held back"),
        Duration::from_secs(30),
        async {
            loop {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let now = count.load(Ordering::Relaxed);
                if now == last {
                    return now;
                }
                last = now;
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_stalls_only_its_own_stream_with_bounded_memory() {
    let rig = Rig::start(
        &allow_loopback(),
        |p| {
            // Frequent heartbeats, so the test sees them flow beside the stall, but a generous
            // miss count: other tests load the machine, and a late heartbeat is not the point.
            p.heartbeat.interval = Duration::from_millis(100);
            p.heartbeat.missed = 30;
        },
        |a| a.heartbeat_interval = Duration::from_millis(100),
    )
    .await;
    let (firehose, written) = firehose_server().await;
    let echo = echo_server().await.expect("echo");
    let rss_before = rss_bytes();

    // Stream A: the target floods, the root-side reader never reads.
    let (_stalled, _task) = attach(rig.dial(firehose).await.expect("dial firehose"), 4096);
    let last = until_held_back("the firehose", &written).await;
    eprintln!("stalled reader: the flooding target got {last} bytes out before being held");
    // One stream window (512 KiB at first; up to 2 MiB if it grew while the kernel's socket
    // buffers still took everything, before the stall) plus kernel socket buffers on loopback:
    // a few MiB at most. The bound is unchanged by the adaptive window.
    assert!(
        last < 24 * 1024 * 1024,
        "the stalled stream let {last} bytes through"
    );

    // Stream B on the same tunnel still works, and heartbeats keep arriving.
    let other = rig.dial(echo).await;
    let (mut other, _t) = attach(
        other.unwrap_or_else(|e| panic!("dial beside a stalled stream: {e}")),
        64 * 1024,
    );
    let back = within(
        "echo beside a stalled stream",
        Duration::from_secs(10),
        echo_round_trip(&mut other, b"still moving"),
    )
    .await;
    assert_eq!(back, b"still moving");
    let site = rig.proxy.site(&leaf()).expect("site");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let later = rig.proxy.site(&leaf()).expect("site");
    assert!(
        later.tunnels[0].last_heartbeat > site.tunnels[0].last_heartbeat,
        "heartbeats stopped while a stream was stalled"
    );
    assert_eq!(later.status, tether::proxy::SiteStatus::Online);

    // The other direction: the target never reads, the root-side writer keeps writing.
    let hole = black_hole_server().await;
    let (mut pusher, _t2) = attach(rig.dial(hole).await.expect("dial hole"), 4096);
    let pushed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = pushed.clone();
    tokio::spawn(async move {
        let chunk = vec![1u8; 64 * 1024];
        while let Ok(n) = pusher.write(&chunk).await {
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
    });
    let last = until_held_back("the writer", &pushed).await;
    assert!(
        last < 24 * 1024 * 1024,
        "the stalled target let {last} bytes through"
    );
    eprintln!("stalled target: the writer got {last} bytes in before being held");
    let grown = rss_bytes().saturating_sub(rss_before);
    eprintln!(
        "memory grew by {} KiB while both streams were stalled",
        grown / 1024
    );
    assert!(
        grown < 64 * 1024 * 1024,
        "memory grew by {grown} bytes while streams were stalled"
    );
}
