//! Proxies learn their peers from the EndpointSlices of their Service: one peer per ready pod
//! endpoint, named by its pod, reachable at the endpoint's address and the slice's tunnel port.
//! Discovery announces them to agents; peering forwards dials to them.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use tracing::{info, warn};

use crate::proxy::Peer;

/// The label Kubernetes puts on a Service's EndpointSlices.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The peers described by `slices`: ready endpoints only, each at the slice's port named
/// `port_name` (or its only port), sorted by ID.
pub fn peers_from_slices<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    port_name: Option<&str>,
) -> Vec<Peer> {
    let mut peers = BTreeMap::new();
    for slice in slices {
        let ports = slice.ports.as_deref().unwrap_or_default();
        let port = ports
            .iter()
            .find(|p| port_name.is_none() || p.name.as_deref() == port_name)
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok());
        let Some(port) = port else { continue };
        for endpoint in slice.endpoints.iter().flatten() {
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            let id = endpoint
                .target_ref
                .as_ref()
                .and_then(|r| r.name.clone())
                .or_else(|| endpoint.hostname.clone());
            let ip = endpoint
                .addresses
                .first()
                .and_then(|a| a.parse::<IpAddr>().ok());
            if let (true, Some(id), Some(ip)) = (ready, id, ip) {
                peers.insert(
                    id.clone(),
                    Peer {
                        id,
                        addr: Some(SocketAddr::new(ip, port)),
                        generation: 0,
                    },
                );
            }
        }
    }
    peers.into_values().collect()
}

/// Watches the EndpointSlices of `service` in `namespace` and hands the peer set to `sink`
/// after every change, until the watch ends. Errors are retried with backoff by the watcher.
pub async fn watch_peers(
    client: Client,
    namespace: &str,
    service: &str,
    port_name: Option<String>,
    sink: impl Fn(Vec<Peer>),
) {
    let api: Api<EndpointSlice> = Api::namespaced(client, namespace);
    let config = watcher::Config::default().labels(&format!("{SERVICE_NAME_LABEL}={service}"));
    let (reader, writer) = reflector::store();
    // Every event counts, deletions included (a deleted slice removes its peers); only a
    // relist in progress is skipped, as the store is incomplete until it is done.
    let stream = watcher(api, config).default_backoff().reflect(writer);
    futures::pin_mut!(stream);
    let mut last: Option<Vec<Peer>> = None;
    while let Some(event) = stream.next().await {
        match event {
            Err(e) => {
                warn!(error = %e, service, "watching the proxies' EndpointSlices");
                continue;
            }
            // A (re)list fills the store only at `InitDone`: reading it before would announce
            // the slices of before the list (none, at start) until the next change.
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
            Ok(_) => {}
        }
        let slices = reader.state();
        let peers = peers_from_slices(slices.iter().map(|s| s.as_ref()), port_name.as_deref());
        if last.as_ref() != Some(&peers) {
            info!(count = peers.len(), service, "proxy peers changed");
            sink(peers.clone());
            last = Some(peers);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ObjectReference;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};

    fn slice(port: i32, endpoints: &[(&str, &str, bool)]) -> EndpointSlice {
        EndpointSlice {
            address_type: "IPv4".into(),
            ports: Some(vec![EndpointPort {
                name: Some("tunnel".into()),
                port: Some(port),
                ..Default::default()
            }]),
            endpoints: Some(
                endpoints
                    .iter()
                    .map(|(name, ip, ready)| Endpoint {
                        addresses: vec![ip.to_string()],
                        conditions: Some(EndpointConditions {
                            ready: Some(*ready),
                            ..Default::default()
                        }),
                        target_ref: Some(ObjectReference {
                            name: Some(name.to_string()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn ready_endpoints_become_peers_at_the_named_port() {
        let slices = [
            slice(3024, &[("p2", "10.0.0.2", true), ("p1", "10.0.0.1", true)]),
            slice(3024, &[("p3", "10.0.0.3", false)]),
        ];
        let peers = peers_from_slices(&slices, Some("tunnel"));
        let got: Vec<(String, String)> = peers
            .iter()
            .map(|p| {
                (
                    p.id.clone(),
                    p.addr.map(|a| a.to_string()).unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("p1".to_string(), "10.0.0.1:3024".to_string()),
                ("p2".to_string(), "10.0.0.2:3024".to_string())
            ]
        );
        assert!(peers_from_slices(&slices, Some("other")).is_empty());
    }
}
