//! `kubectl get rt` with two replicas: each replica's entry in `status.replicas`, the union in
//! `PROXIES` and the count in `REPLICAS`; a dead replica's entry stops counting once its stamp
//! is stale, and once the last replica is dead `SEEN` passes the stale age.

use super::failover::{REFRESH, carried_by_two, lease_holder};
use super::quiet::parse_age;
use super::*;
use tether::operator::crd::reverse_tunnel::ProxyState;
use tether::operator::status::stale_after;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_shows_each_replica_until_it_dies() {
    let _serial = SERIAL.lock().await;
    let (cp, client, ns, _root, mut operators, _echo) = carried_by_two("ha-status").await;
    let api: Api<ReverseTunnel> = Api::namespaced(client.clone(), &ns);
    let row = kubectl_row(cp, &ns).await;
    eprintln!("[{ns}] kubectl get rt: {row:?}");
    // Each replica's own entry: its name, its three tunnels.
    let status = api.get(RT).await.expect("get").status.expect("status");
    let mut names: Vec<&str> = status.replicas.iter().map(|e| e.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["operator-a", "operator-b"], "{status:?}");
    for entry in &status.replicas {
        assert_eq!(entry.phase, Phase::Connected, "{entry:?}");
        let up: Vec<&str> = entry
            .proxies
            .iter()
            .filter(|p| p.state == ProxyState::Connected)
            .map(|p| p.id.as_str())
            .collect();
        assert_eq!(up, ["p1", "p2", "p3"], "{entry:?}");
        assert!(entry.observed_at.is_some());
    }
    // kill -9 the replica that does not lead: its entry stops counting once stale.
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let leader = eventually("a Lease holder", || lease_holder(&leases)).await;
    let other = operators
        .keys()
        .find(|n| **n != leader)
        .expect("the other replica")
        .clone();
    let mut dead = operators.remove(&other).expect("process");
    let killed = Instant::now();
    dead.signal(libc::SIGKILL);
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
    let uncounted = killed.elapsed();
    let entries = eventually("the dead replica's entry removed", || async {
        let rt = api.get(RT).await.ok()?;
        let names: Vec<String> = rt.status?.replicas.iter().map(|e| e.name.clone()).collect();
        (names == [leader.clone()]).then_some(names)
    })
    .await;
    eprintln!(
        "[{ns}] kill -9 {other}: `kubectl get rt` {row:?} after {uncounted:?} (stale age \
         {:?}); entries {entries:?} after {:?}",
        stale_after(REFRESH),
        killed.elapsed()
    );
    assert!(
        uncounted <= stale_after(REFRESH) + Duration::from_secs(3),
        "the dead replica counted for {uncounted:?}"
    );
    // The last replica dies: nothing can write, and SEEN passes the stale age instead.
    let mut last = operators.remove(&leader).expect("the leader");
    last.signal(libc::SIGKILL);
    last.exited().await;
    let killed = Instant::now();
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
        assert!(killed.elapsed() < DEADLINE, "SEEN stayed fresh: {row:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let aged = killed.elapsed();
    eprintln!("[{ns}] both replicas dead: {aged:?} later `kubectl get rt` {row:?}");
    assert!(
        aged <= stale_after(REFRESH) + Duration::from_secs(2),
        "SEEN passed the stale age only {aged:?} after the last replica died"
    );
    dead.exited().await;
}
