//! The summary fields of `RemoteCluster` status (`connection`, `heldBy`, `tunnels`, `since`),
//! derived from the replicas' entries so `kubectl get remoteclusters` shows them in columns (a
//! column shows only the first value of a list).
//!
//! One replica writes them: the lowest live ID, under the field manager [`SUMMARY_MANAGER`]
//! shared by all replicas, so when that replica goes the next one takes over without a
//! conflict. It writes only where the summary differs from the entries, so a steady root
//! makes no writes.
//!
//! `since` is when `connection` last changed, like a condition's `lastTransitionTime`: no
//! timestamp here moves while nothing happens, so `Online 3h` reads "online for three hours",
//! and the truth of `Online` rests on the entries being current (see [`super::holdings`]).

use std::sync::Arc;
use std::time::SystemTime;

use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use tracing::debug;

use crate::operator::crd::RemoteCluster;
use crate::operator::crd::remote_cluster::{Connection, RemoteClusterStatus};

/// The field manager of the summary fields, whichever replica writes them.
pub const SUMMARY_MANAGER: &str = "tether-proxies";

/// The summary fields `status`'s entries call for, as a status with only those fields; `since`
/// is kept while the connection holds, and `now` when it changed.
pub fn summarize(status: &RemoteClusterStatus, now: SystemTime) -> RemoteClusterStatus {
    let mut ids: Vec<&str> = status.proxies.iter().map(|p| p.proxy_id.as_str()).collect();
    ids.sort_unstable();
    let online = status
        .proxies
        .iter()
        .any(|p| p.connection == Connection::Online);
    let connection = if online {
        Connection::Online
    } else {
        Connection::Offline
    };
    let since = match (status.connection, &status.since) {
        (Some(c), Some(since)) if c == connection => since.clone(),
        _ => humantime::format_rfc3339_seconds(now).to_string(),
    };
    RemoteClusterStatus {
        proxies: Vec::new(),
        connection: Some(connection),
        held_by: (!ids.is_empty()).then(|| ids.join(",")),
        tunnels: Some(status.proxies.iter().map(|p| p.tunnels).sum()),
        since: Some(since),
    }
}

fn current_summary(status: &RemoteClusterStatus) -> RemoteClusterStatus {
    RemoteClusterStatus {
        proxies: Vec::new(),
        ..status.clone()
    }
}

/// Writes the summary of every `RemoteCluster` in `remotes` whose summary is out of step.
pub async fn write_summaries(
    api: &Api<RemoteCluster>,
    remotes: &[Arc<RemoteCluster>],
    now: SystemTime,
) {
    let params = PatchParams::apply(SUMMARY_MANAGER).force();
    for rc in remotes {
        let Some(name) = rc.metadata.name.as_deref() else {
            continue;
        };
        let status = rc.status.clone().unwrap_or_default();
        let wanted = summarize(&status, now);
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
    use std::time::Duration;

    use super::*;
    use crate::operator::crd::remote_cluster::ProxyHolding;

    fn entry(id: &str, connection: Connection, tunnels: u32) -> ProxyHolding {
        ProxyHolding {
            proxy_id: id.into(),
            connection,
            tunnels,
            since: Some("2026-11-26T05:00:00Z".into()),
        }
    }

    #[test]
    fn the_summary_follows_the_entries() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_000_000);
        let mut status = RemoteClusterStatus {
            proxies: vec![
                entry("proxy-b", Connection::Offline, 1),
                entry("proxy-a", Connection::Online, 2),
            ],
            ..Default::default()
        };
        let summary = summarize(&status, t0);
        assert_eq!(summary.connection, Some(Connection::Online));
        assert_eq!(summary.held_by.as_deref(), Some("proxy-a,proxy-b"));
        assert_eq!(summary.tunnels, Some(3));
        let online_since = humantime::format_rfc3339_seconds(t0).to_string();
        assert_eq!(summary.since.as_deref(), Some(online_since.as_str()));
        // Written, then summarized again later: identical, so nothing is written.
        status = RemoteClusterStatus {
            proxies: status.proxies,
            ..summary.clone()
        };
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(summarize(&status, later), current_summary(&status));
        // Every tunnel gone: Offline since then.
        status.proxies.clear();
        let gone = summarize(&status, later);
        assert_eq!(gone.connection, Some(Connection::Offline));
        assert_eq!(gone.held_by, None);
        assert_eq!(gone.tunnels, Some(0));
        let offline_since = humantime::format_rfc3339_seconds(later).to_string();
        assert_eq!(gone.since.as_deref(), Some(offline_since.as_str()));
    }
}
