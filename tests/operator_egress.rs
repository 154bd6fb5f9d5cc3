//! `spec.egressProxy` (issue #17): a ReverseTunnel names the forward proxy its agent reaches
//! the root through, credentials in a Secret; a missing Secret is a condition that says which
//! field, and the tunnel comes up once the Secret is there. A real tinyproxy with Basic auth,
//! a real API server, the operator in-process (its own route direct).

mod support;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;
use tether::identity::{CertificateAuthority, TrustStore};
use tether::operator::crd::reverse_tunnel::{EgressProxy, Phase, SecretKeyReference};
use tether::operator::crd::{ReverseTunnel, TrustedCluster};
use tether::protocol::ClusterName;
use tokio_util::sync::CancellationToken;

use support::tinyproxy::{PASSWORD, Tinyproxy, USER};
use support::tunnel_e2e::*;

#[tokio::test]
async fn a_reverse_tunnel_goes_through_the_forward_proxy_its_spec_names() {
    let (_cp, client, ns) = crds_and_namespace("op-egress").await;
    let (_leaf, pki, proxy) = root_proxy_for_leaf_1().await;
    create_secrets(&client, &ns, &pki).await;
    let tiny = Tinyproxy::start(&[proxy.local_addr().port()]);
    let stop = start_operator(client.clone(), &ns, None);

    let mut manifest = example(&proxy.local_addr().to_string(), &[]);
    manifest["spec"]["egressProxy"] = json!({
        "url": format!("http://{}", tiny.addr),
        "credentialsSecretRef": {"name": "egress-proxy", "key": "credentials"},
    });
    let rt: ReverseTunnel = serde_json::from_value(manifest).expect("a ReverseTunnel");
    let api: Api<ReverseTunnel> = Api::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &rt)
        .await
        .expect("create");

    // No Secret yet: the condition names the field, the tunnel is not up.
    let message = eventually("a Ready condition naming the missing Secret", || async {
        let rt = api.get("to-root").await.ok()?;
        let status = rt.status?;
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready")?;
        (status.phase == Some(Phase::Failed)).then(|| ready.message.clone())
    })
    .await;
    assert!(
        message.contains("spec.egressProxy.credentialsSecretRef")
            && message.contains("\"egress-proxy\" not found"),
        "{message}"
    );
    assert_eq!(tiny.connects(), 0);

    // The Secret appears: the agent connects through tinyproxy.
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(
            &PostParams::default(),
            &secret(
                "egress-proxy",
                &[("credentials", format!("{USER}:{PASSWORD}\n"))],
            ),
        )
        .await
        .expect("the credentials Secret");
    let status = eventually("status Connected 1/1", || async {
        let status = api.get("to-root").await.ok()?.status?;
        (status.phase == Some(Phase::Connected) && status.proxies_ready.as_deref() == Some("1/1"))
            .then_some(status)
    })
    .await;
    assert!(tiny.connects() >= 1, "the agent went through tinyproxy");
    let shown = serde_json::to_string(&status).expect("json");
    assert!(!shown.contains(PASSWORD), "the password is in the status");
    stop.cancel();
}

/// A `TrustedCluster` naming a forward proxy joins through it, and the tunnel it owns (which
/// takes the same `egressProxy`) connects through it too: tinyproxy logs both CONNECTs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_cluster_joins_and_tunnels_through_its_forward_proxy() {
    let (cp, client, root_ns) = crds_and_namespace("egress-join-root").await;
    let leaf_ns = cp.new_namespace("egress-join-leaf").await;
    let stop = CancellationToken::new();
    let pki = tether::demo::Pki {
        root: CertificateAuthority::generate(ClusterName::new("root").expect("name")).expect("ca"),
        leaf: CertificateAuthority::generate(ClusterName::new("unused").expect("name"))
            .expect("ca"),
    };
    let proxy = start_kube_root(&client, &root_ns, &pki, TrustStore::new(), &[], &stop).await;
    let tiny = Tinyproxy::start(&[proxy.local_addr().port()]);
    let token = create_join_token(&client, &root_ns).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &leaf_ns);
    create_leaf_ca(&secrets, "leaf-e").await;
    for s in [
        secret("join", &[("token", token.reveal())]),
        secret(
            "egress-proxy",
            &[("credentials", format!("{USER}:{PASSWORD}"))],
        ),
    ] {
        secrets
            .create(&PostParams::default(), &s)
            .await
            .expect("Secret");
    }
    let operator = start_operator(client.clone(), &leaf_ns, None);
    let mut tc = trusted_cluster("e", &proxy.local_addr().to_string(), "join", "leaf-e", &[]);
    tc.spec.tunnel.egress_proxy = Some(EgressProxy {
        url: format!("http://{}", tiny.addr),
        no_proxy: String::new(),
        credentials_secret_ref: Some(SecretKeyReference {
            name: "egress-proxy".into(),
            key: "credentials".into(),
        }),
        ca_secret_ref: None,
    });
    let tcs: Api<TrustedCluster> = Api::namespaced(client.clone(), &leaf_ns);
    tcs.create(&PostParams::default(), &tc)
        .await
        .expect("create");

    let rts: Api<ReverseTunnel> = Api::namespaced(client.clone(), &leaf_ns);
    eventually("the owned tunnel Connected 1/1", || async {
        let status = rts.get_opt("e").await.ok()??.status?;
        (status.phase == Some(Phase::Connected) && status.proxies_ready.as_deref() == Some("1/1"))
            .then_some(())
    })
    .await;
    let owned = rts.get("e").await.expect("the owned tunnel");
    assert_eq!(owned.spec.tunnel.egress_proxy, tc.spec.tunnel.egress_proxy);
    // One CONNECT for the join, one for the tunnel (the operator's own route is direct).
    assert!(
        tiny.connects() >= 2,
        "the join and the tunnel went through tinyproxy ({} CONNECTs)",
        tiny.connects()
    );
    operator.cancel();
    stop.cancel();
}
