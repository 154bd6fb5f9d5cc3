//! Soak at CI scale (issue #18): thousands of short dials through one long-lived tunnel must
//! leave the proxy's and the agent's heaps where they were after warm-up.
//!
//! Proxy and agent run in one process, each on its own runtime whose threads are tagged, and a
//! counting allocator ([`alloc`]) keeps the live heap bytes of each side: an exact figure per
//! side, where RSS mixes both and moves with the allocator's arenas. Before the fix each closed
//! stream left ~3 KB behind on the side that closed its channel first (russh kept the channel's
//! sender, see vendor/README.md); after it, growth is a few bytes per dial at most.

#[path = "../support/mod.rs"]
mod support;

mod alloc;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tether::admin::metrics::StreamMetrics;
use tether::agent::Agent;
use tether::egress::allow_list::AllowList;
use tether::proxy::ProxyServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use alloc::{Side, live_bytes, runtime};
use support::*;
use tokio::runtime::Runtime;

#[global_allocator]
static ALLOCATOR: alloc::Counting = alloc::Counting;

const TOKEN: &str = "soak-token-for-tests-only-0123456789";

/// Dials before the baseline: the first streams fill caches (metric labels, hash maps sized
/// for the concurrency, the allocator's and russh's buffers) that later ones reuse.
const WARM_UP: usize = 500;

/// Dials measured.
const DIALS: usize = 5_000;

/// Dials in flight at once, as several clients would make them.
const CONCURRENCY: usize = 8;

/// What each side may keep per measured dial. A kept channel cost ~3 KB before the fix; what
/// legitimately remains (a hash map that grew, a slab of the runtime's) is a few KB in all,
/// far under 5,000 × 64 B = 320 KB.
const BOUND_PER_DIAL: i64 = 64;

/// Sends `CONNECT target` to the entry; returns the socket and the reply's head.
async fn connect(entry: SocketAddr, target: &str) -> (TcpStream, String) {
    let mut socket = TcpStream::connect(entry).await.expect("connect to entry");
    let head = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Bearer {TOKEN}\r\n\r\n"
    );
    socket
        .write_all(head.as_bytes())
        .await
        .expect("send CONNECT");
    // Nothing follows a 200 until we send, so reading up to its blank line reads no echo.
    let mut reply = Vec::new();
    while !reply.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut buf = [0u8; 256];
        let n = socket.read(&mut buf).await.expect("read reply");
        assert!(
            n > 0,
            "entry closed mid-reply: {:?}",
            String::from_utf8_lossy(&reply)
        );
        reply.extend_from_slice(&buf[..n]);
    }
    (socket, String::from_utf8_lossy(&reply).into_owned())
}

/// One client of the entry: `CONNECT` to the echo server in the leaf, a 64-byte echo, close.
async fn dial_echo(entry: SocketAddr, target: &str) {
    let (mut socket, reply) = connect(entry, target).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "dial failed: {reply}");
    echo_once(&mut socket, &[0x5a; 64]).await;
    socket.shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    socket.read_to_end(&mut rest).await.expect("read to end");
    assert!(rest.is_empty(), "bytes after the echo");
}

/// A dial the agent refuses (its allow-list): the stream opens and closes with an error.
async fn dial_refused(entry: SocketAddr, target: &str) {
    let (_, reply) = connect(entry, target).await;
    assert!(
        reply.starts_with("HTTP/1.1 403"),
        "expected a refusal: {reply}"
    );
}

