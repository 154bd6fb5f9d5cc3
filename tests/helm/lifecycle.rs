//! Releases over time: install, upgrade and uninstall; root and leaf as two releases.

use super::*;

#[tokio::test]
async fn install_upgrade_uninstall_leaves_only_the_crds() {
    let started = Instant::now();
    let cp = support::kube::control_plane().await;
    let client = cp.kube_client();
    // The CRDs may exist already (other tests, an earlier release): the chart takes them over
    // and upgrades them, as it would from a release installed before it managed them.
    ensure_crds(&client).await;
    let ns = cp.new_namespace("helm-lifecycle").await;
    let chart = chart_arg();
    let release = "lifecycle";
    let cluster_role = format!("lifecycle-tether-operator-{ns}");

    let notes = helm_ok(
        cp,
        &concat(&[
            &["install", release, &chart, "-n", &ns, "--take-ownership"],
            BOTH,
            &["--set", "leaf.watchAllNamespaces=true"],
        ]),
    );
    for hint in [
        "create secret generic tether-root-ca",
        "tether ca init --cluster root",
        &format!("kubectl -n {ns} get rt"),
        "lifecycle-tether-proxy",
    ] {
        assert!(notes.contains(hint), "NOTES do not say {hint:?}:\n{notes}");
    }
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let proxy = deployments
        .get("lifecycle-tether-proxy")
        .await
        .expect("proxy Deployment");
    assert_eq!(proxy.spec.replicas, Some(3));
    deployments
        .get("lifecycle-tether-operator")
        .await
        .expect("operator Deployment");
    let cluster_roles: Api<ClusterRole> = Api::all(client.clone());
    cluster_roles
        .get(&cluster_role)
        .await
        .expect("the operator's ClusterRole");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in [
        "reversetunnels.tether.dev",
        "trustedclusters.tether.dev",
        "remoteclusters.tether.dev",
    ] {
        let crd = crds.get(name).await.expect("CRD");
        let annotations = crd.metadata.annotations.unwrap_or_default();
        assert_eq!(
            annotations
                .get("helm.sh/resource-policy")
                .map(String::as_str),
            Some("keep"),
            "{name}"
        );
        assert_eq!(
            annotations
                .get("meta.helm.sh/release-name")
                .map(String::as_str),
            Some(release),
            "{name} is the release's"
        );
    }

    // Upgrade: more proxies, and the operator back to its namespace.
    helm_ok(
        cp,
        &concat(&[
            &["upgrade", release, &chart, "-n", &ns],
            BOTH,
            &["--set", "root.replicas=5"],
        ]),
    );
    let proxy = deployments
        .get("lifecycle-tether-proxy")
        .await
        .expect("proxy Deployment");
    assert_eq!(proxy.spec.replicas, Some(5));
    let operator = deployments
        .get("lifecycle-tether-operator")
        .await
        .expect("operator Deployment");
    let args = operator
        .spec
        .template
        .spec
        .and_then(|p| p.containers.into_iter().next())
        .and_then(|c| c.args)
        .unwrap_or_default();
    assert!(args.windows(2).any(|w| w == ["--namespace", ns.as_str()]));
    let roles: Api<Role> = Api::namespaced(client.clone(), &ns);
    roles
        .get("lifecycle-tether-operator")
        .await
        .expect("the operator's Role after the upgrade");
    eventually("the ClusterRole gone after the upgrade", || async {
        matches!(cluster_roles.get_opt(&cluster_role).await, Ok(None)).then_some(())
    })
    .await;
    let list = helm_ok(cp, &["list", "-n", &ns, "-o", "json"]);
    let list: Value = serde_json::from_str(&list).expect("helm list JSON");
    assert_eq!(list[0]["name"], release);
    assert_eq!(list[0]["revision"], "2");
    assert_eq!(list[0]["status"], "deployed");

    // Uninstall: nothing of the release is left but the CRDs.
    helm_ok(cp, &["uninstall", release, "-n", &ns]);
    let left = eventually("the namespace emptied", || async {
        let left = namespace_objects(cp, &ns);
        left.is_empty().then_some(left)
    })
    .await;
    assert!(left.is_empty());
    let cluster_wide = kubectl_ok(
        cp,
        &[
            "get",
            "clusterroles,clusterrolebindings",
            "-l",
            &format!("app.kubernetes.io/instance={release}"),
            "-o",
            "name",
        ],
    );
    assert_eq!(cluster_wide.trim(), "", "cluster-wide leftovers");
    for name in [
        "reversetunnels.tether.dev",
        "trustedclusters.tether.dev",
        "remoteclusters.tether.dev",
    ] {
        crds.get(name).await.expect("the CRDs stay");
    }
    eprintln!(
        "install_upgrade_uninstall_leaves_only_the_crds took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn root_and_leaf_install_as_two_releases_in_one_namespace() {
    let started = Instant::now();
    let (cp, admin, ns) = crds_and_namespace("helm-two-releases").await;
    install(cp, "root", &ns, ROOT_ONLY);
    install(cp, "leaf", &ns, LEAF_ONLY);
    let list: Value =
        serde_json::from_str(&helm_ok(cp, &["list", "-n", &ns, "-o", "json"])).expect("JSON");
    let mut deployed: Vec<(&str, &str)> = list
        .as_array()
        .expect("releases")
        .iter()
        .map(|r| {
            (
                r["name"].as_str().expect("name"),
                r["status"].as_str().expect("status"),
            )
        })
        .collect();
    deployed.sort();
    assert_eq!(deployed, [("leaf", "deployed"), ("root", "deployed")]);
    let deployments: Api<Deployment> = Api::namespaced(admin, &ns);
    let mut names: Vec<String> = deployments
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .into_iter()
        .filter_map(|d| d.metadata.name)
        .collect();
    names.sort();
    assert_eq!(names, ["leaf-tether-operator", "root-tether-proxy"]);
    eprintln!(
        "root_and_leaf_install_as_two_releases_in_one_namespace took {:?}",
        started.elapsed()
    );
}
