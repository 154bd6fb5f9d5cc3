//! Counting what a cluster writes, from the API server's own `apiserver_request_total`: the
//! quiet-state tests assert that a steady root or leaf writes nothing but its liveness.

use std::collections::BTreeMap;

use kube::Client;

/// The verbs that change something.
const WRITE_VERBS: [&str; 6] = [
    "POST",
    "PUT",
    "PATCH",
    "APPLY",
    "DELETE",
    "DELETECOLLECTION",
];

/// `apiserver_request_total` of write verbs, by `resource[/subresource] VERB CODE`.
pub async fn write_counts(client: &Client) -> BTreeMap<String, f64> {
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

/// The writes counted between two [`write_counts`] scrapes (only those that grew).
pub fn since(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .filter_map(|(key, v)| {
            let d = v - before.get(key).copied().unwrap_or(0.0);
            (d > 0.0).then(|| (key.clone(), d))
        })
        .collect()
}

/// Writes to `resource` and its subresources among `writes`.
pub fn total(writes: &BTreeMap<String, f64>, resource: &str) -> f64 {
    writes
        .iter()
        .filter(|(k, _)| {
            let r = k.split_whitespace().next().unwrap_or_default();
            r == resource || r.starts_with(&format!("{resource}/"))
        })
        .map(|(_, v)| v)
        .sum()
}
