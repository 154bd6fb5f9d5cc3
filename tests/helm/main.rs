//! The Helm chart (`charts/tether`) against the real helm and kube-apiserver of the test
//! control plane: lint, rendering and schema; a server-side dry run of what it renders;
//! install, upgrade and uninstall (only the CRDs stay); and its RBAC, with the ServiceAccount
//! tokens of an installed release: enough for the operator end to end (a ReverseTunnel
//! connects and a dial goes through; in-process, and as the `tether` binary run with the
//! container's rendered arguments) and for what proxies do, and no more (403s).

#[path = "../support/mod.rs"]
mod support;

mod lifecycle;
mod rbac;
mod render;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{ClusterRole, Role};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::{Api, Client};
use serde::Deserialize;
use serde_json::{Value, json};

use support::kube::ControlPlane;
use support::tunnel_e2e::{
    crds_and_namespace, create_secrets, delete_and_wait_gone, echo_through, eventually, example,
    proxy_slice, root_proxy_for_leaf_1, start_operator,
};
use tether::agent::join::{JoinRequest, join};
use tether::demo::{Pki, echo_server};
use tether::identity::TrustStore;
use tether::operator::crd::reverse_tunnel::Phase;
use tether::operator::crd::{ConditionStatus, RemoteCluster, ReverseTunnel};
use tether::operator::root::tokens::token_secret;
use tether::operator::root::{self, KubeJoinAuthority};
use tether::protocol::ClusterName;
use tether::protocol::join::JoinToken;
use tether::proxy::ProxyServer;
use tokio_util::sync::CancellationToken;

/// Values of a root-only release.
const ROOT_ONLY: &[&str] = &[
    "--set",
    "root.enabled=true,root.clusterName=root,root.caSecret=tether-root-ca,leaf.enabled=false",
];
/// Values of a leaf-only release (root is off by default).
const LEAF_ONLY: &[&str] = &["--set", "leaf.enabled=true"];
/// Values of a release with both roles.
const BOTH: &[&str] = &[
    "--set",
    "root.enabled=true,root.clusterName=root,root.caSecret=tether-root-ca,leaf.enabled=true",
];

/// Values that turn on the Kubernetes API through the root on both sides (#16).
const KUBE_ACCESS: &[&str] = &[
    "--set",
    "root.kube.enabled=true,root.kube.extraSANs={tether.example.com,203.0.113.7},root.kube.clientCASecret=root-client-ca,leaf.kubeAccess.enabled=true,leaf.kubeAccess.groups={tether:admins}",
];

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/tether")
}

fn chart_arg() -> String {
    chart().to_string_lossy().into_owned()
}

/// Runs helm; returns (success, stdout, stderr).
fn helm(cp: &ControlPlane, args: &[&str]) -> (bool, String, String) {
    let out = cp.helm(args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs helm and returns its stdout, failing the test (with its stderr) if it fails.
fn helm_ok(cp: &ControlPlane, args: &[&str]) -> String {
    let (ok, stdout, stderr) = helm(cp, args);
    assert!(ok, "helm {args:?} failed:\n{stderr}\n{stdout}");
    stdout
}

fn kubectl_ok(cp: &ControlPlane, args: &[&str]) -> String {
    let out = cp.kubectl(args);
    assert!(
        out.status.success(),
        "kubectl {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn concat<'a>(parts: &[&[&'a str]]) -> Vec<&'a str> {
    parts.iter().flat_map(|p| p.iter().copied()).collect()
}

/// `helm template RELEASE charts/tether -n NS VALUES...` as text.
fn render_text(cp: &ControlPlane, release: &str, ns: &str, values: &[&str]) -> String {
    let chart = chart_arg();
    let args = concat(&[&["template", release, &chart, "--namespace", ns], values]);
    helm_ok(cp, &args)
}

/// The rendered objects (empty documents dropped).
fn parse_docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn render(cp: &ControlPlane, release: &str, ns: &str, values: &[&str]) -> Vec<Value> {
    parse_docs(&render_text(cp, release, ns, values))
}

fn kinds(docs: &[Value]) -> BTreeMap<String, usize> {
    let mut kinds = BTreeMap::new();
    for d in docs {
        *kinds
            .entry(d["kind"].as_str().expect("kind").to_owned())
            .or_default() += 1;
    }
    kinds
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().expect("a string"))
        .collect()
}

/// The hardening every Tether pod must have.
fn assert_hardened(deployment: &Value) {
    let name = deployment["metadata"]["name"].as_str().unwrap_or_default();
    let pod = &deployment["spec"]["template"]["spec"];
    let psc = &pod["securityContext"];
    assert_eq!(psc["runAsNonRoot"], true, "{name}");
    assert_eq!(psc["runAsUser"], 65532, "{name}");
    assert_eq!(psc["seccompProfile"]["type"], "RuntimeDefault", "{name}");
    assert_eq!(pod["automountServiceAccountToken"], true, "{name}");
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1, "{name}");
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true, "{name}");
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{name}");
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{name}");
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(c[probe]["httpGet"]["port"], "admin", "{name} {probe}");
    }
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{name}");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{name}");
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                c["resources"][kind][resource].is_string(),
                "{name}: no resources.{kind}.{resource}"
            );
        }
    }
    let env: Vec<(&str, &str)> = c["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| {
            (
                e["name"].as_str().expect("name"),
                e["valueFrom"]["fieldRef"]["fieldPath"]
                    .as_str()
                    .unwrap_or_default(),
            )
        })
        .collect();
    assert!(
        env.contains(&("POD_NAME", "metadata.name")),
        "{name}: {env:?}"
    );
    assert!(
        env.contains(&("POD_NAMESPACE", "metadata.namespace")),
        "{name}: {env:?}"
    );
    // The admin endpoint binds to the pod's IP (`$(POD_IP):PORT`), never 0.0.0.0.
    assert!(env.contains(&("POD_IP", "status.podIP")), "{name}: {env:?}");
}

