//! `kubectl get rt` with several replicas: each replica's entry in `status.replicas`, the union
//! in `PROXIES` and the count in `REPLICAS`. A replica's own Lease vouches for its entries: a
//! replica stopping cleanly removes its entry and its Lease at once; a killed replica's entries
//! are pruned once its Lease expires (long before the stamp period, so stamp ages cannot be
//! what prunes them); once the last replica is dead, `SEEN` passes the stale age.

use super::failover::{lease_holder, replica_refreshing};
use super::quiet::parse_age;
use super::*;
use tether::operator::crd::reverse_tunnel::ProxyState;
use tether::operator::liveness::{CLOCK_SKEW, Liveness, judge, lease_name};
use tether::operator::stamps::stale_after;
use tether::operator::summarizer::poll_for;

/// The stamp period here: far longer than the 6 s Lease, so a dead replica's entries pruned
/// within the Lease are the Lease's doing, while `SEEN` still goes stale within the test.
const REFRESH: Duration = Duration::from_secs(20);
/// The replicas' Lease (`LEASE_TIMES`).
const LEASE_DURATION: Duration = Duration::from_secs(6);

/// An operator replica competing for the Lease, the leader stamping every [`REFRESH`].
fn replica(cp: &ControlPlane, ns: &str, root: &Root, name: &str) -> Process {
    replica_refreshing(cp, ns, root, name, REFRESH)
}

