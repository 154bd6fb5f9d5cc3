//! Revocation against a real kube-apiserver (issue #11, item 3): a root proxy following the
//! `RemoteCluster` objects of its namespace closes, within seconds, every tunnel the records no
//! longer vouch for: the leaf's record deleted (even when the name stays trusted statically
//! with another CA), or one of its CA keys removed from the spec. A single-use token stays
//! spent once its leaf was revoked, and (the garbage collector running) goes with the leaf.

mod support;
#[allow(unused_imports)]
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use support::tunnel_e2e::{
    crds_and_namespace, create_join_token, eventually, install_crds, start_kube_root,
};
use support::{pki, wait_for};
use tether::agent::Agent;
use tether::agent::join::{JoinError, JoinRequest, join};
use tether::demo::Pki;
use tether::egress::allow_list::AllowList;
use tether::identity::{CertificateAuthority, Identity, TrustStore};
use tether::operator::crd::RemoteCluster;
use tether::protocol::ClusterName;
use tether::protocol::join::{JoinRefusal, JoinToken};
use tether::proxy::ProxyServer;

/// How soon a revocation must have closed the tunnels it concerns.
const EVICTION: Duration = Duration::from_secs(5);

fn name(s: &str) -> ClusterName {
    ClusterName::new(s).expect("valid cluster name")
}

/// A `RemoteCluster` `leaf` trusting `cas`, as an administrator would write it.
async fn record(remotes: &Api<RemoteCluster>, leaf: &str, cas: &[&CertificateAuthority]) {
    let keys: Vec<String> = cas
        .iter()
        .map(|ca| ca.public_key().to_openssh().expect("encode"))
        .collect();
    let rc: RemoteCluster = serde_json::from_value(json!({
        "apiVersion": "tether.dev/v1alpha1",
        "kind": "RemoteCluster",
        "metadata": { "name": leaf },
        "spec": { "caKeys": keys },
    }))
    .expect("a RemoteCluster");
    remotes
        .create(&PostParams::default(), &rc)
        .await
        .expect("creating the RemoteCluster");
}

/// Runs an agent of `ca`'s cluster, whose certificate `ca` signs, against `proxy`.
fn start_agent(
    proxy: &ProxyServer,
    pki: &Pki,
    ca: &CertificateAuthority,
    stop: &CancellationToken,
) {
    let mut config = pki
        .agent_config(&proxy.local_addr().to_string(), AllowList::default())
        .expect("agent config");
    config.cluster = ca.cluster().clone();
    config.identity = Arc::new(Identity::generate_agent(ca, Duration::from_secs(600)).expect("id"));
    let agent = Arc::new(Agent::new(config));
    let stop = stop.clone();
    tokio::spawn(async move { agent.run(stop).await });
}

fn tunnel_ids(proxy: &ProxyServer, leaf: &ClusterName) -> Vec<u64> {
    proxy
        .site(leaf)
        .map(|s| s.tunnels.iter().map(|t| t.id).collect())
        .unwrap_or_default()
}

