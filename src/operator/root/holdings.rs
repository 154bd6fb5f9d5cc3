//! Each proxy replica's entry in `RemoteCluster` status: which leaves it holds tunnels from.
//!
//! Every replica writes only its own entry of `status.proxies` (a list keyed by `proxyId`) by
//! server-side apply under its own field manager, so replicas never overwrite each other and
//! need no coordination. An entry is written when its tunnel count or connection changes,
//! and its heartbeat time refreshed at most every [`HEARTBEAT_REFRESH`], so a steady root
//! makes no writes. When a replica holds no tunnel from a leaf, it applies nothing for it and
//! its entry goes away.
//!
//! A replica that dies without removing its entries (kill -9, node loss) leaves them behind;
//! when proxies follow their Service's endpoints, the live replica with the lowest ID removes
//! entries of replicas no longer among the endpoints, whenever that set changes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::reflector::Store;
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::operator::crd::RemoteCluster;
use crate::operator::crd::remote_cluster::{Connection, ProxyHolding};
use crate::proxy::{ProxyServer, SiteInfo, SiteStatus};

/// How often an unchanged entry's `lastHeartbeat` is refreshed.
pub const HEARTBEAT_REFRESH: Duration = Duration::from_secs(300);
/// How often the sites are looked at even without a change notice (offline transitions).
const RECHECK: Duration = Duration::from_secs(10);
/// Changes closer together than this are written once.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// The field manager of one replica's status writes.
pub fn field_manager(proxy_id: &str) -> String {
    format!("tether-proxy-{proxy_id}")
}

/// This replica's entry for one site, or `None` when it holds no tunnel from it.
pub fn holding(proxy_id: &str, site: &SiteInfo) -> Option<ProxyHolding> {
    if site.tunnels.is_empty() {
        return None;
    }
    let last = site.tunnels.iter().map(|t| t.last_heartbeat).max();
    Some(ProxyHolding {
        proxy_id: proxy_id.to_owned(),
        connection: if site.status == SiteStatus::Online {
            Connection::Online
        } else {
            Connection::Offline
        },
        tunnels: u32::try_from(site.tunnels.len()).unwrap_or(u32::MAX),
        last_heartbeat: last.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
    })
}

/// What was last written for one leaf, and when.
struct Written {
    entry: Option<ProxyHolding>,
    at: SystemTime,
}

fn needs_write(previous: Option<&Written>, entry: Option<&ProxyHolding>, now: SystemTime) -> bool {
    let Some(previous) = previous else {
        return entry.is_some();
    };
    match (previous.entry.as_ref(), entry) {
        (None, None) => false,
        (Some(a), Some(b)) => {
            a.connection != b.connection
                || a.tunnels != b.tunnels
                || now.duration_since(previous.at).unwrap_or_default() >= HEARTBEAT_REFRESH
        }
        _ => true,
    }
}

/// The `RemoteCluster` objects as the trust follower sees them, and a bump on each change.
pub struct Remotes {
    pub store: Store<RemoteCluster>,
    pub changed: watch::Receiver<u64>,
}

/// Writes `proxy`'s entries into the `RemoteCluster` objects of `api` until `shutdown`, then
/// removes them (best effort). With `prune`, the proxy's peer set is authoritative (it comes
/// from the Service's endpoints) and entries of departed replicas are removed.
pub async fn write_holdings(
    api: Api<RemoteCluster>,
    proxy_id: String,
    proxy: Arc<ProxyServer>,
    prune: bool,
    mut remotes: Remotes,
    shutdown: CancellationToken,
) {
    let mut peers = proxy.shared().peers.subscribe();
    let (mut peers_dirty, mut remotes_dirty) = (true, true);
    let params = PatchParams::apply(&field_manager(&proxy_id));
    let mut written: BTreeMap<String, Written> = BTreeMap::new();
    // Entries a previous run of this replica left behind are corrected on the first pass.
    match api.list(&ListParams::default()).await {
        Ok(list) => {
            for rc in list {
                let mine = rc
                    .status
                    .and_then(|s| s.proxies.into_iter().find(|p| p.proxy_id == proxy_id));
                if let (Some(name), Some(entry)) = (rc.metadata.name, mine) {
                    written.insert(
                        name,
                        Written {
                            entry: Some(entry),
                            at: SystemTime::UNIX_EPOCH,
                        },
                    );
                }
            }
        }
        Err(e) => warn!(error = %e, "listing RemoteClusters"),
    }
    let mut changes = proxy.sites().subscribe();
    loop {
        let now = SystemTime::now();
        let mut current: BTreeMap<String, ProxyHolding> = proxy
            .sites()
            .list()
            .iter()
            .filter_map(|site| Some((site.name.to_string(), holding(&proxy_id, site)?)))
            .collect();
        let leaves: Vec<String> = written.keys().chain(current.keys()).cloned().collect();
        for leaf in leaves {
            let entry = current.remove(&leaf);
            if !needs_write(written.get(&leaf), entry.as_ref(), now) {
                continue;
            }
            match apply(&api, &params, &leaf, entry.as_ref()).await {
                Ok(()) => {
                    written.insert(leaf, Written { entry, at: now });
                }
                // A leaf trusted without a RemoteCluster (a static trust directory).
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    written.insert(leaf, Written { entry, at: now });
                }
                Err(e) => warn!(%leaf, error = %e, "writing RemoteCluster status"),
            }
        }
        written.retain(|_, w| w.entry.is_some());
        let live: Vec<String> = peers.borrow().iter().map(|p| p.id.clone()).collect();
        let designated = live.iter().min() == Some(&proxy_id);
        if designated && prune && peers_dirty {
            prune_departed(&api, &live).await;
        }
        if designated && remotes_dirty {
            super::summary::write_summaries(&api, &remotes.store).await;
        }
        (peers_dirty, remotes_dirty) = (false, false);
        tokio::select! {
            () = shutdown.cancelled() => break,
            Ok(()) = changes.changed() => tokio::time::sleep(DEBOUNCE).await,
            Ok(()) = peers.changed() => {
                // The designated replica may have changed too.
                (peers_dirty, remotes_dirty) = (true, true);
                tokio::time::sleep(DEBOUNCE).await;
            }
            Ok(()) = remotes.changed.changed() => {
                remotes_dirty = true;
                tokio::time::sleep(DEBOUNCE).await;
            }
            () = tokio::time::sleep(RECHECK) => {}
        }
    }
    for leaf in written.keys() {
        let removed =
            tokio::time::timeout(Duration::from_secs(5), apply(&api, &params, leaf, None));
        if !matches!(removed.await, Ok(Ok(()))) {
            debug!(%leaf, "could not remove this replica's status entry");
        }
    }
}

