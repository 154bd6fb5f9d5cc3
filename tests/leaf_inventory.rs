//! The root remembers each leaf (issue #19), with every part a real process against a real
//! kube-apiserver: two `tether proxy --kubernetes` replicas behind haproxy, the leaf's
//! `tether operator` running the example ReverseTunnel, and a dial load through them.
//!
//! - `kubectl get remoteclusters -o wide` shows the leaf's Tether and Kubernetes versions and
//!   what the root may reach there, Live, while no dial of the load fails;
//! - once the leaf's operator is gone, the same view stays, Cached, with when it turned;
//! - a dial the cached allow-list forbids is refused at the root (the leaf has no tunnel left,
//!   so nothing else could refuse it), and one it permits finds the leaf offline;
//! - a leaf away longer than `--stale-leaf-after` reads Stale, and with
//!   `--remove-stale-leaves` its RemoteCluster goes, and its trust with it (in-process
//!   proxies here: the policy is the status writer's, the same code as in the process).

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use support::procs::{Proc, operator_command, spawn_kube_proxy};
use support::tunnel_e2e::{
    crds_and_namespace, create_proxy_slices, create_secrets, eventually, example, grant_dial,
    leaf_1_pki_saved_in,
};
use tether::agent::Agent;
use tether::client::{ClientError, DialClient, DialClientConfig};
use tether::demo::Pki;
use tether::demo::echo_server;
use tether::egress::allow_list::AllowList;
use tether::identity::Identity;
use tether::identity::TrustStore;
use tether::operator::crd::remote_cluster::{Connection, InventoryState, RemoteClusterStatus};
use tether::operator::crd::{RemoteCluster, RemoteClusterSpec};
use tether::operator::root::{self, summary::StalePolicy};
use tether::protocol::{ClusterName, DialErrorKind, ProtocolVersion, Target};
use tether::proxy::ProxyServer;

const SERVICE: &str = "tether-proxy-peers";

