//! The operator against a real kube-apiserver: CRDs, a ReverseTunnel reconciled into a live
//! tunnel to an in-process proxy, allow-list edits in place, validation, deletion, and a quiet
//! steady state.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams, WatchEvent,
    WatchParams,
};
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio::time::timeout;

use support::tunnel_e2e::{
    DialLoad, agent_secret, crds_and_namespace, create_secrets, delete_and_wait_gone, echo_through,
    eventually, example, root_proxy_for_leaf_1, start_operator,
};
use tether::demo::{Pki, echo_server};
use tether::operator::crd::reverse_tunnel::Phase;
use tether::operator::crd::{ConditionStatus, ReverseTunnel};
use tether::protocol::ClusterName;
use tether::proxy::ProxyServer;

fn tunnel_ids(proxy: &ProxyServer, leaf: &ClusterName) -> Vec<u64> {
    proxy
        .site(leaf)
        .map(|s| s.tunnels.iter().map(|t| t.id).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn reverse_tunnel_lifecycle() {
    let (cp, client, ns) = crds_and_namespace("op-life").await;
    let (leaf, pki, proxy) = root_proxy_for_leaf_1().await;
    let echo = echo_server().await.expect("echo");
    create_secrets(&client, &ns, &pki).await;
    let stop = start_operator(client.clone(), &ns, Some("tether-operator"));

    // Applied with kubectl, as users do.
    let manifest = example(
        &proxy.local_addr().to_string(),
        &["db.internal:5432".to_owned()],
    );
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), serde_json::to_vec(&manifest).expect("json")).expect("write");
    let path = file.path().to_string_lossy().into_owned();
    let out = cp.kubectl(["apply", "-n", &ns, "-f", &path]);
    assert!(
        out.status.success(),
        "kubectl apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let api: Api<ReverseTunnel> = Api::namespaced(client.clone(), &ns);
    let connected = eventually("status Connected 1/1", || async {
        let rt = api.get("to-root").await.ok()?;
        let status = rt.status.clone()?;
        (status.phase == Some(Phase::Connected) && status.proxies_ready.as_deref() == Some("1/1"))
            .then_some(rt)
    })
    .await;
    let status = connected.status.clone().expect("status");
    assert_eq!(status.proxies.len(), 1);
    assert_eq!(status.proxies[0].id, "proxy-1");
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready condition");
    assert_eq!(ready.status, ConditionStatus::True);
    assert_eq!(ready.observed_generation, connected.metadata.generation);
    // The leader's finalizer controller adds it; the summary may be written first.
    eventually("the finalizer", || async {
        let rt = api.get("to-root").await.ok()?;
        rt.finalizers()
            .iter()
            .any(|f| f == "tether.dev/reverse-tunnel")
            .then_some(())
    })
    .await;

    let out = cp.kubectl(["get", "reversetunnels", "-n", &ns]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kubectl get: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for column in ["NAME", "CLUSTER", "STATUS", "PROXIES", "SEEN", "AGE"] {
        assert!(table.contains(column), "no {column} column in:\n{table}");
    }
    let row = table
        .lines()
        .find(|l| l.starts_with("to-root"))
        .expect("row");
    for cell in ["root", "Connected", "1/1"] {
        assert!(row.contains(cell), "no {cell} in row {row:?}");
    }

    // Users see the connection in `kubectl describe` / `kubectl events`.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    eventually("a Connected Event", || async {
        (!events_for(&events, "Connected").await.is_empty()).then_some(())
    })
    .await;

    // The echo server is not allowed yet.
    let target = format!("{}.leaf-1.tether:{}", echo.ip(), echo.port());
    let refused = echo_through(&proxy, &target).await;
    assert!(refused.is_err(), "dial outside the allow-list succeeded");
    let ids = tunnel_ids(&proxy, &leaf);
    assert_eq!(ids.len(), 1, "one tunnel expected: {ids:?}");

    // Allow it: the same tunnel now serves the dial.
    let rule = format!("{}/32:{}", echo.ip(), echo.port());
    api.patch(
        "to-root",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "allow": ["db.internal:5432", rule] } })),
    )
    .await
    .expect("editing the allow-list");
    let echoed = eventually("a dial through the edited allow-list", || async {
        echo_through(&proxy, &target).await.ok()
    })
    .await;
    assert_eq!(echoed, b"ping");
    assert_eq!(tunnel_ids(&proxy, &leaf), ids, "the tunnel was replaced");

    // Quiet steady state: once the edit is acknowledged, nothing writes the object.
    let settled = eventually("status for the new generation", || async {
        let rt = api.get("to-root").await.ok()?;
        let status = rt.status.as_ref()?;
        (status.observed_generation == rt.metadata.generation
            && status.phase == Some(Phase::Connected))
        .then_some(rt)
    })
    .await;
    let version = settled.resource_version().expect("resourceVersion");
    let mut changes = api
        .watch(
            &WatchParams::default().fields("metadata.name=to-root"),
            &version,
        )
        .await
        .expect("watch")
        .boxed();
    // The leader's once-a-minute stamp (`observedAt`, at the tunnel's slot, which may fall in
    // this window) is the one write allowed; anything else is not.
    let without_stamp = |rt: &ReverseTunnel| {
        rt.status.clone().map(|mut status| {
            status.observed_at = None;
            status
        })
    };
    let settled_status = without_stamp(&settled);
    let window = timeout(Duration::from_secs(4), async {
        while let Some(event) = changes.try_next().await.expect("watch stream") {
            if let WatchEvent::Modified(rt) = event
                && (without_stamp(&rt) != settled_status || rt.spec != settled.spec)
            {
                return Some(rt);
            }
        }
        None
    })
    .await;
    if let Ok(Some(rt)) = window {
        panic!("steady state wrote the object: {:?}", rt.status);
    }
    assert_eq!(tunnel_ids(&proxy, &leaf), ids);

    // A rotated identity (a Secret edit, no spec change) restarts the agent: a new tunnel.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    secrets
        .replace(
            "leaf-1-agent",
            &PostParams::default(),
            &agent_secret(&pki.leaf),
        )
        .await
        .expect("rotating the identity Secret");
    let new_ids = eventually("a new tunnel after the rotation", || async {
        let now = tunnel_ids(&proxy, &leaf);
        (now.len() == 1 && now != ids).then_some(now)
    })
    .await;
    assert_ne!(new_ids, ids);

    // Deleting closes the tunnel and the finalizer goes.
    delete_and_wait_gone(&api, "to-root").await;
    eventually("the tunnel closed", || async {
        tunnel_ids(&proxy, &leaf).is_empty().then_some(())
    })
    .await;
    stop.cancel();
    proxy.shutdown(Duration::from_secs(1)).await;
}