async fn wait_tunnels(proxy: &ProxyServer, leaf: &ClusterName, count: usize) -> Vec<u64> {
    eventually(&format!("{count} tunnel(s) of {leaf}"), || async {
        let ids = tunnel_ids(proxy, leaf);
        (ids.len() == count).then_some(ids)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_remote_cluster_ends_its_tunnels_even_when_the_name_stays_trusted() {
    let (_, client, ns) = crds_and_namespace("revoke-delete").await;
    let remotes: Api<RemoteCluster> = Api::namespaced(client.clone(), &ns);
    let pki = pki();
    let leaf = name("leaf");
    // The name is trusted statically with one CA, and recorded with another.
    let static_ca = CertificateAuthority::generate(leaf.clone()).expect("ca");
    let mut static_trust = TrustStore::new();
    static_trust.insert(leaf.clone(), static_ca.public_key().clone());
    let stop = CancellationToken::new();
    let proxy = start_kube_root(&client, &ns, &pki, static_trust, &[], &stop).await;
    let recorded_ca = CertificateAuthority::generate(leaf.clone()).expect("ca");
    record(&remotes, "leaf", &[&recorded_ca]).await;
    start_agent(&proxy, &pki, &recorded_ca, &stop);
    wait_tunnels(&proxy, &leaf, 1).await;

    remotes
        .delete("leaf", &DeleteParams::default())
        .await
        .expect("kubectl delete remotecluster leaf");
    wait_for("the revoked leaf's tunnel closed", EVICTION, || {
        tunnel_ids(&proxy, &leaf).is_empty()
    })
    .await;
    let trust = proxy.shared().config.trust.load();
    assert_eq!(
        trust.cas(&leaf),
        [static_ca.public_key().clone()],
        "the static trust stays"
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_ca_key_from_a_remote_cluster_ends_the_tunnels_it_signed() {
    let (_, client, ns) = crds_and_namespace("revoke-rekey").await;
    let remotes: Api<RemoteCluster> = Api::namespaced(client.clone(), &ns);
    let pki = pki();
    let leaf = name("leaf-k");
    let stop = CancellationToken::new();
    let proxy = start_kube_root(&client, &ns, &pki, TrustStore::new(), &[], &stop).await;
    let (old, new) = (
        CertificateAuthority::generate(leaf.clone()).expect("ca"),
        CertificateAuthority::generate(leaf.clone()).expect("ca"),
    );
    record(&remotes, "leaf-k", &[&old, &new]).await;
    start_agent(&proxy, &pki, &old, &stop);
    let of_old = wait_tunnels(&proxy, &leaf, 1).await;
    start_agent(&proxy, &pki, &new, &stop);
    let both = wait_tunnels(&proxy, &leaf, 2).await;
    let of_new: Vec<u64> = both.into_iter().filter(|id| !of_old.contains(id)).collect();

    let keys = [new.public_key().to_openssh().expect("encode")];
    remotes
        .patch(
            "leaf-k",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "caKeys": keys } })),
        )
        .await
        .expect("removing the old key");
    wait_for("the old key's tunnel closed", EVICTION, || {
        tunnel_ids(&proxy, &leaf) == of_new
    })
    .await;
    stop.cancel();
}

/// A root in a new namespace with one single-use token, the leaf `leaf-j` joined with it (and
/// admitted again on a retry, as after a lost answer).
struct Joined {
    client: Client,
    ns: String,
    remotes: Api<RemoteCluster>,
    proxy: Arc<ProxyServer>,
    token: JoinToken,
    leaf_ca: CertificateAuthority,
    stop: CancellationToken,
}

impl Joined {
    async fn start(prefix: &str) -> Joined {
        let cp = support::kube::control_plane().await;
        // The garbage collector, which deletes what a RemoteCluster owns.
        cp.start_controller_manager().await;
        let client = cp.kube_client();
        install_crds(&client).await;
        let ns = cp.new_namespace(prefix).await;
        let remotes: Api<RemoteCluster> = Api::namespaced(client.clone(), &ns);
        let stop = CancellationToken::new();
        let proxy = start_kube_root(&client, &ns, &pki(), TrustStore::new(), &[], &stop).await;
        let token = create_join_token(&client, &ns).await;
        let leaf_ca = CertificateAuthority::generate(name("leaf-j")).expect("ca");
        let joined = Joined {
            client,
            ns,
            remotes,
            proxy,
            token,
            leaf_ca,
            stop,
        };
        join(&joined.request(&joined.leaf_ca))
            .await
            .expect("the join");
        join(&joined.request(&joined.leaf_ca))
            .await
            .expect("the retry");
        joined
    }

    fn request(&self, ca: &CertificateAuthority) -> JoinRequest {
        JoinRequest {
            root_address: self.proxy.local_addr().to_string(),
            route: tether::transport::Route::direct(),
            token: self.token.clone(),
            leaf_cluster: name("leaf-j"),
            leaf_cas: vec![ca.public_key().clone()],
            root_ca_pin: None,
            timeout: Duration::from_secs(20),
        }
    }

    /// Deletes the leaf's `RemoteCluster` with `params`, and waits until the proxy no longer
    /// trusts it.
    async fn revoke(&self, params: &DeleteParams) {
        self.remotes
            .delete("leaf-j", params)
            .await
            .expect("revoking the leaf");
        eventually("the revocation seen by the proxy", || async {
            let trust = self.proxy.shared().config.trust.load();
            let gone = self.remotes.get_opt("leaf-j").await.ok()?.is_none();
            (gone && !trust.contains(&name("leaf-j"))).then_some(())
        })
        .await;
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.ns)
    }
}

/// An administrator who keeps the token (deleting the leaf with `orphan`) still can't have it
/// used again: the token remembers that its leaf was revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_single_use_token_is_refused_once_its_leaf_was_revoked() {
    let joined = Joined::start("revoke-token").await;
    // The same token for the same name with another CA: refused.
    let other = CertificateAuthority::generate(name("leaf-j")).expect("ca");
    assert!(
        matches!(
            join(&joined.request(&other)).await,
            Err(JoinError::Refused { .. })
        ),
        "another CA used a spent token"
    );
    joined
        .revoke(&DeleteParams {
            propagation_policy: Some(kube::api::PropagationPolicy::Orphan),
            ..DeleteParams::default()
        })
        .await;
    match join(&joined.request(&joined.leaf_ca)).await {
        Err(JoinError::Refused {
            reason: JoinRefusal::TokenAlreadyUsed,
            message,
        }) => assert!(message.contains("revoked"), "{message}"),
        other => panic!("a revoked leaf reused its token: {other:?}"),
    }
    assert!(
        joined
            .remotes
            .get_opt("leaf-j")
            .await
            .expect("get")
            .is_none(),
        "the refused join recorded the leaf again"
    );
    joined.stop.cancel();
}

/// A spent token does not stay behind: it belongs to the leaf it admitted, and goes with the
/// leaf's revocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_token_goes_with_the_leaf_it_admitted() {
    let joined = Joined::start("spent-token").await;
    let secret_name = tether::operator::root::tokens::secret_name(joined.token.id());
    let record = joined
        .remotes
        .get("leaf-j")
        .await
        .expect("the leaf's RemoteCluster");
    let token = joined.secrets().get(&secret_name).await.expect("the token");
    let owners = token.metadata.owner_references.unwrap_or_default();
    assert_eq!(
        owners
            .iter()
            .map(|o| (o.kind.as_str(), o.uid.as_str()))
            .collect::<Vec<_>>(),
        [(
            "RemoteCluster",
            record.metadata.uid.as_deref().unwrap_or_default()
        )],
        "the spent token is not the leaf's dependent"
    );
    joined.revoke(&DeleteParams::default()).await;
    eventually("the spent token deleted", || async {
        joined
            .secrets()
            .get_opt(&secret_name)
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert!(
        matches!(
            join(&joined.request(&joined.leaf_ca)).await,
            Err(JoinError::Refused { .. })
        ),
        "a deleted token admitted a leaf"
    );
    joined.stop.cancel();
}
