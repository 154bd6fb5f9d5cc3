//! Each proxy replica's entry in `RemoteCluster` status: which leaves it holds tunnels from.
//!
//! Every replica writes only its own entry of `status.proxies` (a list keyed by `proxyId`) by
//! server-side apply under its own field manager, so replicas never overwrite each other and
//! need no coordination.
//!
//! **Writes follow state, not time.** An entry says how many tunnels the replica holds from
//! the leaf and whether they keep their heartbeats; it is written when that changes (a tunnel
//! up or down, Online ↔ Offline) and never refreshed on a timer. A steady root therefore makes
//! no `RemoteCluster` writes at all, however many leaves it serves:
//!
//! ```text
//!                        writes at rest, 3 replicas
//!   heartbeat refresh     3 × leaves / 300 s   (1,000 leaves: 10 writes/s)
//!   state changes only    0                    (what this module does)
//! ```
//!
//! What the entry no longer proves by a fresh timestamp, the replica's liveness proves: the
//! replicas follow their Service's ready endpoints (`--peers-service`), an entry counts only
//! while its replica is among them, and the live replica with the lowest ID removes the
//! entries of any replica that is not (a dead or frozen pod loses its endpoint when its
//! readiness probe fails). A replica that is not among the ready endpoints itself withdraws
//! its entries rather than have them pruned and rewritten. Without `--peers-service` (static
//! `--peer` lists) nothing vouches for a replica, so nothing is pruned: a dead replica's
//! entries stay until it restarts, and its first pass corrects them.
//!
//! **Desired versus observed.** Each pass compares the entries this replica wants (from its
//! live sites) with the entries the `RemoteCluster` objects actually carry (the trust
//! follower's reflector store), and writes only the difference. An entry removed by someone
//! else (a prune that raced a restart) is therefore written again, and the replica's own
//! write, coming back through the watch, finds nothing left to do. A write the watch has not
//! shown yet is remembered for [`STORE_LAG`], so a pass woken before the watch caught up does
//! not repeat it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::Store;
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::summary::StalePolicy;
use crate::operator::crd::RemoteCluster;
use crate::operator::crd::remote_cluster::{Connection, ProxyHolding};
use crate::proxy::{ProxyServer, SiteInfo, SiteStatus};

/// How often the sites are looked at even without a change notice: a tunnel that stops
/// sending heartbeats turns Offline without any event.
const RECHECK: Duration = Duration::from_secs(10);
/// Changes closer together than this are written once.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// How long a write may take to come back through the watch before the store is believed
/// over it.
pub const STORE_LAG: Duration = Duration::from_secs(5);

/// The field manager of one replica's status writes.
pub fn field_manager(proxy_id: &str) -> String {
    format!("tether-proxy-{proxy_id}")
}

/// This replica's entry for one site, or `None` when it holds no tunnel from it and has not
/// refused one of its agents. `since` is left empty: it is stamped when the entry is written.
pub fn holding(proxy_id: &str, site: &SiteInfo) -> Option<ProxyHolding> {
    if site.tunnels.is_empty() && site.refused.is_none() {
        return None;
    }
    Some(ProxyHolding {
        proxy_id: proxy_id.to_owned(),
        connection: if site.status == SiteStatus::Online {
            Connection::Online
        } else {
            Connection::Offline
        },
        tunnels: u32::try_from(site.tunnels.len()).unwrap_or(u32::MAX),
        since: None,
        agents: super::inventory::records(&site.agents),
        refused: site.refused.clone(),
    })
}

/// Whether two entries say the same thing (the time they were written aside).
fn same_state(a: Option<&ProxyHolding>, b: Option<&ProxyHolding>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            a.connection == b.connection
                && a.tunnels == b.tunnels
                && a.agents == b.agents
                && a.refused == b.refused
        }
        _ => false,
    }
}

