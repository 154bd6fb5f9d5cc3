//! The agent dials only what its allow-list permits, however the address is spelled.

use std::time::Duration;

use tether::agent::LiveAllowList;
use tether::egress::allow_list::AllowList;
use tether::protocol::DialErrorKind;

use crate::dial_error;
use crate::support::*;

/// Every spelling of "this machine" that a careless check would let through.
const ALIASES: &[&str] = &[
    "0.0.0.0",
    "[::]",
    "[::ffff:127.0.0.1]",
    "[::1]",
    "2130706433",
    "0177.0.0.1",
    "0x7f.0.0.1",
    "127.1",
    "localhost",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aliases_of_a_forbidden_address_are_refused() {
    let rig = Rig::start(&["10.0.0.0/8:*".to_owned()], |_| {}, |_| {}).await;
    let echo = echo_server().await.expect("echo");
    for host in ALIASES {
        let name = format!("{host}.leaf.tether:{}", echo.port());
        let unexpected = format!("{name} got through an allow-list of 10.0.0.0/8");
        let err = dial_error(&rig, &name, &unexpected).await;
        assert_eq!(err.kind, DialErrorKind::Forbidden, "{name}: {err}");
        assert!(
            err.message.contains("allow-list")
                || err.message.contains("never dials")
                || err.message.contains("numeric"),
            "{name}: the reason should say why: {err}"
        );
    }
    let localhost = format!("localhost.leaf.tether:{}", echo.port());
    let err = dial_error(&rig, &localhost, "refused").await;
    assert!(
        err.message
            .contains("resolves only to addresses outside the agent's allow-list"),
        "a name that resolves elsewhere says so: {err}"
    );
    // ... but not where: the leaf's DNS answers stay on the leaf (issue #11).
    assert!(!err.message.contains("127.0.0.1"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_allowed_address_and_port_get_through() {
    let echo = echo_server().await.expect("echo");
    let rig = Rig::start(&[format!("127.0.0.1/32:{}", echo.port())], |_| {}, |_| {}).await;
    // The same address in its IPv4-mapped form is the same address: allowed.
    let conn = rig
        .dial_name(&format!("[::ffff:127.0.0.1].leaf.tether:{}", echo.port()))
        .await
        .expect("mapped form of an allowed address");
    let (mut stream, _t) = attach(conn, 4096);
    assert_eq!(echo_round_trip(&mut stream, b"ok").await, b"ok");
    for host in ["0.0.0.0", "2130706433", "0177.0.0.1", "127.1"] {
        let name = format!("{host}.leaf.tether:{}", echo.port());
        let err = dial_error(&rig, &name, "refused").await;
        assert_eq!(err.kind, DialErrorKind::Forbidden, "{name}: {err}");
    }
    let other_port = if echo.port() == 65535 {
        1
    } else {
        echo.port() + 1
    };
    let other = format!("127.0.0.1.leaf.tether:{other_port}");
    let err = dial_error(&rig, &other, "another port is refused").await;
    assert_eq!(err.kind, DialErrorKind::Forbidden, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_the_allow_list_applies_to_new_dials_without_dropping_the_tunnel() {
    let echo = echo_server().await.expect("echo");
    let mut handle: Option<LiveAllowList> = None;
    let rig = Rig::start(&[], |_| {}, |a| handle = Some(a.allow.clone())).await;
    let allow = handle.expect("allow-list handle");
    let tunnel_before = rig.proxy.site(&leaf()).expect("site").tunnels[0].id;
    let err = rig.dial(echo).await.err().expect("denied by default");
    assert_eq!(err.kind, DialErrorKind::Forbidden);
    // Written as agents report rules (a /32 without its prefix length).
    let rule = format!("127.0.0.1:{}", echo.port());
    assert!(allow.replace(AllowList::parse([&rule]).expect("rules")));
    // The agent judges by the new list at once; the root, which refuses early what its
    // agents' reports forbid, once the agent's report of it has arrived.
    let sites = rig.proxy.sites();
    wait_for(
        "the root to learn the new list",
        Duration::from_secs(10),
        || {
            sites.get(&leaf()).is_some_and(|s| {
                !s.agents.is_empty() && s.agents.iter().all(|a| a.report.allow == [rule.clone()])
            })
        },
    )
    .await;
    let (mut stream, _t) = attach(rig.dial(echo).await.expect("allowed now"), 4096);
    assert_eq!(echo_round_trip(&mut stream, b"hi").await, b"hi");
    let site = rig.proxy.site(&leaf()).expect("site");
    assert_eq!(site.tunnels.len(), 1);
    assert_eq!(site.tunnels[0].id, tunnel_before, "the tunnel was replaced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_unresolvable_targets_say_which() {
    let rig = Rig::start(
        &["127.0.0.1/32:*".to_owned(), "*.invalid:*".to_owned()],
        |_| {},
        |_| {},
    )
    .await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let err = rig.dial(closed).await.err().expect("refused");
    assert_eq!(err.kind, DialErrorKind::Refused, "{err}");
    let err = dial_error(&rig, "nowhere.invalid.leaf.tether:80", "unresolvable").await;
    assert_eq!(err.kind, DialErrorKind::NameNotResolved, "{err}");
    let err = dial_error(&rig, "db.other-cluster.tether:80", "unknown cluster").await;
    assert_eq!(err.kind, DialErrorKind::NoTunnel, "{err}");
    assert!(err.message.contains("other-cluster"), "{err}");
}
