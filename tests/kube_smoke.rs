//! Smoke tests of the test control plane itself: a CRD from a Rust type,
//! server-side apply, the status subresource, watches, kubectl, RBAC and
//! kube-controller-manager's EndpointSlice controller, all against a real
//! kube-apiserver (see tests/kube/README.md).

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    ApiResource, DynamicObject, ListParams, ObjectMeta, Patch, PatchParams, PostParams,
};
use kube::runtime::{WatchStreamExt, conditions, wait::await_condition, watcher};
use kube::{Api, Client, CustomResource, CustomResourceExt, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::time::timeout;

const DEADLINE: Duration = Duration::from_secs(60);
const MANAGER: &str = "tether-smoke";

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "smoke.tether.dev",
    version = "v1alpha1",
    kind = "Widget",
    namespaced,
    status = "WidgetStatus",
    shortname = "wdg"
)]
pub struct WidgetSpec {
    pub size: i32,
    pub color: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WidgetStatus {
    pub ready: bool,
    pub observed_size: i32,
}

/// Installs the Widget CRD (server-side apply, so every test may call it) and
/// waits until it is Established.
async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = Widget::crd();
    let name = crd.name_any();
    crds.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("applying the Widget CRD");
    timeout(
        DEADLINE,
        await_condition(crds, &name, conditions::is_crd_established()),
    )
    .await
    .expect("CRD not Established in time")
    .expect("watching the CRD");
}

fn api_status(result: Result<impl std::fmt::Debug, kube::Error>) -> u16 {
    match result {
        Err(kube::Error::Api(status)) => status.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn crd_apply_status_watch_and_kubectl() {
    let cp = support::kube::control_plane().await;
    let client = cp.kube_client();
    install_crd(&client).await;
    let ns = cp.new_namespace("smoke-crd").await;
    let widgets: Api<Widget> = Api::namespaced(client.clone(), &ns);

    // Schema validation is the server's: a string where the schema says int.
    let bad: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "smoke.tether.dev/v1alpha1",
        "kind": "Widget",
        "metadata": { "name": "bad" },
        "spec": { "size": "big", "color": "red" },
    }))
    .expect("bad widget JSON");
    let dynamic: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &ApiResource::erase::<Widget>(&()));
    let code = api_status(dynamic.create(&PostParams::default(), &bad).await);
    assert_eq!(code, 422, "schema validation should reject size: \"big\"");
    // Server-side apply reports the same mismatch as a 500 (typed patch).
    let code = api_status(
        dynamic
            .patch("bad", &PatchParams::apply(MANAGER), &Patch::Apply(&bad))
            .await,
    );
    assert_eq!(code, 500, "server-side apply of size: \"big\"");

    let created = widgets
        .create(
            &PostParams::default(),
            &Widget::new(
                "w1",
                WidgetSpec {
                    size: 1,
                    color: "red".into(),
                },
            ),
        )
        .await
        .expect("creating Widget w1");
    assert_eq!(created.spec.size, 1);
    assert!(created.status.is_none());

    // Start watching: the initial list yields w1 as created; what follows
    // can only come from watch events.
    let mut seen = watcher(
        widgets.clone(),
        watcher::Config::default().fields("metadata.name=w1"),
    )
    .applied_objects()
    .boxed();
    let initial = timeout(DEADLINE, seen.try_next())
        .await
        .expect("watcher's initial list in time")
        .expect("watch stream")
        .expect("watch stream ended");
    assert_eq!(initial.spec.size, 1);
    assert!(initial.status.is_none());

    let spec = json!({
        "apiVersion": "smoke.tether.dev/v1alpha1",
        "kind": "Widget",
        "spec": { "size": 3, "color": "blue" },
    });
    let patched = widgets
        .patch(
            "w1",
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&spec),
        )
        .await
        .expect("server-side apply of spec");
    assert_eq!(patched.spec.size, 3);
    let managers: Vec<_> = patched
        .managed_fields()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        managers.iter().any(|m| m == MANAGER),
        "field manager {MANAGER} missing: {managers:?}"
    );

    let status = json!({
        "apiVersion": "smoke.tether.dev/v1alpha1",
        "kind": "Widget",
        "status": { "ready": true, "observedSize": 3 },
    });
    let patched = widgets
        .patch_status(
            "w1",
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&status),
        )
        .await
        .expect("server-side apply of status");
    assert_eq!(
        patched.status,
        Some(WidgetStatus {
            ready: true,
            observed_size: 3
        })
    );

    let watched = timeout(DEADLINE, async {
        while let Some(w) = seen.try_next().await.expect("watch stream") {
            if w.status.as_ref().is_some_and(|s| s.ready) {
                return w;
            }
        }
        panic!("watch stream ended");
    })
    .await
    .expect("watch did not see the status change in time");
    assert_eq!(watched.spec.color, "blue");

    // The status subresource ignores spec changes and vice versa.
    let got = widgets.get("w1").await.expect("get w1");
    assert_eq!(got.spec.size, 3);

    let out = cp.kubectl([
        "get",
        "widgets.smoke.tether.dev",
        "w1",
        "-n",
        &ns,
        "-o",
        "json",
    ]);
    assert!(
        out.status.success(),
        "kubectl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let from_kubectl: Widget = serde_json::from_slice(&out.stdout).expect("kubectl JSON");
    assert_eq!(from_kubectl.spec, got.spec);
    assert_eq!(from_kubectl.status, got.status);
    assert_eq!(from_kubectl.metadata.uid, got.metadata.uid);
    assert_eq!(
        from_kubectl.metadata.resource_version,
        got.metadata.resource_version
    );
}

