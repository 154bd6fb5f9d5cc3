//! The SSH tunnel listener.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tether::client::{DialClient, DialClientConfig};
use tether::identity::Identity;
use tether::protocol::{ClusterName, Target, ssh};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::{ATTACKER, connect_from, hoard, open_fds, rss_of, until_closed};
use crate::support::procs::free_addr;
use crate::support::procs::{self, Files, Proc};
use crate::support::*;

/// The handshake deadline of these tests' proxies.
const DEADLINE: Duration = Duration::from_secs(2);
/// How late after its deadline a connection may still be seen open.
const SLACK: Duration = Duration::from_secs(1);
const BANNER: &[u8] = b"SSH-2.0-x\r\n";

/// A client KEXINIT packet (unencrypted binary packet, RFC 4253 §6 and §7.1) offering what the
/// proxy accepts, so the proxy goes on to wait for the key exchange that never comes.
fn kexinit_packet() -> Vec<u8> {
    let mut payload = vec![20u8];
    payload.extend_from_slice(&[7u8; 16]);
    for list in [
        "curve25519-sha256",
        "ssh-ed25519-cert-v01@openssh.com,ssh-ed25519",
        "aes256-gcm@openssh.com",
        "aes256-gcm@openssh.com",
        "hmac-sha2-256",
        "hmac-sha2-256",
        "none",
        "none",
        "",
        "",
    ] {
        payload.extend_from_slice(&(list.len() as u32).to_be_bytes());
        payload.extend_from_slice(list.as_bytes());
    }
    payload.extend_from_slice(&[0, 0, 0, 0, 0]);
    let mut padding = 8 - (5 + payload.len()) % 8;
    if padding < 4 {
        padding += 8;
    }
    let mut packet = ((1 + payload.len() + padding) as u32)
        .to_be_bytes()
        .to_vec();
    packet.push(padding as u8);
    packet.extend_from_slice(&payload);
    packet.extend(std::iter::repeat_n(0u8, padding));
    packet
}

/// Sends `bytes` after `delay` and returns how long after connecting the proxy closed.
async fn stall(addr: std::net::SocketAddr, delay: Duration, bytes: Vec<u8>) -> Duration {
    let started = Instant::now();
    let mut s = connect_from(ATTACKER, addr).await.expect("connect");
    tokio::time::sleep(delay).await;
    s.write_all(&bytes).await.expect("write");
    within("the proxy to close", DEADLINE + SLACK, until_closed(&mut s)).await;
    started.elapsed()
}

/// Completes the key exchange, never authenticates; how long until the proxy closed.
async fn no_userauth(addr: std::net::SocketAddr) -> Duration {
    let started = Instant::now();
    let socket = connect_from(ATTACKER, addr).await.expect("connect");
    let config = Arc::new(ssh::client_config());
    let handle = russh::client::connect_stream(config, socket, AnyHost)
        .await
        .expect("key exchange");
    wait_for(
        "the proxy to close a session that never authenticates",
        DEADLINE + SLACK,
        || handle.is_closed(),
    )
    .await;
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stalled_handshake_is_closed_at_its_one_deadline() {
    let rig = Rig::start(&[], |p| p.limits.handshake_timeout = DEADLINE, |_| {}).await;
    let addr = rig.proxy.local_addr();
    let none = Duration::ZERO;
    let kex = [BANNER, &kexinit_packet()].concat();
    let late = DEADLINE.mul_f64(0.7);
    let (banner, partial, kexinit, userauth, late_banner) = tokio::join!(
        stall(addr, none, BANNER.to_vec()),
        stall(addr, none, b"SSH-2.0-".to_vec()),
        stall(addr, none, kex.clone()),
        no_userauth(addr),
        stall(addr, late, kex),
    );
    eprintln!(
        "closed after: banner only {banner:?}, partial banner {partial:?}, KEXINIT {kexinit:?}, \
         no userauth {userauth:?}, banner at {late:?} then KEXINIT {late_banner:?}"
    );
    // One deadline from accept: a banner sent late does not start a second one (which would
    // close it at 1.4 s + 2 s = 3.4 s).
    assert!(
        late_banner < DEADLINE + Duration::from_millis(900),
        "a late banner got {late_banner:?}, more than the one {DEADLINE:?} deadline"
    );
    let limiter = rig.proxy.shared().limiter.clone();
    wait_for("only the agent to be counted", SLACK, || {
        limiter.connections() == 1 && limiter.handshakes() == 0
    })
    .await;
}

/// Dials `echo` in the leaf as a root client, through the proxy at `proxy`.
async fn echo_through(
    files: &Files,
    pki: &tether::demo::Pki,
    proxy: std::net::SocketAddr,
    echo: std::net::SocketAddr,
) -> bool {
    let config = DialClientConfig {
        proxy_addr: proxy.to_string(),
        route: tether::transport::Route::direct(),
        root_cluster: ClusterName::new("root").expect("name"),
        root_cas: vec![pki.root.public_key().clone()],
        identity: Arc::new(Identity::load(&files.path("peer")).expect("client identity")),
        timeout: Duration::from_secs(5),
    };
    let Ok(client) = DialClient::connect(&config).await else {
        return false;
    };
    let target = Target::parse(&format!("127.0.0.1.leaf.tether:{}", echo.port())).expect("target");
    let Ok(mut stream) = client.open(&target, "127.0.0.1").await else {
        return false;
    };
    if stream.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut back = [0u8; 4];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back)).await,
        Ok(Ok(_))
    ) && &back == b"ping"
}

