//! Memory an idle leaf tunnel costs the proxy (issues #12 and #18): 10,000 idle tunnels of
//! distinct leaves must fit one proxy in 512 MiB, so each may cost well under 48 KiB.
//!
//! The proxy runs on its own runtime whose threads are tagged, and the counting allocator of
//! the soak test (`tests/soak/alloc.rs`) keeps the live heap bytes it allocated: an exact
//! figure, where RSS moves with the allocator's arenas and the machine's load. N agents of N
//! distinct leaves (each its own CA, as a fleet has them) connect and go idle; the proxy's heap
//! grows by what N tunnels hold, divided by N.
//!
//! Heap per idle tunnel measured here: 56.7 KiB before the fix (russh's session future was
//! 17.5 KB, boxed inside a wrapper future: 24.5 KB a session), 33.7 KiB after (a 4.1 KB
//! session future; see vendor/README.md, "a smaller session future"). The bound leaves room
//! for allocations that vary from run to run (hash maps, the runtime's slabs), not for the old
//! figure.

#[allow(unused_imports)] // what this test does not use of the shared helpers
#[path = "../support/mod.rs"]
mod support;

#[path = "../soak/alloc.rs"]
mod alloc;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tether::agent::{Agent, AgentConfig};
use tether::egress::allow_list::AllowList;
use tether::identity::{CertificateAuthority, Identity};
use tether::protocol::ClusterName;
use tether::proxy::{ProxyLimits, ProxyServer};
use tokio_util::sync::CancellationToken;

use alloc::{Side, live_bytes, runtime};
use support::*;

#[global_allocator]
static ALLOCATOR: alloc::Counting = alloc::Counting;

/// Leaves, one tunnel each: enough that one-off allocations (a map's growth, a metric family)
/// weigh little per tunnel, few enough for a test.
const LEAVES: usize = 200;

/// What the proxy's heap may hold per idle tunnel.
const BOUND_PER_TUNNEL: i64 = 40 * 1024;

/// A leaf: its cluster name, its CA and an agent identity the CA signed.
struct Leaf {
    name: ClusterName,
    ca: CertificateAuthority,
    identity: Arc<Identity>,
}

fn leaves(n: usize) -> Vec<Leaf> {
    (0..n)
        .map(|i| {
            let name = ClusterName::new(format!("leaf-{i:04}")).expect("name");
            let ca = CertificateAuthority::generate(name.clone()).expect("CA");
            let identity = Identity::generate_agent(&ca, Duration::from_secs(3600)).expect("id");
            Leaf {
                name,
                ca,
                identity: Arc::new(identity),
            }
        })
        .collect()
}

fn agent_config(pki: &tether::demo::Pki, proxy: &ProxyServer, leaf: &Leaf) -> AgentConfig {
    AgentConfig {
        connect_timeout: Duration::from_secs(15),
        ..AgentConfig::new(
            leaf.name.clone(),
            pki.root.cluster().clone(),
            proxy.local_addr().to_string(),
            leaf.identity.clone(),
            vec![pki.root.public_key().clone()],
            AllowList::parse(["127.0.0.1/32:9"]).expect("allow"),
        )
    }
}

#[test]
fn an_idle_leaf_tunnel_costs_the_proxy_less_than_the_bound() {
    let proxy_rt = runtime(Side::Proxy, "idle-proxy");
    let agent_rt = runtime(Side::Agent, "idle-agent");
    let pki = pki();
    let leaves = leaves(LEAVES);
    let mut config = pki.proxy_config("proxy-1").expect("proxy config");
    let mut trust = pki.trust();
    for leaf in &leaves {
        trust.insert(leaf.name.clone(), leaf.ca.public_key().clone());
    }
    config.trust = Arc::new(ArcSwap::from_pointee(trust));
    // Every agent dials from 127.0.0.1: its share is the whole.
    config.limits = ProxyLimits {
        max_connections_per_ip: ProxyLimits::default().max_connections,
        max_handshakes_per_ip: ProxyLimits::default().max_handshakes,
        ..ProxyLimits::default()
    };
    let proxy = proxy_rt
        .block_on(async { ProxyServer::start(config).await })
        .expect("proxy starts");
    let before = live_bytes(Side::Proxy);

    let stop = CancellationToken::new();
    for leaf in &leaves {
        let agent = Arc::new(Agent::new(agent_config(&pki, &proxy, leaf)));
        let stop = stop.clone();
        agent_rt.spawn(async move { agent.run(stop).await });
    }
    let sites = proxy.sites();
    agent_rt.block_on(wait_for(
        "every leaf online",
        Duration::from_secs(120),
        || {
            sites
                .list()
                .iter()
                .filter(|s| s.status == tether::proxy::SiteStatus::Online)
                .count()
                == LEAVES
        },
    ));
    // The last handshakes' transient buffers are freed once their sessions settle: wait for
    // the heap to come under the bound rather than sleeping (it never does while a tunnel
    // holds more).
    let per_tunnel = || (live_bytes(Side::Proxy) - before) / LEAVES as i64;
    let settled = agent_rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), async {
            while per_tunnel() > BOUND_PER_TUNNEL {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
    });
    let kib = per_tunnel() as f64 / 1024.0;
    eprintln!("proxy heap per idle leaf tunnel: {kib:.1} KiB ({LEAVES} leaves)");
    assert!(
        settled.is_ok(),
        "an idle leaf tunnel holds {kib:.1} KiB of the proxy's heap (bound {} KiB)",
        BOUND_PER_TUNNEL / 1024
    );
    stop.cancel();
    drop(proxy);
    proxy_rt.shutdown_background();
    agent_rt.shutdown_background();
}
