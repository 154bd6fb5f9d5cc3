//! The root's recorded leaves, followed into the proxy's trust: a leaf is trusted while its
//! `RemoteCluster` object exists, with the CA keys its spec names.
//!
//! This follower owns the proxy's [`TrustSource::Recorded`] source and nothing else (the static
//! trust and the proxy's own CA are the trust-dir reloader's). Every change goes through
//! [`ProxyServer::update_trust`], which closes the tunnels the new trust refuses: deleting a
//! `RemoteCluster` ends its leaf's tunnels even when the name stays trusted statically with
//! another CA, and removing a key from `spec.caKeys` ends the tunnels that key signed.
//!
//! A leaf that joined through this replica is trusted at once ([`TrustSource::Joined`]) and
//! handed over to the records as soon as they show it; a `RemoteCluster` deleted before this
//! follower ever saw it ends that trust too.
//!
//! **Cost at fleet scale.** Rebuilding the trust reads every object's CA keys, and changing it
//! checks every tunnel's certificate: O(leaves) each time. Most events are status writes (three
//! replicas' entries and a summary per leaf: ~4,000 events as 1,000 leaves come online), which
//! change no key, so they only wake the status writers ([`Applied`] tells them apart); and
//! events already waiting are taken together, one rebuild per batch. Rebuilding on every event
//! made 1,000 leaves × 3 replicas quadratic: the follower fell minutes behind the API, the
//! status writers read a stale store, and after 4 minutes most leaves still had no status
//! (`cargo bench --bench fleet`, BENCHMARKS.md).

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt as _;
use kube::Api;
use kube::runtime::reflector::{Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use russh::keys::PublicKey;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::identity::{TrustSource, TrustStore};
use crate::operator::crd::RemoteCluster;
use crate::protocol::ClusterName;
use crate::proxy::ProxyServer;

/// The leaves in `remotes` and their CA keys. Objects with an unusable name or key are skipped
/// with a warning, never fatal.
pub fn recorded_trust(remotes: &[Arc<RemoteCluster>]) -> TrustStore {
    let mut trust = TrustStore::new();
    for rc in remotes {
        let name = rc.metadata.name.as_deref().unwrap_or_default();
        let Ok(cluster) = ClusterName::new(name) else {
            warn!(remote_cluster = name, "not a valid cluster name; ignored");
            continue;
        };
        for text in &rc.spec.ca_keys {
            match PublicKey::from_openssh(text) {
                Ok(key) => trust.insert(cluster.clone(), key),
                Err(e) => warn!(remote_cluster = name, error = %e, "unreadable CA key; ignored"),
            }
        }
    }
    trust
}

/// Most events taken together into one trust rebuild.
const BATCH: usize = 1024;

/// Each `RemoteCluster`'s CA keys as the trust was last built from them, to tell the events
/// that change the trust (a key, an object added or deleted, a relist) from status writes.
#[derive(Debug, Default)]
pub struct Applied {
    /// Object name → `spec.caKeys`.
    keys: BTreeMap<String, Vec<String>>,
}

impl Applied {
    /// Whether `event` changes what the trust is built from; remembers what it says.
    pub fn changes_trust(&mut self, event: &watcher::Event<RemoteCluster>) -> bool {
        match event {
            watcher::Event::Apply(rc) => {
                let name = rc.metadata.name.clone().unwrap_or_default();
                if self.keys.get(&name) == Some(&rc.spec.ca_keys) {
                    return false;
                }
                self.keys.insert(name, rc.spec.ca_keys.clone());
                true
            }
            watcher::Event::Delete(rc) => {
                self.keys
                    .remove(rc.metadata.name.as_deref().unwrap_or_default());
                true
            }
            // A relist may have dropped objects deleted meanwhile: start again from the store.
            watcher::Event::InitDone => {
                self.keys.clear();
                true
            }
            watcher::Event::Init | watcher::Event::InitApply(_) => false,
        }
    }

    /// Records the keys of every object in `remotes` (after a rebuild from them).
    fn record(&mut self, remotes: &[Arc<RemoteCluster>]) {
        self.keys = remotes
            .iter()
            .map(|rc| {
                let name = rc.metadata.name.clone().unwrap_or_default();
                (name, rc.spec.ca_keys.clone())
            })
            .collect();
    }
}

/// Keeps `proxy`'s recorded trust equal to the `RemoteCluster` objects in `api`, until the
/// watch stream ends (never, in practice: the watcher retries with backoff). The objects are
/// kept in `writer`'s store, and `changed` is bumped after every batch of changes to them.
pub async fn follow_remote_clusters(
    api: Api<RemoteCluster>,
    (reader, writer): (Store<RemoteCluster>, Writer<RemoteCluster>),
    proxy: Arc<ProxyServer>,
    changed: watch::Sender<u64>,
) {
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .ready_chunks(BATCH);
    futures::pin_mut!(stream);
    let mut applied = Applied::default();
    let mut initialised = false;
    while let Some(batch) = stream.next().await {
        let mut deleted = Vec::new();
        let mut rebuild = false;
        for event in &batch {
            match event {
                Err(e) => warn!(error = %e, "watching RemoteClusters"),
                Ok(event) => {
                    initialised |= matches!(event, watcher::Event::InitDone);
                    match event {
                        watcher::Event::Delete(rc) => deleted.extend(rc.metadata.name.clone()),
                        watcher::Event::Apply(rc) | watcher::Event::InitApply(rc) => {
                            remember_inventory(&proxy, rc);
                        }
                        _ => {}
                    }
                    rebuild |= applied.changes_trust(event);
                }
            }
        }
        // Mid-relist the store is incomplete: a leaf would look revoked.
        if !initialised {
            continue;
        }
        changed.send_modify(|n| *n = n.wrapping_add(1));
        if !rebuild {
            continue;
        }
        let state = reader.state();
        applied.record(&state);
        let recorded = recorded_trust(&state);
        let change = proxy
            .update_trust(|trust| apply_records(trust, &recorded, &deleted))
            .await;
        if change.changed {
            info!(
                leaves = recorded.clusters().count(),
                closed_tunnels = change.evicted,
                "trust updated from RemoteClusters"
            );
        }
    }
}

/// Lets `proxy` judge dials for a leaf whose tunnels it does not hold by what the leaf's
/// agents last reported to any replica (`status.inventory`).
fn remember_inventory(proxy: &ProxyServer, rc: &RemoteCluster) {
    let (Some(name), Some(inventory)) = (
        rc.metadata.name.as_deref(),
        rc.status.as_ref().and_then(|s| s.inventory.as_ref()),
    ) else {
        return;
    };
    if let Ok(leaf) = ClusterName::new(name) {
        proxy
            .sites()
            .remember(&leaf, super::inventory::remembered(inventory));
    }
}

/// Makes `recorded` the store's recorded source, and ends the join-time trust of leaves the
/// records now speak for (or that were just deleted).
fn apply_records(trust: &mut TrustStore, recorded: &TrustStore, deleted: &[String]) {
    trust.replace_source(TrustSource::Recorded, recorded);
    let handed_over: Vec<ClusterName> = trust
        .clusters_from(TrustSource::Joined)
        .filter(|c| recorded.contains(c) || deleted.iter().any(|d| d == c.as_str()))
        .cloned()
        .collect();
    for cluster in &handed_over {
        trust.remove_from(TrustSource::Joined, cluster);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::CertificateAuthority;

    fn leaf(name: &str) -> (ClusterName, PublicKey) {
        let cluster = ClusterName::new(name).expect("name");
        let ca = CertificateAuthority::generate(cluster.clone()).expect("ca");
        (cluster, ca.public_key().clone())
    }

    #[test]
    fn records_take_over_joined_leaves_and_deletion_revokes_them() {
        let (a, a_key) = leaf("leaf-a");
        let (b, b_key) = leaf("leaf-b");
        let (c, c_key) = leaf("leaf-c");
        let mut trust = TrustStore::new();
        trust.insert_from(TrustSource::Joined, a.clone(), a_key.clone());
        trust.insert_from(TrustSource::Joined, b.clone(), b_key.clone());
        trust.insert_from(TrustSource::Joined, c.clone(), c_key);

        // The records show leaf-a; leaf-b is not there yet; leaf-c was deleted unseen.
        let mut recorded = TrustStore::new();
        recorded.insert(a.clone(), a_key);
        apply_records(&mut trust, &recorded, &["leaf-c".to_owned()]);
        assert_eq!(trust.sources(&a), [TrustSource::Recorded]);
        assert_eq!(trust.sources(&b), [TrustSource::Joined]);
        assert!(!trust.contains(&c));

        // leaf-a's record is deleted: nothing trusts it any more.
        apply_records(&mut trust, &TrustStore::new(), &["leaf-a".to_owned()]);
        assert!(!trust.contains(&a));
        assert!(trust.contains(&b));
    }

    fn remote(name: &str, keys: &[&str], tunnels: Option<u32>) -> RemoteCluster {
        let mut rc = RemoteCluster::new(
            name,
            crate::operator::crd::RemoteClusterSpec {
                ca_keys: keys.iter().map(|k| (*k).to_owned()).collect(),
                join_token: None,
            },
        );
        rc.status = tunnels.map(
            |t| crate::operator::crd::remote_cluster::RemoteClusterStatus {
                tunnels: Some(t),
                ..Default::default()
            },
        );
        rc
    }

    /// The replicas' status writes (thousands as a fleet comes online) leave the trust alone;
    /// what it is built from (keys, objects, a relist) rebuilds it.
    #[test]
    fn only_key_changes_rebuild_the_trust() {
        let mut applied = Applied::default();
        let apply = |rc| watcher::Event::Apply(rc);
        assert!(applied.changes_trust(&apply(remote("leaf-a", &["k1"], None))));
        assert!(applied.changes_trust(&apply(remote("leaf-b", &["k2"], None))));
        // Status writes: one entry, then another, then the summary.
        for tunnels in [1, 2, 3] {
            assert!(!applied.changes_trust(&apply(remote("leaf-a", &["k1"], Some(tunnels)))));
        }
        // A rotated key, a deletion, a return, a relist: each rebuilds.
        assert!(applied.changes_trust(&apply(remote("leaf-a", &["k1", "k3"], Some(3)))));
        assert!(!applied.changes_trust(&apply(remote("leaf-a", &["k1", "k3"], Some(2)))));
        assert!(applied.changes_trust(&watcher::Event::Delete(remote("leaf-b", &["k2"], None))));
        assert!(applied.changes_trust(&apply(remote("leaf-b", &["k2"], None))));
        assert!(!applied.changes_trust(&watcher::Event::Init));
        assert!(applied.changes_trust(&watcher::Event::InitDone));
        // After a rebuild from the store, its objects' status writes are quiet again.
        applied.record(&[Arc::new(remote("leaf-a", &["k1", "k3"], None))]);
        assert!(!applied.changes_trust(&apply(remote("leaf-a", &["k1", "k3"], Some(1)))));
    }
}