/// Waits until a dial through `proxy` reaches `echo` (the agent is connected).
async fn until_serving(
    files: &Files,
    pki: &tether::demo::Pki,
    proxy: std::net::SocketAddr,
    echo: std::net::SocketAddr,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !echo_through(files, pki, proxy, echo).await {
        assert!(Instant::now() < deadline, "the proxy never served a dial");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A real `tether proxy` process and a real agent serving an echo server in the leaf, up once
/// a client's dial reaches it: for the tests that measure what an attack costs the process.
/// Fields drop in order: the processes end before their files go.
pub struct ServingProcess {
    _agent: Proc,
    pub proxy: Proc,
    files: Files,
    pki: tether::demo::Pki,
    /// The proxy's tunnel listener.
    pub listen: std::net::SocketAddr,
    /// The proxy's admin endpoint.
    pub admin: std::net::SocketAddr,
    echo: std::net::SocketAddr,
}

impl ServingProcess {
    /// Starts the proxy (`proxy-1`, its command adjusted by `tune`) and the agent, and waits
    /// until they serve.
    pub async fn start(tune: impl FnOnce(&mut std::process::Command)) -> ServingProcess {
        let pki = pki();
        let files = Files::write(&pki, &["proxy-1"]);
        let (listen, admin) = (free_addr(), free_addr());
        let mut cmd = procs::proxy_command(&files, "proxy-1", listen, admin, &[]);
        tune(&mut cmd);
        let proxy = procs::spawn(cmd);
        let echo = echo_server().await.expect("echo");
        let allow = [
            "--allow".to_owned(),
            format!("127.0.0.1/32:{}", echo.port()),
        ];
        let agent = procs::spawn_agent(&files, listen, &allow);
        until_serving(&files, &pki, listen, echo).await;
        ServingProcess {
            _agent: agent,
            proxy,
            files,
            pki,
            listen,
            admin,
            echo,
        }
    }

    /// Whether a client's dial through the proxy reaches the echo server now.
    pub async fn serves(&self) -> bool {
        echo_through(&self.files, &self.pki, self.listen, self.echo).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_stalled_connections_leave_the_proxy_process_whole() {
    let served = ServingProcess::start(|cmd| {
        cmd.args(["--handshake-timeout", "2s"]);
    })
    .await;
    let (pid, listen) = (served.proxy.pid(), served.listen);
    let (fds_before, rss_before) = (open_fds(pid), rss_of(pid));

    // 1,000 banner-only connections from one address, all kept open by the attacker.
    let mut held = Vec::new();
    for _ in 0..1000 {
        if let Ok(mut s) = connect_from(ATTACKER, listen).await {
            let _ = s.write_all(BANNER).await;
            held.push(s);
        }
    }
    let fds_during = open_fds(pid);
    assert!(
        served.serves().await,
        "a client's dial fails while the attacker holds its connections"
    );
    // The proxy shuts every one down by the deadline, though the attacker still holds its ends.
    wait_for(
        "the proxy's descriptors to come back to their baseline",
        DEADLINE + Duration::from_secs(5),
        || open_fds(pid) <= fds_before + 2,
    )
    .await;
    for s in &mut held {
        within("each attacker socket to be closed", SLACK, until_closed(s)).await;
    }
    let rss_after = rss_of(pid);
    eprintln!(
        "proxy fds {fds_before} → {fds_during} during → {} after; RSS {:.1} → {:.1} MB",
        open_fds(pid),
        rss_before as f64 / 1e6,
        rss_after as f64 / 1e6
    );
    assert!(
        rss_after < rss_before + 8 * 1024 * 1024,
        "the proxy grew from {rss_before} to {rss_after} bytes"
    );
    drop(held);
    assert!(served.serves().await, "the proxy serves after the attack");
}

/// While one address keeps `slots` silent connections open (reopened as they are dropped), a
/// legitimate agent whose tunnel is dropped reconnects, and dials succeed throughout.
async fn an_agent_reconnects_while_one_source_hoards(slots: usize) {
    let echo = echo_server().await.expect("echo");
    let rig = Rig::start(
        &[format!("127.0.0.1/32:{}", echo.port())],
        |p| p.limits.handshake_timeout = DEADLINE,
        |_| {},
    )
    .await;
    let stop = CancellationToken::new();
    let hold = DEADLINE.mul_f64(0.9);
    let mut attack = hoard(rig.proxy.local_addr(), slots, BANNER, hold, stop.clone());
    let limiter = rig.proxy.shared().limiter.clone();
    let share = tether::proxy::ProxyLimits::default().max_handshakes_per_ip;
    wait_for(
        "the attacker to hold its handshake slots",
        Duration::from_secs(10),
        || limiter.handshakes() >= share.min(slots),
    )
    .await;
    let echo_once = async || {
        let (mut s, _t) = attach(rig.dial(echo).await.expect("dial while hoarded"), 4096);
        let back = within(
            "echo",
            Duration::from_secs(5),
            echo_round_trip(&mut s, b"ok"),
        )
        .await;
        assert_eq!(back, b"ok");
    };
    echo_once().await;
    assert!(
        rig.proxy.remove_site(&leaf()).await,
        "the tunnel is dropped"
    );
    rig.wait_online().await;
    echo_once().await;
    stop.cancel();
    while attack.join_next().await.is_some() {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_hoarded_sockets_do_not_lock_an_agent_out() {
    an_agent_reconnects_while_one_source_hoards(64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_hoarded_sockets_do_not_lock_an_agent_out() {
    an_agent_reconnects_while_one_source_hoards(1000).await;
}
