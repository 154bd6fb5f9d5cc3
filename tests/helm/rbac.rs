//! The chart's RBAC with the ServiceAccount tokens of an installed release: enough for the
//! operator and the proxies end to end, and nothing more.

use super::*;

#[tokio::test]
async fn the_operator_runs_end_to_end_with_the_charts_rbac() {
    let started = Instant::now();
    let (cp, admin, ns) = crds_and_namespace("helm-operator-rbac").await;
    install(cp, "rbac", &ns, LEAF_ONLY);
    // Only the chart's ServiceAccount token from here on (the Secrets and the ReverseTunnel
    // are the user's, created as admin).
    let operator = cp
        .client_for_service_account(&ns, "rbac-tether-operator")
        .await;

    let (leaf, pki, proxy) = root_proxy_for_leaf_1().await;
    let echo = echo_server().await.expect("echo");
    create_secrets(&admin, &ns, &pki).await;
    let stop = start_operator(operator.clone(), &ns, Some("rbac-tether-operator"));

    let rule = format!("{}/32:{}", echo.ip(), echo.port());
    let manifest = example(&proxy.local_addr().to_string(), &[rule]);
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), serde_json::to_vec(&manifest).expect("json")).expect("write");
    let path = file.path().to_string_lossy().into_owned();
    kubectl_ok(cp, &["apply", "-n", &ns, "-f", &path]);

    // The same manifest, and the example TrustedCluster, where no operator watches: the CRDs'
    // status default says what is missing instead of an empty STATUS.
    let unwatched = cp.new_namespace("helm-unwatched").await;
    kubectl_ok(cp, &["apply", "-n", &unwatched, "-f", &path]);
    let example_tc = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/trustedcluster.yaml");
    kubectl_ok(
        cp,
        &[
            "apply",
            "-n",
            &unwatched,
            "-f",
            &example_tc.to_string_lossy(),
        ],
    );
    let waiting = kubectl_ok(
        cp,
        &["get", "rt", "-n", &unwatched, "-o", "wide", "--no-headers"],
    );
    assert!(
        waiting.contains("Pending") && waiting.contains("WaitingForOperator"),
        "an unwatched ReverseTunnel: {waiting}"
    );
    let waiting = kubectl_ok(
        cp,
        &["get", "trustedclusters", "-n", &unwatched, "--no-headers"],
    );
    assert!(
        waiting.contains("Unknown") && waiting.contains("WaitingForOperator"),
        "an unwatched TrustedCluster: {waiting}"
    );
    let described = kubectl_ok(cp, &["describe", "rt", "-n", &unwatched]);
    assert!(
        described.contains("leaf.watchAllNamespaces=true"),
        "the Ready message says what to do: {described}"
    );

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
    assert!(
        connected
            .conditions
            .iter()
            .all(|c| c.reason != "WaitingForOperator"),
        "the operator's status replaces the default: {:?}",
        connected.conditions
    );
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
    delete_and_wait_gone(&api, "to-root").await;
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
    let (cp, admin, ns) = crds_and_namespace("helm-proxy-rbac").await;
    install(cp, "peers", &ns, ROOT_ONLY);
    let proxy = cp
        .client_for_service_account(&ns, "peers-tether-proxy")
        .await;

    // Peers: the EndpointSlices of the chart's headless Service, followed as `tether proxy
    // --peers-service` does (list, then watch).
    let service = "peers-tether-proxy-peers";
    let slice = |name: &str, ready: bool| {
        proxy_slice(
            service,
            &format!("peers-tether-proxy-{name}"),
            0,
            3024,
            ready,
        )
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
            let peers = tokio::time::timeout(support::tunnel_e2e::DEADLINE, rx.recv())
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
    config.trust.store(std::sync::Arc::new(base));
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
        (true, Default::default()),
        stop.clone(),
    ));
    let joined = join(&JoinRequest {
        root_address: server.local_addr().to_string(),
        route: tether::transport::Route::direct(),
        token: token.clone(),
        leaf_cluster: pki.leaf.cluster().clone(),
        leaf_cas: vec![pki.leaf.public_key().clone()],
        root_ca_pin: None,
        timeout: support::tunnel_e2e::DEADLINE,
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
            tether::egress::allow_list::AllowList::default(),
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
                .create(
                    &PostParams::default(),
                    &support::tunnel_e2e::secret("mine", &[])
                )
                .await
        ),
        403
    );
    let as_proxy: Api<RemoteCluster> = Api::namespaced(proxy.clone(), &ns);
    assert_eq!(
        status_code(as_proxy.delete("leaf-1", &DeleteParams::default()).await),
        403
    );

    // Who may dial: the proxy asks, with its own token, whether a client may; the answer
    // follows the RoleBindings an administrator writes: the README's example, applied as
    // written but for its namespace.
    use tether::proxy::{LeafAccess as _, Reach, Who};
    let access = tether::operator::root::RbacLeafAccess::new(proxy.clone(), &ns);
    let (leaf, alice) = (
        ClusterName::new("leaf-1").expect("name"),
        Who::named("alice"),
    );
    let refused = access
        .check(&alice, &leaf, Reach::Dial)
        .await
        .expect_err("nobody granted alice anything");
    assert!(
        refused.0.contains("may not create remoteclusters/dial"),
        "the proxy could ask, and the answer was no: {refused}"
    );
    let example = readme_yaml_after("**Who may dial which leaf.**").replace("tether-system", &ns);
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), example).expect("write");
    kubectl_ok(cp, &["apply", "-f", &file.path().to_string_lossy()]);
    let fresh = tether::operator::root::RbacLeafAccess::new(proxy.clone(), &ns);
    fresh
        .check(&alice, &leaf, Reach::Dial)
        .await
        .expect("alice may dial leaf-1 once bound as the README shows");
    // And as the chart's NOTES show, with kubectl's create role / rolebinding.
    kubectl_ok(
        cp,
        &[
            "-n",
            &ns,
            "create",
            "role",
            "notes-dial-leaf-1",
            "--verb=create",
            "--resource=remoteclusters.tether.dev/dial",
            "--resource-name=leaf-1",
        ],
    );
    kubectl_ok(
        cp,
        &[
            "-n",
            &ns,
            "create",
            "rolebinding",
            "notes-dial-leaf-1-bob",
            "--role=notes-dial-leaf-1",
            "--user=bob",
        ],
    );
    tether::operator::root::RbacLeafAccess::new(proxy.clone(), &ns)
        .check(&Who::named("bob"), &leaf, Reach::Dial)
        .await
        .expect("bob may dial leaf-1 once bound as the NOTES show");
    eprintln!(
        "the_proxies_rbac_covers_peers_join_tokens_and_remote_clusters took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_operator_token_is_denied_outside_its_role() {
    let started = Instant::now();
    let (cp, admin, ns) = crds_and_namespace("helm-deny").await;
    let other = cp.new_namespace("helm-deny-other").await;
    install(cp, "deny", &ns, LEAF_ONLY);
    Api::<Secret>::namespaced(admin.clone(), &other)
        .create(
            &PostParams::default(),
            &support::tunnel_e2e::secret("elsewhere", &[("k", "v".to_owned())]),
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

#[tokio::test]
async fn the_operator_container_command_runs_with_the_charts_rbac() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let started = Instant::now();
    let (cp, admin, ns) = crds_and_namespace("helm-operator-cli").await;
    install(cp, "cli", &ns, LEAF_ONLY);

    // The container's arguments as the chart renders them; only the admin port becomes a free
    // loopback one, and logs are JSON so the test can read the bound address.
    let docs = render(cp, "cli", &ns, LEAF_ONLY);
    let container = &find(&docs, "Deployment", "cli-tether-operator")["spec"]["template"]["spec"]["containers"]
        [0];
    let mut args: Vec<String> = strings(&container["args"])
        .into_iter()
        .map(|a| {
            if a == "$(POD_IP):9090" {
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
    let addr = tokio::time::timeout(support::tunnel_e2e::DEADLINE, addr_rx)
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
    let (_, pki, proxy) = root_proxy_for_leaf_1().await;
    let echo = echo_server().await.expect("echo");
    create_secrets(&admin, &ns, &pki).await;
    let rule = format!("{}/32:{}", echo.ip(), echo.port());
    let rt: ReverseTunnel =
        serde_json::from_value(example(&proxy.local_addr().to_string(), &[rule])).expect("rt");
    let api: Api<ReverseTunnel> = Api::namespaced(admin.clone(), &ns);
    let by_test = PostParams {
        field_manager: Some("the-test".into()),
        ..PostParams::default()
    };
    api.create(&by_test, &rt)
        .await
        .expect("creating the ReverseTunnel");
    eventually("status Connected 1/1", || async {
        let status = api.get("to-root").await.ok()?.status?;
        (status.phase == Some(Phase::Connected) && status.proxies_ready.as_deref() == Some("1/1"))
            .then_some(())
    })
    .await;
    // Every write the operator made (its finalizer too, a patch kube-runtime makes without a
    // field manager) is its own, not `unknown`'s.
    let fields = api
        .get("to-root")
        .await
        .expect("rt")
        .metadata
        .managed_fields;
    let managers: Vec<String> = fields
        .into_iter()
        .flatten()
        .flat_map(|f| f.manager)
        .collect();
    assert!(
        managers
            .iter()
            .all(|m| m == "the-test" || m.starts_with("tether-operator")),
        "managers: {managers:?}"
    );
    assert!(
        managers.iter().any(|m| m == "tether-operator"),
        "{managers:?}"
    );
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
    let status = tokio::time::timeout(support::tunnel_e2e::DEADLINE, child.wait())
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

/// The first ```yaml block of README.md after the line starting with `marker`.
fn readme_yaml_after(marker: &str) -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let after = readme
        .split_once(marker)
        .unwrap_or_else(|| panic!("README.md has no {marker:?}"))
        .1;
    let block = after
        .split_once("```yaml\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .unwrap_or_else(|| panic!("no ```yaml block after {marker:?} in README.md"))
        .0;
    block.to_owned()
}
