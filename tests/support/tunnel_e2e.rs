//! Pieces of the operator end-to-end test (a ReverseTunnel reconciled into a tunnel to an
//! in-process proxy) that other test binaries reuse with a client of their choosing, e.g. one
//! holding only a ServiceAccount's token.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::{conditions, wait::await_condition};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use super::kube::{ControlPlane, control_plane};
use tether::demo::Pki;
use tether::identity::{CertificateAuthority, Identity, TrustStore};
use tether::operator::crd::TrustedCluster;
use tether::operator::root::{self, KubeJoinAuthority};
use tether::operator::{LeaderElection, OperatorConfig};
use tether::protocol::{ClusterName, Target};
use tether::proxy::{Dialer, JoinAuthority, Peer, ProxyServer};
use tether::stream::Splice;

pub const DEADLINE: Duration = Duration::from_secs(60);

/// Where most operator tests start: the binary's control plane, an admin client, the CRDs
/// applied, and a fresh namespace named after `prefix`.
pub async fn crds_and_namespace(prefix: &str) -> (&'static ControlPlane, Client, String) {
    let cp = control_plane().await;
    let client = cp.kube_client();
    install_crds(&client).await;
    let ns = cp.new_namespace(prefix).await;
    (cp, client, ns)
}

/// A Role in `ns` letting its subjects dial `leaf` (`create` on `remoteclusters/dial`, that
/// name only), bound to user `user`: what a platform team writes to let someone in.
pub async fn grant_dial(admin: &Client, ns: &str, user: &str, leaf: &str) {
    grant(admin, ns, "User", user, leaf, "dial").await;
}

/// [`grant_dial`] for every member of group `group`.
pub async fn grant_dial_to_group(admin: &Client, ns: &str, group: &str, leaf: &str) {
    grant(admin, ns, "Group", group, leaf, "dial").await;
}

/// Lets `kind` (`User`, `Group`) `subject` create `remoteclusters/SUBRESOURCE` on `leaf` in
/// `ns`: a Role and a RoleBinding, as a platform team would write them.
pub async fn grant(
    admin: &Client,
    ns: &str,
    kind: &str,
    subject: &str,
    leaf: &str,
    subresource: &str,
) {
    let name = format!("{subresource}-{leaf}-{}", subject.replace(':', "-"));
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": name},
        "rules": [{
            "apiGroups": ["tether.dev"],
            "resources": [format!("remoteclusters/{subresource}")],
            "resourceNames": [leaf],
            "verbs": ["create"],
        }],
    }))
    .expect("Role");
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": subject}],
    }))
    .expect("RoleBinding");
    Api::<Role>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &role)
        .await
        .expect("creating the Role");
    Api::<RoleBinding>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &binding)
        .await
        .expect("creating the RoleBinding");
    // The API server's authorizer learns of a new binding from its own watch, a moment
    // later: a check made at once could still be denied. Wait until it is in force.
    let (user, groups) = match kind {
        "Group" => ("tether-test-probe".to_owned(), vec![subject.to_owned()]),
        _ => (subject.to_owned(), Vec::new()),
    };
    let review: SubjectAccessReview = serde_json::from_value(json!({
        "spec": {
            "user": user,
            "groups": groups,
            "resourceAttributes": {
                "namespace": ns,
                "verb": "create",
                "group": "tether.dev",
                "resource": "remoteclusters",
                "subresource": subresource,
                "name": leaf,
            },
        },
    }))
    .expect("SubjectAccessReview");
    let reviews: Api<SubjectAccessReview> = Api::all(admin.clone());
    eventually("the grant in force", || async {
        let answer = reviews.create(&PostParams::default(), &review).await.ok()?;
        answer.status.filter(|s| s.allowed).map(|_| ())
    })
    .await;
}

/// The PKI of the root and `leaf-1`, and the root's proxy `proxy-1` in-process: what the
/// operator tests' ReverseTunnels dial.
pub async fn root_proxy_for_leaf_1() -> (ClusterName, Pki, ProxyServer) {
    let leaf = ClusterName::new("leaf-1").expect("name");
    let pki = Pki::generate(ClusterName::new("root").expect("name"), leaf.clone()).expect("pki");
    let proxy = ProxyServer::start(pki.proxy_config("proxy-1").expect("proxy config"))
        .await
        .expect("proxy");
    (leaf, pki, proxy)
}