/// `kubectl get remoteclusters -o wide`'s row of leaf-1, by column (NAME STATUS HELD BY
/// TUNNELS SINCE AGE VERSION KUBERNETES ALLOWED INVENTORY CONFIRMED), cut where the header
/// puts each column (an empty cell, like HELD BY of an offline leaf, prints as nothing).
fn wide_row(cp: &support::kube::ControlPlane, ns: &str) -> BTreeMap<String, String> {
    let out = cp.kubectl(["get", "remoteclusters", "-n", ns, "-o", "wide"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let Some(header) = lines.next() else {
        return BTreeMap::new();
    };
    let Some(row) = lines.find(|l| l.starts_with("leaf-1 ")) else {
        return BTreeMap::new();
    };
    let mut starts: Vec<(usize, &str)> = Vec::new();
    let mut rest = header;
    while let Some(at) = rest.find(|c: char| c != ' ') {
        let offset = header.len() - rest.len() + at;
        let name_end = rest[at..].find("  ").map_or(rest.len(), |e| at + e);
        starts.push((offset, rest[at..name_end].trim()));
        rest = &rest[name_end..];
    }
    starts
        .iter()
        .enumerate()
        .map(|(i, (start, name))| {
            let end = starts
                .get(i + 1)
                .map_or(row.len(), |(s, _)| *s)
                .min(row.len());
            let cell = row.get(*start..end).unwrap_or("").trim();
            ((*name).to_owned(), cell.to_owned())
        })
        .collect()
}

/// The columns of a row that say what the leaf is and allows.
fn what(row: &BTreeMap<String, String>) -> [String; 3] {
    ["VERSION", "KUBERNETES", "ALLOWED"].map(|c| row.get(c).cloned().unwrap_or_default())
}

/// One dial of `target` through `client`, and an echo through it.
async fn echo_once(client: &DialClient, target: &Target) -> Result<(), ClientError> {
    let mut stream = client.open(target, "127.0.0.1:1").await?;
    stream.write_all(b"ping").await.map_err(io)?;
    let mut back = [0u8; 4];
    stream.read_exact(&mut back).await.map_err(io)?;
    assert_eq!(&back, b"ping");
    Ok(())
}

fn io(e: std::io::Error) -> ClientError {
    ClientError::Ssh(russh::Error::IO(e))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_shows_a_leafs_inventory_and_keeps_it_while_the_leaf_is_away() {
    let (cp, client, ns) = crds_and_namespace("inventory").await;
    // Logs stay in the control plane's run directory, kept for a failed test.
    let dir = cp.dir().join(format!("inventory-{ns}"));
    std::fs::create_dir_all(&dir).expect("log dir");
    eprintln!("process logs in {}", dir.display());
    let (pki, ca_path) = leaf_1_pki_saved_in(dir.as_path());

    // The root: two replicas behind haproxy, trusting leaf-1 through its RemoteCluster.
    let ids = ["proxy-a", "proxy-b"];
    create_proxy_slices(&client, &ns, SERVICE, &ids).await;
    let mut proxies = Vec::new();
    let mut addrs = Vec::new();
    for id in ids {
        let log = dir.join(format!("{id}.log"));
        let (proc, addr) = spawn_kube_proxy(id, &ns, SERVICE, &ca_path, cp.kubeconfig_path(), &log);
        proxies.push(proc);
        addrs.push(addr);
    }
    let lb = support::haproxy::Haproxy::start("roundrobin", &addrs);
    let remotes: Api<RemoteCluster> = Api::namespaced(client.clone(), &ns);
    let leaf_ca = pki
        .leaf
        .public_key()
        .to_openssh()
        .expect("encoding the leaf CA");
    remotes
        .create(
            &PostParams::default(),
            &RemoteCluster::new(
                "leaf-1",
                RemoteClusterSpec {
                    ca_keys: vec![leaf_ca],
                    join_token: None,
                },
            ),
        )
        .await
        .expect("creating the RemoteCluster");

    // The leaf: its operator, in a namespace of its own, runs the example ReverseTunnel.
    let leaf_ns = format!("{ns}-leaf");
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": leaf_ns}}))
                .expect("namespace"),
        )
        .await
        .expect("creating the leaf's namespace");
    create_secrets(&client, &leaf_ns, &pki).await;
    let echo = echo_server().await.expect("echo");
    let rule = format!("127.0.0.1:{}", echo.port());
    let mut rt = example(&lb.addr.to_string(), std::slice::from_ref(&rule));
    rt["metadata"]["namespace"] = serde_json::json!(leaf_ns);
    let gvk = GroupVersionKind::gvk("tether.dev", "v1alpha1", "ReverseTunnel");
    let rts: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &leaf_ns, &ApiResource::from_gvk(&gvk));
    rts.create(
        &PostParams::default(),
        &serde_json::from_value(rt).expect("example"),
    )
    .await
    .expect("creating the ReverseTunnel");
    let operator = Proc::logged(
        "leaf-operator",
        operator_command(cp.kubeconfig_path(), &leaf_ns, "leaf-operator-0").env("RUST_LOG", "info"),
        dir.as_path().join("leaf-operator.log"),
    )
    .expect("tether operator starts");

    // A dial load from the root's side, through haproxy, for the whole test, by a client the
    // root's RBAC lets dial the leaf.
    grant_dial(&client, &ns, "alice", "leaf-1").await;
    let client_identity = Identity::generate_client(&pki.root, "alice", Duration::from_secs(3600))
        .expect("client identity");
    let dialer = DialClient::connect(&DialClientConfig {
        proxy_addr: lb.addr.to_string(),
        route: tether::transport::Route::direct(),
        root_cluster: pki.root.cluster().clone(),
        root_cas: vec![pki.root.public_key().clone()],
        identity: Arc::new(client_identity),
        timeout: Duration::from_secs(10),
    })
    .await
    .expect("client connects");
    let dialer = Arc::new(dialer);
    let permitted = Target::from_name("127.0.0.1.leaf-1.tether", echo.port()).expect("target");
    eventually("a first dial through the leaf", || async {
        echo_once(&dialer, &permitted).await.ok()
    })
    .await;
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load_stop = CancellationToken::new();
    let load = tokio::spawn({
        let (dialer, target) = (dialer.clone(), permitted.clone());
        let (ok, failed, stop) = (ok.clone(), failed.clone(), load_stop.clone());
        async move {
            while !stop.is_cancelled() {
                match echo_once(&dialer, &target).await {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("a dial of the load failed: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }
    });

    // `kubectl get remoteclusters -o wide`: versions and allowed targets, Live.
    let kubernetes = client
        .apiserver_version()
        .await
        .expect("version")
        .git_version;
    let version = env!("CARGO_PKG_VERSION");
    let live = eventually("the inventory in kubectl's wide view", || async {
        let row = wide_row(cp, &ns);
        (row.get("STATUS")? == "Online" && row.get("INVENTORY")? == "Live").then_some(row)
    })
    .await;
    assert_eq!(
        what(&live),
        [version, kubernetes.as_str(), rule.as_str()],
        "{live:?}"
    );
    let rc = remotes.get("leaf-1").await.expect("RemoteCluster");
    let inventory = rc.status.and_then(|s| s.inventory).expect("inventory");
    assert_eq!(inventory.agents.len(), 1, "{inventory:?}");
    assert_eq!(inventory.agents[0].replica, "leaf-operator-0");
    // The root keys the leaf trusts: what a root CA rotation waits on before new certificates.
    assert_eq!(
        inventory.agents[0].root_keys,
        [tether::identity::fingerprint(pki.root.public_key())]
    );
    assert_eq!(
        inventory.agents[0].protocol_version,
        ProtocolVersion::CURRENT.to_string()
    );

    // The load ran through the reports, the status writes and the root's own refusals.
    eventually("the load to make progress", || async {
        (ok.load(Ordering::Relaxed) >= 20).then_some(())
    })
    .await;
    load_stop.cancel();
    load.await.expect("the load task");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "dials of the load failed"
    );

    // The leaf goes away (its operator stops; its agents leave): the same view, Cached.
    operator.signal(libc::SIGTERM).expect("SIGTERM");
    let cached = eventually("the inventory cached", || async {
        let row = wide_row(cp, &ns);
        (row.get("STATUS")? == "Offline" && row.get("INVENTORY")? == "Cached").then_some(row)
    })
    .await;
    assert_eq!(what(&cached), what(&live), "{cached:?}");
    assert!(!cached["CONFIRMED"].is_empty(), "{cached:?}");
    let rc = remotes.get("leaf-1").await.expect("RemoteCluster");
    let inventory = rc.status.and_then(|s| s.inventory).expect("inventory");
    assert_eq!(inventory.state, InventoryState::Cached);
    assert!(humantime::parse_rfc3339(&inventory.confirmed_at).is_ok());

    // Refused at the root: no tunnel is left to ask, and the cached list forbids it.
    let forbidden = Target::from_name("127.0.0.1.leaf-1.tether", 1).expect("target");
    for _ in 0..5 {
        let started = Instant::now();
        match dialer.open(&forbidden, "127.0.0.1:1").await {
            Err(ClientError::Dial { kind, .. }) => {
                assert_eq!(kind, DialErrorKind::Forbidden);
            }
            other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
        }
        eprintln!("refused at the root in {:?}", started.elapsed());
    }
    match dialer.open(&permitted, "127.0.0.1:1").await {
        Err(ClientError::Dial { kind, .. }) => assert_eq!(kind, DialErrorKind::NoTunnel),
        other => panic!("expected the leaf offline, got {:?}", other.map(|_| ())),
    }
    drop(proxies);
}

/// A leaf that visited a root and left: an in-process root proxy following the
/// `RemoteCluster` objects of its namespace and writing their status under a stale policy.
struct Visited {
    /// The proxy, trusting the leaf through its RemoteCluster only.
    proxy: Arc<ProxyServer>,
    /// The RemoteCluster objects of the proxy's namespace.
    remotes: Api<RemoteCluster>,
    /// The leaf's name.
    leaf: ClusterName,
    /// Stops the status writer.
    stop: CancellationToken,
    /// The leaf's and the root's CAs.
    pki: Pki,
}

impl Visited {
    /// Sets up the root with leaves stale after a second (and removed then if `remove`), runs
    /// the leaf's agent until it has held a tunnel, then stops it: the leaf is going Offline.
    async fn start(prefix: &str, remove: bool) -> Visited {
        let stale = StalePolicy {
            after: Some(Duration::from_secs(1)),
            remove,
        };
        let visited = Visited::root(prefix, stale).await;
        let (agent, agent_stop, run) = visited.agent(ProtocolVersion::CURRENT);
        let mut status = agent.status();
        support::within("a tunnel", Duration::from_secs(20), async {
            while status.borrow_and_update().connected() == 0 {
                status.changed().await.expect("status");
            }
        })
        .await;
        agent_stop.cancel();
        run.await.expect("the agent stops");
        visited
    }

    /// The leaf's agent, speaking `protocol`, running until the token is cancelled.
    fn agent(
        &self,
        protocol: ProtocolVersion,
    ) -> (Arc<Agent>, CancellationToken, tokio::task::JoinHandle<()>) {
        let mut config = self
            .pki
            .agent_config(&self.proxy.local_addr().to_string(), AllowList::default())
            .expect("agent config");
        config.protocol = protocol;
        let agent = Arc::new(Agent::new(config));
        let stop = CancellationToken::new();
        let run = tokio::spawn({
            let (agent, stop) = (agent.clone(), stop.clone());
            async move { agent.run(stop).await }
        });
        (agent, stop, run)
    }

    /// The root: a proxy following the RemoteCluster objects of a new namespace, writing their
    /// status under `stale`, and the leaf's RemoteCluster, trusted once this returns.
    async fn root(prefix: &str, stale: StalePolicy) -> Visited {
        let (_cp, client, ns) = crds_and_namespace(prefix).await;
        let pki = support::pki();
        let config = pki.proxy_config("proxy-1").expect("proxy config");
        let mut trust = TrustStore::new();
        trust.insert(pki.root.cluster().clone(), pki.root.public_key().clone());
        config.trust.store(Arc::new(trust));
        let proxy = Arc::new(ProxyServer::start(config).await.expect("proxy starts"));
        let leaf = pki.leaf.cluster().clone();
        let remotes: Api<RemoteCluster> = Api::namespaced(client.clone(), &ns);
        let leaf_ca = pki
            .leaf
            .public_key()
            .to_openssh()
            .expect("encoding the leaf CA");
        let spec = RemoteClusterSpec {
            ca_keys: vec![leaf_ca],
            join_token: None,
        };
        remotes
            .create(
                &PostParams::default(),
                &RemoteCluster::new(leaf.as_str(), spec),
            )
            .await
            .expect("creating the RemoteCluster");
        let stop = CancellationToken::new();
        tokio::spawn(root::run(
            client,
            ns,
            proxy.clone(),
            (false, stale),
            stop.clone(),
        ));
        let visited = Visited {
            proxy,
            remotes,
            leaf,
            stop,
            pki,
        };
        eventually("the proxy to trust the leaf", || async {
            visited.trusted().then_some(())
        })
        .await;
        visited
    }

    /// Whether the proxy trusts the leaf.
    fn trusted(&self) -> bool {
        self.proxy.shared().config.trust.load().contains(&self.leaf)
    }

    /// The leaf's status once its connection reads `connection`.
    async fn reads(&self, connection: Connection) -> RemoteClusterStatus {
        eventually(&format!("the leaf {connection:?}"), || async {
            let status = self.remotes.get(self.leaf.as_str()).await.ok()?.status?;
            (status.connection == Some(connection)).then_some(status)
        })
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_of_another_major_version_is_refused_and_the_remote_cluster_says_why() {
    let visited = Visited::root("refused", StalePolicy::default()).await;
    let (_agent, stop, _run) = visited.agent(ProtocolVersion { major: 2, minor: 0 });
    let why = eventually("the refusal in the RemoteCluster's status", || async {
        let status = visited
            .remotes
            .get(visited.leaf.as_str())
            .await
            .ok()?
            .status?;
        status.refused
    })
    .await;
    assert!(
        why.contains(&format!(
            "the agent speaks protocol 2.0 and the proxy {}",
            ProtocolVersion::CURRENT
        )) && why.ends_with("upgrade the root's proxies to a release that speaks 2.x"),
        "{why}"
    );
    stop.cancel();
    visited.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_away_longer_than_the_policy_is_reported_stale() {
    let visited = Visited::start("stale", false).await;
    let offline = visited.reads(Connection::Offline).await;
    // Time alone turns it Stale (the status writer looks again every 10 s); it went away
    // when it went Offline, and it is still trusted: the policy only reports.
    let stale = visited.reads(Connection::Stale).await;
    assert_eq!(stale.since, offline.since);
    assert!(visited.trusted());
    visited.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_leaf_is_removed_when_the_policy_says_so() {
    let visited = Visited::start("stale-rm", true).await;
    eventually("the stale leaf's RemoteCluster deleted", || async {
        let leaf = visited.remotes.get_opt(visited.leaf.as_str()).await.ok()?;
        leaf.is_none().then_some(())
    })
    .await;
    eventually("the proxy to forget the leaf", || async {
        (!visited.trusted()).then_some(())
    })
    .await;
    visited.stop.cancel();
}