#[tokio::test]
async fn rbac_is_enforced_for_service_accounts() {
    let cp = support::kube::control_plane().await;
    let admin = cp.kube_client();
    install_crd(&admin).await;
    let ns = cp.new_namespace("smoke-rbac").await;
    let sa = cp.client_for_service_account(&ns, "no-rights").await;
    let widgets: Api<Widget> = Api::namespaced(sa.clone(), &ns);
    let w = Widget::new(
        "w2",
        WidgetSpec {
            size: 2,
            color: "green".into(),
        },
    );

    assert_eq!(api_status(widgets.list(&ListParams::default()).await), 403);
    assert_eq!(
        api_status(widgets.create(&PostParams::default(), &w).await),
        403
    );

    let role = Role {
        metadata: ObjectMeta {
            name: Some("widgets".into()),
            ..Default::default()
        },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["smoke.tether.dev".into()]),
            resources: Some(vec!["widgets".into()]),
            verbs: vec!["get".into(), "list".into(), "create".into()],
            ..Default::default()
        }]),
    };
    Api::<Role>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &role)
        .await
        .expect("creating Role");
    let binding = RoleBinding {
        metadata: ObjectMeta {
            name: Some("widgets".into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: "widgets".into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: "no-rights".into(),
            namespace: Some(ns.clone()),
            ..Default::default()
        }]),
    };
    Api::<RoleBinding>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &binding)
        .await
        .expect("creating RoleBinding");

    // The authorizer's informers see the binding shortly after; poll.
    timeout(DEADLINE, async {
        loop {
            match widgets.list(&ListParams::default()).await {
                Ok(_) => break,
                Err(kube::Error::Api(s)) if s.code == 403 => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("listing as the bound ServiceAccount: {e}"),
            }
        }
    })
    .await
    .expect("RoleBinding never took effect");
    widgets
        .create(&PostParams::default(), &w)
        .await
        .expect("creating as the bound ServiceAccount");
    // Still no delete right.
    assert_eq!(
        api_status(widgets.delete("w2", &Default::default()).await),
        403
    );
}

fn pod(name: &str, node: &str, labels: &BTreeMap<String, String>) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "name": name, "labels": labels },
        "spec": {
            "nodeName": node,
            "containers": [{
                "name": "web",
                "image": "registry.invalid/none:0",
                "ports": [{ "containerPort": 8080, "name": "http" }],
            }],
        },
    }))
    .expect("pod JSON")
}

#[tokio::test]
async fn controller_manager_writes_endpoint_slices() {
    let cp = support::kube::control_plane().await;
    cp.start_controller_manager().await;
    let client = cp.kube_client();
    let ns = cp.new_namespace("smoke-eps").await;

    // Pods reference a Node; the EndpointSlice controller skips Pods whose
    // Node does not exist. No kubelet: the Node is just an object.
    let node_name = format!("node-{ns}");
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": node_name } }))
                .expect("node JSON"),
        )
        .await
        .expect("creating Node");

    let labels: BTreeMap<String, String> = [("app".to_string(), "web".to_string())].into();
    let service: Service = serde_json::from_value(json!({
        "metadata": { "name": "web" },
        "spec": {
            "selector": labels,
            "ports": [{ "name": "http", "port": 80, "targetPort": "http" }],
        },
    }))
    .expect("service JSON");
    Api::<Service>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &service)
        .await
        .expect("creating Service");

    // Addresses from TEST-NET-1 (RFC 5737): data only, nothing connects.
    let ips = ["192.0.2.11", "192.0.2.12"];
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    for (i, ip) in ips.iter().enumerate() {
        let name = format!("web-{i}");
        pods.create(&PostParams::default(), &pod(&name, &node_name, &labels))
            .await
            .expect("creating Pod");
        let status = json!({
            "status": {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{ "ip": ip }],
                "conditions": [
                    { "type": "Ready", "status": "True" },
                    { "type": "ContainersReady", "status": "True" },
                ],
            },
        });
        pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .expect("setting Pod status");
    }

    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    let selector = ListParams::default().labels("kubernetes.io/service-name=web");
    let ready_ips = timeout(DEADLINE, async {
        loop {
            let list = slices
                .list(&selector)
                .await
                .expect("listing EndpointSlices");
            let mut ready: Vec<String> = list
                .items
                .iter()
                .flat_map(|s| s.endpoints.iter().flatten())
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                .flat_map(|e| e.addresses.iter().cloned())
                .collect();
            ready.sort();
            if ready.len() == ips.len() {
                return ready;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no EndpointSlice with both Pods in time; kube-controller-manager log: {}",
            cp.log_dir().join("kube-controller-manager.log").display()
        )
    });
    assert_eq!(ready_ips, ips);

    let _ = nodes.delete(&node_name, &Default::default()).await;
}