fn api_message(result: Result<impl std::fmt::Debug, kube::Error>) -> String {
    match result {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "unexpected status {status:?}");
            status.message
        }
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn invalid_specs_are_rejected_with_clear_messages() {
    let (_, client, ns) = crds_and_namespace("op-invalid").await;
    let api: Api<DynamicObject> =
        Api::namespaced_with(client, &ns, &ApiResource::erase::<ReverseTunnel>(&()));
    let base = example("proxy.example.com:3024", &["db.internal:5432".to_owned()]);
    let create = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = base.clone();
        edit(&mut v);
        let obj: DynamicObject = serde_json::from_value(v).expect("object");
        let api = api.clone();
        async move { api.create(&PostParams::default(), &obj).await }
    };

    let msg = api_message(create(&|v| v["spec"]["heartbeatInterval"] = json!("fast")).await);
    assert!(msg.contains("spec.heartbeatInterval"), "{msg}");
    let msg = api_message(
        create(&|v| {
            v["spec"]
                .as_object_mut()
                .expect("spec")
                .remove("proxyAddress");
        })
        .await,
    );
    assert!(msg.contains("spec.proxyAddress: Required value"), "{msg}");
    let msg = api_message(create(&|v| v["spec"]["allow"] = json!(["10.0.0.0/8"])).await);
    assert!(
        msg.contains("each allow rule must be CIDR:PORTS or HOST:PORTS"),
        "{msg}"
    );
    let msg = api_message(create(&|v| v["spec"]["proxyAddress"] = json!("no port")).await);
    assert!(msg.contains("spec.proxyAddress"), "{msg}");
    let msg = api_message(create(&|v| v["spec"]["proxyAddress"] = json!("https://lb:443")).await);
    assert!(msg.contains("spec.proxyAddress"), "{msg}");

    // The example itself is valid.
    let ok: DynamicObject = serde_json::from_value(base.clone()).expect("object");
    api.create(&PostParams::default(), &ok)
        .await
        .expect("the example is accepted");
}

