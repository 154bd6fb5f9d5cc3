//! Two operator replicas share a Lease, and both carry the tunnel: each proxy holds one tunnel
//! from each. Under a dial load, losing either replica (kill -9, the leader included) or
//! restarting both in turn must not fail a dial the loss could not have touched.

use super::load::{DialRecord, Load, LongDial, split_at};
use super::*;

/// The Lease in these tests: renewed every 4 s, expires 6 s after the last renewal.
pub(crate) const LEASE_TIMES: (&str, &str) = ("6s", "2s");
/// `--status-refresh` in these tests (instead of a minute): how often the leader stamps each
/// tunnel's `observedAt`.
pub(crate) const REFRESH: Duration = Duration::from_secs(3);
/// Dials that must complete after an event before the load is judged over it.
const DIALS_AFTER: usize = 30;
/// Streams held open across each SIGTERM of the rolling restart.
const LONG_STREAMS: usize = 6;
/// Load workers dialling back to back.
const WORKERS: usize = 2;

pub(crate) async fn lease_holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt(LEASE)
        .await
        .ok()
        .flatten()?
        .spec?
        .holder_identity
}

/// An operator replica competing for the Lease, with `--status-refresh` [`REFRESH`].
pub(crate) fn replica(cp: &ControlPlane, ns: &str, root: &Root, name: &str) -> Process {
    replica_refreshing(cp, ns, root, name, REFRESH)
}

/// [`replica`] with `--status-refresh` `refresh`.
pub(crate) fn replica_refreshing(
    cp: &ControlPlane,
    ns: &str,
    root: &Root,
    name: &str,
    refresh: Duration,
) -> Process {
    let refresh = format!("{}s", refresh.as_secs());
    spawn_operator_with(
        cp,
        ns,
        &root.logs,
        name,
        Some(Some(LEASE_TIMES)),
        &["--status-refresh", &refresh],
    )
}

/// A leaf carried by two replicas (`operator-a`, `operator-b`) to three proxies, the example
/// allowing the returned echo server; a dial has gone through.
pub(crate) async fn carried_by_two(
    prefix: &str,
) -> (
    &'static ControlPlane,
    Client,
    String,
    Root,
    BTreeMap<String, Process>,
    SocketAddr,
) {
    let (cp, client, ns, mut root) = setup(prefix, 3).await;
    let operators: BTreeMap<String, Process> = ["operator-a", "operator-b"]
        .into_iter()
        .map(|name| (name.to_owned(), replica(cp, &ns, &root, name)))
        .collect();
    apply_example(cp, &root).await;
    let echo = echo_server().await.expect("echo server");
    allow(cp, &ns, echo).await;
    wait_connected_by_two(cp, &ns).await;
    let tunnels = root.wait_each_holds(2).await;
    eprintln!("[{ns}] two replicas carry the leaf: tunnels per proxy {tunnels:?}");
    eventually("a dial through the tunnel", || async {
        root.dial(echo, b"ping\n").await.ok()
    })
    .await;
    (cp, client, ns, root, operators, echo)
}

/// Waits until `kubectl get rt` shows the example Connected to all three proxies by both
/// replicas.
pub(crate) async fn wait_connected_by_two(cp: &'static ControlPlane, ns: &str) {
    let row = [
        ("STATUS", "Connected"),
        ("PROXIES", "3/3"),
        ("REPLICAS", "2/2"),
    ];
    wait_row(cp, ns, &row).await;
}

/// Starts replica `successor` (as the Deployment would after losing one) and waits until
/// every proxy holds a tunnel of each of the two replicas, and the status lists exactly the
/// live replicas and reads Connected 2/2.
async fn start_successor(
    cp: &'static ControlPlane,
    ns: &str,
    root: &mut Root,
    client: &Client,
    operators: &mut BTreeMap<String, Process>,
    successor: &str,
) {
    operators.insert(successor.to_owned(), replica(cp, ns, root, successor));
    root.wait_each_holds(2).await;
    let live: Vec<String> = operators.keys().cloned().collect();
    wait_entries(client, ns, &live).await;
    wait_row(cp, ns, &[("STATUS", "Connected"), ("REPLICAS", "2/2")]).await;
}

/// Waits until the example's `status.replicas` names exactly `live` (in any order).
pub(crate) async fn wait_entries(client: &Client, ns: &str, live: &[String]) {
    let api: Api<ReverseTunnel> = Api::namespaced(client.clone(), ns);
    let mut want = live.to_vec();
    want.sort();
    eventually(&format!("status.replicas to name {want:?}"), || async {
        let rt = api.get(RT).await.ok()?;
        let mut names: Vec<String> = rt.status?.replicas.iter().map(|e| e.name.clone()).collect();
        names.sort();
        (names == want).then_some(())
    })
    .await;
}