/// The EndpointSlice of Service `service` for its proxy pod `pod`, in slot `slot`, with the
/// proxy's port named `tunnel`. The API server refuses loopback endpoint addresses, so it names
/// a TEST-NET-1 address (RFC 5737: `192.0.2.<slot + 1>`) with the real port: proxies learn
/// their peers' IDs from it, and agents reach every proxy through a load balancer.
pub fn proxy_slice(service: &str, pod: &str, slot: usize, port: u16, ready: bool) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {
            "name": format!("{service}-{pod}"),
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": [{
            "addresses": [format!("192.0.2.{}", slot + 1)],
            "conditions": {"ready": ready},
            "targetRef": {"kind": "Pod", "name": pod},
        }],
        "ports": [{"name": "tunnel", "port": port, "protocol": "TCP"}],
    }))
    .expect("valid EndpointSlice")
}

/// Creates the ready EndpointSlices of Service `service`'s proxy pods `ids` (slot = index,
/// port 3024), as the endpoint controller would write them for its replicas.
pub async fn create_proxy_slices(client: &Client, ns: &str, service: &str, ids: &[&str]) {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    for (slot, id) in ids.iter().enumerate() {
        slices
            .create(
                &PostParams::default(),
                &proxy_slice(service, id, slot, 3024, true),
            )
            .await
            .unwrap_or_else(|e| panic!("creating the EndpointSlice of {id}: {e}"));
    }
}

/// Deletes object `name` and waits until it is gone (its finalizers done).
pub async fn delete_and_wait_gone<K>(api: &Api<K>, name: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.delete(name, &kube::api::DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("deleting {name}: {e}"));
    eventually(&format!("{name} gone"), || async {
        matches!(api.get_opt(name).await, Ok(None)).then_some(())
    })
    .await;
}

/// Polls `check` until it yields a value, failing with `what` after [`DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = tokio::time::Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Applies the tether.dev CRDs (server-side apply, so any test may call it) and waits until
/// they are Established.
pub async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in tether::operator::crd::all() {
        let name = crd.name_any();
        crds.patch(
            &name,
            &PatchParams::apply("tether-test").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("applying CRD {name}: {e}"));
        timeout(
            DEADLINE,
            await_condition(crds.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .expect("CRD not Established in time")
        .expect("watching the CRD");
    }
}

pub fn secret(name: &str, data: &[(&str, String)]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        string_data: Some(
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        ),
        ..Default::default()
    }
}

/// The agent identity Secret the example names (`leaf-1-agent`): a new agent certificate
/// from `leaf`.
pub fn agent_secret(leaf: &CertificateAuthority) -> Secret {
    agent_secret_named("leaf-1-agent", leaf)
}

/// An agent identity Secret `name`: a new agent certificate from `leaf`.
pub fn agent_secret_named(name: &str, leaf: &CertificateAuthority) -> Secret {
    let agent = Identity::generate_agent(leaf, Duration::from_secs(3600)).expect("agent id");
    let key = agent
        .key
        .to_openssh(Default::default())
        .expect("encoding key")
        .to_string();
    let cert = agent.certificate.to_openssh().expect("encoding cert");
    secret(name, &[("key", key), ("cert", cert)])
}

/// The agent identity (`leaf-1-agent`) and root CA (`root-ca`) Secrets the example names,
/// for `pki`'s clusters, created with `client`.
pub async fn create_secrets(client: &Client, ns: &str, pki: &Pki) {
    let ca = pki.root.public_key().to_openssh().expect("encoding CA");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    for s in [
        agent_secret(&pki.leaf),
        secret("root-ca", &[("ca.pub", ca)]),
    ] {
        secrets
            .create(&PostParams::default(), &s)
            .await
            .expect("creating a Secret");
    }
}

