//! Lint, rendering and the values schema; a server-side dry run of everything rendered.

use super::*;

#[tokio::test]
async fn lint_template_and_schema() {
    let started = Instant::now();
    let cp = support::kube::control_plane().await;
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
        ("ClusterRole", 1),
        ("ClusterRoleBinding", 1),
        ("ServiceMonitor", 2),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_owned(), n))
    .collect();
    assert_eq!(kinds(&docs), expected);
    for d in &docs {
        let cluster_scoped = [
            "CustomResourceDefinition",
            "ClusterRole",
            "ClusterRoleBinding",
        ];
        if !cluster_scoped.iter().any(|k| d["kind"] == *k) {
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
            "$(POD_IP):9090",
            "--shutdown-grace",
            "30s",
            "--stale-leaf-after",
            "168h",
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
    // Its cluster-wide rights: asking who presents a token, and whether a client may dial.
    let access_rules = rules(find(
        &docs,
        "ClusterRole",
        "tether-proxy-tether-system-access",
    ));
    let review =
        |group: &str, resource: &str| ((group.to_owned(), resource.to_owned()), verbs(&["create"]));
    assert_eq!(
        access_rules,
        BTreeMap::from([
            review("authorization.k8s.io", "subjectaccessreviews"),
            review("authentication.k8s.io", "tokenreviews"),
        ])
    );

    // The operator.
    let operator = find(&docs, "Deployment", "tether-operator");
    assert_eq!(operator["spec"]["replicas"], 2);
    assert_hardened(operator);
    // Every replica carries every tunnel (issue #13): two by default, spread over nodes, one
    // always kept through voluntary disruptions, and a successor up before its predecessor
    // stops.
    let operator_pod = &operator["spec"]["template"]["spec"];
    let anti = &operator_pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        [0]["podAffinityTerm"];
    assert_eq!(anti["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(
        anti["labelSelector"]["matchLabels"],
        operator["spec"]["selector"]["matchLabels"]
    );
    let rollout = &operator["spec"]["strategy"]["rollingUpdate"];
    assert_eq!(
        (&rollout["maxSurge"], &rollout["maxUnavailable"]),
        (&serde_json::json!(1), &serde_json::json!(0))
    );
    let operator_pdb = find(&docs, "PodDisruptionBudget", "tether-operator");
    assert_eq!(operator_pdb["spec"]["minAvailable"], 1);
    assert!(operator_pdb["spec"].get("maxUnavailable").is_none());
    assert_eq!(
        operator_pdb["spec"]["selector"]["matchLabels"],
        operator["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(
        strings(&operator["spec"]["template"]["spec"]["containers"][0]["args"]),
        [
            "operator",
            "--lease-name",
            "tether-operator",
            "--namespace",
            ns,
            "--admin-listen",
            "$(POD_IP):9090"
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
            verbs(&["get", "create", "update", "patch", "delete"])
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
    // One replica: no PodDisruptionBudget, which would block every drain.
    let single = render(
        cp,
        "tether",
        ns,
        &concat(&[LEAF_ONLY, &["--set", "leaf.replicas=1"]]),
    );
    assert!(
        !kinds(&single).contains_key("PodDisruptionBudget"),
        "{:?}",
        kinds(&single)
    );

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
    // The operator's (it watches every namespace) and the proxies' access review.
    assert_eq!(kinds(&all)["ClusterRole"], 2);
    assert_eq!(kinds(&all)["ClusterRoleBinding"], 2);
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
    let cp = support::kube::control_plane().await;
    let ns = cp.new_namespace("helm-dry-run").await;
    for extra in [
        &[][..],
        &["--set", "leaf.watchAllNamespaces=true"][..],
        KUBE_ACCESS,
    ] {
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

/// What `kubectl` users meet of the CRDs (issue #14): they install without a warning (schemars'
/// `format: uint32` drew "unrecognized format" twice per install), their short names are their
/// own (`rc` listed ReplicationControllers), and `kubectl explain` reads whole sentences.
#[tokio::test]
async fn the_crds_install_without_warnings_under_short_names_of_their_own() {
    let cp = support::kube::control_plane().await;
    // Created afresh under a group of their own (a dry run of `create`): the apiserver checks
    // and warns on creation, and the real CRDs may be installed already.
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("crds.yaml");
    let mut text = String::new();
    for mut crd in tether::operator::crd::all() {
        crd.spec.group = "warnings.tether.test".into();
        crd.metadata.name = Some(format!("{}.{}", crd.spec.names.plural, crd.spec.group));
        text += &format!("---\n{}", serde_yaml::to_string(&crd).expect("yaml"));
    }
    std::fs::write(&path, text).expect("write");
    let path = path.to_string_lossy().into_owned();
    let out = cp.kubectl(["create", "--dry-run=server", "-f", &*path]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kubectl create failed:\n{stderr}");
    assert!(
        !stderr.contains("Warning"),
        "the apiserver warned:\n{stderr}"
    );

    let listed = kubectl_ok(cp, &["api-resources", "--no-headers", "-o", "wide"]);
    let theirs: Vec<&str> = listed
        .lines()
        .filter(|line| !line.contains("tether.dev/"))
        .flat_map(|line| line.split_whitespace().nth(1))
        .flat_map(|short| short.split(','))
        .collect();
    for crd in tether::operator::crd::all() {
        let names = &crd.spec.names;
        for short in names.short_names.iter().flatten() {
            assert!(
                !theirs.contains(&short.as_str()),
                "{}: short name {short:?} is taken by a built-in resource",
                names.kind
            );
        }
        let schema = serde_json::to_string(&crd.spec.versions[0].schema).expect("json");
        assert!(
            !schema.contains("Auto-generated"),
            "{}: boilerplate",
            names.kind
        );
        let descriptions = serde_json::from_str::<Value>(&schema).expect("json");
        assert_whole_sentences(&names.kind, &descriptions);
    }
}

/// Every `description` in `schema` keeps a line break only between paragraphs or list items.
fn assert_whole_sentences(kind: &str, schema: &Value) {
    match schema {
        Value::Object(map) => {
            if let Some(Value::String(text)) = map.get("description") {
                let broken = text.replace("\n\n", "").replace("\n- ", "").contains('\n');
                assert!(
                    !broken,
                    "{kind}: a description breaks mid-paragraph: {text:?}"
                );
            }
            map.values().for_each(|v| assert_whole_sentences(kind, v));
        }
        Value::Array(items) => items.iter().for_each(|v| assert_whole_sentences(kind, v)),
        _ => {}
    }
}

/// The Kubernetes API through the root, as the chart sets it up (#16): the proxies listen on
/// `root.kube.port` with a certificate the chart makes for the Service's names and the extra
/// ones (its CA in the same Secret, for `tether kubeconfig`), the Service carries the port,
/// client certificates of `clientCASecret` are accepted, and the operator may impersonate
/// users and only the listed groups. Off by default: no impersonation, no endpoint.
#[tokio::test]
async fn the_kubernetes_endpoint_and_impersonation_render_only_when_asked() {
    let cp = support::kube::control_plane().await;
    let off = render(cp, "tether", "tether", BOTH);
    assert!(
        !off.iter().any(|d| d["metadata"]["name"]
            .as_str()
            .is_some_and(|n| n.ends_with("-impersonate") || n.ends_with("-kube-tls"))),
        "nothing of it by default"
    );
    let docs = render(cp, "tether", "tether", &concat(&[BOTH, KUBE_ACCESS]));
    let deployment = find(&docs, "Deployment", "tether-proxy");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args = strings(&container["args"]).join(" ");
    for flag in [
        "--kube-listen 0.0.0.0:6443",
        "--kube-tls-cert /etc/tether/kube-tls/tls.crt",
        "--kube-tls-key /etc/tether/kube-tls/tls.key",
        "--kube-client-ca /etc/tether/kube-client-ca/ca.crt",
    ] {
        assert!(args.contains(flag), "{flag} in {args}");
    }
    let service = find(&docs, "Service", "tether-proxy");
    assert!(
        service["spec"]["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .any(|p| p["name"] == "kube" && p["port"] == 6443),
        "{service}"
    );
    let secret = find(&docs, "Secret", "tether-proxy-kube-tls");
    use base64::Engine as _;
    let pem = base64::engine::general_purpose::STANDARD
        .decode(secret["data"]["tls.crt"].as_str().expect("tls.crt"))
        .expect("base64");
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).expect("PEM");
    let cert = pem.parse_x509().expect("certificate");
    let sans = format!(
        "{:?}",
        cert.subject_alternative_name().expect("SAN").expect("SAN")
    );
    for name in [
        "tether-proxy.tether.svc",
        "tether.example.com",
        "203.0.113.7",
    ] {
        let wanted = if name.starts_with("203") {
            "203, 0, 113, 7".to_owned()
        } else {
            name.to_owned()
        };
        assert!(sans.contains(&wanted), "{name} in {sans}");
    }
    assert!(
        secret["data"]["ca.crt"].is_string(),
        "the CA for tether kubeconfig"
    );
    let role = find(&docs, "ClusterRole", "tether-operator-tether-impersonate");
    let rules = role["rules"].as_array().expect("rules");
    assert!(
        rules
            .iter()
            .all(|r| strings(&r["verbs"]) == ["impersonate"]),
        "{role}"
    );
    let groups = rules
        .iter()
        .find(|r| strings(&r["resources"]) == ["groups"])
        .expect("groups");
    assert_eq!(strings(&groups["resourceNames"]), ["tether:admins"]);
}

#[tokio::test]
async fn removing_stale_leaves_is_asked_for_and_only_then_may_the_proxies_delete() {
    let cp = support::kube::control_plane().await;
    let proxy_rules = |docs: &[Value]| {
        rules(find(docs, "Role", "tether-proxy"))
            [&("tether.dev".to_owned(), "remoteclusters".to_owned())]
            .clone()
    };
    let off = render(cp, "tether", "tether", BOTH);
    assert!(!proxy_rules(&off).contains(&"delete".to_owned()));
    let stale = &[
        "--set",
        "root.staleLeaves.after=720h,root.staleLeaves.remove=true",
    ];
    let docs = render(cp, "tether", "tether", &concat(&[BOTH, stale]));
    let deployment = find(&docs, "Deployment", "tether-proxy");
    let args = strings(&deployment["spec"]["template"]["spec"]["containers"][0]["args"]).join(" ");
    assert!(
        args.contains("--stale-leaf-after 720h --remove-stale-leaves"),
        "{args}"
    );
    assert_eq!(
        proxy_rules(&docs),
        verbs(&["get", "list", "watch", "create", "patch", "delete"])
    );
}

/// The TLS port (#17): off by default; on, each proxy listens on `root.tls.port` and the
/// tunnel Service carries it as "tls" on `root.tls.servicePort` (443); with `root.tls.secret`
/// the proxies use its certificate, without one each issues itself one (no Secret needed).
#[tokio::test]
async fn the_tls_port_and_proxy_headers_render_only_when_asked() {
    let cp = support::kube::control_plane().await;
    let container_args = |docs: &[Value]| {
        let deployment = find(docs, "Deployment", "tether-proxy");
        strings(&deployment["spec"]["template"]["spec"]["containers"][0]["args"]).join(" ")
    };
    let off = render(cp, "tether", "tether", ROOT_ONLY);
    assert!(!container_args(&off).contains("--tls-listen"));
    let self_issued = concat(&[ROOT_ONLY, &["--set", "root.tls.enabled=true"]]);
    let docs = render(cp, "tether", "tether", &self_issued);
    let args = container_args(&docs);
    assert!(args.contains("--tls-listen 0.0.0.0:8443"), "{args}");
    assert!(!args.contains("--tls-cert"), "{args}");
    let service = find(&docs, "Service", "tether-proxy");
    let ports = service["spec"]["ports"].as_array().expect("ports");
    assert!(
        ports
            .iter()
            .any(|p| p["name"] == "tls" && p["port"] == 443 && p["targetPort"] == "tls"),
        "{service}"
    );
    let given = concat(&[
        ROOT_ONLY,
        &["--set", "root.tls.enabled=true,root.tls.secret=root-tls"],
    ]);
    let docs = render(cp, "tether", "tether", &given);
    let args = container_args(&docs);
    for flag in [
        "--tls-cert /etc/tether/tls/tls.crt",
        "--tls-key /etc/tether/tls/tls.key",
    ] {
        assert!(args.contains(flag), "{flag} in {args}");
    }
    let deployment = find(&docs, "Deployment", "tether-proxy");
    let volumes = deployment["spec"]["template"]["spec"]["volumes"].to_string();
    assert!(volumes.contains("root-tls"), "{volumes}");

    // PROXY protocol headers: read from nobody unless the balancers are listed.
    assert!(!container_args(&off).contains("--proxy-protocol-from"));
    let listed = concat(&[
        ROOT_ONLY,
        &[
            "--set-json",
            r#"root.proxyProtocolFrom=["10.0.0.0/24","192.0.2.7"]"#,
        ],
    ]);
    let args = container_args(&render(cp, "tether", "tether", &listed));
    assert!(
        args.contains("--proxy-protocol-from 10.0.0.0/24,192.0.2.7"),
        "{args}"
    );
}

/// `leaf.egressProxy` (#17): the operator gets HTTPS_PROXY and NO_PROXY, and the credentials
/// and CA Secrets as files for its flags; nothing of it by default; a URL with credentials in
/// it (they would sit in the Deployment for every reader) is refused by the schema.
#[tokio::test]
async fn the_egress_proxy_renders_as_env_and_mounted_secrets_only_when_asked() {
    let cp = support::kube::control_plane().await;
    // The operator's Deployment (the CRDs' descriptions name HTTPS_PROXY, as docs).
    let off = render(cp, "tether", "tether", LEAF_ONLY);
    let off = find(&off, "Deployment", "tether-operator").to_string();
    assert!(
        !off.contains("HTTPS_PROXY") && !off.contains("egress-proxy"),
        "{off}"
    );
    let values = [
        "--set",
        "leaf.egressProxy.url=http://proxy.corp:3128,leaf.egressProxy.noProxy=10.96.0.1\\,.svc,leaf.egressProxy.credentialsSecret.name=egress-creds,leaf.egressProxy.caSecret.name=egress-ca",
    ];
    let docs = render(cp, "tether", "tether", &concat(&[LEAF_ONLY, &values]));
    let deployment = find(&docs, "Deployment", "tether-operator");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args = strings(&container["args"]).join(" ");
    for flag in [
        "--egress-proxy-credentials /etc/tether/egress-proxy/credentials/credentials",
        "--egress-proxy-ca /etc/tether/egress-proxy/ca/ca.crt",
    ] {
        assert!(args.contains(flag), "{flag} in {args}");
    }
    let env = container["env"].as_array().expect("env");
    let var = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].clone())
    };
    assert_eq!(var("HTTPS_PROXY"), Some("http://proxy.corp:3128".into()));
    assert_eq!(var("NO_PROXY"), Some("10.96.0.1,.svc".into()));
    let volumes = serde_json::to_string(&pod["volumes"]).expect("json");
    assert!(
        volumes.contains("egress-creds") && volumes.contains("egress-ca"),
        "{volumes}"
    );
    let chart = chart_arg();
    let (ok, _, err) = helm(
        cp,
        &concat(&[
            &["template", "tether", &chart],
            LEAF_ONLY,
            &["--set", "leaf.egressProxy.url=http://u:p@proxy.corp:3128"],
        ]),
    );
    assert!(!ok && err.contains("egressProxy/url"), "{err}");
}
