//! The root's trust store, following `RemoteCluster` objects: a leaf is trusted while its
//! object exists, with the CA keys its spec names. A deleted object revokes the trust and
//! closes the leaf's tunnels on this replica.

use std::collections::BTreeSet;
use std::sync::Arc;

use futures::StreamExt as _;
use kube::Api;
use kube::runtime::reflector::{Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use russh::keys::PublicKey;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::identity::TrustStore;
use crate::operator::crd::RemoteCluster;
use crate::protocol::ClusterName;
use crate::proxy::ProxyServer;

/// `base` (the root's own CA, and any leaves configured statically) plus every leaf in
/// `remotes`. Objects with an unusable name or key are skipped with a warning, never fatal.
pub fn trust_from(base: &TrustStore, remotes: &[Arc<RemoteCluster>]) -> TrustStore {
    let mut trust = base.clone();
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

/// Keeps `proxy`'s trust store equal to `base` plus the `RemoteCluster` objects in `api`,
/// until the watch stream ends (never, in practice: the watcher retries with backoff). The
/// objects are kept in `writer`'s store, and `changed` is bumped after every change to them.
pub async fn follow_remote_clusters(
    api: Api<RemoteCluster>,
    (reader, writer): (Store<RemoteCluster>, Writer<RemoteCluster>),
    base: TrustStore,
    proxy: Arc<ProxyServer>,
    changed: watch::Sender<u64>,
) {
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    futures::pin_mut!(stream);
    let trust = proxy.shared().config.trust.clone();
    while let Some(event) = stream.next().await {
        match event {
            Err(e) => {
                warn!(error = %e, "watching RemoteClusters");
                continue;
            }
            // Mid-relist: the store is incomplete until InitDone, so a leaf would look revoked.
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
            Ok(_) => {}
        }
        changed.send_modify(|n| *n = n.wrapping_add(1));
        let next = trust_from(&base, &reader.state());
        let before: BTreeSet<ClusterName> = trust.load().clusters().cloned().collect();
        let after: BTreeSet<ClusterName> = next.clusters().cloned().collect();
        if before == after && same_cas(&trust.load(), &next) {
            continue;
        }
        trust.store(Arc::new(next));
        info!(
            leaves = after.len().saturating_sub(1),
            "trust store updated from RemoteClusters"
        );
        for revoked in before.difference(&after) {
            if proxy.remove_site(revoked).await {
                info!(leaf = %revoked, "leaf no longer trusted; its tunnels are closed");
            }
        }
    }
}

fn same_cas(a: &TrustStore, b: &TrustStore) -> bool {
    a.clusters().all(|c| a.cas(c) == b.cas(c))
}
