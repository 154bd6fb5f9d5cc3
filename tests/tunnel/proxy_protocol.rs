//! Behind a load balancer that prepends a PROXY protocol header (a real haproxy, `send-proxy-v2`
//! to the SSH port and version 1 `send-proxy` to the TLS port): the proxy counts each client by
//! the address the header names, so one host behind the balancer that takes its whole
//! handshake share does not take everyone's; and only a listed balancer is believed.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tether::admin::metrics::label;
use tether::protocol::busy::BUSY_PREFIX;
use tether::proxy::Balancers;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::support::haproxy::Haproxy;
use crate::support::{wait_for, within};
use crate::tls_port::TlsRig;

/// The share of handshakes one source may hold here.
const SHARE: usize = 2;

/// The host behind the balancer that hoards (the agent connects from 127.0.0.1).
const HOARDER: [u8; 4] = [127, 0, 0, 2];

/// A proxy that trusts PROXY headers from 127.0.0.1 only, with a small per-source share and a
/// deadline long enough that a hoarded socket outlives the test.
async fn rig() -> (TlsRig, tether::demo::Pki) {
    TlsRig::start(|config| {
        config.limits.max_handshakes_per_ip = SHARE;
        config.limits.handshake_timeout = Duration::from_secs(120);
        config.balancers = Balancers::new(vec!["127.0.0.1/32".parse().expect("net")]);
    })
    .await
}

/// A TCP connection to `to` from `source`, which then sends nothing.
async fn connect_from(source: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(IpAddr::from(source), 0))
        .expect("bind a loopback source");
    socket.connect(to).await.expect("connect")
}

/// Everything `stream` receives until the other end closes it.
async fn until_closed(mut stream: TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got).await;
    got
}

/// The hoarder takes its whole share through `balancer`; its next connection is refused, and
/// what the refused connection received is returned.
async fn hoard_through(rig: &TlsRig, balancer: SocketAddr) -> (Vec<TcpStream>, Vec<u8>) {
    let limiter = rig.proxy.shared().limiter.clone();
    // haproxy's start-up probe went through too; let it end.
    wait_for("no handshake in flight", Duration::from_secs(10), || {
        limiter.handshakes() == 0
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..SHARE {
        held.push(connect_from(HOARDER, balancer).await);
    }
    wait_for("the hoarder's share taken", Duration::from_secs(10), || {
        limiter.handshakes() == SHARE
    })
    .await;
    let refused = connect_from(HOARDER, balancer).await;
    let got = within(
        "the proxy to refuse the hoarder's next connection",
        Duration::from_secs(20),
        until_closed(refused),
    )
    .await;
    (held, got)
}

#[tokio::test]
async fn behind_a_proxy_v2_balancer_one_host_cannot_take_the_agents_share() {
    let (mut rig, pki) = rig().await;
    let balancer = Haproxy::start_sending_proxy_header(&[rig.proxy.local_addr()], "send-proxy-v2");
    let (_held, refused) = hoard_through(&rig, balancer.addr).await;
    assert!(
        refused.starts_with(BUSY_PREFIX),
        "the hoarder's next connection was told the proxy is busy, got {:?}",
        String::from_utf8_lossy(&refused)
    );
    // Without the header the agent would be the hoarder's address (haproxy's) and refused too.
    assert_eq!(rig.agent(&pki, &balancer.addr.to_string()).await, "ssh");
    rig.echo_through().await;
}

#[tokio::test]
async fn behind_a_proxy_v1_balancer_on_the_tls_port_one_host_cannot_take_the_agents_share() {
    let (mut rig, pki) = rig().await;
    let balancer = Haproxy::start_sending_proxy_header(&[rig.tls], "send-proxy");
    let (_held, refused) = hoard_through(&rig, balancer.addr).await;
    // The TLS port refuses with a close (no busy line outside SSH).
    assert!(refused.is_empty(), "{refused:?}");
    let address = format!("tls://{}", balancer.addr);
    assert_eq!(rig.agent(&pki, &address).await, "tls-alpn");
    rig.echo_through().await;
}

#[tokio::test]
async fn only_a_listed_balancer_is_read_for_a_header() {
    let (rig, _pki) = rig().await;
    let proxy = rig.proxy.local_addr();

    // From the balancer's address, a connection without a header is closed unserved.
    let mut bare = connect_from([127, 0, 0, 1], proxy).await;
    bare.write_all(b"SSH-2.0-OpenSSH_9.6\r\n")
        .await
        .expect("write");
    let got = within("the bare connection closed", Duration::from_secs(20), {
        until_closed(bare)
    })
    .await;
    assert!(got.is_empty(), "served without a header: {got:?}");
    let refused = rig
        .proxy
        .shared()
        .metrics
        .refused
        .get_or_create(&label("reason", "proxy_header"))
        .get();
    assert_eq!(refused, 1, "the refusal is counted");

    // From anywhere else, a header is not read: it cannot claim another address, and the
    // connection is SSH's (the proxy's greeting comes first).
    let mut spoof = connect_from(HOARDER, proxy).await;
    spoof
        .write_all(b"PROXY TCP4 198.51.100.1 127.0.0.1 40000 3024\r\n")
        .await
        .expect("write");
    let mut greeting = [0u8; 8];
    within("the proxy's SSH greeting", Duration::from_secs(20), {
        spoof.read_exact(&mut greeting)
    })
    .await
    .expect("greeting");
    assert_eq!(&greeting, b"SSH-2.0-");
}

#[tokio::test]
async fn a_balancer_connection_that_never_sends_its_header_is_closed_at_the_deadline() {
    let (rig, _pki) = TlsRig::start(|config| {
        config.limits.handshake_timeout = Duration::from_secs(1);
        config.balancers = Balancers::new(vec!["127.0.0.1/32".parse().expect("net")]);
    })
    .await;
    let silent = connect_from([127, 0, 0, 1], rig.proxy.local_addr()).await;
    let got = within("the silent connection closed", Duration::from_secs(20), {
        until_closed(silent)
    })
    .await;
    assert!(got.is_empty(), "{got:?}");
}
