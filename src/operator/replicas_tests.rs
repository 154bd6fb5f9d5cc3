use super::*;
use crate::operator::liveness::Liveness;

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
        observed_at: Some(crate::operator::stamps::rfc3339(at)),
        identity_ca: None,
        ca_keys: None,
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

fn stamp() -> Stamp {
    Stamp {
        slot: Duration::from_secs(17),
        refresh: REFRESH,
    }
}

fn leases(list: &[(&str, Liveness)]) -> BTreeMap<String, Liveness> {
    list.iter().map(|(n, l)| ((*n).to_owned(), *l)).collect()
}

const ALIVE: Liveness = Liveness::Alive(None);

#[test]
fn a_dead_replicas_entry_stops_counting_and_is_pruned() {
    let up = [("p1", Up), ("p2", Up), ("p3", Up)];
    let a = replica("a", Phase::Connected, &up, t0());
    let b = replica("b", Phase::Connected, &up, t0());
    let mut status = summarize(&[&a, &b], None, t0());
    status.replicas = vec![a, b];
    status.observed_at = Some(crate::operator::stamps::rfc3339(t0()));
    // Both Leases current, however old the entries: nothing to write before the stamp's slot,
    // nothing to prune.
    let both = leases(&[("a", ALIVE), ("b", ALIVE)]);
    let at = t0() + Duration::from_secs(10);
    let quiet = plan(&status, &both, stamp(), at);
    assert!(quiet.summary.is_none(), "{:?}", quiet.summary);
    assert!(quiet.prune.is_none());
    // A replica not read yet, or whose Lease could not be read, still counts.
    let unread = plan(&status, &leases(&[("a", Liveness::Unknown)]), stamp(), at);
    assert!(unread.summary.is_none() && unread.prune.is_none());
    // b's Lease expired: 1/1, b's entry removed, and the summary stamped.
    let later = t0() + Duration::from_secs(20);
    let p = plan(
        &status,
        &leases(&[("a", ALIVE), ("b", Liveness::Dead)]),
        stamp(),
        later,
    );
    let summary = p.summary.expect("a new summary");
    assert_eq!(summary.replicas_ready.as_deref(), Some("1/1"));
    assert_eq!(summary.phase, Some(Phase::Connected));
    assert_eq!(
        summary.observed_at,
        Some(crate::operator::stamps::rfc3339(later))
    );
    let ops = serde_json::to_value(p.prune.expect("a prune")).expect("json");
    assert_eq!(ops[0]["path"], "/status/replicas/1/name");
    assert_eq!(ops[0]["value"], "b");
    assert_eq!(ops[1]["op"], "remove");
    // Every replica dead: nothing counts, the leader says so, and the stamp is left to age.
    let none = leases(&[("a", Liveness::Dead), ("b", Liveness::Dead)]);
    let dead = plan(&status, &none, stamp(), later);
    let summary = dead.summary.expect("summary");
    assert_eq!(summary.phase, Some(Phase::Pending));
    assert_eq!(summary.observed_at, status.observed_at);
    assert_eq!(dead.next_stamp, None);
}

#[test]
fn the_leader_stamps_once_a_refresh_on_the_tunnels_slot_while_a_replica_lives() {
    let up = [("p1", Up), ("p2", Up), ("p3", Up)];
    let a = replica("a", Phase::Connected, &up, t0());
    let mut status = summarize(&[&a], None, t0());
    status.replicas = vec![a];
    let alive = leases(&[("a", ALIVE)]);
    // Never stamped: stamped at once, next on the slot (second 17 of the minute).
    let first = plan(&status, &alive, stamp(), t0());
    let written = first.summary.expect("a first stamp");
    assert_eq!(settled(&written), settled(&status));
    status.observed_at = written.observed_at;
    let due = first.next_stamp.expect("a next stamp");
    let secs = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .expect("epoch")
            .as_secs()
    };
    assert_eq!(secs(due) % 60, 17);
    assert!(due > t0() + Duration::from_secs(1) && due <= t0() + REFRESH + Duration::from_secs(1));
    // Newer heartbeats change nothing that counts: no write until the slot.
    status.replicas[0].proxies[0].last_heartbeat = Some(crate::operator::stamps::rfc3339(due));
    let before = plan(&status, &alive, stamp(), due - Duration::from_millis(500));
    assert!(before.summary.is_none());
    assert_eq!(before.next_stamp, Some(due));
    let on_slot = plan(&status, &alive, stamp(), due);
    status.observed_at = on_slot.summary.expect("the stamp").observed_at;
    // From then on exactly a refresh apart.
    assert_eq!(on_slot.next_stamp, Some(due + REFRESH));
    // No live replica: no stamp at all, however old.
    let dead = leases(&[("a", Liveness::Dead)]);
    let p = plan(&status, &dead, stamp(), due + REFRESH * 10);
    assert_eq!(p.summary.expect("Pending").observed_at, status.observed_at);
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
