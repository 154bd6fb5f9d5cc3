//! The root side as it runs in a cluster, against a real kube-apiserver: `tether proxy --ca
//! --kubernetes --peers-service` processes behind a real haproxy, their pods represented by
//! EndpointSlices the test controls. A leaf joins through the load balancer; every replica
//! trusts it (the one that served the join and the others, through the RemoteCluster), each
//! writes its own entry of the RemoteCluster's status, `kubectl get remoteclusters` shows who
//! holds the tunnels, and a replica killed with -9 has its entry removed by a survivor.
//!
//! And the root at rest (issue #12): with four leaves and three replicas, a quiet minute
//! costs no `RemoteCluster` write at all (counted by the API server's `apiserver_request_total`)
//! and no change of one (watched); a dead replica's entries go from every leaf; a leaf whose
//! agent is frozen (SIGSTOP) or killed turns Offline within its heartbeat timeout.
//!
//! The tests run one at a time ([`SERIAL`]): the quiet window reads cluster-wide counters.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, ListParams, PostParams, WatchEvent, WatchParams};
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;

use support::kube::api_writes::{since, total, write_counts};
use support::procs::Proc;
use support::procs::{agent_command, spawn_kube_proxy};
use support::tunnel_e2e::{
    crds_and_namespace, create_join_token, create_proxy_slices, eventually, leaf_1_pki_saved_in,
};
use tether::agent::Agent;
use tether::agent::join::{JoinRequest, join};
use tether::egress::allow_list::AllowList;
use tether::identity::{CertificateAuthority, Identity};
use tether::operator::crd::remote_cluster::Connection;
use tether::operator::crd::{RemoteCluster, RemoteClusterSpec};
use tether::protocol::ClusterName;

const SERVICE: &str = "tether-proxy-peers";
/// The proxies' (and agents') heartbeat interval; a tunnel silent for 3 is closed.
const HEARTBEAT: Duration = Duration::from_millis(500);

/// One test at a time (a tokio mutex: no poisoning when a test fails).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A root replica in Kubernetes mode (heartbeats every 500 ms), logging to `log`.
fn spawn_proxy(id: &str, ns: &str, ca: &Path, kubeconfig: &Path, log: &Path) -> (Proc, SocketAddr) {
    spawn_kube_proxy(id, ns, SERVICE, ca, kubeconfig, log)
}

