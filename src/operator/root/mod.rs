//! The root side in Kubernetes: what `tether proxy --kubernetes` runs next to the proxy.
//!
//! - [`access`]: who may dial which leaf, by the root's RBAC (the proxy's
//!   [`LeafAccess`](crate::proxy::LeafAccess));
//! - [`bearer`]: who presents a bearer token at the client entry, by the root's TokenReview;
//! - [`kept`]: their answers kept for a few seconds, bounded;
//! - [`tokens`]: join tokens in Secrets, joined leaves recorded as `RemoteCluster` objects
//!   (the proxy's [`JoinAuthority`](crate::proxy::JoinAuthority));
//! - [`trust`]: the proxy's trust store follows those `RemoteCluster` objects;
//! - [`holdings`]: each replica reports in `RemoteCluster` status which leaves it holds,
//!   written when that changes, never on a timer; the lowest live replica prunes the entries
//!   of replicas gone from the Service's ready endpoints;
//! - [`summary`]: the lowest live replica keeps the columns of `kubectl get remoteclusters`
//!   in step with the entries.
//!
//! A steady root writes nothing to the API, whatever the number of leaves: a replica's
//! liveness is its pod's readiness (its EndpointSlice, which the kubelet and the endpoint
//! controller keep), not a timestamp each replica would refresh in every leaf's object.
//!
//! Everything lives in the proxies' own namespace, so their RBAC is a namespaced Role.

pub mod access;
pub mod bearer;
pub mod holdings;
pub mod inventory;
pub mod kept;
pub mod summary;
pub mod tokens;
pub mod trust;

use std::sync::Arc;

use kube::runtime::reflector;
use kube::{Api, Client};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span};

use crate::operator::crd::RemoteCluster;
use crate::proxy::ProxyServer;

pub use access::RbacLeafAccess;
pub use bearer::TokenReviews;
pub use tokens::KubeJoinAuthority;

/// Follows `RemoteCluster` objects into `proxy`'s trust store (its recorded source; the static
/// trust stays as configured) and writes this replica's status entries, until `shutdown`.
/// `prune`: the proxy's peers come from its Service's ready endpoints, so they vouch for the
/// entries: departed replicas' entries are removed, and a replica not among them withdraws its
/// own. `stale`: what becomes of leaves away a long time.
pub async fn run(
    client: Client,
    namespace: String,
    proxy: Arc<ProxyServer>,
    (prune, stale): (bool, summary::StalePolicy),
    shutdown: CancellationToken,
) {
    let api: Api<RemoteCluster> = Api::namespaced(client, &namespace);
    let proxy_id = proxy.shared().config.proxy_id.clone();
    let (reader, writer) = reflector::store();
    let changed = watch::channel(0u64).0;
    let remotes = holdings::Remotes {
        store: reader.clone(),
        changed: changed.subscribe(),
    };
    let follow =
        trust::follow_remote_clusters(api.clone(), (reader, writer), proxy.clone(), changed)
            .instrument(info_span!("remote_clusters", %namespace));
    let write = holdings::write_holdings(
        api,
        proxy_id,
        proxy,
        (prune, stale),
        remotes,
        shutdown.clone(),
    )
    .instrument(info_span!("holdings", %namespace));
    tokio::select! {
        () = follow => {}
        () = async { tokio::join!(write, shutdown.cancelled()); } => {}
    }
}
