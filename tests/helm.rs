//! The Helm chart (`charts/tether`) against the real helm and kube-apiserver of the test
//! control plane: lint, rendering and schema; a server-side dry run of what it renders;
//! install, upgrade and uninstall (only the CRDs stay); and its RBAC, with the ServiceAccount
//! tokens of an installed release: enough for the operator end to end (a ReverseTunnel
//! connects and a dial goes through; in-process, and as the `tether` binary run with the
//! container's rendered arguments) and for what proxies do, and no more (403s).

mod common;
#[path = "common/tunnel_e2e.rs"]
mod tunnel_e2e;

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

use common::ControlPlane;
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
use tunnel_e2e::{create_secrets, echo_through, eventually, example, start_operator};

/// Values of a root-only release.
const ROOT_ONLY: &[&str] = &[
    "--set",
    "root.enabled=true",
    "--set",
    "root.clusterName=root",
    "--set",
    "root.caSecret=tether-root-ca",
    "--set",
    "leaf.enabled=false",
];
/// Values of a leaf-only release (root is off by default).
const LEAF_ONLY: &[&str] = &["--set", "leaf.enabled=true"];
/// Values of a release with both roles.
const BOTH: &[&str] = &[
    "--set",
    "root.enabled=true",
    "--set",
    "root.clusterName=root",
    "--set",
    "root.caSecret=tether-root-ca",
    "--set",
    "leaf.enabled=true",
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

#[tokio::test]
async fn lint_template_and_schema() {
    let started = Instant::now();
    let cp = common::control_plane().await;
    let chart = chart_arg();

    for (what, values) in [
        ("root only", ROOT_ONLY),
        ("leaf only", LEAF_ONLY),
        ("both", BOTH),
    ] {
        let mut args = vec!["lint", "--strict", &chart];
        args.extend(values);
        let out = helm_ok(cp, &args);
        assert!(out.contains("0 chart(s) failed"), "{what}: {out}");
        args.extend(["--set", "metrics.serviceMonitor.enabled=true"]);
        helm_ok(cp, &args);
    }

    // Both roles, with ServiceMonitors.
    let ns = "tether-system";
    let docs = render(
        cp,
        "tether",
        ns,
        &concat(&[BOTH, &["--set", "metrics.serviceMonitor.enabled=true"]]),
    );
    let expected: BTreeMap<String, usize> = [
        ("CustomResourceDefinition", 3),
        ("Deployment", 2),
        ("Service", 3),
        ("PodDisruptionBudget", 2),
        ("ServiceAccount", 2),
        ("Role", 3),
        ("RoleBinding", 3),
        ("ServiceMonitor", 2),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_owned(), n))
    .collect();
    assert_eq!(kinds(&docs), expected);
    for d in &docs {
        if d["kind"] != "CustomResourceDefinition" {
            assert_eq!(d["metadata"]["namespace"], ns, "{}", d["metadata"]["name"]);
        }
    }
    assert_least_privilege(&docs);

    // The proxies.
    let proxy = find(&docs, "Deployment", "tether-proxy");
    assert_eq!(proxy["spec"]["replicas"], 3);
    assert_hardened(proxy);
    let pod = &proxy["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(
        strings(&c["args"]),
        [
            "proxy",
            "--cluster",
            "root",
            "--proxy-id",
            "$(POD_NAME)",
            "--ca",
            "/etc/tether/ca/ca",
            "--listen",
            "0.0.0.0:3024",
            "--peers-service",
            "tether-proxy-peers",
            "--peers-port-name",
            "tunnel",
            "--kubernetes",
            "--admin-listen",
            "0.0.0.0:9090",
            "--shutdown-grace",
            "30s",
        ]
    );
    assert_eq!(c["image"], "registry.example.com/tether:0.1.0");
    let ports: Vec<(&str, i64)> = c["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().expect("name"),
                p["containerPort"].as_i64().expect("port"),
            )
        })
        .collect();
    assert_eq!(ports, [("tunnel", 3024), ("admin", 9090)]);
    assert!(
        pod["terminationGracePeriodSeconds"]
            .as_i64()
            .expect("grace")
            > 30
    );
    assert_eq!(
        pod["topologySpreadConstraints"][0]["topologyKey"],
        "kubernetes.io/hostname"
    );
    assert!(
        pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
            .is_array()
    );
    assert_eq!(pod["serviceAccountName"], "tether-proxy");
    let mount = &c["volumeMounts"][0];
    assert_eq!(mount["mountPath"], "/etc/tether/ca");
    assert_eq!(mount["readOnly"], true);
    let ca = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the CA volume");
    assert_eq!(ca["secret"]["secretName"], "tether-root-ca");
    let keys: Vec<&str> = ca["secret"]["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["key"].as_str().expect("key"))
        .collect();
    assert_eq!(keys, ["ca", "ca.pub"]);

    let tunnel = find(&docs, "Service", "tether-proxy");
    assert_eq!(tunnel["spec"]["type"], "LoadBalancer");
    assert_eq!(tunnel["spec"]["ports"][0]["name"], "tunnel");
    assert_eq!(tunnel["spec"]["ports"][0]["port"], 3024);
    assert_eq!(
        tunnel["spec"]["ports"].as_array().expect("ports").len(),
        1,
        "the tunnel Service exposes the tunnel port only"
    );
    let peers = find(&docs, "Service", "tether-proxy-peers");
    assert_eq!(peers["spec"]["clusterIP"], "None");
    assert_eq!(peers["spec"]["ports"][0]["name"], "tunnel");
    assert_eq!(
        peers["spec"]["selector"],
        proxy["spec"]["selector"]["matchLabels"]
    );
    let pdb = find(&docs, "PodDisruptionBudget", "tether-proxy");
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        proxy["spec"]["selector"]["matchLabels"]
    );
    let proxy_rules = rules(find(&docs, "Role", "tether-proxy"));
    let expected_proxy_rules: BTreeMap<(String, String), Vec<String>> = [
        (
            ("discovery.k8s.io", "endpointslices"),
            verbs(&["get", "list", "watch"]),
        ),
        (("", "secrets"), verbs(&["get", "patch"])),
        (
            ("tether.dev", "remoteclusters"),
            verbs(&["get", "list", "watch", "create", "patch"]),
        ),
        (
            ("tether.dev", "remoteclusters/status"),
            verbs(&["get", "patch"]),
        ),
    ]
    .into_iter()
    .map(|((g, r), v)| ((g.to_owned(), r.to_owned()), v))
    .collect();
    assert_eq!(proxy_rules, expected_proxy_rules);

    // The operator.
    let operator = find(&docs, "Deployment", "tether-operator");
    assert_eq!(operator["spec"]["replicas"], 2);
    assert_hardened(operator);
    assert_eq!(
        strings(&operator["spec"]["template"]["spec"]["containers"][0]["args"]),
        [
            "operator",
            "--lease-name",
            "tether-operator",
            "--namespace",
            ns,
            "--admin-listen",
            "0.0.0.0:9090"
        ]
    );
    let operator_rules = rules(find(&docs, "Role", "tether-operator"));
    assert_eq!(
        operator_rules[&("".to_owned(), "secrets".to_owned())],
        verbs(&["get", "list", "watch", "create", "patch", "delete"])
    );
    assert_eq!(
        operator_rules[&("tether.dev".to_owned(), "reversetunnels".to_owned())],
        verbs(&[
            "get", "list", "watch", "patch", "update", "create", "delete"
        ])
    );
    assert!(
        !operator_rules.contains_key(&("coordination.k8s.io".to_owned(), "leases".to_owned())),
        "leases belong in the leader-election Role"
    );
    let lease_rules = rules(find(&docs, "Role", "tether-operator-leader-election"));
    assert_eq!(
        lease_rules,
        [(
            ("coordination.k8s.io".to_owned(), "leases".to_owned()),
            verbs(&["get", "create", "update", "patch"])
        )]
        .into_iter()
        .collect()
    );

    // The CRDs: the files of crds/ (the chart holds byte-identical copies), plus Helm's keep
    // policy.
    for file in tether::operator::crd::FILES {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("crds")
            .join(file);
        let text = std::fs::read_to_string(&path).expect("reading crds/");
        let mut ours: Value = serde_yaml::from_str(&text).expect("CRD YAML");
        let name = ours["metadata"]["name"].as_str().expect("name").to_owned();
        let mut rendered = find(&docs, "CustomResourceDefinition", &name).clone();
        assert_eq!(
            rendered["metadata"]["annotations"]["helm.sh/resource-policy"],
            "keep"
        );
        let meta = rendered["metadata"].as_object_mut().expect("metadata");
        meta.remove("annotations");
        meta.remove("labels");
        ours["metadata"]
            .as_object_mut()
            .expect("metadata")
            .remove("annotations");
        assert_eq!(
            rendered, ours,
            "the chart renders {name} as crds/{file} has it"
        );
    }

    // ServiceMonitors find their Services.
    let monitor = find(&docs, "ServiceMonitor", "tether-proxy");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "admin");
    for (monitor, service) in [
        ("tether-proxy", "tether-proxy-peers"),
        ("tether-operator", "tether-operator-metrics"),
    ] {
        let selector = find(&docs, "ServiceMonitor", monitor)["spec"]["selector"]["matchLabels"]
            .as_object()
            .expect("selector");
        let labels = find(&docs, "Service", service)["metadata"]["labels"]
            .as_object()
            .expect("labels");
        for (k, v) in selector {
            assert_eq!(labels.get(k), Some(v), "{monitor} selects {service} by {k}");
        }
    }

    // Roles apart.
    let root = render(cp, "tether", ns, ROOT_ONLY);
    assert!(
        root.iter()
            .all(|d| d["metadata"]["name"] != "tether-operator")
    );
    assert_eq!(kinds(&root)["Deployment"], 1);
    let leaf = render(cp, "tether", ns, LEAF_ONLY);
    assert_eq!(kinds(&leaf)["Deployment"], 1);
    assert!(!kinds(&leaf).contains_key("Service"), "{:?}", kinds(&leaf));
    find(&leaf, "Deployment", "tether-operator");

    // Options.
    let all = render(
        cp,
        "tether",
        ns,
        &concat(&[
            BOTH,
            &[
                "--set",
                "leaf.watchAllNamespaces=true",
                "--set",
                "crds.install=false",
                "--set",
                "logFormat=json",
                "--set",
                "root.service.type=ClusterIP",
                "--set",
                "image.tag=abc123",
            ],
        ]),
    );
    assert!(!kinds(&all).contains_key("CustomResourceDefinition"));
    assert_eq!(kinds(&all)["ClusterRole"], 1);
    assert_eq!(kinds(&all)["ClusterRoleBinding"], 1);
    assert_least_privilege(&all);
    let args = strings(
        &find(&all, "Deployment", "tether-operator")["spec"]["template"]["spec"]["containers"][0]["args"],
    );
    assert!(!args.contains(&"--namespace"), "{args:?}");
    assert!(args.ends_with(&["--log-format", "json"]), "{args:?}");
    let proxy = find(&all, "Deployment", "tether-proxy");
    let c = &proxy["spec"]["template"]["spec"]["containers"][0];
    assert!(
        strings(&c["args"]).ends_with(&["--log-format", "json"]),
        "{}",
        c["args"]
    );
    assert_eq!(c["image"], "registry.example.com/tether:abc123");
    assert_eq!(
        find(&all, "Service", "tether-proxy")["spec"]["type"],
        "ClusterIP"
    );

    // The schema refuses bad values and names the field.
    for (set, field) in [
        ("root.replicas=0", "/root/replicas"),
        ("leaf.replicas=0", "/leaf/replicas"),
        ("root.service.type=Ingress", "/root/service/type"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("root.enabled=true", "/root/clusterName"),
        ("logFormat=xml", "/logFormat"),
        ("replicas=3", "replicas"),
    ] {
        let (ok, _, stderr) = helm(cp, &["template", "t", &chart, "--set", set]);
        assert!(!ok, "--set {set} was accepted");
        assert!(
            stderr.contains(field) && stderr.contains("schema"),
            "--set {set}: no mention of {field} in:\n{stderr}"
        );
    }
    let (ok, _, stderr) = helm(
        cp,
        &concat(&[
            &["template", "t", &chart],
            BOTH,
            &["--set", "root.terminationGracePeriodSeconds=20"],
        ]),
    );
    assert!(!ok);
    assert!(stderr.contains("terminationGracePeriodSeconds"), "{stderr}");
    eprintln!("lint_template_and_schema took {:?}", started.elapsed());
}

