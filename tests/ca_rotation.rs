//! A leaf's CA rotated over its tunnel (#19, work in progress): the new key set, signed by a
//! CA key the root trusts, reaches the leaf's RemoteCluster through a proxy; retiring the old
//! key closes the tunnels it alone authenticated; an old set replayed is refused.

mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use support::tunnel_e2e::{crds_and_namespace, eventually};
use tether::agent::Agent;
use tether::egress::allow_list::AllowList;
use tether::identity::keyset::KeySet;
use tether::identity::{CertificateAuthority, Identity, TrustStore};
use tether::operator::crd::{RemoteCluster, RemoteClusterSpec};
use tether::operator::root::{self, KubeJoinAuthority};
use tether::protocol::control::CaKeySet;
use tether::proxy::{JoinAuthority, ProxyServer};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn openssh(ca: &CertificateAuthority) -> String {
    ca.public_key().to_openssh().expect("encoding")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_rotates_its_ca_over_its_tunnel_and_the_old_key_loses_its_sessions() {
    let (_cp, client, ns) = crds_and_namespace("rotate").await;
    let pki = support::pki();
    let leaf = pki.leaf.cluster().clone();
    let new_ca = CertificateAuthority::generate(leaf.clone()).expect("new CA");

    // The root: a proxy with the Kubernetes join authority, following the RemoteClusters.
    let mut config = pki.proxy_config("proxy-1").expect("proxy config");
    let mut trust = TrustStore::new();
    trust.insert(pki.root.cluster().clone(), pki.root.public_key().clone());
    config.trust.store(Arc::new(trust));
    config.join =
        Some(Arc::new(KubeJoinAuthority::new(client.clone(), &ns)) as Arc<dyn JoinAuthority>);
    let proxy = Arc::new(ProxyServer::start(config).await.expect("proxy"));
    let remotes: Api<RemoteCluster> = Api::namespaced(client.clone(), &ns);
    let spec = RemoteClusterSpec {
        ca_keys: vec![openssh(&pki.leaf)],
        join_token: None,
    };
    remotes
        .create(
            &PostParams::default(),
            &RemoteCluster::new(leaf.as_str(), spec),
        )
        .await
        .expect("RemoteCluster");
    let stop = CancellationToken::new();
    tokio::spawn(root::run(
        client.clone(),
        ns.clone(),
        proxy.clone(),
        (false, Default::default()),
        stop.clone(),
    ));
    eventually("the leaf trusted", || async {
        proxy
            .shared()
            .config
            .trust
            .load()
            .contains(&leaf)
            .then_some(())
    })
    .await;

    // An agent of the old CA, which will publish the sets.
    let (publish, published) = watch::channel::<Option<Arc<CaKeySet>>>(None);
    let mut old_config = pki
        .agent_config(&proxy.local_addr().to_string(), AllowList::default())
        .expect("agent config");
    old_config.ca_keys = published;
    let old_agent = Arc::new(Agent::new(old_config));
    let old_stop = CancellationToken::new();
    tokio::spawn({
        let (agent, stop) = (old_agent.clone(), old_stop.clone());
        async move { agent.run(stop).await }
    });
    let tunnels = |proxy: &ProxyServer| proxy.sites().tunnels_of(&leaf).len();
    eventually("the old agent's tunnel", || async {
        (tunnels(&proxy) == 1).then_some(())
    })
    .await;

    // Init: both keys, signed by the old one.
    let init_at = now();
    let init = KeySet {
        cluster: leaf.clone(),
        issued_at: init_at,
        keys: vec![pki.leaf.public_key().clone(), new_ca.public_key().clone()],
    }
    .sign(pki.leaf.private_key())
    .expect("sign");
    publish.send_replace(Some(Arc::new(init.clone())));
    let both = vec![openssh(&pki.leaf), openssh(&new_ca)];
    eventually("both keys in the record", || async {
        let rc = remotes.get(leaf.as_str()).await.ok()?;
        (rc.spec.ca_keys == both).then_some(())
    })
    .await;

    // An agent of the new CA is admitted beside the old one.
    let mut new_config = pki
        .agent_config(&proxy.local_addr().to_string(), AllowList::default())
        .expect("agent config");
    new_config.identity = Arc::new(
        Identity::generate_agent(&new_ca, Duration::from_secs(3600)).expect("new identity"),
    );
    let new_agent = Arc::new(Agent::new(new_config));
    let new_stop = CancellationToken::new();
    tokio::spawn({
        let (agent, stop) = (new_agent.clone(), new_stop.clone());
        async move { agent.run(stop).await }
    });
    eventually("both agents' tunnels", || async {
        (tunnels(&proxy) == 2).then_some(())
    })
    .await;

    // Retire: the new key alone, signed by it. The old agent's tunnel goes.
    let retire = KeySet {
        cluster: leaf.clone(),
        issued_at: init_at + 1,
        keys: vec![new_ca.public_key().clone()],
    }
    .sign(new_ca.private_key())
    .expect("sign");
    publish.send_replace(Some(Arc::new(retire)));
    eventually("only the new key in the record", || async {
        let rc = remotes.get(leaf.as_str()).await.ok()?;
        (rc.spec.ca_keys == [openssh(&new_ca)]).then_some(())
    })
    .await;
    eventually("only the new agent's tunnel", || async {
        (tunnels(&proxy) == 1 && new_agent.status().borrow().connected() == 1).then_some(())
    })
    .await;

    // The init set again (its signer retired): refused, the record unchanged.
    let verdict = {
        let trusted = proxy.shared().config.trust.load().cas(&leaf).to_vec();
        tether::identity::keyset::verify(&init, &leaf, &trusted, 0)
    };
    assert!(verdict.is_err(), "{verdict:?}");
    let rc = remotes.get(leaf.as_str()).await.expect("record");
    assert_eq!(rc.spec.ca_keys, [openssh(&new_ca)]);
    old_stop.cancel();
    new_stop.cancel();
    stop.cancel();
}
