//! The TrustedCluster join against a real kube-apiserver: a root proxy keeping its tokens and
//! leaves in one namespace, the leaf's operator in another. A valid token joins and yields a
//! connected tunnel; invalid, expired, reused tokens and a taken name each give a condition
//! that says so and no tunnel; disable, re-enable, delete and revocation do what they say.

mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use support::tunnel_e2e::{
    crds_and_namespace, create_leaf_ca, echo_through, eventually, secret, start_kube_root,
    start_operator, start_operator_counting, trusted_cluster,
};
use tether::admin::Component;
use tether::admin::metrics::{MetricsRegistry, OperatorMetrics};
use tether::demo::echo_server;
use tether::identity::{CertificateAuthority, TrustStore, fingerprint};
use tether::operator::crd::reverse_tunnel::Phase;
use tether::operator::crd::{ConditionStatus, RemoteCluster, ReverseTunnel, TrustedCluster};
use tether::operator::root::tokens::token_secret;
use tether::protocol::ClusterName;
use tether::protocol::join::JoinToken;
use tether::proxy::ProxyServer;

fn name(s: &str) -> ClusterName {
    ClusterName::new(s).expect("valid cluster name")
}

/// A root proxy whose state lives in `ns`, as `tether proxy --ca --kubernetes` runs it.
async fn start_root(
    client: &Client,
    ns: &str,
    ca: &CertificateAuthority,
    peers: &[&str],
    stop: &CancellationToken,
) -> Arc<ProxyServer> {
    let pki = tether::demo::Pki {
        root: CertificateAuthority::from_key(ca.cluster().clone(), ca.private_key().clone()),
        leaf: CertificateAuthority::generate(name("unused")).expect("ca"),
    };
    start_kube_root(client, ns, &pki, TrustStore::new(), peers, stop).await
}

async fn issue_token(client: &Client, ns: &str, expires: Option<SystemTime>) -> JoinToken {
    let token = JoinToken::generate();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    secrets
        .create(
            &PostParams::default(),
            &token_secret(&token, None, expires, false),
        )
        .await
        .expect("creating the token Secret");
    token
}

/// The `Joined` condition's (status, reason, message), once it has one.
async fn joined(api: &Api<TrustedCluster>, tc: &str) -> Option<(ConditionStatus, String, String)> {
    let obj = api.get_opt(tc).await.ok()??;
    let c = obj
        .status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Joined")?;
    Some((c.status, c.reason, c.message))
}

