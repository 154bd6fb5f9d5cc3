//! Two operators share a Lease; the leader dies by SIGKILL and the standby takes over.

use super::*;

/// The Lease in the failover test: renewed every 4 s, expires 6 s after the last renewal.
const FAILOVER_LEASE: (&str, &str) = ("6s", "2s");
/// Bound on kill -9 -> tunnels back on every proxy: the Lease may have just been renewed
/// (6 s), the standby waits up to 1 s before taking an expired Lease (kube-lease-manager's
/// random back-off), and the agent needs a few hundred ms per proxy; 5 s of slack on top.
const FAILOVER_BOUND: Duration = Duration::from_secs(11);

/// A status write seen by a watch: when, the phase, and PROXIES (`3/3`).
type StatusWrite = (Instant, Option<Phase>, String);

async fn lease_holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt(LEASE)
        .await
        .ok()
        .flatten()?
        .spec?
        .holder_identity
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_after_kill_9() {
    let _serial = SERIAL.lock().await;
    let (cp, client, ns, mut root) = setup("ha-failover", 3).await;
    let mut operators: BTreeMap<String, Process> = ["operator-a", "operator-b"]
        .into_iter()
        .map(|name| {
            let process = spawn_operator(cp, &ns, &root.logs, name, Some(Some(FAILOVER_LEASE)));
            (name.to_owned(), process)
        })
        .collect();
    apply_example(cp, &root).await;
    wait_kubectl_connected(cp, &ns, "3/3").await;
    let before = root.wait_all_hold().await;

    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let leader = eventually("a Lease holder", || lease_holder(&leases)).await;
    let standby = operators
        .keys()
        .find(|n| **n != leader)
        .expect("standby")
        .clone();
    let lease = leases.get(LEASE).await.expect("lease");
    eprintln!(
        "[{ns}] leader {leader}, standby {standby}; Lease {:?}",
        lease.spec
    );

    // Every write to the ReverseTunnel from here on, as it happens.
    let api: Api<ReverseTunnel> = Api::namespaced(client.clone(), &ns);
    let version = api
        .get(RT)
        .await
        .expect("get")
        .resource_version()
        .expect("rv");
    let writes: Arc<Mutex<Vec<StatusWrite>>> = Arc::default();
    let watcher = tokio::spawn({
        let (api, writes) = (api.clone(), writes.clone());
        async move {
            let mut events = api
                .watch(
                    &WatchParams::default().fields("metadata.name=to-root"),
                    &version,
                )
                .await
                .expect("watch")
                .boxed();
            while let Ok(Some(event)) = events.try_next().await {
                if let WatchEvent::Modified(rt) = event {
                    let status = rt.status.unwrap_or_default();
                    let ready = status.proxies_ready.unwrap_or_default();
                    writes
                        .lock()
                        .expect("lock")
                        .push((Instant::now(), status.phase, ready));
                }
            }
        }
    });

    let mut dead = operators.remove(&leader).expect("leader process");
    let renewed = leases
        .get(LEASE)
        .await
        .expect("lease")
        .spec
        .and_then(|s| s.renew_time)
        .expect("renewTime");
    let killed = Instant::now();
    dead.signal(libc::SIGKILL);
    let since_renewal = std::time::SystemTime::now()
        .duration_since(renewed.0.into())
        .unwrap_or_default();
    let old: BTreeSet<u64> = before.values().flatten().copied().collect();
    let (mut gone, mut took_lease, mut back) = (None, None, None);
    while back.is_none() || took_lease.is_none() {
        assert!(
            killed.elapsed() < DEADLINE,
            "no takeover after {DEADLINE:?}: lease {took_lease:?}, tunnels {:?}",
            root.tunnels()
        );
        let tunnels = root.tunnels();
        if gone.is_none() && tunnels.values().flatten().all(|t| !old.contains(t)) {
            gone = Some(killed.elapsed());
        }
        if took_lease.is_none() && lease_holder(&leases).await.as_deref() == Some(&standby) {
            took_lease = Some(killed.elapsed());
        }
        if back.is_none()
            && tunnels
                .values()
                .all(|t| t.len() == 1 && !old.contains(&t[0]))
        {
            back = Some(killed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (gone, took_lease, back) = (
        gone.expect("old tunnels gone before new ones are all there"),
        took_lease.expect("lease"),
        back.expect("back"),
    );
    wait_kubectl_connected(cp, &ns, "3/3").await;
    // The status the dead leader wrote last stays until the standby's first write; the
    // standby then writes Pending/Connecting before Connected 3/3.
    let reconnected = eventually("the standby's Connected 3/3 status", || {
        let writes = writes.lock().expect("lock").clone();
        async move {
            let connected = Some(Phase::Connected);
            let first_down = writes.iter().position(|(_, p, _)| *p != connected)?;
            writes[first_down..]
                .iter()
                .find(|(_, p, r)| *p == connected && r == "3/3")
                .map(|(at, _, _)| at.duration_since(killed))
        }
    })
    .await;
    watcher.abort();
    let history: Vec<String> = writes
        .lock()
        .expect("lock")
        .iter()
        .map(|(at, p, r)| format!("+{:?} {p:?} {r}", at.duration_since(killed)))
        .collect();
    eprintln!(
        "[{ns}] kill -9 {leader} (Lease {}/grace {}, last renewed {since_renewal:?} before \
         the kill): its tunnels closed after {gone:?}; \
         {standby} held the Lease after {took_lease:?}; tunnels back on all 3 proxies after \
         {back:?}; ReverseTunnel status Connected 3/3 again after {reconnected:?}; \
         status writes since the kill: {history:?}",
        FAILOVER_LEASE.0, FAILOVER_LEASE.1
    );
    assert!(
        back <= FAILOVER_BOUND,
        "failover took {back:?}, more than {FAILOVER_BOUND:?}"
    );
    assert!(reconnected <= FAILOVER_BOUND + Duration::from_secs(2));
    operators
        .get_mut(&standby)
        .expect("standby")
        .assert_running();
    dead.exited().await;
}