/// Runs `count` dials, `CONCURRENCY` at a time; one in ten to `refused`, the rest to `echo`.
async fn dial_many(entry: SocketAddr, echo: &str, refused: &str, count: usize) {
    within(
        "the dials",
        Duration::from_secs(120),
        futures::stream::iter(0..count)
            .map(|i| async move {
                if i % 10 == 9 {
                    dial_refused(entry, refused).await;
                } else {
                    dial_echo(entry, echo).await;
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect::<Vec<()>>(),
    )
    .await;
}

/// Waits until no stream is open on either side (their splices have ended).
async fn wait_streams_closed(proxy: &ProxyServer, agent: &StreamMetrics) {
    let proxy = proxy.shared().streams.open.clone();
    wait_for("every stream to close", Duration::from_secs(20), || {
        proxy.get() == 0 && agent.open.get() == 0
    })
    .await;
}

/// Starts a proxy with a client entry on `rt`; returns it and the entry's address.
async fn start_proxy(rt: &Runtime, pki: &tether::demo::Pki) -> (ProxyServer, SocketAddr) {
    let config = pki.proxy_config("proxy-1").expect("proxy config");
    rt.spawn(async move {
        let proxy = ProxyServer::start(config).await.expect("proxy starts");
        let tokens = format!("soak:{TOKEN}\n");
        let entry = start_client_entry(&proxy, &tokens, |_| {}).await;
        (proxy, entry)
    })
    .await
    .expect("proxy task")
}

/// Starts an agent of `proxy` on `rt` allowing `echo`; returns its streams' counters.
fn start_agent(
    rt: &Runtime,
    pki: &tether::demo::Pki,
    proxy: &ProxyServer,
    echo: SocketAddr,
) -> StreamMetrics {
    let allow = AllowList::parse(&[format!("127.0.0.1/32:{}", echo.port())]).expect("allow");
    let config = pki
        .agent_config(&proxy.local_addr().to_string(), allow)
        .expect("agent config");
    let stop = CancellationToken::new();
    let streams = config.metrics.streams.clone();
    let agent = Arc::new(Agent::new(config));
    rt.spawn(async move { agent.run(stop).await });
    streams
}

#[test]
fn five_thousand_closed_streams_leave_proxy_and_agent_heaps_where_they_were() {
    let proxy_rt = runtime(Side::Proxy, "soak-proxy");
    let agent_rt = runtime(Side::Agent, "soak-agent");
    let driver = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("driver runtime");
    driver.block_on(async {
        let pki = pki();
        let echo = echo_server().await.expect("echo server");
        let (proxy, entry) = start_proxy(&proxy_rt, &pki).await;
        let agent_streams = start_agent(&agent_rt, &pki, &proxy, echo);
        let sites = proxy.sites();
        wait_for("the leaf to come online", Duration::from_secs(20), || {
            sites
                .get(&leaf())
                .is_some_and(|s| s.status == tether::proxy::SiteStatus::Online)
        })
        .await;
        let target = format!("127.0.0.1.leaf.tether:{}", echo.port());
        // Any other port is outside the agent's allow-list.
        let refused = format!("127.0.0.1.leaf.tether:{}", echo.port() ^ 1);

        dial_many(entry, &target, &refused, WARM_UP).await;
        wait_streams_closed(&proxy, &agent_streams).await;
        let base = [live_bytes(Side::Proxy), live_bytes(Side::Agent)];
        eprintln!(
            "after warm-up: proxy heap {} B, agent heap {} B",
            base[0], base[1]
        );

        dial_many(entry, &target, &refused, DIALS).await;
        wait_streams_closed(&proxy, &agent_streams).await;
        let bound = BOUND_PER_DIAL * DIALS as i64;
        let growth = || {
            [
                live_bytes(Side::Proxy) - base[0],
                live_bytes(Side::Agent) - base[1],
            ]
        };
        // Closing finishes in russh's session loops after the splices end: wait for it.
        let waited = tokio::time::timeout(Duration::from_secs(20), async {
            while growth().iter().any(|g| *g > bound) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        let [proxy_growth, agent_growth] = growth();
        let per_dial = |g: i64| g as f64 / DIALS as f64;
        eprintln!(
            "after {DIALS} dials: proxy heap {proxy_growth:+} B ({:.1} B/dial), agent heap \
             {agent_growth:+} B ({:.1} B/dial)",
            per_dial(proxy_growth),
            per_dial(agent_growth),
        );
        assert!(
            waited.is_ok(),
            "memory kept per dial: proxy {:.0} B/dial, agent {:.0} B/dial (bound \
             {BOUND_PER_DIAL} B/dial)",
            per_dial(proxy_growth),
            per_dial(agent_growth),
        );
        drop(proxy);
    });
    proxy_rt.shutdown_background();
    agent_rt.shutdown_background();
}
