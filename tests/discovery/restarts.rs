//! Proxies restarting under a steady dial load: with drain, no dial fails; after kill -9, new
//! dials succeed once the loss is detected, and the restarted proxy gets its tunnel back.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tether::egress::allow_list::AllowList;
use tether::protocol::Target;
use tether::proxy::{Dialer, ProxyDialer, ProxyServer};

use crate::support::haproxy::Haproxy;
use crate::support::procs::free_addr;
use crate::support::procs::{Files, Proc, admin_get, spawn_proxy};
use crate::support::*;
use crate::{Root, allow_only, start_agent, wait_connected};

/// Dials the echo server through a randomly chosen live proxy, over and over.
struct Load {
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<(Instant, String)>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(live: Arc<Mutex<Vec<ProxyDialer>>>, echo: SocketAddr) -> Load {
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (ok, failures, stop) = (ok.clone(), failures.clone(), stop.clone());
            async move {
                let target =
                    Target::parse(&format!("127.0.0.1.leaf.tether:{}", echo.port())).expect("t");
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let dialer = {
                        let live = live.lock().expect("lock");
                        live[(i as usize) % live.len()].clone()
                    };
                    let message = format!("dial {i}");
                    let result = async {
                        let conn = dialer
                            .dial(target.clone(), "127.0.0.1:1".parse().expect("addr"))
                            .await
                            .map_err(|e| e.to_string())?;
                        let (mut stream, _t) = attach(conn, 4096);
                        let back = echo_round_trip(&mut stream, message.as_bytes()).await;
                        if back == message.as_bytes() {
                            Ok(())
                        } else {
                            Err(format!("echo came back as {back:?}"))
                        }
                    };
                    match tokio::time::timeout(Duration::from_secs(10), result).await {
                        Ok(Ok(())) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(e)) => failures.lock().expect("lock").push((Instant::now(), e)),
                        Err(_) => failures
                            .lock()
                            .expect("lock")
                            .push((Instant::now(), "timed out".into())),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        });
        Load {
            ok,
            failures,
            stop,
            task,
        }
    }

    /// Waits until `more` dials have succeeded since the call, so every phase of a restart is
    /// shown to carry traffic (an outcome, not a count of dials in a time window).
    async fn wait_for_more(&self, more: u64) {
        let from = self.ok.load(Ordering::Relaxed);
        wait_for("dials to succeed", Duration::from_secs(30), || {
            self.ok.load(Ordering::Relaxed) >= from + more
        })
        .await;
    }

    async fn finish(self) -> (u64, Vec<(Instant, String)>) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("load task");
        let failures = self.failures.lock().expect("lock").clone();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_with_drain_fails_no_dial() {
    let pki = Arc::new(pki());
    let echo = echo_server().await.expect("echo");
    let ids = ["p1", "p2", "p3", "p4", "p5"];
    let mut root = Root::start(pki.clone(), &ids).await;
    let lb = Haproxy::start("random", &root.addrs());
    let (agent, stop) = start_agent(&pki, lb.addr, allow_only(echo), |_| {});
    let mut status = agent.status();
    wait_connected(&mut status, 5, Duration::from_secs(30)).await;

    let live = Arc::new(Mutex::new(
        root.proxies
            .iter()
            .map(|(_, p)| p.dialer())
            .collect::<Vec<_>>(),
    ));
    let load = Load::start(live.clone(), echo);
    load.wait_for_more(5).await;
    for id in ids {
        let proxy = root.take(id);
        // Clients stop being sent to it (its load balancer would take it out), then it drains.
        *live.lock().expect("lock") = root.proxies.iter().map(|(_, p)| p.dialer()).collect();
        proxy.shutdown(Duration::from_secs(5)).await;
        // Back on the same port, which the root kept bound.
        root.add(id, None).await;
        live.lock()
            .expect("lock")
            .push(root.proxies.last().expect("added").1.dialer());
        wait_connected(&mut status, 5, Duration::from_secs(30)).await;
        load.wait_for_more(5).await;
    }
    let (ok, failures) = load.finish().await;
    eprintln!(
        "rolling restart: {ok} dials succeeded, {} failed",
        failures.len()
    );
    assert!(failures.is_empty(), "failed dials: {failures:?}");
    stop.cancel();
}