/// A write made and not yet seen through the watch.
#[derive(Debug, Clone)]
pub struct Pending {
    /// What was written (`None`: the entry was removed).
    pub entry: Option<ProxyHolding>,
    /// When, to stop waiting for the watch after [`STORE_LAG`].
    pub at: Instant,
}

/// The writes that bring `proxy_id`'s entries in `remotes` to `desired` (leaf → entry), as
/// (leaf, entry-or-removal). Leaves without a `RemoteCluster` (trusted statically) get none;
/// writes in `pending` younger than [`STORE_LAG`] are not repeated. Drops from `pending` the
/// writes the store now shows.
pub fn plan(
    remotes: &[Arc<RemoteCluster>],
    proxy_id: &str,
    desired: &BTreeMap<String, ProxyHolding>,
    pending: &mut BTreeMap<String, Pending>,
    now: Instant,
) -> Vec<(String, Option<ProxyHolding>)> {
    let mut writes = Vec::new();
    for rc in remotes {
        let Some(leaf) = rc.metadata.name.as_deref() else {
            continue;
        };
        let actual = rc
            .status
            .as_ref()
            .and_then(|s| s.proxies.iter().find(|p| p.proxy_id == proxy_id));
        let want = desired.get(leaf);
        if let Some(p) = pending.get(leaf)
            && same_state(p.entry.as_ref(), actual)
        {
            pending.remove(leaf);
        }
        if same_state(actual, want) {
            continue;
        }
        let awaited = pending.get(leaf).is_some_and(|p| {
            same_state(p.entry.as_ref(), want) && now.duration_since(p.at) < STORE_LAG
        });
        if !awaited {
            writes.push((leaf.to_owned(), want.cloned()));
        }
    }
    // An older pending write no longer holds anything back.
    pending.retain(|_, p| now.duration_since(p.at) < STORE_LAG);
    writes
}

/// The `RemoteCluster` objects as the trust follower sees them, and a bump on each change.
pub struct Remotes {
    /// The follower's reflector store: what the objects carry now.
    pub store: Store<RemoteCluster>,
    /// Bumped after every change the follower applied to `store`.
    pub changed: watch::Receiver<u64>,
}

/// Writes `proxy`'s entries into the `RemoteCluster` objects of `api` until `shutdown`, then
/// removes them (best effort). With `prune`, the proxy's peer set is authoritative (it comes
/// from the Service's ready endpoints): entries count only while their replica is in it.
pub async fn write_holdings(
    api: Api<RemoteCluster>,
    proxy_id: String,
    proxy: Arc<ProxyServer>,
    (prune, stale): (bool, StalePolicy),
    mut remotes: Remotes,
    shutdown: CancellationToken,
) {
    tokio::select! {
        () = shutdown.cancelled() => return,
        ready = remotes.store.wait_until_ready() => if ready.is_err() { return },
    }
    let mut peers = proxy.shared().peers.subscribe();
    let (mut peers_dirty, mut remotes_dirty) = (true, true);
    // Whether a leaf may have turned stale since the last pass: time alone does that.
    let mut time_passed = false;
    let params = PatchParams::apply(&field_manager(&proxy_id));
    let mut pending: BTreeMap<String, Pending> = BTreeMap::new();
    let mut changes = proxy.sites().subscribe();
    loop {
        let live: Vec<String> = peers.borrow().iter().map(|p| p.id.clone()).collect();
        let vouched = !prune || live.contains(&proxy_id);
        let desired: BTreeMap<String, ProxyHolding> = if vouched {
            proxy
                .sites()
                .list()
                .iter()
                .filter_map(|site| Some((site.name.to_string(), holding(&proxy_id, site)?)))
                .collect()
        } else {
            BTreeMap::new()
        };
        let state = remotes.store.state();
        for (leaf, entry) in plan(&state, &proxy_id, &desired, &mut pending, Instant::now()) {
            match apply(&api, &params, &leaf, entry.as_ref()).await {
                Ok(()) => {
                    debug!(%leaf, ?entry, "wrote this replica's entry");
                    pending.insert(
                        leaf,
                        Pending {
                            entry,
                            at: Instant::now(),
                        },
                    );
                }
                Err(e) => warn!(%leaf, error = %e, "writing RemoteCluster status"),
            }
        }
        let designated = live.iter().min() == Some(&proxy_id);
        if designated && prune && (peers_dirty || remotes_dirty) {
            prune_departed(&api, &state, &live).await;
        }
        if designated && (remotes_dirty || (time_passed && stale.after.is_some())) {
            super::summary::write_summaries(&api, &state, SystemTime::now(), stale).await;
        }
        (peers_dirty, remotes_dirty, time_passed) = (false, false, false);
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
            () = tokio::time::sleep(RECHECK) => time_passed = true,
        }
    }
    withdraw(&api, &params, &remotes.store.state(), &proxy_id).await;
}

