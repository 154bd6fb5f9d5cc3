//! One leaf, two agent instances (real `tether agent` processes) on one proxy; one of their
//! paths dies under a dial load.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tether::proxy::ProxyServer;

use crate::load::{
    Load, assert_no_dial_waited, assert_stream_ends, dial_once, first_stream, report, tokens,
};
use crate::support::procs::{Files, Proc, agent_flags_reaching, spawn_agent};
use crate::support::relay::Relay;
use crate::support::*;

/// How a path dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// The agent process is stopped (SIGSTOP): its connection stays open, silent.
    FrozenAgent,
    /// The path between agent and proxy drops every byte (a paused relay).
    BlackHole,
}

/// What a dial may take beyond the time the proxy took to declare the path dead: one retry on
/// the other agent (milliseconds) and a generous margin for a loaded test machine. A dial left
/// waiting on the dead path takes the proxy's dial timeout, 30 s.
const RETRY_MARGIN: Duration = Duration::from_secs(5);

/// An in-process proxy with a client entry for the load, the echo server the leaf serves, and
/// the files of the leaf's `tether agent` processes: each test here starts these, then kills
/// an agent's path.
struct OneProxy {
    proxy: ProxyServer,
    entry: SocketAddr,
    echo: SocketAddr,
    files: Files,
}

impl OneProxy {
    async fn start() -> OneProxy {
        let echo = echo_server().await.expect("echo");
        let pki = pki();
        let proxy = ProxyServer::start(pki.proxy_config("p1").expect("config"))
            .await
            .expect("proxy");
        let entry = start_client_entry(&proxy, &tokens(), |_| {}).await;
        let files = Files::write(&pki, &[]);
        OneProxy {
            proxy,
            entry,
            echo,
            files,
        }
    }

    /// A `tether agent` process of the leaf dialling `path` (the proxy, or a relay to it).
    fn agent(&self, path: SocketAddr) -> Proc {
        spawn_agent(&self.files, path, &agent_flags_reaching(self.echo))
    }
}

async fn one_of_two_agent_paths_dies(fault: Fault) {
    let p1 = OneProxy::start().await;
    let (entry, echo) = (p1.entry, p1.echo);
    let relay = Relay::start(p1.proxy.local_addr()).await;
    let tunnels = || p1.proxy.sites().tunnels_of(&leaf());
    let path_a = match fault {
        Fault::FrozenAgent => p1.proxy.local_addr(),
        Fault::BlackHole => relay.addr,
    };
    let agent_a = p1.agent(path_a);
    wait_for("agent A's tunnel", Duration::from_secs(20), || {
        tunnels().len() == 1
    })
    .await;
    let tunnel_a = tunnels()[0].clone();
    let _agent_b = p1.agent(p1.proxy.local_addr());
    wait_for("agent B's tunnel", Duration::from_secs(20), || {
        tunnels().len() == 2
    })
    .await;

    // A load before the fault, to warm both paths up; stopped a moment for the fault itself,
    // so that both tunnels are idle and the proxy spreads the next two dials over them.
    let warm_up = Load::start(entry, echo, Duration::from_millis(50));
    wait_for("the load to get going", Duration::from_secs(20), || {
        warm_up.finished() >= 10
    })
    .await;
    let mut all = warm_up.finish().await;
    // Right after a heartbeat, so the proxy still hands A dials for a while (until it is late).
    wait_for("a fresh heartbeat from A", Duration::from_secs(5), || {
        tunnel_a.since_heartbeat() < Duration::from_millis(30)
    })
    .await;
    let fault_at = Instant::now();
    match fault {
        Fault::FrozenAgent => agent_a.signal(libc::SIGSTOP).expect("SIGSTOP"),
        Fault::BlackHole => relay.pause(),
    }
    // Two dials at once on two idle tunnels: the proxy spreads them, so one waits on A.
    let probes = [
        tokio::spawn(dial_once(entry, echo)),
        tokio::spawn(dial_once(entry, echo)),
    ];
    wait_for(
        "a dial pending on the dead path",
        Duration::from_secs(2),
        || tunnel_a.open_streams() > 0,
    )
    .await;
    let load = Load::start(entry, echo, Duration::from_millis(50));
    wait_for(
        "the dead tunnel to be removed",
        Duration::from_secs(10),
        || tunnels().iter().all(|t| t.id != tunnel_a.id),
    )
    .await;
    let detected = fault_at.elapsed();
    // The load goes on over the one path left, for a while.
    let so_far = load.finished();
    wait_for(
        "dials over the remaining path",
        Duration::from_secs(30),
        || load.finished() >= so_far + 20,
    )
    .await;
    all.extend(load.finish().await);
    for p in probes {
        all.push(p.await.expect("probe"));
    }
    if fault == Fault::FrozenAgent {
        agent_a.signal(libc::SIGCONT).expect("SIGCONT");
    }
    println!("{fault:?}: the proxy declared the path dead after {detected:?}");
    report(&format!("{fault:?}"), &all, fault_at);
    assert_no_dial_waited(&all, detected + RETRY_MARGIN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_agent_s_pending_dials_move_to_the_other_agent() {
    one_of_two_agent_paths_dies(Fault::FrozenAgent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_path_s_pending_dials_move_to_the_other_agent() {
    one_of_two_agent_paths_dies(Fault::BlackHole).await;
}

/// A stream through the client entry ends for its client once the proxy declares its tunnel
/// dead (the agent frozen): within one heartbeat timeout (3 × 200 ms) and a margin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_stream_ends_when_its_agent_freezes() {
    let p1 = OneProxy::start().await;
    let agent = p1.agent(p1.proxy.local_addr());
    let mut stream = first_stream("a stream through the agent", p1.entry, p1.echo).await;
    let frozen_at = Instant::now();
    agent.signal(libc::SIGSTOP).expect("SIGSTOP");
    assert_stream_ends(&mut stream, "the stream", Duration::from_secs(5)).await;
    println!(
        "frozen agent: the client saw its stream end after {:?}",
        frozen_at.elapsed()
    );
    agent.signal(libc::SIGCONT).expect("SIGCONT");
}
