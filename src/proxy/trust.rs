//! Changing what the proxy trusts, in one place, so that a change takes effect on the tunnels
//! already up and not only on the next handshake.
//!
//! Three updaters replace one source each of the [`TrustStore`] (see its module): the
//! `--trust-dir` reloader ([`follow_dir`]), the follower of the root's records
//! (`operator::root::trust`), and a join this proxy served (`proxy::join`). All go through
//! [`update`]:
//!
//! ```text
//!  updater ──change(&mut TrustStore)──▶ update ──swap──▶ config.trust (read by every handshake)
//!                                          │
//!                                          └──▶ every tunnel: verify_agent(its certificate)
//!                                                 refused → unregistered and disconnected
//!                                               every site no source trusts → forgotten
//! ```
//!
//! A tunnel keeps the certificate it authenticated with ([`Tunnel::verify`]), so revoking a
//! leaf, removing one of its CA keys or editing a trust file ends exactly the tunnels the
//! remaining trust refuses, within the time the updater takes to notice the change. Root
//! clients' sessions that carry streams are re-checked the same way
//! ([`super::clients`]): rotating a client CA out ends their streams too.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::server::ProxyShared;
use super::sites::Tunnel;
use crate::identity::{IdentityError, TrustSource, TrustStore};

/// How often [`follow_dir`] re-reads the trust directory when nothing wakes it earlier.
pub const TRUST_DIR_POLL: Duration = Duration::from_secs(2);

/// What an [`update`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TrustChange {
    /// Whether the trust differs from before (nothing else happens when it does not).
    pub changed: bool,
    /// Tunnels closed because the new trust refuses their certificates.
    pub evicted: usize,
}

/// Applies `change` to the proxy's trust atomically (concurrent updaters do not lose each
/// other's changes), then closes every tunnel the new trust refuses and forgets every site no
/// source trusts any more.
pub async fn update(shared: &ProxyShared, change: impl Fn(&mut TrustStore)) -> TrustChange {
    let mut changed = false;
    shared.config.trust.rcu(|current| {
        let mut next = (**current).clone();
        change(&mut next);
        changed = !next.same_as(current);
        if changed {
            Arc::new(next)
        } else {
            current.clone()
        }
    });
    if !changed {
        return TrustChange::default();
    }
    TrustChange {
        changed,
        evicted: revalidate(shared).await,
    }
}

/// Checks every tunnel's certificate against the current trust; closes the refused ones and
/// forgets sites nothing trusts. Returns how many tunnels were closed.
pub async fn revalidate(shared: &ProxyShared) -> usize {
    let trust = shared.config.trust.load_full();
    let now = SystemTime::now();
    let refused: Vec<(Arc<Tunnel>, String)> = shared
        .sites
        .tunnels()
        .into_iter()
        .filter_map(|t| t.verify(&trust, now).err().map(|e| (t, e.to_string())))
        .collect();
    for (tunnel, reason) in &refused {
        shared.sites.remove_tunnel(&tunnel.cluster, tunnel.id);
        warn!(leaf = %tunnel.cluster, tunnel = tunnel.id, peer = %tunnel.peer, %reason, "the trust no longer accepts this tunnel's certificate; closing it");
        tunnel.disconnect("no longer trusted").await;
    }
    for client in shared
        .client_sessions
        .take_refused(&trust, &shared.config.cluster)
    {
        warn!(client = %client.name, reason = %client.reason, "the trust no longer accepts this client's certificate; ending its session");
        let reason = "certificate no longer trusted".to_owned();
        let _ = client
            .handle
            .disconnect(russh::Disconnect::ByApplication, reason, String::new())
            .await;
    }
    for site in shared.sites.names() {
        if !trust.contains(&site)
            && let Some(tunnels) = shared.sites.remove_site(&site)
        {
            info!(leaf = %site, "no longer trusted; forgotten");
            for tunnel in tunnels {
                tunnel.disconnect("no longer trusted").await;
            }
        }
    }
    refused.len()
}

/// Keeps the static source equal to the files of `dir` plus `extra` (the proxy's own CA),
/// re-reading them every [`TRUST_DIR_POLL`] and whenever `wake` is notified (SIGHUP), until
/// `stop`. A directory that cannot be read, or holds a bad file, leaves the previous trust in
/// place; the error (naming the file and the cause) is logged once until it changes.
pub async fn follow_dir(
    shared: Arc<ProxyShared>,
    dir: PathBuf,
    extra: TrustStore,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(TRUST_DIR_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
            () = wake.notified() => {}
        }
        match load_static(&dir, &extra) {
            Ok(next) => {
                if last_error.take().is_some() {
                    info!(dir = %dir.display(), "the trust directory is readable again");
                }
                let change =
                    update(&shared, |t| t.replace_source(TrustSource::Static, &next)).await;
                if change.changed {
                    info!(dir = %dir.display(), evicted = change.evicted, "trust directory reloaded");
                }
            }
            Err(e) => {
                let text = e.to_string();
                if last_error.as_deref() != Some(text.as_str()) {
                    warn!(error = %text, "trust directory not reloaded; the previous trust stays");
                    last_error = Some(text);
                }
            }
        }
    }
}

/// The static trust: `dir`'s files and `extra`.
fn load_static(dir: &Path, extra: &TrustStore) -> Result<TrustStore, IdentityError> {
    Ok(union(&TrustStore::load_dir(dir)?, extra))
}

/// Every key `a` or `b` trusts, as one static store.
pub fn union(a: &TrustStore, b: &TrustStore) -> TrustStore {
    let mut out = TrustStore::new();
    for store in [a, b] {
        for cluster in store.clusters() {
            for key in store.cas(cluster) {
                out.insert(cluster.clone(), key.clone());
            }
        }
    }
    out
}