/// Removes the entries of replicas not in `live` from every `RemoteCluster`. Each removal
/// tests the entry's ID first, so a list changed meanwhile makes the patch fail harmlessly.
async fn prune_departed(api: &Api<RemoteCluster>, live: &[String]) {
    let list = match api.list(&ListParams::default()).await {
        Ok(list) => list,
        Err(e) => {
            warn!(error = %e, "listing RemoteClusters to prune departed replicas");
            return;
        }
    };
    for rc in list {
        let (Some(name), Some(status)) = (rc.metadata.name, rc.status) else {
            continue;
        };
        let mut ops = Vec::new();
        for (i, entry) in status.proxies.iter().enumerate().rev() {
            if !live.contains(&entry.proxy_id) {
                let path = format!("/status/proxies/{i}");
                ops.push(json!({"op": "test", "path": format!("{path}/proxyId"), "value": entry.proxy_id}));
                ops.push(json!({"op": "remove", "path": path}));
            }
        }
        if ops.is_empty() {
            continue;
        }
        let patch: json_patch::Patch = match serde_json::from_value(serde_json::Value::Array(ops)) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "building a prune patch");
                continue;
            }
        };
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::<()>::Json(patch))
            .await
        {
            Ok(_) => debug!(leaf = %name, "removed entries of departed replicas"),
            Err(e) => debug!(leaf = %name, error = %e, "pruning departed replicas' entries"),
        }
    }
}

/// Applies this replica's entry for `leaf`; `None` drops it.
async fn apply(
    api: &Api<RemoteCluster>,
    params: &PatchParams,
    leaf: &str,
    entry: Option<&ProxyHolding>,
) -> Result<(), kube::Error> {
    let proxies: Vec<&ProxyHolding> = entry.into_iter().collect();
    let patch = json!({
        "apiVersion": "tether.dev/v1alpha1",
        "kind": "RemoteCluster",
        "metadata": { "name": leaf },
        "status": { "proxies": proxies },
    });
    api.patch_status(leaf, params, &Patch::Apply(&patch))
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tunnels: u32, connection: Connection) -> ProxyHolding {
        ProxyHolding {
            proxy_id: "p1".into(),
            connection,
            tunnels,
            last_heartbeat: None,
        }
    }

    #[test]
    fn writes_only_changes_and_rare_heartbeat_refreshes() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let online = entry(1, Connection::Online);
        assert!(needs_write(None, Some(&online), t0));
        assert!(!needs_write(None, None, t0));
        let w = Written {
            entry: Some(online.clone()),
            at: t0,
        };
        assert!(!needs_write(
            Some(&w),
            Some(&online),
            t0 + Duration::from_secs(60)
        ));
        assert!(needs_write(Some(&w), Some(&online), t0 + HEARTBEAT_REFRESH));
        assert!(needs_write(
            Some(&w),
            Some(&entry(2, Connection::Online)),
            t0
        ));
        assert!(needs_write(
            Some(&w),
            Some(&entry(1, Connection::Offline)),
            t0
        ));
        assert!(needs_write(Some(&w), None, t0));
    }
}