/// No wildcards and no pods/exec in any rendered RBAC rule.
fn assert_least_privilege(docs: &[Value]) {
    for d in docs
        .iter()
        .filter(|d| d["kind"] == "Role" || d["kind"] == "ClusterRole")
    {
        for rule in d["rules"].as_array().expect("rules") {
            for field in ["apiGroups", "resources", "verbs"] {
                assert!(
                    !strings(&rule[field]).contains(&"*"),
                    "wildcard {field} in {}: {rule}",
                    d["metadata"]["name"]
                );
            }
            let resources = strings(&rule["resources"]);
            assert!(!resources.contains(&"pods/exec"), "{rule}");
            assert!(!resources.contains(&"pods"), "{rule}");
        }
    }
}

/// The rules of a rendered Role/ClusterRole as (apiGroup, resource) -> verbs.
fn rules(role: &Value) -> BTreeMap<(String, String), Vec<String>> {
    let mut out: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for rule in role["rules"].as_array().expect("rules") {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                let verbs = out
                    .entry((group.to_owned(), resource.to_owned()))
                    .or_default();
                verbs.extend(strings(&rule["verbs"]).into_iter().map(str::to_owned));
                verbs.sort();
                verbs.dedup();
            }
        }
    }
    out
}

fn verbs(list: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = list.iter().map(|s| (*s).to_owned()).collect();
    v.sort();
    v
}

/// The CRDs for tests that run the operator or install releases with `crds.install=false`.
/// Once per test binary, so that no install races another's creation of them.
async fn ensure_crds(client: &Client) {
    static DONE: tokio::sync::Mutex<bool> = tokio::sync::Mutex::const_new(false);
    let mut done = DONE.lock().await;
    if !*done {
        support::tunnel_e2e::install_crds(client).await;
        *done = true;
    }
}

/// `kubectl get KINDS -n NS -o name`, minus what every namespace has.
fn namespace_objects(cp: &ControlPlane, ns: &str) -> Vec<String> {
    let kinds = "deployments,replicasets,pods,services,endpointslices,serviceaccounts,roles,\
                 rolebindings,poddisruptionbudgets,secrets,configmaps,leases,\
                 reversetunnels,trustedclusters,remoteclusters";
    kubectl_ok(cp, &["get", kinds, "-n", ns, "-o", "name"])
        .lines()
        .filter(|l| *l != "serviceaccount/default" && *l != "configmap/kube-root-ca.crt")
        .map(str::to_owned)
        .collect()
}

/// Installs a release of the chart in `ns` (CRDs left to [`ensure_crds`]).
fn install(cp: &ControlPlane, release: &str, ns: &str, values: &[&str]) {
    let chart = chart_arg();
    helm_ok(
        cp,
        &concat(&[
            &["install", release, &chart, "-n", ns],
            values,
            &["--set", "crds.install=false"],
        ]),
    );
}

fn status_code<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> u16 {
    match result {
        Err(kube::Error::Api(status)) => status.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// GETs `path` from `addr` (blocking, off the runtime); the status code and the body.
async fn http_get(addr: &str, path: &str) -> (u16, String) {
    let addr: std::net::SocketAddr = addr.parse().expect("an IP:port");
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || support::procs::http_get(addr, &path))
        .await
        .expect("the GET ran")
        .unwrap_or_else(|e| panic!("{e}"))
}
