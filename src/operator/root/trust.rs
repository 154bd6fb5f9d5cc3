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

/// Keeps `proxy`'s recorded trust equal to the `RemoteCluster` objects in `api`, until the
/// watch stream ends (never, in practice: the watcher retries with backoff). The objects are
/// kept in `writer`'s store, and `changed` is bumped after every change to them.
pub async fn follow_remote_clusters(
    api: Api<RemoteCluster>,
    (reader, writer): (Store<RemoteCluster>, Writer<RemoteCluster>),
    proxy: Arc<ProxyServer>,
    changed: watch::Sender<u64>,
) {
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        let deleted = match event {
            Err(e) => {
                warn!(error = %e, "watching RemoteClusters");
                continue;
            }
            // Mid-relist: the store is incomplete until InitDone, so a leaf would look revoked.
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
            Ok(watcher::Event::Delete(rc)) => rc.metadata.name.clone(),
            Ok(_) => None,
        };
        changed.send_modify(|n| *n = n.wrapping_add(1));
        let recorded = recorded_trust(&reader.state());
        let change = proxy
            .update_trust(|trust| apply_records(trust, &recorded, deleted.as_deref()))
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

/// Makes `recorded` the store's recorded source, and ends the join-time trust of leaves the
/// records now speak for (or that were just deleted).
fn apply_records(trust: &mut TrustStore, recorded: &TrustStore, deleted: Option<&str>) {
    trust.replace_source(TrustSource::Recorded, recorded);
    let handed_over: Vec<ClusterName> = trust
        .clusters_from(TrustSource::Joined)
        .filter(|c| recorded.contains(c) || deleted == Some(c.as_str()))
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
        apply_records(&mut trust, &recorded, Some("leaf-c"));
        assert_eq!(trust.sources(&a), [TrustSource::Recorded]);
        assert_eq!(trust.sources(&b), [TrustSource::Joined]);
        assert!(!trust.contains(&c));

        // leaf-a's record is deleted: nothing trusts it any more.
        apply_records(&mut trust, &TrustStore::new(), Some("leaf-a"));
        assert!(!trust.contains(&a));
        assert!(trust.contains(&b));
    }
}
