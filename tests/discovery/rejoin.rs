//! A replica that comes back is held again at once (issue #13): while it was gone the agent's
//! dials through the load balancer failed and its back-off grew, but the peers announcing the
//! replica again is news the pool acts on without waiting the back-off out.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tether::agent::Backoff;
use tether::egress::allow_list::AllowList;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::support::*;
use crate::{Root, start_agent, wait_connected};

/// A load balancer whose backends the test sets: each connection goes to the next backend in
/// turn, and is closed at once when that backend refuses (as a Service does for a pod that died
/// before its endpoint was removed).
struct Balancer {
    addr: SocketAddr,
    backends: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Balancer {
    async fn start(backends: Vec<SocketAddr>) -> Balancer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let backends = Arc::new(Mutex::new(backends));
        tokio::spawn({
            let backends = backends.clone();
            async move {
                let mut turn = 0usize;
                while let Ok((mut client, _)) = listener.accept().await {
                    turn += 1;
                    let to = {
                        let list = backends.lock().expect("lock");
                        list[turn % list.len()]
                    };
                    tokio::spawn(async move {
                        if let Ok(mut server) = TcpStream::connect(to).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                }
            }
        });
        Balancer { addr, backends }
    }

    fn send_to(&self, backends: Vec<SocketAddr>) {
        *self.backends.lock().expect("lock") = backends;
    }
}

/// Holds a dead replica's address: bound, so nothing else takes the port, but not listening,
/// so connections to it are refused until the replica is back.
fn reserve(addr: SocketAddr) -> TcpSocket {
    let socket = TcpSocket::new_v4().expect("socket");
    // The replica's closed connections leave TIME_WAIT entries on this port.
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket.bind(addr).expect("re-bind the dead replica's port");
    socket
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_announced_again_is_held_at_once_whatever_the_back_off() {
    let pki = Arc::new(pki());
    let mut root = Root::start(pki.clone(), &["p1", "p2", "p3"]).await;
    let addrs = root.addrs();
    let p2 = addrs[1];
    let lb = Balancer::start(addrs.clone()).await;
    // One failed dial puts the next one 30-60 s away: only the announcement can explain a
    // quick return.
    let (agent, stop) = start_agent(&pki, lb.addr, AllowList::default(), |c| {
        c.backoff = Backoff {
            initial: Duration::from_secs(60),
            max: Duration::from_secs(60),
        }
    });
    let mut status = agent.status();
    wait_connected(&mut status, 3, Duration::from_secs(30)).await;

    // p2 dies; its peers still announce it, and the balancer still sends dials to its address.
    let proxy = root.take("p2");
    root.forget_port("p2");
    proxy.close();
    proxy.wait().await;
    let dead = reserve(p2);
    lb.send_to(vec![p2]);
    within(
        "a dial to fail on the dead replica",
        Duration::from_secs(20),
        status.wait_for(|s| s.last_error.is_some()),
    )
    .await
    .expect("status");

    // Its endpoint turns unready: the peers stop announcing it.
    root.announce();
    within(
        "the agent to want two proxies",
        Duration::from_secs(20),
        status.wait_for(|s| s.expected == 2 && s.connected() == 2),
    )
    .await
    .expect("status");

    // It restarts on its address and, once ready, is announced again.
    lb.send_to(addrs.clone());
    let listener = dead.listen(1024).expect("listen").into_std().expect("std");
    let back = Instant::now();
    root.add("p2", Some(listener)).await;
    wait_connected(&mut status, 3, Duration::from_secs(10)).await;
    eprintln!("p2 held again {:?} after it was announced", back.elapsed());
    stop.cancel();
}