/// CAs for `root` and `leaf-1`, the root's key saved at `dir/root-ca` (and `.pub`) for
/// `tether proxy --ca`.
pub fn leaf_1_pki_saved_in(dir: &std::path::Path) -> (Pki, std::path::PathBuf) {
    let pki = Pki::generate(
        ClusterName::new("root").expect("name"),
        ClusterName::new("leaf-1").expect("name"),
    )
    .expect("pki");
    let ca_path = dir.join("root-ca");
    pki.root.save(&ca_path).expect("save the root CA");
    (pki, ca_path)
}

/// A new single-use join token, its Secret (as `tether join-token` prints it) created in `ns`.
pub async fn create_join_token(client: &Client, ns: &str) -> tether::protocol::join::JoinToken {
    let token = tether::protocol::join::JoinToken::generate();
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(
            &PostParams::default(),
            &tether::operator::root::tokens::token_secret(&token, None, None, false),
        )
        .await
        .expect("a single-use join token Secret");
    token
}

/// `examples/reversetunnel.yaml`, pointed at `proxy` and allowing `allow`.
pub fn example(proxy: &str, allow: &[String]) -> serde_json::Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/reversetunnel.yaml"
    ))
    .expect("reading the example");
    let mut value: serde_json::Value = serde_yaml::from_str(&text).expect("example YAML");
    value["spec"]["proxyAddress"] = json!(proxy);
    value["spec"]["allow"] = json!(allow);
    value
}

/// Runs the operator in-process with `client`, watching `ns`, electing a leader through
/// `lease` (in `ns`) when given. Cancel the token to stop it; it panics if the operator fails.
pub fn start_operator(client: Client, ns: &str, lease: Option<&str>) -> CancellationToken {
    start_operator_counting(client, ns, lease, Default::default())
}

/// [`start_operator`], counting into `metrics`.
pub fn start_operator_counting(
    client: Client,
    ns: &str,
    lease: Option<&str>,
    metrics: tether::admin::metrics::OperatorMetrics,
) -> CancellationToken {
    let shutdown = CancellationToken::new();
    let config = OperatorConfig {
        namespace: Some(ns.to_owned()),
        leader_election: lease.map(|name| LeaderElection {
            lease_name: name.to_owned(),
            lease_namespace: ns.to_owned(),
            identity: format!("test-{ns}"),
            duration_secs: 15,
            grace_secs: 5,
        }),
        instance: Some("test".into()),
        metrics,
        // The agents lend the operator's own credentials for the root's Kubernetes requests,
        // as in a pod (the example TrustedCluster maps a root caller).
        kube_upstream: tether::operator::kube_upstream::from_config(
            &super::kube::control_plane_blocking().kube_config(),
        )
        .ok(),
        route: tether::transport::Route::direct(),
    };
    let stop = shutdown.clone();
    tokio::spawn(async move {
        if let Err(e) = tether::operator::run(client, config, stop).await {
            panic!("operator failed: {e:#}");
        }
    });
    shutdown
}

/// Dials `target` (`HOST.CLUSTER.tether:PORT`) through `proxy`, sends "ping", and returns what
/// comes back.
pub async fn echo_through(proxy: &ProxyServer, target: &str) -> Result<Vec<u8>, String> {
    let target = Target::parse(target).map_err(|e| e.to_string())?;
    let conn = proxy
        .dialer()
        .dial(target, "127.0.0.1:0".parse().expect("addr"))
        .await
        .map_err(|e| e.to_string())?;
    let (mut mine, theirs) = tokio::io::duplex(64 * 1024);
    let splice = tokio::spawn(conn.splice(theirs));
    mine.write_all(b"ping").await.map_err(|e| e.to_string())?;
    mine.shutdown().await.map_err(|e| e.to_string())?;
    let mut echoed = Vec::new();
    mine.read_to_end(&mut echoed)
        .await
        .map_err(|e| e.to_string())?;
    let _ = splice.await;
    Ok(echoed)
}