/// The names in the example's `status.replicas`, sorted.
async fn entry_names(api: &Api<ReverseTunnel>) -> Option<Vec<String>> {
    let rt = api.get(RT).await.ok()?;
    let mut names: Vec<String> = rt.status?.replicas.iter().map(|e| e.name.clone()).collect();
    names.sort();
    Some(names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_shows_each_replica_until_it_dies() {
    let _serial = SERIAL.lock().await;
    let (cp, client, ns, mut root) = setup("ha-status", 3).await;
    let names = ["operator-a", "operator-b", "operator-c"];
    let mut operators: BTreeMap<String, Process> = names
        .iter()
        .map(|name| ((*name).to_owned(), replica(cp, &ns, &root, name)))
        .collect();
    apply_example(cp, &root).await;
    let row = wait_row(
        cp,
        &ns,
        &[
            ("STATUS", "Connected"),
            ("PROXIES", "3/3"),
            ("REPLICAS", "3/3"),
        ],
    )
    .await;
    root.wait_each_holds(3).await;
    eprintln!("[{ns}] kubectl get rt: {row:?}");
    let api: Api<ReverseTunnel> = Api::namespaced(client.clone(), &ns);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    // Each replica's own entry (its name, its three tunnels) and its own Lease.
    let status = api.get(RT).await.expect("get").status.expect("status");
    let mut listed: Vec<&str> = status.replicas.iter().map(|e| e.name.as_str()).collect();
    listed.sort_unstable();
    assert_eq!(listed, names, "{status:?}");
    for entry in &status.replicas {
        assert_eq!(entry.phase, Phase::Connected, "{entry:?}");
        let up: Vec<&str> = entry
            .proxies
            .iter()
            .filter(|p| p.state == ProxyState::Connected)
            .map(|p| p.id.as_str())
            .collect();
        assert_eq!(up, ["p1", "p2", "p3"], "{entry:?}");
        let lease = eventually(&format!("{}'s own Lease", entry.name), || async {
            leases.get_opt(&lease_name(LEASE, &entry.name)).await.ok()?
        })
        .await;
        assert!(
            matches!(
                judge(&lease, &entry.name, std::time::SystemTime::now()),
                Liveness::Alive(_)
            ),
            "{lease:?}"
        );
    }
    let leader = eventually("a Lease holder", || lease_holder(&leases)).await;
    let mut others = names
        .iter()
        .map(|n| (*n).to_owned())
        .filter(|n| *n != leader);
    let (stopped, killed) = (
        others.next().expect("a replica"),
        others.next().expect("another"),
    );

    // SIGTERM: the replica removes its entry and deletes its Lease before it exits.
    let mut process = operators.remove(&stopped).expect("process");
    process.signal(libc::SIGTERM);
    let exit = process.exited().await;
    assert!(exit.success(), "{stopped} exited {exit}");
    let mut two = vec![leader.clone(), killed.clone()];
    two.sort();
    assert_eq!(
        entry_names(&api).await.as_ref(),
        Some(&two),
        "{stopped}'s entry after it exited"
    );
    assert!(
        leases
            .get_opt(&lease_name(LEASE, &stopped))
            .await
            .expect("get")
            .is_none(),
        "{stopped}'s Lease after it exited"
    );
    wait_row(cp, &ns, &[("STATUS", "Connected"), ("REPLICAS", "2/2")]).await;

    // kill -9 of a replica that does not lead: its entry counts while its Lease lasts, then
    // stops counting and is removed, and so is its expired Lease.
    let mut dead = operators.remove(&killed).expect("process");
    let at_kill = Instant::now();
    dead.signal(libc::SIGKILL);
    dead.exited().await;
    // Its last renewal: nothing renews it any more.
    let last = leases
        .get(&lease_name(LEASE, &killed))
        .await
        .expect("the dead replica's Lease");
    let Liveness::Alive(Some(expires)) = judge(&last, &killed, std::time::SystemTime::now()) else {
        panic!("{killed}'s Lease expired at once: {last:?}");
    };
    let row = wait_row(
        cp,
        &ns,
        &[
            ("STATUS", "Connected"),
            ("PROXIES", "3/3"),
            ("REPLICAS", "1/1"),
        ],
    )
    .await;
    let uncounted = at_kill.elapsed();
    let uncounted_at = std::time::SystemTime::now();
    let entries = eventually("the dead replica's entry removed", || async {
        let names = entry_names(&api).await?;
        (names == [leader.clone()]).then_some(names)
    })
    .await;
    let pruned_after = at_kill.elapsed();
    eventually("the dead replica's Lease deleted", || async {
        let gone = leases.get_opt(&lease_name(LEASE, &killed)).await.ok()?;
        gone.is_none().then_some(())
    })
    .await;
    eprintln!(
        "[{ns}] kill -9 {killed}: `kubectl get rt` {row:?} after {uncounted:?}; entries \
         {entries:?} after {pruned_after:?}; its Lease ({LEASE_DURATION:?}) deleted after {:?}",
        at_kill.elapsed()
    );
    // Not before its Lease (and the clock-skew margin) ran out...
    assert!(
        uncounted_at >= expires,
        "it stopped counting before its Lease expired at {}",
        humantime::format_rfc3339_millis(expires)
    );
    // ...and within the Lease, the margin, one poll of the Leases, and a loaded machine's
    // second or two; the stamp period (20 s) plays no part.
    let bound = LEASE_DURATION + CLOCK_SKEW + poll_for(LEASE_DURATION) + Duration::from_secs(3);
    assert!(
        uncounted <= bound,
        "the dead replica counted for {uncounted:?} (bound {bound:?})"
    );
    assert!(
        bound < stale_after(REFRESH),
        "the test cannot tell a Lease from a stamp"
    );

    // The last replica dies: nothing can write, and SEEN passes the stale age instead.
    let mut last = operators.remove(&leader).expect("the leader");
    last.signal(libc::SIGKILL);
    last.exited().await;
    let at_kill = Instant::now();
    let stale_secs = stale_after(REFRESH).as_secs();
    let row = loop {
        let row = kubectl_row(cp, &ns).await;
        if row
            .get("SEEN")
            .and_then(|s| parse_age(s))
            .is_some_and(|age| age.as_secs() > stale_secs)
        {
            break row;
        }
        assert!(at_kill.elapsed() < DEADLINE, "SEEN stayed fresh: {row:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let aged = at_kill.elapsed();
    eprintln!("[{ns}] every replica dead: {aged:?} later `kubectl get rt` {row:?}");
    assert!(
        aged <= stale_after(REFRESH) + Duration::from_secs(3),
        "SEEN passed the stale age only {aged:?} after the last replica died"
    );
}
