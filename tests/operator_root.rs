//! The root side as it runs in a cluster, against a real kube-apiserver: `tether proxy --ca
//! --kubernetes --peers-service` processes behind a real haproxy, their pods represented by
//! EndpointSlices the test controls. A leaf joins through the load balancer; every replica
//! trusts it (the one that served the join and the others, through the RemoteCluster), each
//! writes its own entry of the RemoteCluster's status, `kubectl get remoteclusters` shows who
//! holds the tunnels, and a replica killed with -9 has its entry removed by a survivor.

mod common;
#[path = "support/haproxy.rs"]
mod haproxy;
#[allow(dead_code)]
#[path = "support/procs.rs"]
mod procs;
#[path = "common/tunnel_e2e.rs"]
mod tunnel_e2e;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use haproxy::free_port;
use procs::Proc;
use tether::agent::Agent;
use tether::agent::allow_list::AllowList;
use tether::agent::join::{JoinRequest, join};
use tether::demo::Pki;
use tether::operator::crd::RemoteCluster;
use tether::operator::root::tokens::token_secret;
use tether::protocol::ClusterName;
use tether::protocol::join::JoinToken;
use tunnel_e2e::{eventually, install_crds};

const SERVICE: &str = "tether-proxy-peers";

/// `tether proxy` as the chart runs it; retried on fresh ports if it loses a port race.
fn spawn_proxy(id: &str, ns: &str, ca: &Path, kubeconfig: &Path, log: &Path) -> (Proc, SocketAddr) {
    for _ in 0..5 {
        let (listen, admin) = (free_port(), free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_tether"))
            .args([
                "proxy",
                "--cluster",
                "root",
                "--proxy-id",
                id,
                "--kubernetes",
            ])
            .args(["--namespace", ns, "--peers-service", SERVICE])
            .arg("--ca")
            .arg(ca)
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--admin-listen")
            .arg(admin.to_string())
            .args(["--heartbeat-interval", "500ms", "--shutdown-grace", "1s"])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .expect("tether proxy starts");
        let mut proc = Proc(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = proc.0.try_wait() {
                break; // lost a port race: try others
            }
            if std::net::TcpStream::connect(listen).is_ok()
                && std::net::TcpStream::connect(admin).is_ok()
            {
                return (proc, listen);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = proc.0.kill();
    }
    panic!(
        "tether proxy {id} did not start; log: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// The EndpointSlice of one proxy pod (TEST-NET-1 address: the API server refuses loopback;
/// only the IDs matter here, agents reach every proxy through haproxy).
fn slice(id: &str, index: usize) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {"name": format!("{SERVICE}-{id}"), "labels": {"kubernetes.io/service-name": SERVICE}},
        "addressType": "IPv4",
        "endpoints": [{
            "addresses": [format!("192.0.2.{}", index + 1)],
            "conditions": {"ready": true},
            "targetRef": {"kind": "Pod", "name": id}
        }],
        "ports": [{"name": "tunnel", "port": 3024, "protocol": "TCP"}]
    }))
    .expect("valid EndpointSlice")
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
    let cp = common::control_plane().await;
    let client = cp.kube_client();
    install_crds(&client).await;
    let ns = cp.new_namespace("root-procs").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(
        ClusterName::new("root").expect("name"),
        ClusterName::new("leaf-1").expect("name"),
    )
    .expect("pki");
    let ca_path = dir.path().join("root-ca");
    pki.root.save(&ca_path).expect("save the root CA");

    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    let ids = ["proxy-a", "proxy-b"];
    for (i, id) in ids.iter().enumerate() {
        slices
            .create(&PostParams::default(), &slice(id, i))
            .await
            .expect("EndpointSlice");
    }
    let mut procs = Vec::new();
    let mut addrs = Vec::new();
    for id in ids {
        let log = dir.path().join(format!("{id}.log"));
        let (proc, addr) = spawn_proxy(id, &ns, &ca_path, cp.kubeconfig_path(), &log);
        procs.push(proc);
        addrs.push(addr);
    }
    let lb = haproxy::Haproxy::start("random", &addrs);

    // A leaf joins through the load balancer with a token from `tether join-token`'s Secret.
    let token = JoinToken::generate();
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(
            &PostParams::default(),
            &token_secret(&token, None, None, false),
        )
        .await
        .expect("token Secret");
    let joined = join(&JoinRequest {
        root_address: lb.addr.to_string(),
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
    // NAME STATUS HELD-BY TUNNELS LAST-HEARTBEAT AGE
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
