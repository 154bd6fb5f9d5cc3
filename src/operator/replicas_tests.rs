use super::*;

const REFRESH: Duration = Duration::from_secs(60);

fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn proxy(id: &str, state: ProxyState) -> ProxyTunnel {
    ProxyTunnel {
        id: id.to_owned(),
        state,
        connected_since: None,
        last_heartbeat: None,
    }
}

fn replica(
    name: &str,
    phase: Phase,
    proxies: &[(&str, ProxyState)],
    at: SystemTime,
) -> ReplicaHolding {
    let proxies: Vec<ProxyTunnel> = proxies.iter().map(|(id, s)| proxy(id, *s)).collect();
    let connected = proxies
        .iter()
        .filter(|p| p.state == ProxyState::Connected)
        .count() as u32;
    ReplicaHolding {
        name: name.to_owned(),
        phase,
        connected,
        expected: 3,
        reason: String::new(),
        message: String::new(),
        proxies,
        observed_generation: Some(1),
        observed_at: Some(crate::operator::status::rfc3339(at)),
    }
}

use ProxyState::{Connected as Up, Connecting as Down};

#[test]
fn the_union_counts_a_proxy_any_replica_holds() {
    let a = replica(
        "a",
        Phase::Degraded,
        &[("p1", Up), ("p2", Up), ("p3", Down)],
        t0(),
    );
    let b = replica(
        "b",
        Phase::Degraded,
        &[("p1", Down), ("p2", Up), ("p3", Up)],
        t0(),
    );
    let s = summarize(&[&a, &b], None, t0());
    assert_eq!(s.phase, Some(Phase::Connected));
    assert_eq!(s.proxies_ready.as_deref(), Some("3/3"));
    // Neither replica holds every proxy on its own.
    assert_eq!(s.replicas_ready.as_deref(), Some("0/2"));
    let c = replica(
        "c",
        Phase::Connected,
        &[("p1", Up), ("p2", Up), ("p3", Up)],
        t0(),
    );
    let s = summarize(&[&a, &b, &c], None, t0());
    assert_eq!(s.replicas_ready.as_deref(), Some("1/3"));
    let none = summarize(&[], None, t0());
    assert_eq!(none.phase, Some(Phase::Pending));
    assert_eq!(none.replicas_ready.as_deref(), Some("0/0"));
}

#[test]
fn a_stale_entry_stops_counting_and_is_pruned() {
    let fresh = replica(
        "a",
        Phase::Connected,
        &[("p1", Up), ("p2", Up), ("p3", Up)],
        t0(),
    );
    let old = replica(
        "b",
        Phase::Connected,
        &[("p1", Up), ("p2", Up), ("p3", Up)],
        t0(),
    );
    let mut status = summarize(&[&fresh, &old], None, t0());
    status.replicas = vec![fresh.clone(), old];
    // Within the stale age both count: nothing to write, nothing to prune.
    let plan_now = plan(&status, REFRESH, t0() + Duration::from_secs(30));
    assert!(plan_now.summary.is_none(), "{:?}", plan_now.summary);
    assert!(plan_now.prune.is_none());
    // b stops stamping; a stamps again. Past b's stale age: 1/1, b's entry removed.
    status.replicas[0].observed_at = Some(crate::operator::status::rfc3339(t0() + REFRESH));
    let later = t0() + stale_after(REFRESH) + Duration::from_secs(1);
    let p = plan(&status, REFRESH, later);
    let summary = p.summary.expect("a new summary");
    assert_eq!(summary.replicas_ready.as_deref(), Some("1/1"));
    assert_eq!(summary.phase, Some(Phase::Connected));
    let ops = serde_json::to_value(p.prune.expect("a prune")).expect("json");
    assert_eq!(ops[0]["path"], "/status/replicas/1/name");
    assert_eq!(ops[0]["value"], "b");
    assert_eq!(ops[1]["op"], "remove");
    // Every replica dead: nothing counts, and the leader says so.
    let dead = plan(
        &status,
        REFRESH,
        t0() + REFRESH + stale_after(REFRESH) + Duration::from_secs(1),
    );
    assert_eq!(dead.summary.expect("summary").phase, Some(Phase::Pending));
}

#[test]
fn a_failed_replica_does_not_hide_a_carrying_one() {
    let mut failed = replica("a", Phase::Failed, &[], t0());
    failed.reason = "SecretNotFound".into();
    let up = replica(
        "b",
        Phase::Connected,
        &[("p1", Up), ("p2", Up), ("p3", Up)],
        t0(),
    );
    assert_eq!(
        summarize(&[&failed, &up], None, t0()).phase,
        Some(Phase::Connected)
    );
    let alone = summarize(&[&failed], None, t0());
    assert_eq!(alone.phase, Some(Phase::Failed));
    assert_eq!(alone.conditions[0].reason, "SecretNotFound");
}
