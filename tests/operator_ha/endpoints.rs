//! The example ReverseTunnel connects, admits a dial once the allow-list says so, and follows
//! the proxies' endpoints.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_connects_and_follows_the_proxy_endpoints() {
    let _serial = SERIAL.lock().await;
    let (cp, client, ns, mut root) = setup("ha-example", 3).await;
    let _operator = spawn_operator(cp, &ns, &root.logs, "operator", None);

    let applied = Instant::now();
    apply_example(cp, &root).await;
    wait_kubectl_connected(cp, &ns, "3/3").await;
    let to_3 = applied.elapsed();
    eprintln!("[{ns}] kubectl apply -> `kubectl get rt` Connected 3/3 in {to_3:?}");
    let tunnels = root.wait_all_hold().await;
    eprintln!("[{ns}] tunnels on the proxies: {tunnels:?}");

    // The example allows nothing on loopback: the dial is refused by the agent.
    let echo = echo_server().await.expect("echo server");
    let message = b"through the reverse tunnel\n";
    let refused = root.dial(echo, message).await;
    let error = refused.expect_err("a dial outside the example's allow-list went through");
    assert!(error.contains("is forbidden"), "{error}");
    // The client learns only that it is forbidden; the proxy's log says by what.
    let why = format!("forbidden by the agent's allow-list: {echo} is not in");
    eventually("the proxy's log naming the allow-list", || {
        let logged = root
            .proxies
            .values()
            .any(|p| std::fs::read_to_string(&p.process.log).is_ok_and(|log| log.contains(&why)));
        async move { logged.then_some(()) }
    })
    .await;

    // Allow it, as a user would; the running agent takes the edit.
    let rule = format!("127.0.0.1/32:{}", echo.port());
    let patch = json!([{"op": "add", "path": "/spec/allow/-", "value": rule}]).to_string();
    let edited = Instant::now();
    kubectl(
        cp,
        args(&["patch", "rt", RT, "-n", &ns, "--type=json", "-p", &patch]),
    )
    .await;
    let echoed = eventually("a dial through the tunnel", || async {
        root.dial(echo, message).await.ok()
    })
    .await;
    assert_eq!(echoed, message);
    eprintln!(
        "[{ns}] allow-list edit -> a dial through `tether dial` echoed in {:?}",
        edited.elapsed()
    );
    assert_eq!(
        root.tunnels(),
        tunnels,
        "the allow-list edit replaced tunnels"
    );

    let api: Api<ReverseTunnel> = Api::namespaced(client.clone(), &ns);
    let generation = api.get(RT).await.expect("get").metadata.generation;

    // 3 -> 5: new pods, new endpoints; nothing touches the ReverseTunnel.
    let scaled = Instant::now();
    root.add("p4").await;
    root.add("p5").await;
    wait_kubectl_connected(cp, &ns, "5/5").await;
    eprintln!(
        "[{ns}] endpoints 3 -> 5: `kubectl get rt` 5/5 in {:?}",
        scaled.elapsed()
    );
    let tunnels = root.wait_all_hold().await;
    assert_eq!(tunnels.len(), 5);

    // 5 -> 2: endpoints of p1..p3 go, then the pods (SIGTERM, drain).
    let scaled = Instant::now();
    for id in ["p1", "p2", "p3"] {
        root.remove(id).await;
    }
    wait_kubectl_connected(cp, &ns, "2/2").await;
    eprintln!(
        "[{ns}] endpoints 5 -> 2: `kubectl get rt` 2/2 in {:?}",
        scaled.elapsed()
    );
    let rt = api.get(RT).await.expect("get");
    let listed: Vec<&str> = rt
        .status
        .as_ref()
        .expect("status")
        .proxies
        .iter()
        .map(|p| p.id.as_str())
        .collect();
    assert_eq!(listed, ["p4", "p5"]);
    let tunnels = root.wait_all_hold().await;
    assert_eq!(tunnels.keys().collect::<Vec<_>>(), ["p4", "p5"]);
    assert_eq!(
        rt.metadata.generation, generation,
        "the ReverseTunnel's spec changed while scaling"
    );
    let echoed = root.dial(echo, message).await.expect("a dial after 5 -> 2");
    assert_eq!(echoed, message);
}