async fn wait_joined_false(api: &Api<TrustedCluster>, tc: &str, reason: &str) -> String {
    eventually(&format!("{tc}: Joined=False {reason}"), || async {
        match joined(api, tc).await {
            Some((ConditionStatus::False, r, message)) if r == reason => Some(message),
            _ => None,
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_joins_the_leaf_and_bad_tokens_say_why() {
    let (cp, client, root_ns) = crds_and_namespace("join-root").await;
    let leaf_ns = cp.new_namespace("join-leaf").await;
    let stop = CancellationToken::new();
    let root_ca = CertificateAuthority::generate(name("root")).expect("root ca");
    let proxy = start_root(&client, &root_ns, &root_ca, &[], &stop).await;
    let root_addr = proxy.local_addr().to_string();
    let echo = echo_server().await.expect("echo server");

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &leaf_ns);
    let tcs: Api<TrustedCluster> = Api::namespaced(client.clone(), &leaf_ns);
    let rts: Api<ReverseTunnel> = Api::namespaced(client.clone(), &leaf_ns);
    let remotes: Api<RemoteCluster> = Api::namespaced(client.clone(), &root_ns);
    let root_secrets: Api<Secret> = Api::namespaced(client.clone(), &root_ns);
    create_leaf_ca(&secrets, "leaf-1").await;
    let token = issue_token(
        &client,
        &root_ns,
        Some(SystemTime::now() + Duration::from_secs(3600)),
    )
    .await;
    secrets
        .create(
            &PostParams::default(),
            &secret("join-1", &[("token", token.reveal())]),
        )
        .await
        .expect("token Secret");

    let counted = OperatorMetrics::default();
    let operator = start_operator_counting(client.clone(), &leaf_ns, None, counted.clone());
    let allow = vec![format!("127.0.0.1/32:{}", echo.port())];
    // The shipped example, pointed at this root and this echo server.
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/trustedcluster.yaml"
    ))
    .expect("reading the example");
    let mut example: TrustedCluster = serde_yaml::from_str(&text).expect("example YAML");
    assert_eq!(example.name_any(), "to-root");
    assert_eq!(example.spec.leaf_cluster, "leaf-1");
    example.spec.root_address = root_addr.clone();
    example.spec.token_secret_ref.name = "join-1".into();
    example.spec.tunnel.allow = allow.clone();
    tcs.create(&PostParams::default(), &example)
        .await
        .expect("creating the TrustedCluster");

    // Joined, with the root's fingerprint, and the owned ReverseTunnel connected.
    eventually("to-root joined", || async {
        matches!(
            joined(&tcs, "to-root").await,
            Some((ConditionStatus::True, ..))
        )
        .then_some(())
    })
    .await;
    let tc = tcs.get("to-root").await.expect("tc");
    let status = tc.status.clone().expect("status");
    assert_eq!(status.root_cluster.as_deref(), Some("root"));
    assert_eq!(
        status.root_ca_fingerprint.as_deref(),
        Some(fingerprint(root_ca.public_key()).as_str())
    );
    let rt = eventually("the owned ReverseTunnel connected", || async {
        let rt = rts.get_opt("to-root").await.ok()??;
        (rt.status.as_ref()?.phase == Some(Phase::Connected)).then_some(rt)
    })
    .await;
    assert_eq!(rt.owner_references()[0].uid, tc.uid().expect("uid"));
    assert_eq!(rt.spec.tunnel.allow, allow);
    let target = format!("127.0.0.1.leaf-1.tether:{}", echo.port());
    assert_eq!(
        echo_through(&proxy, &target).await.as_deref(),
        Ok(&b"ping"[..])
    );

    // The root recorded the leaf, spent the token, and reports who holds the tunnel.
    let rc = eventually("RemoteCluster leaf-1 with proxy-1 holding", || async {
        let rc = remotes.get_opt("leaf-1").await.ok()??;
        let held = rc
            .status
            .as_ref()?
            .proxies
            .iter()
            .any(|p| p.proxy_id == "proxy-1" && p.tunnels == 1);
        held.then_some(rc)
    })
    .await;
    assert_eq!(rc.spec.join_token.as_deref(), Some(token.id()));
    let spent = root_secrets
        .get(&format!("tether-join-{}", token.id()))
        .await
        .expect("token Secret");
    assert_eq!(
        spent
            .data
            .expect("data")
            .get("used-by")
            .map(|b| b.0.clone()),
        Some(b"leaf-1".to_vec())
    );

    // The join is counted by the proxy that served it, the reconciles and the agent's
    // convergence by the operator, each in its own set.
    let metrics =
        proxy.shared().metrics() + &MetricsRegistry::default().operator(&counted).encode();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    assert!(
        value("tether_proxy_joins_total{outcome=\"joined\"}") >= 1.0,
        "{metrics}"
    );
    assert!(
        value("tether_operator_reconciles_total{controller=\"trusted_cluster\",result=\"ok\"}")
            >= 1.0,
        "{metrics}"
    );
    assert!(
        value("tether_agent_convergence_seconds_count") >= 1.0,
        "{metrics}"
    );

    // Reusing the spent token for another leaf: refused, no tunnel.
    create_leaf_ca(&secrets, "leaf-2").await;
    tcs.create(
        &PostParams::default(),
        &trusted_cluster("reuse", &root_addr, "join-1", "leaf-2", &[]),
    )
    .await
    .expect("create");
    let message = wait_joined_false(&tcs, "reuse", "TokenAlreadyUsed").await;
    assert!(message.contains("already used by leaf-1"), "{message}");

    // Expired.
    let expired = issue_token(
        &client,
        &root_ns,
        Some(SystemTime::now() - Duration::from_secs(60)),
    )
    .await;
    secrets
        .create(
            &PostParams::default(),
            &secret("join-expired", &[("token", expired.reveal())]),
        )
        .await
        .expect("create");
    tcs.create(
        &PostParams::default(),
        &trusted_cluster("expired", &root_addr, "join-expired", "leaf-2", &[]),
    )
    .await
    .expect("create");
    let message = wait_joined_false(&tcs, "expired", "TokenExpired").await;
    assert!(message.contains("expired at"), "{message}");

    // Not a token at all, and a well-formed token the root never issued.
    secrets
        .create(
            &PostParams::default(),
            &secret("join-garbage", &[("token", "hunter2".into())]),
        )
        .await
        .expect("create");
    tcs.create(
        &PostParams::default(),
        &trusted_cluster("garbage", &root_addr, "join-garbage", "leaf-2", &[]),
    )
    .await
    .expect("create");
    wait_joined_false(&tcs, "garbage", "InvalidToken").await;
    secrets
        .create(
            &PostParams::default(),
            &secret("join-unknown", &[("token", JoinToken::generate().reveal())]),
        )
        .await
        .expect("create");
    tcs.create(
        &PostParams::default(),
        &trusted_cluster("unknown", &root_addr, "join-unknown", "leaf-2", &[]),
    )
    .await
    .expect("create");
    wait_joined_false(&tcs, "unknown", "TokenUnknown").await;

    // A fresh token, but the name leaf-1 belongs to another CA.
    let fresh = issue_token(&client, &root_ns, None).await;
    let impostor_secrets = secrets.clone();
    let other = CertificateAuthority::generate(name("leaf-1")).expect("ca");
    impostor_secrets
        .create(
            &PostParams::default(),
            &secret(
                "impostor-ca",
                &[(
                    "ca",
                    other
                        .private_key()
                        .to_openssh(Default::default())
                        .expect("encode")
                        .to_string(),
                )],
            ),
        )
        .await
        .expect("create");
    secrets
        .create(
            &PostParams::default(),
            &secret("join-fresh", &[("token", fresh.reveal())]),
        )
        .await
        .expect("create");
    let mut taken = trusted_cluster("taken", &root_addr, "join-fresh", "leaf-1", &[]);
    taken.spec.leaf_ca_secret_ref.name = "impostor-ca".into();
    tcs.create(&PostParams::default(), &taken)
        .await
        .expect("create");
    let message = wait_joined_false(&tcs, "taken", "NameTaken").await;
    assert!(
        message.contains("already joined with another CA"),
        "{message}"
    );
    for failed in ["reuse", "expired", "garbage", "unknown", "taken"] {
        assert!(
            rts.get_opt(failed).await.expect("get").is_none(),
            "{failed} has a tunnel"
        );
    }

    // Disable: the tunnel goes, the trust stays; enable: back without a new token.
    let leaf1 = name("leaf-1");
    tcs.patch(
        "to-root",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"enabled": false}})),
    )
    .await
    .expect("disable");
    eventually("tunnel removed on disable", || async {
        let gone = rts.get_opt("to-root").await.ok()?.is_none();
        (gone && proxy.site(&leaf1).is_none_or(|s| s.tunnels.is_empty())).then_some(())
    })
    .await;
    tcs.patch(
        "to-root",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"enabled": true}})),
    )
    .await
    .expect("enable");
    eventually("tunnel back on enable", || async {
        let rt = rts.get_opt("to-root").await.ok()??;
        (rt.status?.phase == Some(Phase::Connected)).then_some(())
    })
    .await;

    // Revocation at the root: deleting the RemoteCluster closes the leaf's tunnels.
    remotes
        .delete("leaf-1", &DeleteParams::default())
        .await
        .expect("delete RemoteCluster");
    eventually("tunnels closed after revocation", || async {
        proxy
            .site(&leaf1)
            .is_none_or(|s| s.tunnels.is_empty())
            .then_some(())
    })
    .await;

    // Deleting the TrustedCluster removes what it created, then the finalizer.
    tcs.delete("to-root", &DeleteParams::default())
        .await
        .expect("delete");
    eventually("TrustedCluster and its objects gone", || async {
        let tc_gone = tcs.get_opt("to-root").await.ok()?.is_none();
        let rt_gone = rts.get_opt("to-root").await.ok()?.is_none();
        let agent_gone = secrets.get_opt("to-root-agent").await.ok()?.is_none();
        let ca_gone = secrets.get_opt("to-root-root-ca").await.ok()?.is_none();
        (tc_gone && rt_gone && agent_gone && ca_gone).then_some(())
    })
    .await;
    operator.cancel();
    stop.cancel();
}