/// A ReverseTunnel naming the proxies' TLS port (#17): the schema takes `tls://HOST:PORT`, and
/// the operator's agent holds its tunnel through it (SSH by ALPN) and serves dials.
#[tokio::test]
async fn a_reverse_tunnel_reaches_the_tls_port() {
    let (_, client, ns) = crds_and_namespace("op-tls").await;
    let (leaf, pki, proxy) = root_proxy_for_leaf_1().await;
    let echo = echo_server().await.expect("echo");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let tls = listener.local_addr().expect("addr");
    let port = tether::proxy::tls_port::TlsPort::self_issued(vec!["localhost".into()], None)
        .expect("certificate");
    proxy.serve_tls_port(listener, port);
    create_secrets(&client, &ns, &pki).await;
    let stop = start_operator(client.clone(), &ns, None);
    let manifest = example(
        &format!("tls://{tls}"),
        &[format!("127.0.0.1:{}", echo.port())],
    );
    let api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns,
        &ApiResource::erase::<ReverseTunnel>(&()),
    );
    let object: DynamicObject = serde_json::from_value(manifest).expect("object");
    api.create(&PostParams::default(), &object)
        .await
        .expect("a tls:// proxy address is accepted");
    let target = format!("127.0.0.1.{leaf}.tether:{}", echo.port());
    eventually("a dial through the tunnel on the TLS port", || async {
        (echo_through(&proxy, &target).await.ok()? == b"ping").then_some(())
    })
    .await;
    stop.cancel();
}

#[tokio::test]
async fn rules_the_schema_cannot_judge_fail_in_status() {
    let (_, client, ns) = crds_and_namespace("op-rule").await;
    let stop = start_operator(client.clone(), &ns, None);
    let api: Api<ReverseTunnel> = Api::namespaced(client.clone(), &ns);
    // Passes the schema's coarse pattern, but /99 is no IPv4 prefix.
    let obj: ReverseTunnel = serde_json::from_value(example(
        "proxy.example.com:3024",
        &["10.0.0.0/99:80".to_owned()],
    ))
    .expect("object");
    api.create(&PostParams::default(), &obj)
        .await
        .expect("create");
    let ready = eventually("a Failed status", || async {
        let status = api.get("to-root").await.ok()?.status?;
        (status.phase == Some(Phase::Failed)).then_some(status)
    })
    .await
    .conditions
    .into_iter()
    .find(|c| c.type_ == "Ready")
    .expect("Ready");
    assert_eq!(ready.status, ConditionStatus::False);
    assert_eq!(ready.reason, "InvalidAllowList");
    assert!(
        ready.message.contains("10.0.0.0/99:80"),
        "{}",
        ready.message
    );

    // Deleting a failed tunnel still removes the finalizer.
    delete_and_wait_gone(&api, "to-root").await;
    stop.cancel();
}

/// Counts the connections it relays to `target` (each an agent's attempt).
async fn counting_relay(target: std::net::SocketAddr) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (addr, count)
}

/// The Events on `to-root` with `reason`.
async fn events_for(
    events: &Api<k8s_openapi::api::events::v1::Event>,
    reason: &str,
) -> Vec<k8s_openapi::api::events::v1::Event> {
    let list = events
        .list(&Default::default())
        .await
        .expect("listing Events");
    list.items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("to-root")
        })
        .collect()
}

