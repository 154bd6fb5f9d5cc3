//! A leaf's CA rotated over its tunnel (#19):
//! - the new key set, signed by a CA key the root trusts, reaches the leaf's RemoteCluster
//!   through a proxy; retiring the old key closes the tunnels it alone authenticated; an old
//!   set replayed is refused (the protocol step alone);
//! - `tether ca rotate` takes a joined leaf through init, update-clients and retire, then
//!   through a second rotation rolled back, under a dial load that sees no failed dial; after
//!   retire the root trusts the new key alone and no tunnel of the old one is left.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use support::tunnel_e2e::{
    DialLoad, crds_and_namespace, create_join_token, create_leaf_ca, create_secrets, echo_through,
    eventually, example, root_proxy_for_leaf_1, secret, start_kube_root, start_operator,
    trusted_cluster,
};
use tether::agent::Agent;
use tether::client::{DialClient, DialClientConfig};
use tether::demo::echo_server;
use tether::egress::allow_list::AllowList;
use tether::identity::TrustSource;
use tether::identity::keyset::KeySet;
use tether::identity::{
    CertificateAuthority, Identity, PrivateKey, PublicKey, TrustStore, fingerprint,
};
use tether::operator::crd::{RemoteCluster, RemoteClusterSpec, TrustedCluster};
use tether::protocol::control::CaKeySet;
use tether::protocol::{ClusterName, Target};
use tether::proxy::ProxyServer;
use tether::proxy::root_keys;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    let stop = CancellationToken::new();
    let proxy = start_kube_root(&client, &ns, &pki, TrustStore::new(), &[], &stop).await;
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