/// A mistyped token Secret, then corrected (issue #14): the operator watches the Secret, so the
/// leaf joins as soon as the token is right, not at the retry 60 s after the refusal. Then an
/// edit of the tunnel it owns is replaced, not a reason to stop reconciling.
#[tokio::test]
async fn a_corrected_token_joins_at_once_and_its_tunnel_follows_the_trusted_cluster() {
    let (cp, client, root_ns) = crds_and_namespace("join-fix-root").await;
    let leaf_ns = cp.new_namespace("join-fix-leaf").await;
    let stop = CancellationToken::new();
    let root_ca = CertificateAuthority::generate(name("root")).expect("root ca");
    let proxy = start_root(&client, &root_ns, &root_ca, &[], &stop).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &leaf_ns);
    let tcs: Api<TrustedCluster> = Api::namespaced(client.clone(), &leaf_ns);
    create_leaf_ca(&secrets, "leaf-fix").await;
    let typo = secret("join-typo", &[("token", JoinToken::generate().reveal())]);
    secrets
        .create(&PostParams::default(), &typo)
        .await
        .expect("token Secret");
    let operator = start_operator(client.clone(), &leaf_ns, None);
    let root_addr = proxy.local_addr().to_string();
    tcs.create(
        &PostParams::default(),
        &trusted_cluster("fix", &root_addr, "join-typo", "leaf-fix", &[]),
    )
    .await
    .expect("create");
    wait_joined_false(&tcs, "fix", "TokenUnknown").await;

    let token = issue_token(&client, &root_ns, None).await;
    let corrected = std::time::Instant::now();
    secrets
        .replace(
            "join-typo",
            &PostParams::default(),
            &secret("join-typo", &[("token", token.reveal())]),
        )
        .await
        .expect("correcting the token");
    eventually("fix: Joined=True", || async {
        matches!(
            joined(&tcs, "fix").await,
            Some((ConditionStatus::True, _, _))
        )
        .then_some(())
    })
    .await;
    // The refusal's retry is 60 s away; a join that waited for it would take that long.
    let took = corrected.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "joined {took:?} after the correction"
    );
    eprintln!("a corrected token Secret joined {took:?} after the correction");

    // Day two: someone edits the tunnel the TrustedCluster owns (as `kubectl edit` would, taking
    // the field). The TrustedCluster is its source: the edit is replaced, and reconciling goes
    // on (it stopped at TunnelNameTaken, a conflict with the editor, until the tunnel was
    // deleted).
    let rts: Api<ReverseTunnel> = Api::namespaced(client.clone(), &leaf_ns);
    eventually("the TrustedCluster's ReverseTunnel", || async {
        rts.get_opt("fix").await.ok()?
    })
    .await;
    let edit = json!({ "spec": { "allow": ["127.0.0.1/32:9"] } });
    let by_hand = PatchParams {
        field_manager: Some("kubectl-edit".into()),
        ..PatchParams::default()
    };
    rts.patch("fix", &by_hand, &Patch::Merge(&edit))
        .await
        .expect("editing the tunnel");
    eventually("the edit replaced by the TrustedCluster's spec", || async {
        let rt = rts.get_opt("fix").await.ok()??;
        rt.spec.tunnel.allow.is_empty().then_some(())
    })
    .await;
    let tc = tcs.get("fix").await.expect("tc");
    let reasons: Vec<String> = tc
        .status
        .into_iter()
        .flat_map(|s| s.conditions)
        .map(|c| c.reason)
        .collect();
    assert!(
        !reasons.iter().any(|r| r == "TunnelNameTaken"),
        "{reasons:?}"
    );
    operator.cancel();
    stop.cancel();
}

