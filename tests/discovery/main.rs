//! Many proxies behind one load balancer (real haproxy): agents converge to a tunnel per proxy.

#[path = "../support/mod.rs"]
mod support;

mod rejoin;
mod restarts;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether::agent::{Agent, AgentConfig, PoolStatus};
use tether::demo::Pki;
use tether::egress::allow_list::AllowList;
use tether::protocol::Target;
use tether::proxy::{Dialer, Peer, ProxyServer};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use support::haproxy::Haproxy;
use support::*;

/// The root cluster: proxies that all announce the same peer list.
pub(crate) struct Root {
    pub(crate) pki: Arc<Pki>,
    pub(crate) proxies: Vec<(String, ProxyServer)>,
    ports: HashMap<String, StdListener>,
}

impl Root {
    pub(crate) async fn start(pki: Arc<Pki>, ids: &[&str]) -> Root {
        let mut root = Root {
            pki,
            proxies: Vec::new(),
            ports: HashMap::new(),
        };
        for id in ids {
            root.add(id, None).await;
        }
        root
    }

    /// Starts proxy `id` on `listener`, or on the port it had before (a restart), or on a new
    /// one. The root keeps each port bound for as long as the proxy belongs to it: a port let
    /// go can be taken as an ephemeral source port by any connection on the machine.
    pub(crate) async fn add(&mut self, id: &str, listener: Option<StdListener>) {
        let listener = match listener {
            Some(l) => l,
            None => match self.ports.get(id) {
                Some(held) => held.try_clone().expect("clone listener"),
                None => StdListener::bind("127.0.0.1:0").expect("bind"),
            },
        };
        self.ports
            .insert(id.to_owned(), listener.try_clone().expect("clone listener"));
        let config = self.pki.proxy_config(id).expect("config");
        let proxy = ProxyServer::start_on_std(config, listener)
            .await
            .expect("proxy starts");
        self.proxies.push((id.to_owned(), proxy));
        self.announce();
    }

    /// Lets go of the port of proxy `id`, which the test closes itself (a replica that died).
    pub(crate) fn forget_port(&mut self, id: &str) {
        self.ports.remove(id);
    }

    /// Takes proxy `id` out of the root, which keeps its port bound (for a restart on it); the
    /// caller stops the proxy and announces the change when it means to.
    pub(crate) fn take(&mut self, id: &str) -> ProxyServer {
        let i = self
            .proxies
            .iter()
            .position(|(p, _)| p == id)
            .expect("known proxy");
        self.proxies.remove(i).1
    }

    async fn remove(&mut self, id: &str) {
        let proxy = self.take(id);
        self.ports.remove(id);
        self.announce();
        proxy.close();
        proxy.wait().await;
    }

    /// Every proxy announces every proxy, as the EndpointSlice watch will make them do.
    pub(crate) fn announce(&self) {
        let peers: Vec<Peer> = self
            .proxies
            .iter()
            .map(|(id, p)| Peer {
                id: id.clone(),
                addr: Some(p.local_addr()),
                generation: 0,
            })
            .collect();
        for (_, p) in &self.proxies {
            p.set_peers(peers.clone());
        }
    }

    pub(crate) fn addrs(&self) -> Vec<SocketAddr> {
        self.proxies.iter().map(|(_, p)| p.local_addr()).collect()
    }

    /// Proxies holding a tunnel from the leaf.
    fn holding(&self) -> usize {
        self.proxies
            .iter()
            .filter(|(_, p)| p.site(&leaf()).is_some_and(|s| !s.tunnels.is_empty()))
            .count()
    }
}

/// An agent of the leaf dialling `proxy` (a load balancer, or one proxy), allowed to reach
/// `allow` and tuned by `tune`, running until the returned token is cancelled.
pub(crate) fn start_agent(
    pki: &Pki,
    proxy: SocketAddr,
    allow: AllowList,
    tune: impl FnOnce(&mut AgentConfig),
) -> (Arc<Agent>, CancellationToken) {
    let mut config = pki
        .agent_config(&proxy.to_string(), allow)
        .expect("agent config");
    tune(&mut config);
    support::run_agent(config)
}

/// Leave to reach the loopback server `target` alone: the echo server the dials go to.
pub(crate) fn allow_only(target: SocketAddr) -> AllowList {
    AllowList::parse([format!("127.0.0.1/32:{}", target.port())]).expect("rules")
}

pub(crate) async fn wait_connected(
    status: &mut watch::Receiver<PoolStatus>,
    n: usize,
    deadline: Duration,
) {
    let reached = tokio::time::timeout(
        deadline,
        status.wait_for(|s| s.connected() == n && s.expected == n),
    )
    .await
    .map(|r| r.is_ok());
    match reached {
        Ok(true) => {}
        Ok(false) => panic!("the status channel closed"),
        Err(_) => panic!(
            "timed out after {deadline:?} waiting for {n} tunnels; the pool: {:?}",
            *status.borrow()
        ),
    }
}