fn holds_leaf(admin: SocketAddr) -> bool {
    admin_get(admin, "/status").is_some_and(|body| {
        serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|v| {
            v["sites"].as_array().is_some_and(|sites| {
                sites.iter().any(|s| {
                    s["name"] == "leaf" && s["tunnels"].as_array().is_some_and(|t| !t.is_empty())
                })
            })
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_dials_recover_and_the_restarted_proxy_gets_its_tunnel_back() {
    let pki = pki();
    let ids = ["p1", "p2", "p3", "p4", "p5"];
    let files = Files::write(&pki, &ids);
    let listen: Vec<SocketAddr> = ids.iter().map(|_| free_addr()).collect();
    let admin: Vec<SocketAddr> = ids.iter().map(|_| free_addr()).collect();
    let peers: Vec<(String, SocketAddr)> = ids
        .iter()
        .zip(&listen)
        .map(|(id, a)| (id.to_string(), *a))
        .collect();
    let mut procs: Vec<Proc> = (0..5)
        .map(|i| spawn_proxy(&files, ids[i], listen[i], admin[i], &peers))
        .collect();
    let lb = Haproxy::start("random", &listen);
    let echo = echo_server().await.expect("echo");
    let (agent, stop) = start_agent(&pki, lb.addr, allow_only(echo), |_| {});
    let mut status = agent.status();
    wait_connected(&mut status, 5, Duration::from_secs(60)).await;

    // Root-side clients enter through an in-process proxy that holds no tunnel of its own and
    // forwards every dial to one of the five: the dial load exercises them all.
    let entry = ProxyServer::start(pki.proxy_config("entry").expect("config"))
        .await
        .expect("entry proxy");
    entry.set_peers(
        peers
            .iter()
            .map(|(id, addr)| tether::proxy::Peer {
                id: id.clone(),
                addr: Some(*addr),
                generation: 0,
            })
            .collect(),
    );
    let live = Arc::new(Mutex::new(vec![entry.dialer()]));
    let load = Load::start(live, echo);
    wait_for("dials to flow", Duration::from_secs(20), || {
        load.ok.load(Ordering::Relaxed) > 20
    })
    .await;

    let killed_at = Instant::now();
    procs[1].kill();
    // The agent notices (its SSH connection drops at once on a kill) and holds 4, while the
    // other proxies still announce p2 (its endpoint has not gone yet).
    within(
        "the agent to see the loss",
        Duration::from_secs(20),
        status.wait_for(|s| s.connected() == 4),
    )
    .await
    .expect("status");
    let detected = Instant::now();
    let before = load.ok.load(Ordering::Relaxed);
    wait_for(
        "dials to go on through the rest",
        Duration::from_secs(20),
        || load.ok.load(Ordering::Relaxed) > before + 20,
    )
    .await;

    procs[1] = spawn_proxy(&files, "p2", listen[1], admin[1], &peers);
    wait_for(
        "the restarted p2 to hold the leaf's tunnel",
        Duration::from_secs(60),
        || holds_leaf(admin[1]),
    )
    .await;
    wait_connected(&mut status, 5, Duration::from_secs(30)).await;
    let (ok, failures) = load.finish().await;
    let late: Vec<_> = failures.iter().filter(|(t, _)| *t > detected).collect();
    eprintln!(
        "kill -9: {ok} dials ok, {} failed ({} after the loss was detected, {:?} after the kill)",
        failures.len(),
        late.len(),
        detected - killed_at
    );
    assert!(late.is_empty(), "dials failed after detection: {late:?}");
    stop.cancel();
}

/// A reconnect storm meets the handshake limit: the refused agent is told the proxy is busy and
/// comes back at the proxy's hint, not after its own backoff. Before, the refusal was a silent
/// close that counted as a failure, so every refusal doubled the agent's pause (up to 30 s
/// after a restart of a 10,000-tunnel proxy: BENCHMARKS.md "Fleet"). Here the agent's backoff
/// is an hour: only the busy answer can bring it back in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refused_by_a_busy_proxy_retries_at_its_hint_not_its_backoff() {
    use tether::agent::{AgentEvent, Backoff};
    use tether::proxy::ProxyLimits;
    use tokio::io::AsyncReadExt;

    let pki = pki();
    let mut config = pki.proxy_config("proxy-1").expect("config");
    config.limits = ProxyLimits {
        max_handshakes: 1,
        max_handshakes_per_ip: 1,
        handshakes_early_drop_start: 1,
        handshake_timeout: Duration::from_secs(60),
        ..ProxyLimits::default()
    };
    let proxy = ProxyServer::start(config).await.expect("proxy starts");
    let addr = proxy.local_addr();
    // A silent connection takes the only handshake slot until it closes.
    let silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let limiter = proxy.shared().limiter.clone();
    wait_for("the slot to be taken", Duration::from_secs(5), || {
        limiter.handshakes() == 1
    })
    .await;
    // What a refused peer reads: the busy line, then the end.
    let mut refused = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut said = Vec::new();
    within(
        "the refusal",
        Duration::from_secs(5),
        refused.read_to_end(&mut said),
    )
    .await
    .expect("read");
    assert!(
        said.starts_with(b"tether-busy retry-ms="),
        "{:?}",
        String::from_utf8_lossy(&said)
    );

    let allow = AllowList::parse(["127.0.0.1/32:9"]).expect("allow");
    let (agent, stop) = start_agent(&pki, addr, allow, |c| {
        c.backoff = Backoff {
            initial: Duration::from_secs(3600),
            max: Duration::from_secs(3600),
        }
    });
    // Subscribed once it runs: it cannot connect before `silent` gives up the slot.
    let mut events = agent.events();
    // Refused, and back at the hint (1-2 s), while the slot is still taken.
    wait_for("a second dial", Duration::from_secs(20), || {
        agent.attempts() >= 2
    })
    .await;
    drop(silent);
    within(
        "the refused agent to connect",
        Duration::from_secs(20),
        async { while !matches!(events.recv().await, Ok(AgentEvent::Connected { .. })) {} },
    )
    .await;
    stop.cancel();
}
