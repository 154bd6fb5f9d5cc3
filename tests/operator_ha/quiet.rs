//! A Connected ReverseTunnel writes nothing over a quiet minute but the Lease renewals.

use super::*;

const WRITE_VERBS: [&str; 6] = [
    "POST",
    "PUT",
    "PATCH",
    "APPLY",
    "DELETE",
    "DELETECOLLECTION",
];
/// The quiet window.
const QUIET: Duration = Duration::from_secs(60);
/// `tether operator`'s default Lease: 15 s, renewed 5 s before expiry, so every 10 s.
const RENEWAL: Duration = Duration::from_secs(10);

/// `apiserver_request_total` of write verbs, by `resource[/subresource] VERB CODE`.
async fn write_counts(client: &Client) -> BTreeMap<String, f64> {
    let request = http::Request::get("/metrics")
        .body(Vec::new())
        .expect("request");
    let text = client.request_text(request).await.expect("GET /metrics");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("Prometheus text");
    let mut counts = BTreeMap::new();
    for sample in scrape
        .samples
        .iter()
        .filter(|s| s.metric == "apiserver_request_total")
    {
        let label = |name: &str| sample.labels.get(name).unwrap_or_default().to_owned();
        let verb = label("verb");
        if !WRITE_VERBS.contains(&verb.as_str()) {
            continue;
        }
        let mut resource = label("resource");
        let sub = label("subresource");
        if !sub.is_empty() {
            resource = format!("{resource}/{sub}");
        }
        let prometheus_parse::Value::Counter(v) = sample.value else {
            continue;
        };
        *counts
            .entry(format!("{resource} {verb} {}", label("code")))
            .or_default() += v;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_state_is_quiet() {
    let _serial = SERIAL.lock().await;
    let (cp, client, ns, mut root) = setup("ha-quiet", 3).await;
    let mut operator = spawn_operator(cp, &ns, &root.logs, "operator-q", Some(None));
    apply_example(cp, &root).await;
    wait_kubectl_connected(cp, &ns, "3/3").await;
    let tunnels = root.wait_all_hold().await;
    // The Connected Event is the last write of the connection.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    eventually("the Connected Event", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("Connected"))
            .then_some(())
    })
    .await;

    // Every Lease write in the cluster during the window, by Lease.
    let leases: Api<Lease> = Api::all(client.clone());
    let version = leases
        .list_metadata(&ListParams::default())
        .await
        .expect("list leases")
        .metadata
        .resource_version
        .expect("rv");
    let renewals: Arc<Mutex<BTreeMap<String, u32>>> = Arc::default();
    let watcher = tokio::spawn({
        let renewals = renewals.clone();
        async move {
            let mut stream = leases
                .watch(&WatchParams::default(), &version)
                .await
                .expect("watch leases")
                .boxed();
            while let Ok(Some(event)) = stream.try_next().await {
                if let WatchEvent::Added(l) | WatchEvent::Modified(l) = event {
                    let name = format!("{}/{}", l.namespace().unwrap_or_default(), l.name_any());
                    *renewals.lock().expect("lock").entry(name).or_default() += 1;
                }
            }
        }
    });

    let before = write_counts(&client).await;
    let started = Instant::now();
    tokio::time::sleep(QUIET).await;
    let after = write_counts(&client).await;
    let window = started.elapsed();
    // A Lease write made just before the scrape may reach the watch a moment later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    watcher.abort();
    operator.assert_running();

    let mut writes: BTreeMap<String, f64> = BTreeMap::new();
    for (key, v) in &after {
        let d = v - before.get(key).copied().unwrap_or(0.0);
        if d > 0.0 {
            writes.insert(key.clone(), d);
        }
    }
    let renewals = renewals.lock().expect("lock").clone();
    eprintln!(
        "[{ns}] API writes in a quiet {window:?} with a Connected ReverseTunnel \
         (apiserver_request_total, resource VERB code: count): {writes:?}"
    );
    eprintln!("[{ns}] Lease writes seen by a watch, by Lease: {renewals:?}");
    let total = |resource: &str| -> f64 {
        writes
            .iter()
            .filter(|(k, _)| {
                let r = k.split_whitespace().next().unwrap_or_default();
                r == resource || r.starts_with(&format!("{resource}/"))
            })
            .map(|(_, v)| v)
            .sum()
    };
    assert_eq!(
        total("reversetunnels"),
        0.0,
        "ReverseTunnel writes: {writes:?}"
    );
    let others: Vec<&String> = writes
        .keys()
        .filter(|k| !k.starts_with("leases "))
        .collect();
    assert!(
        others.is_empty(),
        "writes besides Lease renewals: {writes:?}"
    );
    assert_eq!(total("events"), 0.0, "Event writes: {writes:?}");
    // The operator's Lease: one renewal per period, no more.
    let ours = renewals.get(&format!("{ns}/{LEASE}")).copied().unwrap_or(0);
    let expected = (window.as_secs_f64() / RENEWAL.as_secs_f64()).round() as u32;
    eprintln!(
        "[{ns}] the operator renewed its Lease {ours} times in {window:?} (one per {RENEWAL:?}: \
         {expected} expected)"
    );
    assert!(
        ours + 1 >= expected && ours <= expected + 1,
        "{ours} renewals of the operator's Lease in {window:?}, expected {expected}"
    );
    // Every Lease write the API server counted is one of the renewals the watch saw.
    let lease_writes = total("leases");
    let seen: u32 = renewals.values().sum();
    assert!(
        lease_writes <= f64::from(seen),
        "{lease_writes} Lease writes counted, {seen} seen: {renewals:?}"
    );
    assert_eq!(
        root.tunnels(),
        tunnels,
        "tunnels changed in the quiet minute"
    );
}