async fn converge(balance: &str) -> (u64, Duration) {
    let pki = Arc::new(pki());
    let root = Root::start(pki.clone(), &["p1", "p2", "p3", "p4", "p5"]).await;
    let lb = Haproxy::start(balance, &root.addrs());
    let started = Instant::now();
    let (agent, stop) = start_agent(&pki, lb.addr, AllowList::default(), |_| {});
    wait_connected(&mut agent.status(), 5, Duration::from_secs(30)).await;
    let took = started.elapsed();
    wait_for(
        "every proxy to see its tunnel",
        Duration::from_secs(5),
        || root.holding() == 5,
    )
    .await;
    stop.cancel();
    (agent.attempts(), took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_reaches_all_five_proxies_behind_a_random_balancer() {
    let (attempts, took) = converge("random").await;
    eprintln!("balance random: 5/5 tunnels after {attempts} attempts in {took:?}");
    // Collecting 5 of 5 at random takes 11.4 draws on average; 40 is far in the tail.
    assert!(attempts <= 40, "{attempts} attempts");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_reaches_all_five_proxies_behind_a_round_robin_balancer() {
    let (attempts, took) = converge("roundrobin").await;
    eprintln!("balance roundrobin: 5/5 tunnels after {attempts} attempts in {took:?}");
    assert!(attempts <= 12, "{attempts} attempts");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_proxy_gets_a_tunnel_and_a_removed_one_is_let_go_without_a_storm() {
    let pki = Arc::new(pki());
    let mut root = Root::start(pki.clone(), &["p1", "p2", "p3", "p4", "p5"]).await;
    // haproxy knows the sixth slot from the start; its port is bound, nothing serves it yet.
    let sixth = StdListener::bind("127.0.0.1:0").expect("bind");
    let mut backends = root.addrs();
    backends.push(sixth.local_addr().expect("addr"));
    let lb = Haproxy::start("random", &backends);
    let (agent, stop) = start_agent(&pki, lb.addr, AllowList::default(), |_| {});
    let mut status = agent.status();
    wait_connected(&mut status, 5, Duration::from_secs(30)).await;

    root.add("p6", Some(sixth)).await;
    // Discovery goes out as soon as the peer set changes; well inside two refresh intervals.
    wait_connected(&mut status, 6, Duration::from_secs(20)).await;

    root.remove("p3").await;
    wait_connected(&mut status, 5, Duration::from_secs(20)).await;
    let settled = agent.attempts();
    // Give a reconnect storm every chance to show itself.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let extra = agent.attempts() - settled;
    assert!(extra <= 2, "{extra} dials after the proxy set settled");
    assert!(
        status.borrow().proxies.iter().all(|p| p.proxy_id != "p3"),
        "the removed proxy is still wanted"
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_agents_converge_on_five_proxies_with_bounded_attempts() {
    let pki = Arc::new(pki());
    let root = Root::start(pki.clone(), &["p1", "p2", "p3", "p4", "p5"]).await;
    let lb = Haproxy::start("roundrobin", &root.addrs());
    let agents: Vec<_> = (0..100)
        .map(|_| start_agent(&pki, lb.addr, AllowList::default(), |_| {}))
        .collect();
    within("100 agents × 5 tunnels", Duration::from_secs(120), async {
        for (agent, _) in &agents {
            agent
                .status()
                .wait_for(|s| s.connected() == 5)
                .await
                .expect("status");
        }
    })
    .await;
    let attempts: Vec<u64> = agents.iter().map(|(a, _)| a.attempts()).collect();
    let max = attempts.iter().max().copied().unwrap_or(0);
    let total: u64 = attempts.iter().sum();
    eprintln!("100 agents: {total} attempts in all, at most {max} for one agent");
    assert!(max <= 60, "one agent needed {max} attempts");
    let tunnels: usize = root
        .proxies
        .iter()
        .map(|(_, p)| p.site(&leaf()).map_or(0, |s| s.tunnels.len()))
        .sum();
    assert_eq!(tunnels, 500);
    for (_, stop) in &agents {
        stop.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_entering_a_proxy_without_a_tunnel_is_served_by_a_peer() {
    let pki = Arc::new(pki());
    let echo = echo_server().await.expect("echo");
    let p1 = ProxyServer::start(pki.proxy_config("p1").expect("config"))
        .await
        .expect("p1");
    let p3 = ProxyServer::start(pki.proxy_config("p3").expect("config"))
        .await
        .expect("p3");
    // p1 announces only itself, so the agent holds a tunnel to p1 alone; p3 knows p1 as a peer.
    let peer = |id: &str, p: &ProxyServer| Peer {
        id: id.to_owned(),
        addr: Some(p.local_addr()),
        generation: 0,
    };
    p3.set_peers(vec![peer("p1", &p1), peer("p3", &p3)]);
    let (agent, stop) = start_agent(&pki, p1.local_addr(), allow_only(echo), |_| {});
    wait_connected(&mut agent.status(), 1, Duration::from_secs(20)).await;
    assert!(p3.site(&leaf()).is_none(), "p3 holds no tunnel of its own");

    let target = Target::parse(&format!("127.0.0.1.leaf.tether:{}", echo.port())).expect("t");
    let conn = p3
        .dialer()
        .dial(target, "127.0.0.1:1".parse().expect("addr"))
        .await
        .expect("served through the peer");
    let (mut stream, _t) = attach(conn, 4096);
    assert_eq!(echo_round_trip(&mut stream, b"via p1").await, b"via p1");

    let nowhere = Target::parse("db.elsewhere.tether:5432").expect("t");
    let err = p3
        .dialer()
        .dial(nowhere, "127.0.0.1:1".parse().expect("addr"))
        .await
        .err()
        .expect("no proxy has that cluster");
    assert_eq!(err.kind, tether::protocol::DialErrorKind::NoTunnel);
    assert!(err.message.contains("peers"), "{err}");
    stop.cancel();
}
