//! The root's own CA key set during a root CA rotation (`tether proxy --ca-keys FILE`): a
//! statement the administrator signs with `tether ca key-set`, which every proxy replica reads
//! from the same file (the root CA Secret), so that all of them say the same thing with the
//! same issue time, and which a replica follows without a restart.
//!
//! It does two things: every agent is told the set (and its leaf keeps it as the root's CA:
//! `operator::root_keys`), and the proxy trusts the keys it lists for its own cluster (its
//! clients and its peers), as the [`TrustSource::Announced`] layer. The phases:
//!
//! ```text
//!   phase            --ca (issues the proxies'   --ca-keys           clients and peers
//!                    own certificates)                                trusted from
//!   standby          old                          (no file)          old
//!   init             old                          [old, new] by old  old, new
//!   update servers   new (a rolling restart)      [old, new] by old  old, new
//!   retire           new                          [new] by new       new: old sessions end
//! ```
//!
//! A set is refused at start-up, naming the flag, unless it speaks for this cluster, is signed
//! by a key it lists, and lists the key of `--ca` (a proxy must trust the issuer of its own
//! certificates); later, a file that does not pass keeps the set in force.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::ProxyServer;
use crate::identity::keyset::{self, KeySetError};
use crate::identity::{PublicKey, TrustSource, TrustStore, fingerprint};
use crate::protocol::ClusterName;
use crate::protocol::control::CaKeySet;

/// Why a key set file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RootKeysError {
    #[error("--ca-keys {path}: {source}")]
    Unreadable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--ca-keys {path}: {source}")]
    Invalid {
        path: String,
        #[source]
        source: KeySetError,
    },
    #[error(
        "--ca-keys {path}: the set does not list the key of --ca ({ca}): the proxies' own certificates would not be trusted"
    )]
    WithoutOwnCa { path: String, ca: String },
}

/// The set in `path`, checked for `cluster` and the proxy's own CA key; `None` when there is
/// no such file (no rotation under way).
pub fn load(
    path: &Path,
    cluster: &ClusterName,
    own_ca: &PublicKey,
) -> Result<Option<CaKeySet>, RootKeysError> {
    let shown = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(RootKeysError::Unreadable {
                path: shown,
                source,
            });
        }
    };
    let invalid = |source| RootKeysError::Invalid {
        path: shown.clone(),
        source,
    };
    let signed = keyset::from_file_text(&text).map_err(invalid)?;
    let listed = keyset::KeySet::read(&signed.statement)
        .map_err(invalid)?
        .keys;
    // Signed by a key it lists: whoever trusts one of them may believe the rest.
    let set = keyset::verify(&signed, cluster, &listed, 0).map_err(invalid)?;
    if !set.keys.iter().any(|k| k.key_data() == own_ca.key_data()) {
        return Err(RootKeysError::WithoutOwnCa {
            path: shown,
            ca: fingerprint(own_ca),
        });
    }
    Ok(Some(signed))
}

/// Puts `set` in force on `proxy`: trusted for its own cluster and announced to every agent.
pub async fn apply(proxy: &ProxyServer, cluster: &ClusterName, set: Option<CaKeySet>) {
    let mut announced = TrustStore::new();
    if let Some(read) = set
        .as_ref()
        .and_then(|s| keyset::KeySet::read(&s.statement).ok())
    {
        let prints: Vec<String> = read.keys.iter().map(fingerprint).collect();
        info!(keys = ?prints, issued_at = read.issued_at, "the root's CA key set is in force");
        for key in read.keys {
            announced.insert_from(TrustSource::Announced, cluster.clone(), key);
        }
    }
    proxy
        .update_trust(|t| t.replace_source(TrustSource::Announced, &announced))
        .await;
    proxy.announce_root_keys(set);
}

/// Re-reads `path` when it changes or `wake` is notified, until `stop`, putting each valid set
/// in force (a file that does not pass is logged and leaves the set in force).
pub async fn follow(
    proxy: Arc<ProxyServer>,
    path: PathBuf,
    own_ca: PublicKey,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    let cluster = proxy.shared().config.cluster.clone();
    let (sets, mut read) = watch::channel(None);
    let reader = super::reload::follow_file(
        "root CA key set",
        path,
        super::reload::POLL,
        wake,
        stop.clone(),
        move |path: &Path| {
            load(path, &cluster, &own_ca).map(|set| {
                sets.send_replace(Some(set));
            })
        },
    );
    let cluster = proxy.shared().config.cluster.clone();
    let applier = async {
        while read.changed().await.is_ok() {
            let set = read.borrow_and_update().clone().flatten();
            apply(&proxy, &cluster, set).await;
        }
    };
    tokio::join!(reader, applier);
}