/// A leaf whose certificate the root does not trust can't fix that by waiting: its status says
/// so with a reason of its own, and one Warning Event, however often the agent retries; once
/// the certificate is replaced, the reconnect is a Normal Event.
#[tokio::test]
async fn a_refused_leaf_says_why_with_one_warning() {
    let (_, client, ns) = crds_and_namespace("op-refused").await;
    let (root, leaf) = (
        ClusterName::new("root").expect("name"),
        ClusterName::new("leaf-1").expect("name"),
    );
    let trusted = Pki::generate(root.clone(), leaf.clone()).expect("pki");
    let proxy = ProxyServer::start(trusted.proxy_config("proxy-1").expect("proxy config"))
        .await
        .expect("proxy");
    // The agent's certificate comes from a leaf CA the proxy has never heard of.
    let stranger = Pki::generate(root, leaf).expect("pki");
    let Pki {
        root,
        leaf: trusted_leaf,
    } = trusted;
    create_secrets(
        &client,
        &ns,
        &Pki {
            root,
            leaf: stranger.leaf,
        },
    )
    .await;
    let (relay, attempts) = counting_relay(proxy.local_addr()).await;
    let stop = start_operator(client.clone(), &ns, None);
    let api: Api<ReverseTunnel> = Api::namespaced(client.clone(), &ns);
    let obj: ReverseTunnel =
        serde_json::from_value(example(&relay.to_string(), &[])).expect("object");
    api.create(&PostParams::default(), &obj)
        .await
        .expect("create");

    let ready = eventually("a ProxyRefusedAgent status", || async {
        let status = api.get("to-root").await.ok()?.status?;
        let ready = status.conditions.into_iter().find(|c| c.type_ == "Ready")?;
        (status.phase == Some(Phase::Connecting) && ready.reason == "ProxyRefusedAgent")
            .then_some(ready)
    })
    .await;
    assert!(
        ready
            .message
            .contains("the proxy refused the agent's certificate"),
        "{}",
        ready.message
    );
    // Retries change nothing: still one Warning, never a second in its series.
    let retried = attempts.load(Ordering::Relaxed) + 2;
    eventually("two more attempts", || async {
        (attempts.load(Ordering::Relaxed) >= retried).then_some(())
    })
    .await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    let warned = eventually("the Warning Event", || async {
        let found = events_for(&events, "ProxyRefusedAgent").await;
        (!found.is_empty()).then_some(found)
    })
    .await;
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert_eq!(warned[0].type_.as_deref(), Some("Warning"));
    assert!(
        warned[0].series.is_none(),
        "repeated: {:?}",
        warned[0].series
    );
    assert_eq!(warned[0].note.as_deref(), Some(ready.message.as_str()));

    // A certificate the root trusts: the agent restarts and connects, a Normal Event.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    secrets
        .replace(
            "leaf-1-agent",
            &PostParams::default(),
            &agent_secret(&trusted_leaf),
        )
        .await
        .expect("replacing the identity Secret");
    let connected = eventually("a Connected Event", || async {
        let found = events_for(&events, "Connected").await;
        (!found.is_empty()).then_some(found)
    })
    .await;
    assert_eq!(connected[0].type_.as_deref(), Some("Normal"));
    let warnings = events.list(&Default::default()).await.expect("Events");
    let warnings: Vec<_> = warnings
        .items
        .iter()
        .filter(|e| e.type_.as_deref() == Some("Warning"))
        .map(|e| e.reason.clone())
        .collect();
    assert_eq!(warnings, [Some("ProxyRefusedAgent".to_owned())]);
    stop.cancel();
    proxy.shutdown(Duration::from_secs(1)).await;
}