#[tokio::test]
async fn rendered_manifests_pass_a_server_side_dry_run() {
    let started = Instant::now();
    let cp = common::control_plane().await;
    let ns = cp.new_namespace("helm-dry-run").await;
    for extra in [&[][..], &["--set", "leaf.watchAllNamespaces=true"][..]] {
        let text = render_text(cp, "tether", &ns, &concat(&[BOTH, extra]));
        let count = parse_docs(&text).len();
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), &text).expect("write");
        let path = file.path().to_string_lossy().into_owned();
        let out = kubectl_ok(
            cp,
            &[
                "apply",
                "--dry-run=server",
                "--validate=strict",
                "-n",
                &ns,
                "-f",
                &path,
            ],
        );
        let applied = out
            .lines()
            .filter(|l| l.ends_with("(server dry run)"))
            .count();
        assert_eq!(applied, count, "every object passes:\n{out}");
    }
    // Nothing was created.
    let deployments: Api<Deployment> = Api::namespaced(cp.kube_client(), &ns);
    assert!(
        deployments
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .is_empty()
    );
    eprintln!(
        "rendered_manifests_pass_a_server_side_dry_run took {:?}",
        started.elapsed()
    );
}

/// The CRDs for tests that run the operator or install releases with `crds.install=false`.
/// Once per test binary, so that no install races another's creation of them.
async fn ensure_crds(client: &Client) {
    static DONE: tokio::sync::Mutex<bool> = tokio::sync::Mutex::const_new(false);
    let mut done = DONE.lock().await;
    if !*done {
        tunnel_e2e::install_crds(client).await;
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

#[tokio::test]
async fn install_upgrade_uninstall_leaves_only_the_crds() {
    let started = Instant::now();
    let cp = common::control_plane().await;
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

#[tokio::test]
async fn the_operator_runs_end_to_end_with_the_charts_rbac() {
    let started = Instant::now();
    let cp = common::control_plane().await;
    let admin = cp.kube_client();
    ensure_crds(&admin).await;
    let ns = cp.new_namespace("helm-operator-rbac").await;
    install(cp, "rbac", &ns, LEAF_ONLY);
    // Only the chart's ServiceAccount token from here on (the Secrets and the ReverseTunnel
    // are the user's, created as admin).
    let operator = cp
        .client_for_service_account(&ns, "rbac-tether-operator")
        .await;

    let leaf = ClusterName::new("leaf-1").expect("name");
    let pki = Pki::generate(ClusterName::new("root").expect("name"), leaf.clone()).expect("pki");
    let proxy = ProxyServer::start(pki.proxy_config("proxy-1").expect("proxy config"))
        .await
        .expect("proxy");
    let echo = echo_server().await.expect("echo");
    create_secrets(&admin, &ns, &pki).await;
    let stop = start_operator(operator.clone(), &ns, Some("rbac-tether-operator"));

    let rule = format!("{}/32:{}", echo.ip(), echo.port());
    let manifest = example(&proxy.local_addr().to_string(), &[rule]);
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), serde_json::to_vec(&manifest).expect("json")).expect("write");
    let path = file.path().to_string_lossy().into_owned();
    kubectl_ok(cp, &["apply", "-n", &ns, "-f", &path]);

    let api: Api<ReverseTunnel> = Api::namespaced(admin.clone(), &ns);
    let connected = eventually("status Connected 1/1", || async {
        let rt = api.get("to-root").await.ok()?;
        let status = rt.status.clone()?;
        (status.phase == Some(Phase::Connected) && status.proxies_ready.as_deref() == Some("1/1"))
            .then_some(status)
    })
    .await;
    let ready = connected
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready condition");
    assert_eq!(ready.status, ConditionStatus::True);
    let echoed = eventually("a dial through the tunnel", || async {
        echo_through(
            &proxy,
            &format!("{}.leaf-1.tether:{}", echo.ip(), echo.port()),
        )
        .await
        .ok()
    })
    .await;
    assert_eq!(echoed, b"ping");

    // It led through the chart's Lease rights and reported through its Event rights.
    let lease = Api::<Lease>::namespaced(admin.clone(), &ns)
        .get("rbac-tether-operator")
        .await
        .expect("the leader Lease");
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some(format!("test-{ns}").as_str())
    );
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(admin.clone(), &ns);
    eventually("a Connected Event", || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("Connected"))
            .then_some(())
    })
    .await;

    // Deleting: the operator closes the tunnel and removes its finalizer.
    api.delete("to-root", &DeleteParams::default())
        .await
        .expect("delete");
    eventually("the ReverseTunnel gone", || async {
        matches!(api.get_opt("to-root").await, Ok(None)).then_some(())
    })
    .await;
    eventually("the tunnel closed", || async {
        proxy
            .site(&leaf)
            .is_none_or(|s| s.tunnels.is_empty())
            .then_some(())
    })
    .await;
    stop.cancel();
    proxy.shutdown(std::time::Duration::from_secs(1)).await;
    eprintln!(
        "the_operator_runs_end_to_end_with_the_charts_rbac took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_proxies_rbac_covers_peers_join_tokens_and_remote_clusters() {
    let started = Instant::now();
    let cp = common::control_plane().await;
    let admin = cp.kube_client();
    ensure_crds(&admin).await;
    let ns = cp.new_namespace("helm-proxy-rbac").await;
    install(cp, "peers", &ns, ROOT_ONLY);
    let proxy = cp
        .client_for_service_account(&ns, "peers-tether-proxy")
        .await;

    // Peers: the EndpointSlices of the chart's headless Service, followed as `tether proxy
    // --peers-service` does (list, then watch).
    let service = "peers-tether-proxy-peers";
    let slice = |name: &str, ready: bool| -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {
                "name": format!("{service}-{name}"),
                "labels": {"kubernetes.io/service-name": service}
            },
            "addressType": "IPv4",
            "endpoints": [{
                "addresses": ["192.0.2.1"],
                "conditions": {"ready": ready},
                "targetRef": {"kind": "Pod", "name": format!("peers-tether-proxy-{name}")}
            }],
            "ports": [{"name": "tunnel", "port": 3024, "protocol": "TCP"}]
        }))
        .expect("EndpointSlice")
    };
    let slices: Api<EndpointSlice> = Api::namespaced(admin.clone(), &ns);
    // A slice without ready endpoints, there before the watch: its initial listing makes
    // watch_peers report a first (empty) set, so the test knows the list succeeded.
    slices
        .create(&PostParams::default(), &slice("starting", false))
        .await
        .expect("creating an EndpointSlice");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let watch = tokio::spawn({
        let (proxy, ns) = (proxy.clone(), ns.clone());
        async move {
            tether::operator::endpoints::watch_peers(
                proxy,
                &ns,
                service,
                Some("tunnel".to_owned()),
                move |peers| {
                    let _ = tx.send(peers);
                },
            )
            .await;
        }
    });
    let next_ids =
        async |rx: &mut tokio::sync::mpsc::UnboundedReceiver<Vec<tether::proxy::Peer>>| {
            let peers = tokio::time::timeout(tunnel_e2e::DEADLINE, rx.recv())
                .await
                .expect("no peer set in time (is the proxy allowed to list and watch?)")
                .expect("the watch ended");
            peers.into_iter().map(|p| p.id).collect::<Vec<String>>()
        };
    assert_eq!(next_ids(&mut rx).await, Vec::<String>::new(), "listed");
    // A ready proxy appears: the watch sees it.
    slices
        .create(&PostParams::default(), &slice("a", true))
        .await
        .expect("creating an EndpointSlice");
    assert_eq!(next_ids(&mut rx).await, ["peers-tether-proxy-a"], "watched");
    watch.abort();

    // Join tokens and RemoteClusters, through the code `tether proxy --kubernetes` runs, with
    // only the proxy's token: a leaf joins (its token read by name and spent), the root
    // records and trusts it, and this replica writes its status entry.
    let admin_secrets: Api<Secret> = Api::namespaced(admin.clone(), &ns);
    let pki = Pki::generate(
        ClusterName::new("root").expect("name"),
        ClusterName::new("leaf-1").expect("name"),
    )
    .expect("pki");
    let token = JoinToken::generate();
    admin_secrets
        .create(
            &PostParams::default(),
            &token_secret(&token, None, None, false),
        )
        .await
        .expect("a join token Secret");
    let mut config = pki.proxy_config("proxy-1").expect("proxy config");
    let mut base = TrustStore::new();
    base.insert(pki.root.cluster().clone(), pki.root.public_key().clone());
    config.trust.store(std::sync::Arc::new(base.clone()));
    config.join = Some(std::sync::Arc::new(KubeJoinAuthority::new(
        proxy.clone(),
        &ns,
    )));
    let server = std::sync::Arc::new(ProxyServer::start(config).await.expect("proxy"));
    let stop = CancellationToken::new();
    tokio::spawn(root::run(
        proxy.clone(),
        ns.clone(),
        server.clone(),
        base,
        true,
        stop.clone(),
    ));
    let joined = join(&JoinRequest {
        root_address: server.local_addr().to_string(),
        token: token.clone(),
        leaf_cluster: pki.leaf.cluster().clone(),
        leaf_cas: vec![pki.leaf.public_key().clone()],
        root_ca_pin: None,
        timeout: tunnel_e2e::DEADLINE,
    })
    .await
    .expect("a join served with the proxy's RBAC");
    let spent = admin_secrets
        .get(&format!("tether-join-{}", token.id()))
        .await
        .expect("the token Secret");
    assert!(
        spent.data.expect("data").contains_key("used-by"),
        "the token is spent"
    );
    let mut agent_config = pki
        .agent_config(
            &server.local_addr().to_string(),
            tether::agent::allow_list::AllowList::default(),
        )
        .expect("agent config");
    agent_config.root_cas = joined.root_cas;
    let agent = std::sync::Arc::new(tether::agent::Agent::new(agent_config));
    tokio::spawn({
        let (agent, stop) = (agent.clone(), stop.clone());
        async move { agent.run(stop).await }
    });
    let remote: Api<RemoteCluster> = Api::namespaced(admin.clone(), &ns);
    eventually("RemoteCluster leaf-1 with proxy-1's entry", || async {
        let rc = remote.get_opt("leaf-1").await.ok()??;
        rc.status?
            .proxies
            .iter()
            .any(|p| p.proxy_id == "proxy-1" && p.tunnels == 1)
            .then_some(())
    })
    .await;
    stop.cancel();

    // What the proxy must not do.
    let secrets: Api<Secret> = Api::namespaced(proxy.clone(), &ns);
    assert_eq!(status_code(secrets.list(&ListParams::default()).await), 403);
    assert_eq!(
        status_code(
            secrets
                .create(&PostParams::default(), &tunnel_e2e::secret("mine", &[]))
                .await
        ),
        403
    );
    let as_proxy: Api<RemoteCluster> = Api::namespaced(proxy.clone(), &ns);
    assert_eq!(
        status_code(as_proxy.delete("leaf-1", &DeleteParams::default()).await),
        403
    );
    eprintln!(
        "the_proxies_rbac_covers_peers_join_tokens_and_remote_clusters took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_operator_token_is_denied_outside_its_role() {
    let started = Instant::now();
    let cp = common::control_plane().await;
    let admin = cp.kube_client();
    ensure_crds(&admin).await;
    let ns = cp.new_namespace("helm-deny").await;
    let other = cp.new_namespace("helm-deny-other").await;
    install(cp, "deny", &ns, LEAF_ONLY);
    Api::<Secret>::namespaced(admin.clone(), &other)
        .create(
            &PostParams::default(),
            &tunnel_e2e::secret("elsewhere", &[("k", "v".to_owned())]),
        )
        .await
        .expect("a Secret in another namespace");
    let operator = cp
        .client_for_service_account(&ns, "deny-tether-operator")
        .await;

    // The token works where the Role allows it...
    Api::<Secret>::namespaced(operator.clone(), &ns)
        .list(&ListParams::default())
        .await
        .expect("listing Secrets in its own namespace");
    Api::<ReverseTunnel>::namespaced(operator.clone(), &ns)
        .list(&ListParams::default())
        .await
        .expect("listing ReverseTunnels in its own namespace");

    // ...and nowhere else.
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "shell"},
        "spec": {"containers": [{"name": "sh", "image": "busybox"}]}
    }))
    .expect("pod");
    assert_eq!(
        status_code(
            Api::<Pod>::namespaced(operator.clone(), &ns)
                .create(&PostParams::default(), &pod)
                .await
        ),
        403,
        "creating a Pod"
    );
    let elsewhere: Api<Secret> = Api::namespaced(operator.clone(), &other);
    assert_eq!(
        status_code(elsewhere.get("elsewhere").await),
        403,
        "reading a Secret in another namespace"
    );
    assert_eq!(
        status_code(elsewhere.list(&ListParams::default()).await),
        403,
        "listing Secrets in another namespace"
    );
    assert_eq!(
        status_code(
            Api::<Secret>::all(operator.clone())
                .list(&ListParams::default())
                .await
        ),
        403,
        "listing Secrets cluster-wide"
    );
    assert_eq!(
        status_code(
            Api::<ReverseTunnel>::namespaced(operator.clone(), &other)
                .list(&ListParams::default())
                .await
        ),
        403,
        "listing ReverseTunnels in another namespace"
    );
    assert_eq!(
        status_code(
            Api::<Namespace>::all(operator.clone())
                .delete(&ns, &DeleteParams::default())
                .await
        ),
        403,
        "deleting its namespace"
    );
    let role = Role {
        metadata: ObjectMeta {
            name: Some("escalate".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    assert_eq!(
        status_code(
            Api::<Role>::namespaced(operator.clone(), &ns)
                .create(&PostParams::default(), &role)
                .await
        ),
        403,
        "creating a Role"
    );
    eprintln!(
        "the_operator_token_is_denied_outside_its_role took {:?}",
        started.elapsed()
    );
}

/// GETs `path` from `addr` over plain HTTP/1.1; returns the status code and the body.
async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    conn.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("writing the request");
    let mut response = String::new();
    conn.read_to_string(&mut response)
        .await
        .expect("reading the response");
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

#[tokio::test]
async fn the_operator_container_command_runs_with_the_charts_rbac() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let started = Instant::now();
    let cp = common::control_plane().await;
    let admin = cp.kube_client();
    ensure_crds(&admin).await;
    let ns = cp.new_namespace("helm-operator-cli").await;
    install(cp, "cli", &ns, LEAF_ONLY);

    // The container's arguments as the chart renders them; only the admin port becomes a free
    // loopback one, and logs are JSON so the test can read the bound address.
    let docs = render(cp, "cli", &ns, LEAF_ONLY);
    let container = &find(&docs, "Deployment", "cli-tether-operator")["spec"]["template"]["spec"]["containers"]
        [0];
    let mut args: Vec<String> = strings(&container["args"])
        .into_iter()
        .map(|a| {
            if a == "0.0.0.0:9090" {
                "127.0.0.1:0".to_owned()
            } else {
                a.to_owned()
            }
        })
        .collect();
    assert!(args.contains(&"127.0.0.1:0".to_owned()), "{args:?}");
    args.extend(["--log-format".to_owned(), "json".to_owned()]);

    // Credentials: the chart's ServiceAccount token, as the pod would mount it.
    let token = kubectl_ok(cp, &["create", "token", "cli-tether-operator", "-n", &ns]);
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::copy(cp.kubeconfig_path(), &kubeconfig).expect("copying the kubeconfig");
    let kc = kubeconfig.to_string_lossy().into_owned();
    kubectl_ok(
        cp,
        &[
            "--kubeconfig",
            &kc,
            "config",
            "set-credentials",
            "operator",
            &format!("--token={}", token.trim()),
        ],
    );
    kubectl_ok(
        cp,
        &[
            "--kubeconfig",
            &kc,
            "config",
            "set-context",
            "--current",
            "--user=operator",
        ],
    );
    let whoami = kubectl_ok(
        cp,
        &[
            "--kubeconfig",
            &kc,
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ],
    );
    assert!(
        whoami.contains(&format!("system:serviceaccount:{ns}:cli-tether-operator")),
        "{whoami}"
    );

    let pod = "cli-tether-operator-7d9f-abcde";
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(&args)
        .env("KUBECONFIG", &kubeconfig)
        .env("POD_NAME", pod)
        .env("POD_NAMESPACE", &ns)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting tether operator");
    let stderr = child.stderr.take().expect("stderr");
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    tokio::spawn({
        let log = log.clone();
        async move {
            let mut addr_tx = Some(addr_tx);
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v["fields"]["message"] == "admin endpoint"
                    && let (Some(tx), Some(addr)) = (addr_tx.take(), v["fields"]["addr"].as_str())
                {
                    let _ = tx.send(addr.to_owned());
                }
                log.lock().expect("log").push(line);
            }
        }
    });
    let addr = tokio::time::timeout(tunnel_e2e::DEADLINE, addr_rx)
        .await
        .expect("no admin endpoint in time")
        .unwrap_or_else(|_| {
            panic!(
                "the operator exited:\n{}",
                log.lock().expect("log").join("\n")
            )
        });

    // The probes the chart points at.
    assert_eq!(http_get(&addr, "/healthz").await.0, 200);
    assert_eq!(http_get(&addr, "/readyz").await.0, 200);
    let (code, metrics) = http_get(&addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(metrics.contains("# TYPE"), "{metrics}");

    // It leads through the Lease the chart names...
    let leases = Api::<Lease>::namespaced(admin.clone(), &ns);
    eventually("the operator holding its Lease", || async {
        let lease = leases.get_opt("cli-tether-operator").await.ok()??;
        (lease.spec?.holder_identity.as_deref() == Some(pod)).then_some(())
    })
    .await;

    // ...and connects a ReverseTunnel to a proxy; a dial goes through.
    let leaf = ClusterName::new("leaf-1").expect("name");
    let pki = Pki::generate(ClusterName::new("root").expect("name"), leaf).expect("pki");
    let proxy = ProxyServer::start(pki.proxy_config("proxy-1").expect("proxy config"))
        .await
        .expect("proxy");
    let echo = echo_server().await.expect("echo");
    create_secrets(&admin, &ns, &pki).await;
    let rule = format!("{}/32:{}", echo.ip(), echo.port());
    let rt: ReverseTunnel =
        serde_json::from_value(example(&proxy.local_addr().to_string(), &[rule])).expect("rt");
    let api: Api<ReverseTunnel> = Api::namespaced(admin.clone(), &ns);
    api.create(&PostParams::default(), &rt)
        .await
        .expect("creating the ReverseTunnel");
    eventually("status Connected 1/1", || async {
        let status = api.get("to-root").await.ok()?.status?;
        (status.phase == Some(Phase::Connected) && status.proxies_ready.as_deref() == Some("1/1"))
            .then_some(())
    })
    .await;
    let echoed = eventually("a dial through the tunnel", || async {
        echo_through(
            &proxy,
            &format!("{}.leaf-1.tether:{}", echo.ip(), echo.port()),
        )
        .await
        .ok()
    })
    .await;
    assert_eq!(echoed, b"ping");

    // SIGTERM: it stops its agents, releases the Lease and exits 0.
    let pid = i32::try_from(child.id().expect("pid")).expect("pid");
    // SAFETY: signals the child this test started (still running: it has not been waited).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(tunnel_e2e::DEADLINE, child.wait())
        .await
        .expect("the operator did not exit after SIGTERM")
        .expect("waiting for the operator");
    assert!(
        status.success(),
        "exit {status}:\n{}",
        log.lock().expect("log").join("\n")
    );
    let lease = leases.get("cli-tether-operator").await.expect("Lease");
    assert_ne!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some(pod),
        "the Lease was released"
    );
    proxy.shutdown(std::time::Duration::from_secs(1)).await;
    eprintln!(
        "the_operator_container_command_runs_with_the_charts_rbac took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn root_and_leaf_install_as_two_releases_in_one_namespace() {
    let started = Instant::now();
    let cp = common::control_plane().await;
    let admin = cp.kube_client();
    ensure_crds(&admin).await;
    let ns = cp.new_namespace("helm-two-releases").await;
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