#[tokio::test]
async fn entries_of_departed_replicas_are_pruned() {
    let (_, client, ns) = crds_and_namespace("join-prune").await;
    let remotes: Api<RemoteCluster> = Api::namespaced(client.clone(), &ns);
    let leaf_ca = CertificateAuthority::generate(name("leaf-x")).expect("ca");
    let rc: RemoteCluster = serde_json::from_value(json!({
        "apiVersion": "tether.dev/v1alpha1",
        "kind": "RemoteCluster",
        "metadata": { "name": "leaf-x" },
        "spec": { "caKeys": [leaf_ca.public_key().to_openssh().expect("encode")] },
    }))
    .expect("RemoteCluster");
    remotes
        .create(&PostParams::default(), &rc)
        .await
        .expect("create");
    // Entries as two replicas wrote them: one died (ghost), one is alive (proxy-2).
    for id in ["ghost", "proxy-2"] {
        let status = json!({
            "apiVersion": "tether.dev/v1alpha1",
            "kind": "RemoteCluster",
            "metadata": { "name": "leaf-x" },
            "status": { "proxies": [{ "proxyId": id, "connection": "Online", "tunnels": 1 }] },
        });
        remotes
            .patch_status(
                "leaf-x",
                &PatchParams::apply(&format!("tether-proxy-{id}")),
                &Patch::Apply(&status),
            )
            .await
            .expect("an entry");
    }
    let stop = CancellationToken::new();
    let root_ca = CertificateAuthority::generate(name("root")).expect("root ca");
    let _proxy = start_root(&client, &ns, &root_ca, &["proxy-1", "proxy-2"], &stop).await;
    let left = eventually("the ghost's entry removed", || async {
        let rc = remotes.get_opt("leaf-x").await.ok()??;
        let ids: Vec<String> = rc.status?.proxies.into_iter().map(|p| p.proxy_id).collect();
        (!ids.iter().any(|id| id == "ghost")).then_some(ids)
    })
    .await;
    assert_eq!(left, ["proxy-2"], "a live replica's entry stays");
    stop.cancel();
}

#[tokio::test]
async fn invalid_trusted_clusters_are_rejected_by_the_api_server() {
    let (_, client, ns) = crds_and_namespace("join-invalid").await;
    let tcs: Api<TrustedCluster> = Api::namespaced(client.clone(), &ns);
    let cases = [
        ("leafCluster", json!("Leaf_1"), "leafCluster"),
        ("rootAddress", json!("no-port"), "rootAddress"),
        ("allow", json!(["everything"]), "each allow rule must be"),
        ("heartbeatInterval", json!("soon"), "heartbeatInterval"),
    ];
    for (field, value, expected) in cases {
        let mut tc = serde_json::to_value(trusted_cluster(
            "bad",
            "root.example:3024",
            "t",
            "leaf-1",
            &[],
        ))
        .expect("json");
        tc["spec"][field] = value;
        let tc: TrustedCluster = serde_json::from_value(tc).expect("still a TrustedCluster");
        match tcs.create(&PostParams::default(), &tc).await {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{field}: {status:?}");
                assert!(
                    status.message.contains(expected),
                    "{field}: {}",
                    status.message
                );
            }
            other => panic!("{field}: accepted: {other:?}"),
        }
    }
}