/// Two `ReverseTunnel`s for one leaf would run two agents with one identity and two
/// allow-lists. The newer fails with `DuplicateLeaf`, naming the one that carries the leaf,
/// and takes over as soon as that one is deleted.
#[tokio::test]
async fn a_second_tunnel_for_one_leaf_fails_and_takes_over_when_the_first_goes() {
    let (_, client, ns) = crds_and_namespace("op-dup").await;
    let (leaf, pki, proxy) = root_proxy_for_leaf_1().await;
    create_secrets(&client, &ns, &pki).await;
    let stop = start_operator(client.clone(), &ns, None);
    let api: Api<ReverseTunnel> = Api::namespaced(client.clone(), &ns);
    let create = |name: &str| {
        let mut value = example(&proxy.local_addr().to_string(), &[]);
        value["metadata"]["name"] = json!(name);
        let obj: ReverseTunnel = serde_json::from_value(value).expect("object");
        let api = api.clone();
        async move {
            api.create(&PostParams::default(), &obj)
                .await
                .expect("create")
        }
    };
    let phase_of = |name: &'static str| {
        let api = api.clone();
        async move {
            let status = api.get(name).await.ok()?.status?;
            let ready = status.conditions.into_iter().find(|c| c.type_ == "Ready")?;
            Some((status.phase?, ready.reason, ready.message))
        }
    };
    create("to-root").await;
    eventually("the first Connected", || async {
        (phase_of("to-root").await?.0 == Phase::Connected).then_some(())
    })
    .await;
    create("to-root-again").await;
    let (_, _, message) = eventually("the second Failed as a duplicate", || async {
        let seen = phase_of("to-root-again").await?;
        (seen.0 == Phase::Failed && seen.1 == "DuplicateLeaf").then_some(seen)
    })
    .await;
    assert!(message.contains(&format!("{ns}/to-root ")), "{message}");
    assert_eq!(
        tunnel_ids(&proxy, &leaf).len(),
        1,
        "two agents for one leaf"
    );

    api.delete("to-root", &DeleteParams::default())
        .await
        .expect("delete");
    eventually("the second Connected", || async {
        (phase_of("to-root-again").await?.0 == Phase::Connected).then_some(())
    })
    .await;
    eventually("one tunnel, the second's", || async {
        (tunnel_ids(&proxy, &leaf).len() == 1).then_some(())
    })
    .await;
    stop.cancel();
    proxy.shutdown(Duration::from_secs(1)).await;
}

/// A new identity (a renewed or re-issued certificate, as every CA rotation ends in) moves the
/// leaf to a new tunnel with no dial failing: the new agent holds its tunnel before the old one
/// leaves, so even one operator replica never leaves the leaf dark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_identity_takes_over_before_the_old_agent_leaves() {
    let (_cp, client, ns) = crds_and_namespace("op-handover").await;
    let (leaf, pki, proxy) = root_proxy_for_leaf_1().await;
    let proxy = Arc::new(proxy);
    let echo = echo_server().await.expect("echo");
    create_secrets(&client, &ns, &pki).await;
    let stop = start_operator(client.clone(), &ns, None);
    let rule = format!("{}/32:{}", echo.ip(), echo.port());
    let manifest = example(&proxy.local_addr().to_string(), &[rule]);
    let rts: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns,
        &ApiResource::erase::<ReverseTunnel>(&()),
    );
    rts.create(
        &PostParams::default(),
        &serde_json::from_value(manifest).expect("example"),
    )
    .await
    .expect("creating the ReverseTunnel");
    let target = format!("{}.leaf-1.tether:{}", echo.ip(), echo.port());
    eventually("a first dial", || async {
        echo_through(&proxy, &target).await.ok()
    })
    .await;
    let ids = tunnel_ids(&proxy, &leaf);

    let load = DialLoad::start(proxy.clone(), target.clone());
    // Every change of the leaf's tunnels on the proxy, from now on: the leaf must never be
    // left without one.
    let mut changes = proxy.sites().subscribe();
    let seen = tokio::spawn({
        let (proxy, leaf) = (proxy.clone(), leaf.clone());
        async move {
            let mut seen = Vec::new();
            loop {
                let now = tunnel_ids(&proxy, &leaf);
                let done = now.len() == 1 && !ids.contains(&now[0]);
                seen.push(now);
                if done || changes.changed().await.is_err() {
                    return seen;
                }
            }
        }
    });
    Api::<Secret>::namespaced(client.clone(), &ns)
        .replace(
            "leaf-1-agent",
            &PostParams::default(),
            &agent_secret(&pki.leaf),
        )
        .await
        .expect("a new identity");
    let seen = support::within("only the new agent's tunnel", Duration::from_secs(60), seen)
        .await
        .expect("watching the tunnels");
    assert!(
        seen.iter().all(|ids| !ids.is_empty()),
        "the leaf was left without a tunnel: {seen:?}"
    );
    assert!(
        seen.iter().any(|ids| ids.len() == 2),
        "the new tunnel came up before the old one left: {seen:?}"
    );
    let before = load.echoed();
    eventually("dials through the new tunnel", || async {
        (load.echoed() > before + 20).then_some(())
    })
    .await;
    load.finish().await;
    stop.cancel();
}
