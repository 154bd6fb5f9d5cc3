//! The summary fields of `RemoteCluster` status (`connection`, `heldBy`, `tunnels`,
//! `lastHeartbeat`), derived from the replicas' entries so `kubectl get remoteclusters` shows
//! them in columns (a column shows only the first value of a list).
//!
//! One replica writes them: the lowest live ID, under the field manager [`SUMMARY_MANAGER`]
//! shared by all replicas, so when that replica goes the next one takes over without a
//! conflict. It writes only where the summary differs from the entries, so a steady root
//! makes no writes.

use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::Store;
use serde_json::json;
use tracing::debug;

use crate::operator::crd::RemoteCluster;
use crate::operator::crd::remote_cluster::{Connection, RemoteClusterStatus};

/// The field manager of the summary fields, whichever replica writes them.
pub const SUMMARY_MANAGER: &str = "tether-proxies";

/// The summary fields `status`'s entries call for, as a status with only those fields.
pub fn summarize(status: &RemoteClusterStatus) -> RemoteClusterStatus {
    let mut ids: Vec<&str> = status.proxies.iter().map(|p| p.proxy_id.as_str()).collect();
    ids.sort_unstable();
    let online = status
        .proxies
        .iter()
        .any(|p| p.connection == Connection::Online);
    RemoteClusterStatus {
        proxies: Vec::new(),
        connection: Some(if online {
            Connection::Online
        } else {
            Connection::Offline
        }),
        held_by: (!ids.is_empty()).then(|| ids.join(",")),
        tunnels: Some(status.proxies.iter().map(|p| p.tunnels).sum()),
        last_heartbeat: status
            .proxies
            .iter()
            .filter_map(|p| p.last_heartbeat.clone())
            .max(),
    }
}

fn current_summary(status: &RemoteClusterStatus) -> RemoteClusterStatus {
    RemoteClusterStatus {
        proxies: Vec::new(),
        ..status.clone()
    }
}

/// Writes the summary of every `RemoteCluster` in `store` whose summary is out of step.
pub async fn write_summaries(api: &Api<RemoteCluster>, store: &Store<RemoteCluster>) {
    let params = PatchParams::apply(SUMMARY_MANAGER).force();
    for rc in store.state() {
        let Some(name) = rc.metadata.name.as_deref() else {
            continue;
        };
        let status = rc.status.clone().unwrap_or_default();
        let wanted = summarize(&status);
        if current_summary(&status) == wanted {
            continue;
        }
        let patch = json!({
            "apiVersion": "tether.dev/v1alpha1",
            "kind": "RemoteCluster",
            "metadata": { "name": name },
            "status": wanted,
        });
        if let Err(e) = api.patch_status(name, &params, &Patch::Apply(&patch)).await {
            debug!(leaf = name, error = %e, "writing the RemoteCluster summary");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::crd::remote_cluster::ProxyHolding;

    fn entry(id: &str, connection: Connection, tunnels: u32, hb: &str) -> ProxyHolding {
        ProxyHolding {
            proxy_id: id.into(),
            connection,
            tunnels,
            last_heartbeat: Some(hb.into()),
        }
    }

    #[test]
    fn the_summary_follows_the_entries() {
        let status = RemoteClusterStatus {
            proxies: vec![
                entry("proxy-b", Connection::Offline, 1, "2026-11-26T05:00:00Z"),
                entry("proxy-a", Connection::Online, 2, "2026-11-26T05:00:09Z"),
            ],
            ..Default::default()
        };
        let summary = summarize(&status);
        assert_eq!(summary.connection, Some(Connection::Online));
        assert_eq!(summary.held_by.as_deref(), Some("proxy-a,proxy-b"));
        assert_eq!(summary.tunnels, Some(3));
        assert_eq!(
            summary.last_heartbeat.as_deref(),
            Some("2026-11-26T05:00:09Z")
        );
        let empty = summarize(&RemoteClusterStatus::default());
        assert_eq!(empty.connection, Some(Connection::Offline));
        assert_eq!(empty.held_by, None);
        assert_eq!(empty.tunnels, Some(0));
    }
}
