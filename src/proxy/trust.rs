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

use super::shared::ProxyShared;
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
        tunnel.close();
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
/// re-reading them when they changed (looked at every [`TRUST_DIR_POLL`]) and whenever `wake`
/// is notified (SIGHUP), until `stop`. A directory that cannot be read, or holds a bad file,
/// leaves the previous trust in place; the error (naming the file and the cause) is logged
/// once until it changes.
pub async fn follow_dir(
    shared: Arc<ProxyShared>,
    dir: PathBuf,
    extra: TrustStore,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(TRUST_DIR_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut follower = TrustDirFollower::new(dir.clone(), extra);
    let mut last_error: Option<String> = None;
    loop {
        let forced = tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => false,
            () = wake.notified() => true,
        };
        match follower.poll(forced) {
            Ok(None) => {}
            Ok(Some(next)) => {
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

/// Reads a trust directory again only when it may have changed.
///
/// Re-reading costs a read and a key parse per file, then a comparison with the whole current
/// trust: with 10,000 leaves in the directory that was ~XX ms of CPU every 2 s, at rest. A
/// stamp of the directory (each entry's name, inode, size, modification and change times,
/// following symbolic links as Kubernetes' ConfigMap and Secret mounts use them) costs one
/// `stat` per file instead, and the files are read only when it differs. Change times cannot
/// be set back by a writer, so an edit in place is seen as surely as a renamed-in file; a file
/// changed within [`RACY_WINDOW`] of now is read again at every poll, because a second edit
/// within the file system's timestamp granularity would leave the stamp as it was (git's
/// "racily clean" entries).
pub struct TrustDirFollower {
    /// The trust directory.
    dir: PathBuf,
    /// Keys trusted beside the directory's files (the proxy's own CA).
    extra: TrustStore,
    /// The stamp of the last successful read; `None` before it (or after a failed one, so a
    /// broken directory keeps being retried).
    last: Option<u64>,
    /// How recent a change must be for the directory to be read again whatever the stamp says
    /// ([`RACY_WINDOW`]; shorter in tests).
    racy_window: Duration,
}

/// How recent a change must be for its file to be read again whatever the stamp says.
const RACY_WINDOW: Duration = Duration::from_secs(2 * TRUST_DIR_POLL.as_secs());

impl TrustDirFollower {
    /// A follower of `dir`, adding `extra` to what it reads; nothing is read before the first
    /// [`poll`](Self::poll).
    pub fn new(dir: PathBuf, extra: TrustStore) -> Self {
        Self {
            dir,
            extra,
            last: None,
            racy_window: RACY_WINDOW,
        }
    }

    /// The static trust when the directory changed since the last read (or `forced`);
    /// `None` when it did not.
    pub fn poll(&mut self, forced: bool) -> Result<Option<TrustStore>, IdentityError> {
        let stamp = dir_stamp(&self.dir, self.racy_window).map_err(|source| IdentityError::Io {
            action: "list",
            path: self.dir.clone(),
            source,
        })?;
        if !forced && stamp.is_some() && stamp == self.last {
            return Ok(None);
        }
        self.last = None;
        let next = load_static(&self.dir, &self.extra)?;
        self.last = stamp;
        Ok(Some(next))
    }
}

/// A hash of what `stat` says of `dir` and each of its entries; `None` when some entry changed
/// within `racy_window` of now (its stamp cannot be relied on yet).
fn dir_stamp(dir: &Path, racy_window: Duration) -> std::io::Result<Option<u64>> {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::MetadataExt;
    let recent = SystemTime::now() - racy_window;
    let mut hasher = std::hash::DefaultHasher::new();
    let mut racy = false;
    let mut add = |name: &std::ffi::OsStr, meta: Option<&std::fs::Metadata>| {
        let Some(meta) = meta else {
            // A dangling link or a file removed meanwhile: the read that follows reports it.
            racy = true;
            return;
        };
        (
            name,
            meta.ino(),
            meta.size(),
            meta.mtime(),
            meta.mtime_nsec(),
        )
            .hash(&mut hasher);
        (meta.ctime(), meta.ctime_nsec()).hash(&mut hasher);
        racy |= meta.modified().is_ok_and(|t| t > recent)
            || changed_at(meta).is_some_and(|t| t > recent);
    };
    add(std::ffi::OsStr::new("."), Some(&std::fs::metadata(dir)?));
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        add(
            &entry.file_name(),
            std::fs::metadata(entry.path()).ok().as_ref(),
        );
    }
    Ok((!racy).then(|| hasher.finish()))
}

/// When the inode last changed (`st_ctime`), which no writer can set back.
fn changed_at(meta: &std::fs::Metadata) -> Option<SystemTime> {
    use std::os::unix::fs::MetadataExt;
    let secs = u64::try_from(meta.ctime()).ok()?;
    let nanos = u32::try_from(meta.ctime_nsec()).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::CertificateAuthority;
    use crate::protocol::ClusterName;

    fn write_ca(dir: &Path, cluster: &str) -> crate::identity::PublicKey {
        let ca = CertificateAuthority::generate(ClusterName::new(cluster).unwrap()).unwrap();
        let line = ca.public_key().to_openssh().unwrap();
        std::fs::write(dir.join(format!("{cluster}.pub")), format!("{line}\n")).unwrap();
        ca.public_key().clone()
    }

    const RACY: Duration = Duration::from_millis(300);

    fn follower(dir: &Path) -> TrustDirFollower {
        TrustDirFollower {
            racy_window: RACY,
            ..TrustDirFollower::new(dir.to_owned(), TrustStore::new())
        }
    }

    /// Waits (bounded) until what was written is outside the racy window: the kernel sets
    /// `st_ctime` to now on every change, and nothing can set it back.
    fn wait_out_racy_window(dir: &Path) {
        let deadline = std::time::Instant::now() + RACY * 10;
        while dir_stamp(dir, RACY).unwrap().is_none() {
            assert!(std::time::Instant::now() < deadline, "still racy");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn an_unchanged_directory_is_not_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let first = write_ca(dir.path(), "leaf-a");
        wait_out_racy_window(dir.path());
        let mut follower = follower(dir.path());
        let read = follower.poll(false).unwrap().expect("the first poll reads");
        assert_eq!(read.cas(&ClusterName::new("leaf-a").unwrap()), [first]);
        assert!(follower.poll(false).unwrap().is_none(), "nothing changed");
        assert!(
            follower.poll(true).unwrap().is_some(),
            "SIGHUP reads anyway"
        );

        // An edit in place (same name, same size) changes the stamp.
        let second = write_ca(dir.path(), "leaf-a");
        wait_out_racy_window(dir.path());
        let read = follower.poll(false).unwrap().expect("an edit is read");
        assert_eq!(read.cas(&ClusterName::new("leaf-a").unwrap()), [second]);
        assert!(follower.poll(false).unwrap().is_none());

        // A change too recent to trust the stamp is read at every poll until it is not.
        write_ca(dir.path(), "leaf-a");
        assert!(follower.poll(false).unwrap().is_some());
        wait_out_racy_window(dir.path());
        assert!(follower.poll(false).unwrap().is_some());
        assert!(follower.poll(false).unwrap().is_none());

        // A new file, then its removal.
        let b = ClusterName::new("leaf-b").unwrap();
        write_ca(dir.path(), "leaf-b");
        wait_out_racy_window(dir.path());
        assert!(follower.poll(false).unwrap().expect("added").contains(&b));
        std::fs::remove_file(dir.path().join("leaf-b.pub")).unwrap();
        wait_out_racy_window(dir.path());
        assert!(!follower.poll(false).unwrap().expect("removed").contains(&b));
    }

    #[test]
    fn a_bad_directory_is_retried_until_it_reads() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("leaf.pub"), "ssh-ed25519 garbage\n").unwrap();
        wait_out_racy_window(dir.path());
        let mut follower = follower(dir.path());
        assert!(follower.poll(false).is_err());
        assert!(follower.poll(false).is_err(), "still reported, not skipped");
    }
}