/// Proxy IDs holding tunnels from `leaf`, per its RemoteCluster status.
async fn holders(remotes: &Api<RemoteCluster>, leaf: &str) -> Option<Vec<(String, u32)>> {
    let rc = remotes.get_opt(leaf).await.ok()??;
    Some(
        rc.status?
            .proxies
            .into_iter()
            .map(|p| (p.proxy_id, p.tunnels))
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_a_joined_leaf_and_each_reports_its_tunnels() {
    let _serial = SERIAL.lock().await;
    let (cp, client, ns) = crds_and_namespace("root-procs").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (pki, ca_path) = leaf_1_pki_saved_in(dir.path());

    let ids = ["proxy-a", "proxy-b"];
    create_proxy_slices(&client, &ns, SERVICE, &ids).await;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    let mut procs = Vec::new();
    let mut addrs = Vec::new();
    for id in ids {
        let log = dir.path().join(format!("{id}.log"));
        let (proc, addr) = spawn_proxy(id, &ns, &ca_path, cp.kubeconfig_path(), &log);
        procs.push(proc);
        addrs.push(addr);
    }
    let lb = support::haproxy::Haproxy::start("random", &addrs);

    // A leaf joins through the load balancer with a token from `tether join-token`'s Secret.
    let token = create_join_token(&client, &ns).await;
    let joined = join(&JoinRequest {
        root_address: lb.addr.to_string(),
        route: tether::transport::Route::direct(),
        token,
        leaf_cluster: pki.leaf.cluster().clone(),
        leaf_cas: vec![pki.leaf.public_key().clone()],
        root_ca_pin: Some(tether::identity::fingerprint(pki.root.public_key())),
        timeout: Duration::from_secs(20),
    })
    .await
    .expect("join through haproxy");

    // Its agent, trusting only what the join returned, gets a tunnel to both replicas: the one
    // that did not serve the join trusts the leaf through the RemoteCluster.
    let mut config = pki
        .agent_config(&lb.addr.to_string(), AllowList::default())
        .expect("agent config");
    config.root_cas = joined.root_cas;
    config.heartbeat_interval = Duration::from_millis(500);
    let agent = Arc::new(Agent::new(config));
    let stop = CancellationToken::new();
    tokio::spawn({
        let (agent, stop) = (agent.clone(), stop.clone());
        async move { agent.run(stop).await }
    });
    let remotes: Api<RemoteCluster> = Api::namespaced(client.clone(), &ns);
    let started = Instant::now();
    eventually("both replicas report one tunnel each", || async {
        let mut held = holders(&remotes, "leaf-1").await?;
        held.sort();
        (held == [("proxy-a".to_owned(), 1), ("proxy-b".to_owned(), 1)]).then_some(())
    })
    .await;
    eprintln!(
        "both replicas reported the leaf's tunnels {:?} after the join",
        started.elapsed()
    );

    // What an operator of the root sees: the summary columns follow the entries (written by
    // the lowest live replica).
    eventually("the summary: 2 tunnels", || async {
        let rc = remotes.get_opt("leaf-1").await.ok()??;
        (rc.status?.tunnels == Some(2)).then_some(())
    })
    .await;
    let out = cp.kubectl(["get", "remoteclusters", "-n", &ns, "--no-headers"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // NAME STATUS HELD-BY TUNNELS SINCE AGE
    let columns: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(
        columns[..4],
        ["leaf-1", "Online", "proxy-a,proxy-b", "2"],
        "{text}"
    );

    // proxy-b dies without cleaning up; its pod's endpoints go; proxy-a (lowest live ID)
    // removes its entry, and keeps its own.
    drop(procs.pop());
    slices
        .delete(&format!("{SERVICE}-proxy-b"), &DeleteParams::default())
        .await
        .expect("delete proxy-b's slice");
    eventually("proxy-b's entry removed", || async {
        let held = holders(&remotes, "leaf-1").await?;
        (held == [("proxy-a".to_owned(), 1)]).then_some(())
    })
    .await;
    eventually("the summary without proxy-b", || async {
        let status = remotes.get_opt("leaf-1").await.ok()??.status?;
        (status.held_by.as_deref() == Some("proxy-a") && status.tunnels == Some(1)).then_some(())
    })
    .await;
    stop.cancel();
}

/// The quiet window: the minute issue #12 asks for. The root has no timer that writes: a replica
/// looks at its sites every 10 s (for tunnels that went silent) and writes only what changed,
/// so six such passes per replica, with four leaves each; the write storm of issue #12 wrote 27
/// times a second.
const QUIET: Duration = Duration::from_secs(60);
/// How often a replica looks at its sites without a change notice (`holdings::RECHECK`).
const RECHECK: Duration = Duration::from_secs(10);

/// `tether agent` for leaf `name` through `lb`, as its own process (so that it can be frozen
/// or killed), with an identity signed by `ca`.
fn spawn_agent(dir: &Path, name: &str, ca: &CertificateAuthority, lb: SocketAddr) -> Proc {
    let key = dir.join(format!("{name}-agent"));
    Identity::generate_agent(ca, Duration::from_secs(3600))
        .expect("agent identity")
        .save(&key)
        .expect("save the agent identity");
    let mut cmd = agent_command(name, &lb.to_string(), &key, &dir.join("root-ca.pub"));
    cmd.args(["--heartbeat-interval", "500ms"])
        .env("RUST_LOG", "info");
    Proc::logged(name, &mut cmd, dir.join(format!("{name}.log"))).expect("tether agent starts")
}

/// What `kubectl get remoteclusters` would show of `leaf`: its summary (connection, held by,
/// tunnels) and its entries (replica, tunnels, connection), sorted.
type View = (
    Option<Connection>,
    Option<String>,
    Option<u32>,
    Vec<(String, u32, Connection)>,
);

async fn view(remotes: &Api<RemoteCluster>, leaf: &str) -> Option<View> {
    let status = remotes.get_opt(leaf).await.ok()??.status?;
    let mut entries: Vec<(String, u32, Connection)> = status
        .proxies
        .into_iter()
        .map(|p| (p.proxy_id, p.tunnels, p.connection))
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Some((status.connection, status.held_by, status.tunnels, entries))
}

/// The view of a leaf held, Online, by one tunnel on each of `ids`.
fn held_by(ids: &[&str]) -> View {
    (
        Some(Connection::Online),
        Some(ids.join(",")),
        Some(u32::try_from(ids.len()).expect("few")),
        ids.iter()
            .map(|id| ((*id).to_owned(), 1, Connection::Online))
            .collect(),
    )
}

/// Waits until every leaf in `leaves` shows `want`; how long that took.
async fn wait_views(remotes: &Api<RemoteCluster>, leaves: &[&str], want: &View, what: &str) {
    eventually(what, || async {
        for leaf in leaves {
            if view(remotes, leaf).await.as_ref() != Some(want) {
                return None;
            }
        }
        Some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_root_writes_nothing_and_its_status_tells_the_truth() {
    let _serial = SERIAL.lock().await;
    let (cp, client, ns) = crds_and_namespace("root-quiet").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let root_ca =
        CertificateAuthority::generate(ClusterName::new("root").expect("name")).expect("root CA");
    let ca_path = dir.path().join("root-ca");
    root_ca.save(&ca_path).expect("save the root CA");
    std::fs::write(
        dir.path().join("root-ca.pub"),
        root_ca.public_key().to_openssh().expect("encode"),
    )
    .expect("write root-ca.pub");

    // Three replicas behind haproxy, their pods' endpoints ready.
    let ids = ["proxy-a", "proxy-b", "proxy-c"];
    create_proxy_slices(&client, &ns, SERVICE, &ids).await;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    let mut proxies = BTreeMap::new();
    let mut addrs = Vec::new();
    for id in &ids {
        let log = dir.path().join(format!("{id}.log"));
        let (proc, addr) = spawn_proxy(id, &ns, &ca_path, cp.kubeconfig_path(), &log);
        proxies.insert(*id, proc);
        addrs.push(addr);
    }
    let lb = support::haproxy::Haproxy::start("random", &addrs);

    // Four leaves, each a RemoteCluster (as a join leaves it) and an agent process.
    let remotes: Api<RemoteCluster> = Api::namespaced(client.clone(), &ns);
    let leaves = ["leaf-1", "leaf-2", "leaf-3", "leaf-4"];
    let mut agents = Vec::new();
    for leaf in leaves {
        let ca =
            CertificateAuthority::generate(ClusterName::new(leaf).expect("name")).expect("leaf CA");
        let rc = RemoteCluster::new(
            leaf,
            RemoteClusterSpec {
                ca_keys: vec![ca.public_key().to_openssh().expect("encode")],
                join_token: None,
            },
        );
        remotes
            .create(&PostParams::default(), &rc)
            .await
            .expect("RemoteCluster");
        agents.push(spawn_agent(dir.path(), leaf, &ca, lb.addr));
    }
    wait_views(
        &remotes,
        &leaves,
        &held_by(&ids),
        "every leaf held by the three replicas",
    )
    .await;

    // The quiet window: the API server counts every write, a watch sees every change.
    let version = remotes
        .list_metadata(&ListParams::default())
        .await
        .expect("list RemoteClusters")
        .metadata
        .resource_version
        .expect("rv");
    let changes: Arc<Mutex<Vec<String>>> = Arc::default();
    let watch = tokio::spawn({
        let (remotes, changes) = (remotes.clone(), changes.clone());
        async move {
            let mut stream = remotes
                .watch(&WatchParams::default(), &version)
                .await
                .expect("watch RemoteClusters")
                .boxed();
            while let Ok(Some(event)) = stream.try_next().await {
                let seen = match event {
                    WatchEvent::Added(rc) | WatchEvent::Modified(rc) | WatchEvent::Deleted(rc) => {
                        format!("{}: {:?}", rc.name_any(), rc.status)
                    }
                    WatchEvent::Bookmark(_) => continue,
                    WatchEvent::Error(e) => format!("watch error: {e}"),
                };
                changes.lock().expect("lock").push(seen);
            }
        }
    });
    let before = write_counts(&client).await;
    let started = Instant::now();
    tokio::time::sleep(QUIET).await;
    let after = write_counts(&client).await;
    let window = started.elapsed();
    // A write made just before the scrape may reach the watch a moment later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    watch.abort();
    let writes = since(&before, &after);
    let changes = changes.lock().expect("lock").clone();
    // The counters do see RemoteCluster status writes: the replicas' entries got there so.
    assert!(
        total(&before, "remoteclusters/status") > 0.0,
        "no RemoteCluster status write counted ever: {before:?}"
    );
    eprintln!(
        "[{ns}] API writes in a quiet {window:?}, 3 replicas, {} leaves \
         (apiserver_request_total, resource VERB code: count): {writes:?}",
        leaves.len()
    );
    for proc in proxies.values_mut() {
        assert!(
            proc.running(),
            "a proxy exited; logs in {}",
            dir.path().display()
        );
    }
    assert_eq!(
        total(&writes, "remoteclusters"),
        0.0,
        "RemoteCluster writes at rest: {writes:?}"
    );
    assert!(
        changes.is_empty(),
        "RemoteClusters changed at rest: {changes:#?}"
    );
    // The API server renews its own Lease; nothing else writes.
    let others: Vec<&String> = writes
        .keys()
        .filter(|k| !k.starts_with("leases "))
        .collect();
    assert!(others.is_empty(), "writes at rest: {writes:?}");

    // A replica dies (kill -9) and its pod's endpoint goes: a survivor removes its entries
    // from every leaf, and the summaries follow.
    drop(proxies.remove("proxy-c"));
    slices
        .delete(&format!("{SERVICE}-proxy-c"), &DeleteParams::default())
        .await
        .expect("delete proxy-c's slice");
    let died = Instant::now();
    wait_views(
        &remotes,
        &leaves,
        &held_by(&ids[..2]),
        "proxy-c's entries removed from every leaf",
    )
    .await;
    eprintln!(
        "[{ns}] a dead replica's entries left all {} leaves {:?} after its endpoint went",
        leaves.len(),
        died.elapsed()
    );

    // leaf-4's agent freezes (SIGSTOP: its sockets stay open), leaf-3's is killed: both turn
    // Offline, held by nobody, within the heartbeat timeout (and at most one recheck); the
    // others stay as they were.
    agents[3].signal(libc::SIGSTOP).expect("SIGSTOP");
    agents[2].signal(libc::SIGKILL).expect("SIGKILL");
    let stopped = Instant::now();
    let offline: View = (Some(Connection::Offline), None, Some(0), Vec::new());
    wait_views(
        &remotes,
        &leaves[2..],
        &offline,
        "leaf-3 and leaf-4 Offline",
    )
    .await;
    let took = stopped.elapsed();
    eprintln!("[{ns}] a frozen and a killed leaf showed Offline after {took:?}");
    assert!(
        took < 3 * HEARTBEAT + RECHECK,
        "Offline only after {took:?}"
    );
    wait_views(
        &remotes,
        &leaves[..2],
        &held_by(&ids[..2]),
        "leaf-1 and leaf-2 held",
    )
    .await;
    let out = cp.kubectl(["get", "remoteclusters", "-n", &ns, "--no-headers"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines() {
        let columns: Vec<&str> = line.split_whitespace().collect();
        let want = if ["leaf-3", "leaf-4"].contains(&columns[0]) {
            "Offline"
        } else {
            "Online"
        };
        assert_eq!(columns.get(1), Some(&want), "{text}");
    }
    assert_eq!(text.lines().count(), leaves.len(), "{text}");
}
