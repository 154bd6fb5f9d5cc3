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
use std::time::{Duration, SystemTime};

use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use tracing::{debug, info};

use super::inventory;

use crate::operator::crd::RemoteCluster;
use crate::operator::crd::remote_cluster::{Connection, RemoteClusterStatus};

/// The field manager of the summary fields, whichever replica writes them.
pub const SUMMARY_MANAGER: &str = "tether-proxies";

/// What the proxies do about leaves that have been away a long time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StalePolicy {
    /// A leaf offline for longer than this is reported `Stale`; `None`: never.
    pub after: Option<Duration>,
    /// Whether a stale leaf's `RemoteCluster` is deleted, revoking its trust (it must join
    /// again to come back).
    pub remove: bool,
}

/// The summary fields `status`'s entries call for, as a status with only those fields; `since`
/// is kept while the connection holds (and when Offline turns Stale), and `now` when it
/// changed.
pub fn summarize(
    status: &RemoteClusterStatus,
    now: SystemTime,
    policy: StalePolicy,
) -> RemoteClusterStatus {
    let mut ids: Vec<&str> = status.proxies.iter().map(|p| p.proxy_id.as_str()).collect();
    ids.sort_unstable();
    let online = status
        .proxies
        .iter()
        .any(|p| p.connection == Connection::Online);
    let away = matches!(
        status.connection,
        Some(Connection::Offline | Connection::Stale)
    );
    let connection = if online {
        Connection::Online
    } else if away && inventory::stale(status.since.as_deref(), policy.after, now) {
        Connection::Stale
    } else {
        Connection::Offline
    };
    let since = match (status.connection, &status.since) {
        (Some(c), Some(since)) if c == connection || (away && !online) => since.clone(),
        _ => humantime::format_rfc3339_seconds(now).to_string(),
    };
    RemoteClusterStatus {
        proxies: Vec::new(),
        connection: Some(connection),
        held_by: (!ids.is_empty()).then(|| ids.join(",")),
        tunnels: Some(status.proxies.iter().map(|p| p.tunnels).sum()),
        since: Some(since),
        inventory: inventory::summarize(status, now),
        refused: status.proxies.iter().find_map(|p| p.refused.clone()),
    }
}

fn current_summary(status: &RemoteClusterStatus) -> RemoteClusterStatus {
    RemoteClusterStatus {
        proxies: Vec::new(),
        ..status.clone()
    }
}

/// Writes the summary of every `RemoteCluster` in `remotes` whose summary is out of step, and
/// deletes the stale ones if `policy` says so.
pub async fn write_summaries(
    api: &Api<RemoteCluster>,
    remotes: &[Arc<RemoteCluster>],
    now: SystemTime,
    policy: StalePolicy,
) {
    let params = PatchParams::apply(SUMMARY_MANAGER).force();
    for rc in remotes {
        let Some(name) = rc.metadata.name.as_deref() else {
            continue;
        };
        let status = rc.status.clone().unwrap_or_default();
        let wanted = summarize(&status, now, policy);
        if policy.remove && wanted.connection == Some(Connection::Stale) {
            remove_stale(api, name, rc, wanted.since.as_deref()).await;
            continue;
        }
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

/// Deletes a stale leaf's `RemoteCluster` (its trust goes with it), only if it is still the
/// object that was judged (its `resourceVersion` unchanged).
async fn remove_stale(
    api: &Api<RemoteCluster>,
    name: &str,
    rc: &RemoteCluster,
    since: Option<&str>,
) {
    let params = kube::api::DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: rc.metadata.uid.clone(),
            resource_version: rc.metadata.resource_version.clone(),
        }),
        ..Default::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => info!(
            leaf = name,
            offline_since = since,
            "removed a stale leaf (--remove-stale-leaves)"
        ),
        Err(e) => debug!(leaf = name, error = %e, "removing a stale leaf"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::crd::remote_cluster::ProxyHolding;

    fn entry(id: &str, connection: Connection, tunnels: u32) -> ProxyHolding {
        ProxyHolding {
            proxy_id: id.into(),
            connection,
            tunnels,
            since: Some("2026-11-26T05:00:00Z".into()),
            agents: Vec::new(),
            refused: None,
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
        let summary = summarize(&status, t0, StalePolicy::default());
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
        assert_eq!(
            summarize(&status, later, StalePolicy::default()),
            current_summary(&status)
        );
        // Every tunnel gone: Offline since then.
        status.proxies.clear();
        let gone = summarize(&status, later, StalePolicy::default());
        assert_eq!(gone.connection, Some(Connection::Offline));
        assert_eq!(gone.held_by, None);
        assert_eq!(gone.tunnels, Some(0));
        let offline_since = humantime::format_rfc3339_seconds(later).to_string();
        assert_eq!(gone.since.as_deref(), Some(offline_since.as_str()));
    }
}

#[cfg(test)]
mod stale_tests {
    use super::*;

    #[test]
    fn a_leaf_away_longer_than_the_policy_turns_stale_keeping_its_since() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_000_000);
        let day = Duration::from_secs(86_400);
        let policy = StalePolicy {
            after: Some(day),
            remove: false,
        };
        let offline = RemoteClusterStatus {
            connection: Some(Connection::Offline),
            since: Some(humantime::format_rfc3339_seconds(t0).to_string()),
            tunnels: Some(0),
            ..Default::default()
        };
        // Within the day: still Offline, nothing to write.
        let soon = summarize(&offline, t0 + day / 2, policy);
        assert_eq!(soon, current_summary(&offline));
        // After it: Stale, away since the same moment.
        let later = summarize(&offline, t0 + day * 2, policy);
        assert_eq!(later.connection, Some(Connection::Stale));
        assert_eq!(later.since, offline.since);
        // Without a policy a leaf is never stale.
        let never = summarize(&offline, t0 + day * 400, StalePolicy::default());
        assert_eq!(never.connection, Some(Connection::Offline));
        // Back online: Online from now.
        let stale = RemoteClusterStatus {
            proxies: vec![crate::operator::crd::remote_cluster::ProxyHolding {
                proxy_id: "p0".into(),
                connection: Connection::Online,
                tunnels: 1,
                since: None,
                agents: Vec::new(),
                refused: None,
            }],
            ..later
        };
        let back = summarize(&stale, t0 + day * 3, policy);
        assert_eq!(back.connection, Some(Connection::Online));
        let now = humantime::format_rfc3339_seconds(t0 + day * 3).to_string();
        assert_eq!(back.since.as_deref(), Some(now.as_str()));
    }
}