fn describe(failed: &[&DialRecord], origin: Instant) -> Vec<String> {
    failed
        .iter()
        .map(|r| {
            format!(
                "[{:?}..{:?}] {}",
                r.started.saturating_duration_since(origin),
                r.ended.saturating_duration_since(origin),
                r.error.as_deref().unwrap_or("")
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_either_replica_fails_no_new_dial() {
    let _serial = SERIAL.lock().await;
    let (cp, client, ns, mut root, mut operators, echo) = carried_by_two("ha-kill").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let load = Load::start(root.dialer(), echo, WORKERS);
    let origin = Instant::now();
    let mut kills = Vec::new();
    // First the leader, then (after a replacement joined) the replica that did not lead.
    for (round, successor) in ["operator-c", "operator-d"].into_iter().enumerate() {
        // The Lease names a live replica (after the first kill: once the standby took it).
        let live: Vec<String> = operators.keys().cloned().collect();
        let leader = eventually("a live Lease holder", || async {
            lease_holder(&leases).await.filter(|h| live.contains(h))
        })
        .await;
        let victim = if round == 0 {
            leader.clone()
        } else {
            operators
                .keys()
                .find(|n| **n != leader)
                .expect("a replica that does not lead")
                .clone()
        };
        load.wait_dials_after(origin, DIALS_AFTER * (round + 1))
            .await;
        let mut dead = operators.remove(&victim).expect("victim");
        let killed = Instant::now();
        dead.signal(libc::SIGKILL);
        // The survivor's tunnels stay; the victim's go as the kernel closes its sockets.
        let survivors = root.wait_each_holds(1).await;
        let dropped = killed.elapsed();
        load.wait_dials_after(killed, DIALS_AFTER).await;
        eprintln!(
            "[{ns}] kill -9 {victim} (leader {leader}): its tunnels dropped by every proxy \
             after {dropped:?}; the survivor's tunnels {survivors:?} kept"
        );
        dead.exited().await;
        kills.push((victim.clone(), victim == leader, killed));
        // A replacement, as the Deployment would start.
        start_successor(cp, &ns, &mut root, &client, &mut operators, successor).await;
        eprintln!(
            "[{ns}] {successor} replaced {victim}: the status lists exactly the live replicas, \
             2/2, {:?} after the kill",
            killed.elapsed()
        );
    }
    let records = load.finish().await;
    let mut failed_new = 0;
    for (i, (victim, led, killed)) in kills.iter().enumerate() {
        let next = kills.get(i + 1).map(|(_, _, at)| *at);
        let (in_flight, after, total) = split_at(&records, *killed, next);
        eprintln!(
            "[{ns}] kill -9 of {victim} (leader: {led}): {total} dials started after it (and \
             ended before the next kill), {} failed: {:?}; {} in flight at the kill failed: {:?}",
            after.len(),
            describe(&after, *killed),
            in_flight.len(),
            describe(&in_flight, *killed)
        );
        failed_new += after.len();
    }
    let failed_total = records.iter().filter(|r| r.error.is_some()).count();
    eprintln!(
        "[{ns}] the load: {} dials, {failed_total} failed",
        records.len()
    );
    assert_eq!(failed_new, 0, "dials started after a kill -9 failed");
    for p in operators.values_mut() {
        p.assert_running();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_both_replicas_fails_no_dial() {
    let _serial = SERIAL.lock().await;
    let (cp, client, ns, mut root, mut operators, echo) = carried_by_two("ha-roll").await;
    let load = Load::start(root.dialer(), echo, WORKERS);
    let origin = Instant::now();
    load.wait_dials_after(origin, DIALS_AFTER).await;
    let mut long_failed = Vec::new();
    for (old, successor) in [("operator-a", "operator-a2"), ("operator-b", "operator-b2")] {
        let mut stopping = operators.remove(old).expect("running replica");
        let live: Vec<String> = operators.keys().cloned().collect();
        // Long-lived streams across the stop: the proxies spread them over both replicas'
        // tunnels, and those on the stopping replica's must be let finish.
        let dialer = root.dialer();
        let mut long = Vec::new();
        for i in 0..LONG_STREAMS {
            long.push(LongDial::open(&dialer, echo, format!("long {i} opens\n").as_bytes()).await);
        }
        let stopped = Instant::now();
        stopping.signal(libc::SIGTERM);
        // The stopping replica waits for its streams; they end now, after the SIGTERM.
        tokio::time::sleep(Duration::from_millis(500)).await;
        for (i, dial) in long.into_iter().enumerate() {
            if let Err(e) = dial.finish(format!("long {i} closes\n").as_bytes()).await {
                long_failed.push(format!("{old}: long stream {i}: {e}"));
            }
        }
        let status = stopping.exited().await;
        assert!(status.success(), "{old} exited with {status}");
        let exited = stopped.elapsed();
        root.wait_each_holds(1).await;
        // A clean stop removes the replica's own entry at once.
        wait_entries(&client, &ns, &live).await;
        start_successor(cp, &ns, &mut root, &client, &mut operators, successor).await;
        eprintln!(
            "[{ns}] SIGTERM {old}: exited after {exited:?}; {successor} carrying (2/2) after {:?}",
            stopped.elapsed()
        );
        load.wait_dials_after(stopped, DIALS_AFTER).await;
    }
    let records = load.finish().await;
    let failed: Vec<&DialRecord> = records.iter().filter(|r| r.error.is_some()).collect();
    eprintln!(
        "[{ns}] rolling restart of both replicas under load: {} dials, {} failed: {:?}",
        records.len(),
        failed.len(),
        describe(&failed, origin)
    );
    eprintln!(
        "[{ns}] long-lived streams across the SIGTERMs: {} of {} failed: {long_failed:?}",
        long_failed.len(),
        2 * LONG_STREAMS
    );
    assert!(failed.is_empty(), "dials failed during a rolling restart");
    // A stopping replica's tunnels stay until each proxy has finished their streams
    // (tests/tunnel/leaving.rs), so no long stream loses a byte.
    assert!(
        long_failed.is_empty(),
        "long-lived streams were cut across the SIGTERMs: {long_failed:?}"
    );
}