/// A root proxy `proxy-1` of `pki`, trusting its own CA and `static_trust`, following the
/// `RemoteCluster` objects of `ns` and serving joins with tokens kept there, as `tether proxy
/// --ca --kubernetes` runs it. With `peers`, it knows those replicas and prunes the status
/// entries of others.
pub async fn start_kube_root(
    client: &Client,
    ns: &str,
    pki: &Pki,
    static_trust: TrustStore,
    peers: &[&str],
    stop: &CancellationToken,
) -> Arc<ProxyServer> {
    let mut config = pki.proxy_config("proxy-1").expect("proxy config");
    let mut trust = static_trust;
    trust.insert(pki.root.cluster().clone(), pki.root.public_key().clone());
    config.trust.store(Arc::new(trust));
    config.join =
        Some(Arc::new(KubeJoinAuthority::new(client.clone(), ns)) as Arc<dyn JoinAuthority>);
    let proxy = Arc::new(ProxyServer::start(config).await.expect("proxy starts"));
    let prune = !peers.is_empty();
    if prune {
        proxy.set_peers(
            peers
                .iter()
                .map(|id| Peer {
                    id: (*id).to_owned(),
                    addr: None,
                    generation: 0,
                })
                .collect(),
        );
    }
    tokio::spawn(root::run(
        client.clone(),
        ns.to_owned(),
        proxy.clone(),
        (prune, Default::default()),
        stop.clone(),
    ));
    proxy
}

/// A new CA for cluster `leaf`, its private key saved in Secret `<leaf>-ca` (key `ca`), as the
/// leaf's administrator creates it.
pub async fn create_leaf_ca(secrets: &Api<Secret>, leaf: &str) -> CertificateAuthority {
    let ca = CertificateAuthority::generate(ClusterName::new(leaf).expect("a cluster name"))
        .expect("leaf CA");
    let key = ca
        .private_key()
        .to_openssh(Default::default())
        .expect("encode")
        .to_string();
    secrets
        .create(
            &PostParams::default(),
            &secret(&format!("{leaf}-ca"), &[("ca", key)]),
        )
        .await
        .expect("leaf CA Secret");
    ca
}

/// A `TrustedCluster` `name` joining the root at `root` with the token in Secret
/// `token_secret`, as leaf `leaf` (CA in Secret `<leaf>-ca`), allowing `allow`.
pub fn trusted_cluster(
    name: &str,
    root: &str,
    token_secret: &str,
    leaf: &str,
    allow: &[String],
) -> TrustedCluster {
    serde_json::from_value(json!({
        "apiVersion": "tether.dev/v1alpha1",
        "kind": "TrustedCluster",
        "metadata": { "name": name },
        "spec": {
            "rootAddress": root,
            "tokenSecretRef": { "name": token_secret },
            "leafCluster": leaf,
            "leafCaSecretRef": { "name": format!("{leaf}-ca") },
            "allow": allow,
        },
    }))
    .expect("a TrustedCluster")
}

/// Dials one after another through a proxy until finished, echoing "ping": the load a change
/// (a handover, a rotation) must carry without a failed dial.
pub struct DialLoad {
    stop: CancellationToken,
    echoed: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl DialLoad {
    /// Starts dialling `target` (`HOST.CLUSTER.tether:PORT`) through `proxy`.
    pub fn start(proxy: Arc<ProxyServer>, target: String) -> Self {
        let stop = CancellationToken::new();
        let echoed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let task = tokio::spawn({
            let (stop, echoed) = (stop.clone(), echoed.clone());
            async move {
                let mut failed = Vec::new();
                while !stop.is_cancelled() {
                    match echo_through(&proxy, &target).await {
                        Ok(back) if back == b"ping" => {
                            echoed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Ok(other) => failed.push(format!("echoed {other:?}")),
                        Err(e) => {
                            failed.push(e);
                            // A refusal can come back without awaiting anything: pause, so a
                            // leaf without a tunnel cannot turn this loop into a busy one.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                failed
            }
        });
        Self { stop, echoed, task }
    }

    /// Dials that echoed so far.
    pub fn echoed(&self) -> u64 {
        self.echoed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops the load; panics, naming them, if any dial failed; returns how many echoed.
    pub async fn finish(self) -> u64 {
        self.stop.cancel();
        let failed = self.task.await.expect("the dial load");
        let echoed = self.echoed.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            failed.is_empty(),
            "{} of {} dials failed: {failed:?}",
            failed.len(),
            echoed + failed.len() as u64
        );
        assert!(echoed > 0, "no dial of the load echoed");
        echoed
    }
}
