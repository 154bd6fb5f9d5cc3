//! Version skew and the root's inventory of a leaf (#19): a proxy and an agent one release
//! apart keep working, a major version apart are refused with the reason on both sides, and
//! the root refuses from its agents' reports the dials they would refuse, while the leaf is
//! online and after it is gone.

use std::sync::Arc;
use std::time::Duration;

use tether::admin::metrics::{AgentMetrics, label};
use tether::agent::Agent;
use tether::agent::status::FailureKind;
use tether::egress::allow_list::AllowList;
use tether::protocol::{DialErrorKind, ProtocolVersion};
use tether::proxy::ProxyServer;
use tokio_util::sync::CancellationToken;

use crate::dial_error;
use crate::support::*;

/// The leaf's tunnel on the proxy: its agent's protocol, and whether it reported.
fn the_tunnel(rig: &Rig) -> (u64, ProtocolVersion, bool) {
    let tunnels = rig.proxy.sites().tunnels_of(&leaf());
    assert_eq!(tunnels.len(), 1, "one tunnel");
    let t = &tunnels[0];
    (t.id, t.hello.protocol, t.report().is_some())
}

/// Waits until the proxy has counted `n` more heartbeats than `from`: the agent's messages
/// before them (a report would come first) have been read.
async fn heartbeats_after(rig: &Rig, from: u64, n: u64) {
    let heartbeats = rig.proxy.shared().metrics.heartbeats.clone();
    wait_for("heartbeats", Duration::from_secs(20), || {
        heartbeats.get() >= from + n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_of_this_release_serves_an_agent_speaking_protocol_1_0() {
    let echo = echo_server().await.expect("echo");
    let rule = format!("127.0.0.1/32:{}", echo.port());
    let metrics = AgentMetrics::default();
    let rig = Rig::start(
        &[rule],
        |_| {},
        |a| {
            a.metrics = metrics.clone();
            // The hello this agent writes is protocol 1.0's byte for byte (protocol::control's
            // tests hold it to tests/fixtures/control-1.0.jsonl), and it sends no report.
            a.protocol = ProtocolVersion::V1_0;
            a.heartbeat_interval = Duration::from_millis(100);
        },
    )
    .await;
    let start = rig.proxy.shared().metrics.heartbeats.get();
    heartbeats_after(&rig, start, 3).await;
    let (_, protocol, reported) = the_tunnel(&rig);
    assert_eq!(protocol, ProtocolVersion::V1_0);
    assert!(!reported, "a 1.0 agent sends no report");
    let (mut stream, _t) = attach(rig.dial(echo).await.expect("dial"), 4096);
    assert_eq!(echo_round_trip(&mut stream, b"old").await, b"old");
    // Nothing is known of its allow-list, so the root refuses nothing itself: the agent does.
    let served = served_forbidden(&metrics);
    let err = dial_error(&rig, "127.0.0.1.leaf.tether:1", "forbidden").await;
    assert_eq!(err.kind, DialErrorKind::Forbidden, "{err}");
    assert_eq!(
        served_forbidden(&metrics),
        served + 1,
        "the agent answered it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_of_this_release_keeps_its_tunnel_to_a_proxy_speaking_protocol_1_0() {
    let echo = echo_server().await.expect("echo");
    let rule = format!("127.0.0.1/32:{}", echo.port());
    let rig = Rig::start(
        &[rule],
        |p| p.protocol = ProtocolVersion::V1_0,
        |a| a.heartbeat_interval = Duration::from_millis(100),
    )
    .await;
    // A report is a message protocol 1.0 cannot read (and this proxy, pinned to 1.0, closes
    // the tunnel of an agent that sends one): heartbeats on the same tunnel show none came.
    let (id, protocol, reported) = the_tunnel(&rig);
    let start = rig.proxy.shared().metrics.heartbeats.get();
    heartbeats_after(&rig, start, 3).await;
    assert_eq!(protocol, ProtocolVersion::V1_0);
    assert_eq!(the_tunnel(&rig), (id, protocol, reported));
    assert!(!reported);
    let (mut stream, _t) = attach(rig.dial(echo).await.expect("dial"), 4096);
    assert_eq!(echo_round_trip(&mut stream, b"new").await, b"new");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_future_major_version_is_refused_saying_so_on_both_sides() {
    let pki = pki();
    let config = pki.proxy_config("proxy-1").expect("proxy config");
    let proxy = ProxyServer::start(config).await.expect("proxy");
    let mut agent_config = pki
        .agent_config(&proxy.local_addr().to_string(), AllowList::default())
        .expect("agent config");
    agent_config.protocol = ProtocolVersion { major: 2, minor: 0 };
    let agent = Arc::new(Agent::new(agent_config));
    let stop = CancellationToken::new();
    tokio::spawn({
        let (agent, stop) = (agent.clone(), stop.clone());
        async move { agent.run(stop).await }
    });
    let mut status = agent.status();
    let failure = within("the agent's refusal", Duration::from_secs(20), async {
        loop {
            if let Some(f) = status.borrow_and_update().last_error.clone() {
                return f;
            }
            status.changed().await.expect("status");
        }
    })
    .await;
    assert_eq!(failure.kind, FailureKind::UnsupportedVersion, "{failure:?}");
    let expected = format!(
        "the agent speaks protocol 2.0 and the proxy {}, which no release speaks together: \
         upgrade the root's proxies to a release that speaks 2.x",
        ProtocolVersion::CURRENT
    );
    assert!(failure.message.contains(&expected), "{}", failure.message);
    let site = proxy.site(&leaf()).expect("the refused leaf is known");
    let refused = site.refused.expect("the proxy says why");
    assert!(refused.contains(&expected), "{refused}");
    assert!(site.tunnels.is_empty());
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_refuses_what_the_reported_allow_list_forbids_while_online_and_after() {
    let echo = echo_server().await.expect("echo");
    // Written as agents report rules (a /32 without its prefix length).
    let rule = format!("127.0.0.1:{}", echo.port());
    let metrics = AgentMetrics::default();
    let rig = Rig::start(
        std::slice::from_ref(&rule),
        |_| {},
        |a| {
            a.replica = "agent-0".into();
            a.metrics = metrics.clone();
        },
    )
    .await;
    let sites = rig.proxy.sites();
    wait_for("the agent's report", Duration::from_secs(20), || {
        sites.get(&leaf()).is_some_and(|s| !s.agents.is_empty())
    })
    .await;
    let site = sites.get(&leaf()).expect("site");
    assert_eq!(site.agents[0].report.replica, "agent-0");
    assert_eq!(site.agents[0].report.allow, [rule]);
    assert_eq!(site.agents[0].tether_version, env!("CARGO_PKG_VERSION"));

    // Online: refused at the root, in the agent's words, and the agent never asked.
    let served = served_forbidden(&metrics);
    let forbidden = "127.0.0.1.leaf.tether:1";
    let err = dial_error(&rig, forbidden, "forbidden").await;
    assert_eq!(err.kind, DialErrorKind::Forbidden, "{err}");
    let words = "127.0.0.1:1 is not in the agent's allow-list (loopback addresses need an \
                 address rule inside 127.0.0.0/8)";
    assert_eq!(err.message, words);
    let err = dial_error(&rig, "_apiserver.leaf.tether:0", "no API server").await;
    assert_eq!(err.message, "this agent exposes no API server");
    assert_eq!(served_forbidden(&metrics), served, "the agent was asked");
    let (mut stream, _t) = attach(rig.dial(echo).await.expect("permitted"), 4096);
    assert_eq!(echo_round_trip(&mut stream, b"ok").await, b"ok");

    // The agents are gone: what they reported still refuses, and what it permits says the
    // leaf is offline.
    rig.stop.cancel();
    wait_for("the leaf to go", Duration::from_secs(20), || {
        sites.get(&leaf()).is_some_and(|s| s.tunnels.is_empty())
    })
    .await;
    let err = dial_error(&rig, forbidden, "forbidden while offline").await;
    assert_eq!(err.kind, DialErrorKind::Forbidden, "{err}");
    assert_eq!(err.message, words);
    let err = rig.dial(echo).await.err().expect("offline");
    assert_eq!(err.kind, DialErrorKind::NoTunnel, "{err}");
}

/// Dials the agent counting in `metrics` refused as forbidden.
fn served_forbidden(metrics: &AgentMetrics) -> u64 {
    metrics
        .served
        .get_or_create(&label("outcome", "forbidden"))
        .get()
}
