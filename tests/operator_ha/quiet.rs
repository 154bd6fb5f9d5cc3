//! The leaf at rest, with two operator replicas. Over a quiet minute a Connected
//! ReverseTunnel costs the Lease renewals (the leader Lease and each replica's own, whatever the
//! number of tunnels) and at most one status write per refresh: the leader's `observedAt` stamp
//! behind `kubectl get rt`'s `SEEN` column. Neither replica rewrites its own entry of
//! `status.replicas` while it does not change: their Leases say they live. When every replica
//! dies (kill -9), nothing can say so, and `SEEN` says it instead: within a minute it passes a
//! minute, while the rest of the row still shows the dead operators' last word.

use super::failover::wait_connected_by_two;
use super::*;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
use support::kube::api_writes::{since, total, write_counts};
use tether::operator::crd::ReverseTunnelStatus;
use tether::operator::liveness::lease_name;
use tether::operator::stamps::{SEEN_REFRESH, stale_after};

/// The quiet window: a minute, and long enough to hold at least one `observedAt` stamp (they
/// come every `SEEN_REFRESH` and a second).
const QUIET: Duration = SEEN_REFRESH.saturating_add(Duration::from_secs(5));
/// `tether operator`'s default Lease: 15 s, renewed 5 s before expiry, so every 10 s.
const RENEWAL: Duration = Duration::from_secs(10);
/// The two replicas.
const REPLICAS: [&str; 2] = ["operator-q1", "operator-q2"];
/// The oldest `SEEN` a live operator shows: the refresh and its jitter, the second the stamp
/// drops, and a loaded machine's lateness in writing.
fn fresh() -> Duration {
    stale_after(SEEN_REFRESH)
}

/// A status without what moves on its own (the stamp, heartbeat times).
fn settled(status: Option<&ReverseTunnelStatus>) -> Option<ReverseTunnelStatus> {
    let mut s = status?.clone();
    s.observed_at = None;
    s.last_heartbeat = None;
    for p in &mut s.proxies {
        p.last_heartbeat = None;
    }
    Some(s)
}

fn stamp(rt: &ReverseTunnel) -> std::time::SystemTime {
    let text = rt.status.as_ref().and_then(|s| s.observed_at.as_deref());
    humantime::parse_rfc3339(text.expect("observedAt")).expect("RFC 3339 observedAt")
}

/// The field managers of the object's status, with the time of each one's last write.
fn status_writers(rt: &ReverseTunnel) -> BTreeMap<String, String> {
    rt.metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m: &&ManagedFieldsEntry| m.subresource.as_deref() == Some("status"))
        .map(|m| {
            let time = m.time.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
            (m.manager.clone().unwrap_or_default(), time)
        })
        .collect()
}

/// `kubectl`'s age (`45s`, `2m5s`, `7m`, `3h`, `2d`) as a duration.
pub(crate) fn parse_age(age: &str) -> Option<Duration> {
    let mut total = 0u64;
    let mut number = String::new();
    for c in age.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: u64 = std::mem::take(&mut number).parse().ok()?;
        total += n * match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            'y' => 365 * 86400,
            _ => return None,
        };
    }
    number.is_empty().then_some(Duration::from_secs(total))
}