/// Runs `tether ca rotate` for TrustedCluster `to-root` in `ns` to `phase`, waiting for it.
async fn rotate_to(kubeconfig: &std::path::Path, ns: &str, phase: &str) -> String {
    let out = rotate_command(kubeconfig, ns, "to-root", phase).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "tether ca rotate --phase {phase}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// `tether ca rotate` for TrustedCluster `tc` in `ns` to `phase`, waiting up to 2 minutes.
async fn rotate_command(
    kubeconfig: &std::path::Path,
    ns: &str,
    tc: &str,
    phase: &str,
) -> std::process::Output {
    tokio::process::Command::new(support::procs::tether_bin())
        .args(["ca", "rotate", "--trusted-cluster", tc, "--namespace", ns])
        .args(["--phase", phase, "--wait", "120s"])
        .env("KUBECONFIG", kubeconfig)
        .output()
        .await
        .expect("running tether ca rotate")
}

/// The CA key that signed the agent certificate in Secret `to-root-agent`.
async fn agent_signer(secrets: &Api<Secret>) -> String {
    let secret = secrets.get("to-root-agent").await.expect("agent Secret");
    let cert = secret.data.expect("data")["cert"].0.clone();
    let cert = tether::identity::Certificate::from_openssh(
        std::str::from_utf8(&cert).expect("text").trim(),
    )
    .expect("a certificate");
    fingerprint(&PublicKey::from(cert.signature_key().clone()))
}

/// The private keys of the leaf CA Secret, by key, as fingerprints.
async fn leaf_ca_keys(secrets: &Api<Secret>) -> BTreeMap<String, String> {
    let secret = secrets.get("leaf-1-ca").await.expect("leaf CA Secret");
    secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| {
            let key = PrivateKey::from_openssh(&v.0).expect("a private key");
            (k, fingerprint(key.public_key()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tether_ca_rotate_takes_a_leaf_to_a_new_key_and_back_under_load_without_a_failed_dial() {
    let (cp, client, root_ns) = crds_and_namespace("rotate-root").await;
    let leaf_ns = cp.new_namespace("rotate-leaf").await;
    let stop = CancellationToken::new();

    // The root: one proxy keeping its leaves in root_ns.
    let pki = tether::demo::Pki {
        root: CertificateAuthority::generate(ClusterName::new("root").expect("name"))
            .expect("root CA"),
        leaf: CertificateAuthority::generate(ClusterName::new("unused").expect("name"))
            .expect("CA"),
    };
    let proxy = start_kube_root(&client, &root_ns, &pki, TrustStore::new(), &[], &stop).await;

    // The leaf: its CA, a join token, the TrustedCluster, the operator.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &leaf_ns);
    let first_ca = create_leaf_ca(&secrets, "leaf-1").await;
    let token = create_join_token(&client, &root_ns).await;
    secrets
        .create(
            &PostParams::default(),
            &secret("join-1", &[("token", token.reveal())]),
        )
        .await
        .expect("token Secret");
    let echo = echo_server().await.expect("echo server");
    let tcs: Api<TrustedCluster> = Api::namespaced(client.clone(), &leaf_ns);
    let allow = [format!("127.0.0.1/32:{}", echo.port())];
    let root_address = proxy.local_addr().to_string();
    let tc = trusted_cluster("to-root", &root_address, "join-1", "leaf-1", &allow);
    tcs.create(&PostParams::default(), &tc)
        .await
        .expect("TrustedCluster");
    let operator = start_operator(client.clone(), &leaf_ns, None);
    let leaf = ClusterName::new("leaf-1").expect("name");
    let target = format!("127.0.0.1.leaf-1.tether:{}", echo.port());
    eventually("the leaf's tunnel serves dials", || async {
        echo_through(&proxy, &target)
            .await
            .ok()
            .filter(|e| e == b"ping")
    })
    .await;
    let load = DialLoad::start(proxy.clone(), target.clone());
    let remotes: Api<RemoteCluster> = Api::namespaced(client.clone(), &root_ns);
    let record = || async {
        remotes
            .get("leaf-1")
            .await
            .expect("RemoteCluster")
            .spec
            .ca_keys
    };
    let (first, kubeconfig) = (fingerprint(first_ca.public_key()), cp.kubeconfig_path());

    // A name that is not there: a clear error, naming the flag.
    let out = rotate_command(kubeconfig, &leaf_ns, "no-such-tc", "init").await;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("--trusted-cluster no-such-tc"),
        "{said}"
    );

    // Init: a new key made beside the old one; the root trusts both; agents stay on the old.
    let said = rotate_to(kubeconfig, &leaf_ns, "init").await;
    assert!(said.contains("reached Init"), "{said}");
    let keys = leaf_ca_keys(&secrets).await;
    let second = keys.get("ca-next").expect("a ca-next key").clone();
    assert_eq!(keys["ca"], first);
    assert_eq!(record().await.len(), 2);
    assert_eq!(agent_signer(&secrets).await, first);

    // Update clients: the agent's certificate comes from the new key; the root still trusts both.
    rotate_to(kubeconfig, &leaf_ns, "update-clients").await;
    assert_eq!(agent_signer(&secrets).await, second);
    assert_eq!(record().await.len(), 2);

    // Retire: the root trusts the new key alone, which is now `ca`; the old is kept aside.
    rotate_to(kubeconfig, &leaf_ns, "retire").await;
    let keys = leaf_ca_keys(&secrets).await;
    assert_eq!(
        (keys["ca"].as_str(), keys["ca-retired"].as_str()),
        (second.as_str(), first.as_str())
    );
    assert!(!keys.contains_key("ca-next"), "{keys:?}");
    let trusted = proxy.shared().config.trust.load().cas(&leaf).to_vec();
    assert_eq!(
        trusted.iter().map(fingerprint).collect::<Vec<_>>(),
        std::slice::from_ref(&second)
    );
    let tunnels = proxy.sites().tunnels_of(&leaf);
    assert!(!tunnels.is_empty());
    assert!(
        tunnels.iter().all(|t| t.signed_by(&trusted)),
        "a tunnel of the retired key is left"
    );
    let status = tcs
        .get("to-root")
        .await
        .expect("tc")
        .status
        .expect("status");
    let rotation = status.ca_rotation.expect("rotation status");
    assert!(rotation.last_rotated.is_some() && rotation.next_key.is_none());

    // A second rotation, rolled back after update-clients: the agents return to the key in
    // force, the root trusts it alone, the unused key is dropped.
    rotate_to(kubeconfig, &leaf_ns, "init").await;
    rotate_to(kubeconfig, &leaf_ns, "update-clients").await;
    let third = leaf_ca_keys(&secrets).await["ca-next"].clone();
    assert_eq!(agent_signer(&secrets).await, third);
    rotate_to(kubeconfig, &leaf_ns, "rollback").await;
    let keys = leaf_ca_keys(&secrets).await;
    assert_eq!(keys["ca"], second);
    assert!(!keys.contains_key("ca-next"), "{keys:?}");
    assert_eq!(agent_signer(&secrets).await, second);
    let trusted = proxy.shared().config.trust.load().cas(&leaf).to_vec();
    assert_eq!(
        trusted.iter().map(fingerprint).collect::<Vec<_>>(),
        [second]
    );
    assert_eq!(
        echo_through(&proxy, &target).await.as_deref(),
        Ok(&b"ping"[..])
    );

    let ok = load.finish().await;
    eprintln!("{ok} dials through two rotations (one rolled back), none failed");
    operator.cancel();
    stop.cancel();
}

fn tunnel_ids(proxy: &ProxyServer, leaf: &ClusterName) -> Vec<u64> {
    let mut ids: Vec<u64> = proxy
        .sites()
        .tunnels_of(leaf)
        .iter()
        .map(|t| t.id)
        .collect();
    ids.sort_unstable();
    ids
}

/// Waits until the leaf's agent reports it trusts the root keys `keys`, as `proxy` holds
/// its report (the report follows the tunnel's welcome).
async fn reported_root_keys(proxy: &ProxyServer, leaf: &ClusterName, keys: &[String]) {
    eventually("the leaf's report of its root keys", || async {
        let tunnels = proxy.sites().tunnels_of(leaf);
        let report = tunnels.first().and_then(|t| t.report())?;
        (report.report.root_keys == keys).then_some(())
    })
    .await;
}

/// A client of `proxy`'s root with a certificate from `ca`, trusting `root_cas`.
async fn root_client(
    proxy: &ProxyServer,
    root_cas: &[&CertificateAuthority],
    ca: &CertificateAuthority,
) -> DialClient {
    let identity =
        Identity::generate_client(ca, "alice", Duration::from_secs(3600)).expect("client");
    DialClient::connect(&DialClientConfig {
        proxy_addr: proxy.local_addr().to_string(),
        route: tether::transport::Route::direct(),
        root_cluster: ca.cluster().clone(),
        root_cas: root_cas.iter().map(|c| c.public_key().clone()).collect(),
        identity: Arc::new(identity),
        timeout: Duration::from_secs(10),
    })
    .await
    .expect("a client of the root")
}

/// The root key set `keys` of `ca`'s cluster, issued at `at`, signed by `signer`.
fn root_set(at: u64, keys: &[&CertificateAuthority], signer: &CertificateAuthority) -> CaKeySet {
    KeySet {
        cluster: signer.cluster().clone(),
        issued_at: at,
        keys: keys.iter().map(|c| c.public_key().clone()).collect(),
    }
    .sign(signer.private_key())
    .expect("sign")
}

/// The root CA keys Secret `root-ca` holds, as fingerprints.
async fn root_ca_held(secrets: &Api<Secret>) -> Vec<String> {
    let secret = secrets.get("root-ca").await.expect("root-ca");
    let text = secret.data.expect("data")["ca.pub"].0.clone();
    String::from_utf8(text)
        .expect("text")
        .lines()
        .filter_map(|l| PublicKey::from_openssh(l.trim()).ok())
        .map(|k| fingerprint(&k))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_ca_rotation_under_load_fails_no_dial_and_ends_the_old_keys_sessions() {
    let (_cp, client, ns) = crds_and_namespace("rotate-root-ca").await;
    let (leaf, pki, proxy) = root_proxy_for_leaf_1().await;
    let proxy = Arc::new(proxy);
    let echo = echo_server().await.expect("echo");
    create_secrets(&client, &ns, &pki).await;
    let operator = start_operator(client.clone(), &ns, None);
    let rule = format!("{}/32:{}", echo.ip(), echo.port());
    let tunnels: Api<tether::operator::crd::ReverseTunnel> = Api::namespaced(client.clone(), &ns);
    tunnels
        .create(
            &PostParams::default(),
            &serde_json::from_value(example(&proxy.local_addr().to_string(), &[rule]))
                .expect("example"),
        )
        .await
        .expect("creating the ReverseTunnel");
    let target = format!("{}.leaf-1.tether:{}", echo.ip(), echo.port());
    eventually("a first dial", || async {
        echo_through(&proxy, &target).await.ok()
    })
    .await;
    let load = DialLoad::start(proxy.clone(), target.clone());
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    // The leaf's tunnels, once a new agent has taken over from the one that held `before`.
    let taken_over = |before: Vec<u64>| {
        let proxy = proxy.clone();
        let leaf = leaf.clone();
        async move {
            eventually("a new agent's tunnel alone", || async {
                let now = tunnel_ids(&proxy, &leaf);
                (now.len() == 1 && !before.contains(&now[0])).then_some(now)
            })
            .await
        }
    };
    let first = tunnel_ids(&proxy, &leaf);
    let (old, new) = (
        &pki.root,
        &CertificateAuthority::generate(pki.root.cluster().clone()).expect("new root CA"),
    );
    let (old_print, new_print) = (fingerprint(old.public_key()), fingerprint(new.public_key()));
    let t0 = now();
    let root = old.cluster().clone();
    // A client of the old key, holding a stream open through the rotation until retire.
    let old_client = root_client(&proxy, &[old, new], old).await;
    let dial = Target::parse(&target).expect("target");
    let mut held = old_client
        .open(&dial, "127.0.0.1:1")
        .await
        .expect("a stream");
    held.write_all(b"ping").await.expect("write");
    held.read_exact(&mut [0u8; 4]).await.expect("echo");

    // Init: the root's set is both keys, signed by the old one (`--ca-keys`): the proxy trusts
    // both for its clients, and the leaf trusts both.
    root_keys::apply(&proxy, &root, Some(root_set(t0, &[old, new], old))).await;
    eventually("the leaf trusts both root keys", || async {
        (root_ca_held(&secrets).await == [old_print.clone(), new_print.clone()]).then_some(())
    })
    .await;
    let trusting_both = taken_over(first).await;
    // The root sees that the leaf trusts both: the gate before it updates its servers.
    reported_root_keys(&proxy, &leaf, &[old_print.clone(), new_print.clone()]).await;
    // Update servers: the proxy presents a host certificate of the new key, and its own CA
    // (its static trust) is the new key, as after a restart with `--ca` the new key.
    let host = Identity::generate_host(new, "proxy-1", Duration::from_secs(3600)).expect("host");
    proxy.renew_identities(&host, None);
    proxy
        .update_trust(|t| {
            t.remove_from(TrustSource::Static, &root);
            t.insert_from(TrustSource::Static, root.clone(), new.public_key().clone());
        })
        .await;
    assert!(
        !old_client.is_closed(),
        "both keys are trusted until retire"
    );
    // Retire: the new key alone, signed by it. The old key's session ends, stream and all.
    root_keys::apply(&proxy, &root, Some(root_set(t0 + 1, &[new], new))).await;
    eventually("the old key's client session ended", || async {
        old_client.is_closed().then_some(())
    })
    .await;
    eventually("the leaf trusts the new root key alone", || async {
        (root_ca_held(&secrets).await == [new_print.clone()]).then_some(())
    })
    .await;
    // A set of the old key, however new, is no longer believed (a proxy that announces it
    // by mistake, say).
    proxy.announce_root_keys(Some(root_set(t0 + 2, &[old, new], old)));
    // Nor is an older set of a trusted key (a proxy not yet restarted, say).
    proxy.announce_root_keys(Some(root_set(t0, &[new, old], new)));
    // An agent trusting the new key alone took over, through the proxy's new certificate.
    taken_over(trusting_both).await;
    reported_root_keys(&proxy, &leaf, std::slice::from_ref(&new_print)).await;
    assert_eq!(
        root_ca_held(&secrets).await,
        std::slice::from_ref(&new_print)
    );

    let ok = load.finish().await;
    let new_client = root_client(&proxy, &[new], new).await;
    new_client
        .open(&dial, "127.0.0.1:1")
        .await
        .expect("the new key's client dials");
    eprintln!("{ok} dials through a root CA rotation, none failed");
    operator.cancel();
}