/// Removes this replica's entries on the way out, so they do not wait for a prune.
async fn withdraw(
    api: &Api<RemoteCluster>,
    params: &PatchParams,
    remotes: &[Arc<RemoteCluster>],
    proxy_id: &str,
) {
    let none = BTreeMap::new();
    for (leaf, _) in plan(
        remotes,
        proxy_id,
        &none,
        &mut BTreeMap::new(),
        Instant::now(),
    ) {
        let removed = tokio::time::timeout(Duration::from_secs(5), apply(api, params, &leaf, None));
        if !matches!(removed.await, Ok(Ok(()))) {
            debug!(%leaf, "could not remove this replica's status entry");
        }
    }
}

/// The JSON patch removing the entries of replicas not in `live` from one status, or `None`
/// when there are none. Each removal tests the entry's ID first, so a list changed meanwhile
/// makes the patch fail harmlessly.
pub fn prune_patch(rc: &RemoteCluster, live: &[String]) -> Option<serde_json::Value> {
    let proxies = &rc.status.as_ref()?.proxies;
    let mut ops = Vec::new();
    for (i, entry) in proxies.iter().enumerate().rev() {
        if !live.contains(&entry.proxy_id) {
            let path = format!("/status/proxies/{i}");
            ops.push(
                json!({"op": "test", "path": format!("{path}/proxyId"), "value": entry.proxy_id}),
            );
            ops.push(json!({"op": "remove", "path": path}));
        }
    }
    (!ops.is_empty()).then_some(serde_json::Value::Array(ops))
}

/// Removes the entries of replicas not in `live` from every `RemoteCluster` in `remotes`.
async fn prune_departed(api: &Api<RemoteCluster>, remotes: &[Arc<RemoteCluster>], live: &[String]) {
    for rc in remotes {
        let (Some(name), Some(ops)) = (rc.metadata.name.as_deref(), prune_patch(rc, live)) else {
            continue;
        };
        let patch: json_patch::Patch = match serde_json::from_value(ops) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "building a prune patch");
                continue;
            }
        };
        match api
            .patch_status(name, &PatchParams::default(), &Patch::<()>::Json(patch))
            .await
        {
            Ok(_) => debug!(leaf = %name, "removed entries of departed replicas"),
            Err(e) => debug!(leaf = %name, error = %e, "pruning departed replicas' entries"),
        }
    }
}

/// Applies this replica's entry for `leaf`, stamped with the time of writing; `None` drops it.
async fn apply(
    api: &Api<RemoteCluster>,
    params: &PatchParams,
    leaf: &str,
    entry: Option<&ProxyHolding>,
) -> Result<(), kube::Error> {
    let since = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let proxies: Vec<ProxyHolding> = entry
        .map(|e| ProxyHolding {
            since: Some(since),
            ..e.clone()
        })
        .into_iter()
        .collect();
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
#[path = "holdings_tests.rs"]
mod tests;