/// STATUS, PROXIES and SEEN of the example's row in `kubectl get rt`.
async fn row(cp: &'static ControlPlane, ns: &str) -> Option<(String, String, Duration)> {
    let table = kubectl(cp, args(&["get", "rt", "-n", ns])).await;
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next()?.split_whitespace().collect();
    let col = |name: &str| header.iter().position(|c| *c == name);
    let (status, proxies, seen) = (col("STATUS")?, col("PROXIES")?, col("SEEN")?);
    let row: Vec<&str> = lines
        .find(|l| l.split_whitespace().next() == Some(RT))?
        .split_whitespace()
        .collect();
    Some((
        row.get(status)?.to_string(),
        row.get(proxies)?.to_string(),
        parse_age(row.get(seen)?)?,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_state_is_quiet() {
    let _serial = SERIAL.lock().await;
    let (cp, client, ns, mut root) = setup("ha-quiet", 3).await;
    let mut operators: Vec<Process> = REPLICAS
        .iter()
        .map(|name| spawn_operator(cp, &ns, &root.logs, name, Some(None)))
        .collect();
    apply_example(cp, &root).await;
    wait_connected_by_two(cp, &ns).await;
    let tunnels = root.wait_each_holds(2).await;
    // The Connected Event is the last write of the connection.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    eventually("the Connected Event", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("Connected"))
            .then_some(())
    })
    .await;

    // Every Lease write in the cluster during the window, by Lease.
    let leases: Api<Lease> = Api::all(client.clone());
    let version = leases
        .list_metadata(&ListParams::default())
        .await
        .expect("list leases")
        .metadata
        .resource_version
        .expect("rv");
    let renewals: Arc<Mutex<BTreeMap<String, u32>>> = Arc::default();
    let lease_watch = tokio::spawn({
        let renewals = renewals.clone();
        async move {
            let mut stream = leases
                .watch(&WatchParams::default(), &version)
                .await
                .expect("watch leases")
                .boxed();
            while let Ok(Some(event)) = stream.try_next().await {
                if let WatchEvent::Added(l) | WatchEvent::Modified(l) = event {
                    let name = format!("{}/{}", l.namespace().unwrap_or_default(), l.name_any());
                    *renewals.lock().expect("lock").entry(name).or_default() += 1;
                }
            }
        }
    });
    let before = write_counts(&client).await;
    // Every change of the ReverseTunnel during the window.
    let rts: Api<ReverseTunnel> = Api::namespaced(client.clone(), &ns);
    let first = rts.get(RT).await.expect("the ReverseTunnel");
    let rt_version = first.resource_version().expect("rv");
    let changes: Arc<Mutex<Vec<ReverseTunnel>>> = Arc::default();
    let rt_watch = tokio::spawn({
        let (rts, changes) = (rts.clone(), changes.clone());
        async move {
            let mut stream = rts
                .watch(&WatchParams::default(), &rt_version)
                .await
                .expect("watch reversetunnels")
                .boxed();
            while let Ok(Some(event)) = stream.try_next().await {
                if let WatchEvent::Added(rt) | WatchEvent::Modified(rt) = event {
                    changes.lock().expect("lock").push(rt);
                }
            }
        }
    });

    let started = Instant::now();
    tokio::time::sleep(QUIET).await;
    let after = write_counts(&client).await;
    let window = started.elapsed();
    // A write made just before the scrape may reach a watch a moment later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    lease_watch.abort();
    rt_watch.abort();
    for operator in &mut operators {
        operator.assert_running();
    }

    let writes = since(&before, &after);
    // The counters do see ReverseTunnel status writes: the Connected status got there so.
    assert!(
        total(&before, "reversetunnels/status") > 0.0,
        "no ReverseTunnel status write counted ever: {before:?}"
    );
    let renewals = renewals.lock().expect("lock").clone();
    let changes = changes.lock().expect("lock").clone();
    // The window held a stamp: the leader confirms the status while nothing changes.
    assert!(!changes.is_empty(), "no observedAt stamp in {window:?}");
    eprintln!(
        "[{ns}] API writes in a quiet {window:?} with a Connected ReverseTunnel and two \
         replicas (apiserver_request_total, resource VERB code: count): {writes:?}"
    );
    eprintln!("[{ns}] Lease writes seen by a watch, by Lease: {renewals:?}");
    let others: Vec<&String> = writes
        .keys()
        .filter(|k| !k.starts_with("leases ") && !k.starts_with("reversetunnels/status "))
        .collect();
    assert!(
        others.is_empty(),
        "writes besides Lease renewals and status stamps: {writes:?}"
    );
    assert_eq!(total(&writes, "events"), 0.0, "Event writes: {writes:?}");
    // No replica wrote its entry: the entries are as they were, stamps included, and the
    // replicas' field managers last wrote before the window. Every change is the leader's
    // stamp of an unchanged summary.
    let entries_before = first.status.as_ref().map(|s| s.replicas.clone());
    let writers_before = status_writers(&first);
    let replica_managers: Vec<String> = writers_before
        .keys()
        .filter(|m| m.starts_with("tether-operator-"))
        .cloned()
        .collect();
    assert_eq!(
        replica_managers.len(),
        REPLICAS.len(),
        "one field manager per replica's entry: {writers_before:?}"
    );
    let mut stamps = vec![stamp(&first)];
    for rt in &changes {
        assert_eq!(
            rt.status.as_ref().map(|s| s.replicas.clone()),
            entries_before,
            "a replica rewrote its entry at rest"
        );
        assert_eq!(
            settled(rt.status.as_ref()),
            settled(first.status.as_ref()),
            "the status changed in the quiet minute"
        );
        let writers = status_writers(rt);
        for manager in &replica_managers {
            assert_eq!(
                writers.get(manager),
                writers_before.get(manager),
                "{manager} wrote at rest: {writers:?}"
            );
        }
        stamps.push(stamp(rt));
    }
    // The first stamp after the Connected write may come sooner: it moves the stamps onto
    // the tunnel's own second of the minute (`refresh_slot` in `status.rs`); from then on they
    // are a refresh apart, so at most one per ReverseTunnel per refresh whatever the number of
    // replicas. None comes later than a refresh and the second a stamp drops.
    for (i, pair) in stamps.windows(2).enumerate() {
        let gap = pair[1].duration_since(pair[0]).unwrap_or_default();
        assert!(
            (i == 0 || gap >= SEEN_REFRESH) && gap <= SEEN_REFRESH + Duration::from_secs(1),
            "restamped after {gap:?}: {stamps:?}"
        );
    }
    // Every ReverseTunnel write counted was one the watch saw (none rewrote a status as it
    // was, which would change nothing and so go unseen). (A stamp at an edge of the window,
    // between a scrape and the watch's start or end, may be counted and not seen or the
    // reverse: one at most, stamps being a minute apart.)
    let counted = total(&writes, "reversetunnels");
    assert!(
        (counted - changes.len() as f64).abs() <= 1.0,
        "ReverseTunnel writes {writes:?}, changes seen {}",
        changes.len()
    );
    eprintln!(
        "[{ns}] ReverseTunnel status writes in {window:?}: {} counted, {} seen, stamps {:?}",
        counted as u64,
        changes.len(),
        stamps
            .iter()
            .map(|t| humantime::format_rfc3339_seconds(*t).to_string())
            .collect::<Vec<_>>()
    );
    // The Leases: the leader's and each replica's own, each renewed once a period, no more.
    let ours: Vec<String> = std::iter::once(LEASE.to_owned())
        .chain(REPLICAS.iter().map(|r| lease_name(LEASE, r)))
        .collect();
    let most = (window.as_secs_f64() / RENEWAL.as_secs_f64()).round() as u32 + 1;
    for lease in &ours {
        let n = renewals.get(&format!("{ns}/{lease}")).copied().unwrap_or(0);
        eprintln!("[{ns}] Lease {lease} renewed {n} times in {window:?} (one per {RENEWAL:?})");
        assert!(
            n >= 1 && n <= most,
            "{n} renewals of {lease} in {window:?}, at most {most} expected"
        );
    }
    let theirs: Vec<&String> = renewals
        .keys()
        .filter(|k| k.starts_with(&format!("{ns}/")))
        .filter(|k| !ours.iter().any(|l| **k == format!("{ns}/{l}")))
        .collect();
    assert!(
        theirs.is_empty(),
        "other Leases written in {ns}: {theirs:?}"
    );
    // Every Lease write the API server counted is one of the renewals the watch saw.
    let lease_writes = total(&writes, "leases");
    let seen: u32 = renewals.values().sum();
    assert!(
        lease_writes <= f64::from(seen),
        "{lease_writes} Lease writes counted, {seen} seen: {renewals:?}"
    );
    assert_eq!(
        root.tunnels(),
        tunnels,
        "tunnels changed in the quiet minute"
    );

    // While an operator lives, SEEN stays within the refresh; once all are gone, SEEN passes it
    // within a refresh (the rest of the row cannot change: nobody is left to write it).
    let (_, _, seen_alive) = row(cp, &ns).await.expect("a row with SEEN");
    assert!(
        seen_alive <= fresh(),
        "SEEN {seen_alive:?} with live operators"
    );
    for operator in &mut operators {
        operator.signal(libc::SIGKILL);
        operator.exited().await;
    }
    let killed = Instant::now();
    let deadline = fresh() + Duration::from_secs(10);
    let stale = loop {
        let now = row(cp, &ns).await;
        if let Some((status, proxies, seen)) = &now
            && *seen > fresh()
        {
            break (status.clone(), proxies.clone(), *seen);
        }
        assert!(
            killed.elapsed() < deadline,
            "SEEN still {now:?} {:?} after the operators died",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!(
        "[{ns}] {:?} after kill -9 of both replicas, kubectl get rt: {stale:?} (SEEN past {:?})",
        killed.elapsed(),
        fresh()
    );
    assert!(killed.elapsed() <= fresh() + Duration::from_secs(5));
}
