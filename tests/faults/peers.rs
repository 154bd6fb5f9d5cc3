//! A proxy without tunnels (in process, with a client entry) forwards every dial to peer
//! proxies (real `tether proxy` processes, each holding a tunnel from its own agent); a peer
//! freezes under a dial load, or dies under an open stream.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tether::proxy::{Peer, ProxyServer};

use crate::load::{
    Load, assert_no_dial_waited, assert_stream_ends, dial_once, first_stream, report, tokens,
};
use crate::support::procs::free_addr;
use crate::support::procs::{
    Files, Proc, admin_get, agent_flags_reaching, spawn_agent, spawn_proxy,
};
use crate::support::*;

/// What a dial may take at most while a peer is frozen: the time to declare its connection
/// dead (3 keepalives of 200 ms) or to give up connecting (1 s), one retry on the other peer,
/// and a generous margin for a loaded test machine. Before, such a dial waited 30 s or more.
const PEER_FAULT_BOUND: Duration = Duration::from_secs(6);

/// A peer proxy process with its own agent.
struct PeerProc {
    id: String,
    addr: SocketAddr,
    proxy: Proc,
    agent: Proc,
}

/// The entry proxy `p1` (no tunnel of its own) and peers `ids`, each with a tunnel.
async fn peered(ids: &[&str]) -> (ProxyServer, SocketAddr, SocketAddr, Vec<PeerProc>, Files) {
    let echo = echo_server().await.expect("echo");
    let pki = pki();
    let files = Files::write(&pki, ids);
    let mut config = pki.proxy_config("p1").expect("config");
    config.heartbeat.interval = Duration::from_millis(200);
    let p1 = ProxyServer::start(config).await.expect("p1");
    let entry = start_client_entry(&p1, &tokens(), |_| {}).await;
    let mut peers = vec![Peer {
        id: "p1".into(),
        addr: Some(p1.local_addr()),
        generation: 0,
    }];
    let mut procs = Vec::new();
    for id in ids {
        let (addr, admin) = (free_addr(), free_addr());
        let proxy = spawn_proxy(&files, id, addr, admin, &[]);
        let agent = spawn_agent(&files, addr, &agent_flags_reaching(echo));
        wait_for(
            &format!("{id} to hold the leaf's tunnel"),
            Duration::from_secs(30),
            || admin_get(admin, "/status").is_some_and(|s| s.contains("\"online\"")),
        )
        .await;
        peers.push(Peer {
            id: (*id).into(),
            addr: Some(addr),
            generation: 0,
        });
        procs.push(PeerProc {
            id: (*id).into(),
            addr,
            proxy,
            agent,
        });
    }
    p1.set_peers(peers);
    (p1, entry, echo, procs, files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_peer_s_forwarded_dials_move_to_another_peer_and_it_is_skipped_until_it_answers() {
    let (p1, entry, echo, peers, _files) = peered(&["p2", "p3"]).await;
    let load = Load::start(entry, echo, Duration::from_millis(50));
    wait_for("the load to get going", Duration::from_secs(20), || {
        load.finished() >= 20
    })
    .await;
    let frozen = &peers[0];
    let fault_at = Instant::now();
    frozen.proxy.signal(libc::SIGSTOP).expect("SIGSTOP");
    // Dials at once: each picks a random first peer, so some wait on the frozen one.
    let probes: Vec<_> = (0..12)
        .map(|_| tokio::spawn(dial_once(entry, echo)))
        .collect();
    let pool = p1.shared().peer_pool.clone();
    wait_for(
        "the frozen peer to be skipped",
        Duration::from_secs(10),
        || pool.is_tripped(&frozen.id),
    )
    .await;
    let detected = fault_at.elapsed();
    let so_far = load.finished();
    wait_for("dials over the other peer", Duration::from_secs(30), || {
        load.finished() >= so_far + 40
    })
    .await;
    frozen.proxy.signal(libc::SIGCONT).expect("SIGCONT");
    let resumed_at = Instant::now();
    // Probed once its cool-down is over (the load's dials start the probe), and used again.
    wait_for(
        "the resumed peer to be used again",
        Duration::from_secs(60),
        || !pool.is_tripped(&frozen.id),
    )
    .await;
    let resumed_after = resumed_at.elapsed();
    let dials = load.finish().await;
    let mut all = dials.clone();
    for p in probes {
        all.push(p.await.expect("probe"));
    }
    println!(
        "frozen peer: skipped after {detected:?}; used again {resumed_after:?} after it resumed"
    );
    report("frozen peer proxy", &all, fault_at);
    assert_no_dial_waited(&all, PEER_FAULT_BOUND);
    let _ = (&frozen.addr, &frozen.agent);
}

/// How the path behind a forwarded stream dies.
#[derive(Debug, Clone, Copy)]
enum Death {
    /// The peer proxy is stopped (SIGSTOP).
    FrozenPeer,
    /// The agent behind the peer is killed (kill -9).
    KilledAgent,
}

/// What a client may wait for its forwarded stream to end: one heartbeat timeout (3 × 200 ms
/// here), and a generous margin for a loaded test machine. Before, it never ended.
const STREAM_END_BOUND: Duration = Duration::from_secs(5);

async fn a_forwarded_stream_ends_when(death: Death) {
    let (_p1, entry, echo, peers, _files) = peered(&["p2"]).await;
    let mut stream = first_stream("a stream through the peer", entry, echo).await;
    // Idle for longer than the keepalive detection (3 × 200 ms): a live peer answers the
    // keepalives, so its idle streams stay up.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    echo_once(&mut stream, b"still there").await;
    let peer = &peers[0];
    let died_at = Instant::now();
    match death {
        Death::FrozenPeer => peer.proxy.signal(libc::SIGSTOP).expect("SIGSTOP"),
        Death::KilledAgent => peer.agent.signal(libc::SIGKILL).expect("SIGKILL"),
    }
    assert_stream_ends(&mut stream, "the forwarded stream", STREAM_END_BOUND).await;
    println!(
        "{death:?}: the client saw its stream end after {:?}",
        died_at.elapsed()
    );
    if let Death::FrozenPeer = death {
        peer.proxy.signal(libc::SIGCONT).expect("SIGCONT");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_stream_ends_when_its_peer_proxy_freezes() {
    a_forwarded_stream_ends_when(Death::FrozenPeer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_stream_ends_when_the_agent_behind_its_peer_dies() {
    a_forwarded_stream_ends_when(Death::KilledAgent).await;
}
