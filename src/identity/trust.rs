//! Which certificate authorities the proxy trusts, per cluster, and where each trust comes from.
//!
//! A proxy trusts a leaf's CA for one of three reasons, each kept as its own layer so one
//! updater can replace its layer without touching the others:
//!
//! ```text
//!   Static    --trust-dir files, --ca          (re-read when the files change)
//!   Recorded  the root's records of leaves     (RemoteCluster objects, followed)
//!   Joined    a join this proxy just served    (until the records show it)
//!   Announced the root's own key set, --ca-keys (a root CA rotation; followed)
//!        \___________ union ___________/
//!                      |
//!            verify_agent / verify_client
//! ```
//!
//! Verification uses the union; the layers tell a join which source already claims a name.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::Path;
use std::time::SystemTime;

use russh::keys::ssh_key::{Certificate, PublicKey};

use crate::protocol::target::ClusterName;

use super::error::{AuthError, IdentityError};
use super::keyfile::read_to_string;
use super::role::Role;
use super::verify::{check_user, validate_user_name};

/// Why a CA is trusted: which configuration put it in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TrustSource {
    /// Configured with the proxy: its `--trust-dir` files and its own `--ca`.
    Static,
    /// The root's records of joined leaves (`RemoteCluster` objects in Kubernetes).
    Recorded,
    /// A join this proxy served, trusted at once until the records catch up.
    Joined,
    /// The root's own CA key set during a root CA rotation (`--ca-keys`): both keys until the
    /// old one is retired.
    Announced,
}

impl TrustSource {
    /// Every source, in the order the union is built.
    pub const ALL: [TrustSource; 4] = [Self::Static, Self::Recorded, Self::Joined, Self::Announced];
}

impl fmt::Display for TrustSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Static => "the proxy's static trust (--trust-dir or --ca)",
            Self::Recorded => "a recorded leaf (RemoteCluster)",
            Self::Joined => "a join served by this proxy",
            Self::Announced => "the root's CA key set (--ca-keys)",
        })
    }
}

/// CA keys per cluster.
type CaMap = BTreeMap<ClusterName, Vec<PublicKey>>;

/// Cluster name → the CA public keys trusted for it (several during a CA rotation), by source.
/// The proxy keeps one behind an `Arc` and swaps in a new one when a source changes, so it is
/// plain data: cheap to clone and build.
#[derive(Debug, Clone, Default)]
pub struct TrustStore {
    /// Each source's own keys, so one source can be replaced without touching the others.
    layers: BTreeMap<TrustSource, CaMap>,
    /// The union of the layers, kept in step on every change: what verification reads.
    cas: CaMap,
}

/// Adds `ca` to `cluster`'s keys in `map` unless the same key is already there.
///
/// A new cluster's list starts with room for one key: a first `push` would reserve four
/// (~160 B each), and a cluster has one CA but during a rotation. With 10,000 leaves the three
/// empty slots cost ~9 MiB across the union and the layer that holds them.
fn add_key(map: &mut CaMap, cluster: ClusterName, ca: PublicKey) {
    let cas = map.entry(cluster).or_insert_with(|| Vec::with_capacity(1));
    if !cas.iter().any(|k| k.key_data() == ca.key_data()) {
        cas.push(ca);
    }
}

/// Whether two key lists hold the same keys (comments and order aside).
pub fn same_keys(a: &[PublicKey], b: &[PublicKey]) -> bool {
    a.len() == b.len()
        && a.iter()
            .all(|k| b.iter().any(|o| o.key_data() == k.key_data()))
        && b.iter()
            .all(|k| a.iter().any(|o| o.key_data() == k.key_data()))
}

impl TrustStore {
    /// An empty store, trusting no one.
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads a directory of `<cluster>.pub` files, each holding that cluster's CA public keys in
    /// OpenSSH format, one a line (blank lines and `#` comments ignored). Names starting with `.`
    /// are skipped (Kubernetes' `..data` links in mounted ConfigMaps and Secrets); any other
    /// name that is not `<valid cluster>.pub` is an error, so a typo does not silently drop a
    /// cluster.
    pub fn load_dir(dir: &Path) -> Result<Self, IdentityError> {
        let io = |action, source| IdentityError::Io {
            action,
            path: dir.to_owned(),
            source,
        };
        let mut store = Self::new();
        for entry in fs::read_dir(dir).map_err(|e| io("list", e))? {
            let entry = entry.map_err(|e| io("list", e))?;
            let path = entry.path();
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                return Err(IdentityError::BadTrustFileName {
                    path,
                    reason: "the name is not UTF-8".to_owned(),
                });
            };
            if name.starts_with('.') {
                continue;
            }
            let Some(stem) = name.strip_suffix(".pub") else {
                return Err(IdentityError::BadTrustFileName {
                    path,
                    reason: "the name does not end in .pub".to_owned(),
                });
            };
            let cluster = ClusterName::new(stem).map_err(|e| IdentityError::BadTrustFileName {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            let text = read_to_string(&path)?;
            let keys = parse_ca_keys(&text, &path)?;
            if keys.is_empty() {
                return Err(IdentityError::Parse {
                    path,
                    line: None,
                    message: "no CA public key in the file".to_owned(),
                });
            }
            for key in keys {
                store.insert(cluster.clone(), key);
            }
        }
        Ok(store)
    }

    /// Trusts `ca` for `cluster` statically, in addition to the CAs already trusted for it (so
    /// a rotation can add the new CA before removing the old one). Adding a key twice changes
    /// nothing.
    pub fn insert(&mut self, cluster: ClusterName, ca: PublicKey) {
        self.insert_from(TrustSource::Static, cluster, ca);
    }

    /// Trusts `ca` for `cluster` on behalf of `source`.
    pub fn insert_from(&mut self, source: TrustSource, cluster: ClusterName, ca: PublicKey) {
        add_key(
            self.layers.entry(source).or_default(),
            cluster.clone(),
            ca.clone(),
        );
        add_key(&mut self.cas, cluster, ca);
    }

    /// Stops trusting any CA for `cluster`, whatever the source; returns whether it was known.
    pub fn remove(&mut self, cluster: &ClusterName) -> bool {
        for layer in self.layers.values_mut() {
            layer.remove(cluster);
        }
        self.cas.remove(cluster).is_some()
    }

    /// Drops what `source` trusts for `cluster`; other sources keep theirs.
    pub fn remove_from(&mut self, source: TrustSource, cluster: &ClusterName) {
        if let Some(layer) = self.layers.get_mut(&source)
            && layer.remove(cluster).is_some()
        {
            self.rebuild();
        }
    }

    /// Replaces everything `source` trusts with every key `with` trusts (whatever its sources).
    pub fn replace_source(&mut self, source: TrustSource, with: &TrustStore) {
        self.layers.insert(source, with.cas.clone());
        self.rebuild();
    }

    /// What `source` trusts for `cluster` (empty if nothing).
    pub fn cas_from(&self, source: TrustSource, cluster: &ClusterName) -> &[PublicKey] {
        self.layers
            .get(&source)
            .and_then(|layer| layer.get(cluster))
            .map_or(&[], Vec::as_slice)
    }

    /// The sources that trust some CA for `cluster`, in [`TrustSource::ALL`] order.
    pub fn sources(&self, cluster: &ClusterName) -> Vec<TrustSource> {
        TrustSource::ALL
            .into_iter()
            .filter(|s| !self.cas_from(*s, cluster).is_empty())
            .collect()
    }

    /// The clusters `source` trusts, in name order.
    pub fn clusters_from(&self, source: TrustSource) -> impl Iterator<Item = &ClusterName> {
        self.layers.get(&source).into_iter().flat_map(|l| l.keys())
    }

    /// Whether `self` and `other` trust the same keys for the same clusters, source by source.
    pub fn same_as(&self, other: &TrustStore) -> bool {
        let empty = CaMap::new();
        TrustSource::ALL.iter().all(|s| {
            let a = self.layers.get(s).unwrap_or(&empty);
            let b = other.layers.get(s).unwrap_or(&empty);
            a.len() == b.len()
                && a.iter()
                    .all(|(c, keys)| b.get(c).is_some_and(|theirs| same_keys(keys, theirs)))
        })
    }

    /// Recomputes the union after a layer changed.
    fn rebuild(&mut self) {
        self.layers.retain(|_, layer| {
            layer.retain(|_, keys| !keys.is_empty());
            !layer.is_empty()
        });
        let mut cas = CaMap::new();
        for layer in self.layers.values() {
            for (cluster, keys) in layer {
                for key in keys {
                    add_key(&mut cas, cluster.clone(), key.clone());
                }
            }
        }
        self.cas = cas;
    }

    /// Whether some CA is trusted for `cluster`.
    pub fn contains(&self, cluster: &ClusterName) -> bool {
        self.cas.contains_key(cluster)
    }

    /// The clusters with a trusted CA, in name order.
    pub fn clusters(&self) -> impl Iterator<Item = &ClusterName> {
        self.cas.keys()
    }

    /// The CAs trusted for `cluster` (empty if none), from any source.
    pub fn cas(&self, cluster: &ClusterName) -> &[PublicKey] {
        self.cas.get(cluster).map_or(&[], Vec::as_slice)
    }

    /// Checks the user certificate an agent presents as SSH user `user`: `user` must be a cluster
    /// with a trusted CA, and the certificate a valid agent certificate for that cluster signed by
    /// one of its CAs. Returns the agent's cluster.
    pub fn verify_agent(
        &self,
        user: &str,
        cert: &Certificate,
        now: SystemTime,
    ) -> Result<ClusterName, AuthError> {
        let cluster = ClusterName::new(user).map_err(|_| AuthError::InvalidUserName {
            user: user.to_owned(),
            expected: "cluster name",
        })?;
        let cas = self.known(&cluster)?;
        check_user(cert, cas, &cluster, cluster.as_str(), Role::Agent, now)?;
        Ok(cluster)
    }

    /// Checks the user certificate a root-side client presents as SSH user `user`: signed by a CA
    /// of `local_cluster` (the proxy's own), with the client role and principal `user`. Returns
    /// the client's name.
    pub fn verify_client(
        &self,
        local_cluster: &ClusterName,
        user: &str,
        cert: &Certificate,
        now: SystemTime,
    ) -> Result<String, AuthError> {
        validate_user_name(user).map_err(|_| AuthError::InvalidUserName {
            user: user.to_owned(),
            expected: "client name",
        })?;
        let cas = self.known(local_cluster)?;
        check_user(cert, cas, local_cluster, user, Role::Client, now)?;
        Ok(user.to_owned())
    }

    fn known(&self, cluster: &ClusterName) -> Result<&[PublicKey], AuthError> {
        match self.cas.get(cluster) {
            Some(cas) if !cas.is_empty() => Ok(cas),
            _ => Err(AuthError::UnknownCluster {
                cluster: cluster.to_string(),
            }),
        }
    }
}

/// Parses CA public keys, one per line in OpenSSH format (blank lines and `#` comments ignored);
/// errors name `path` and the line.
pub fn parse_ca_keys(text: &str, path: &Path) -> Result<Vec<PublicKey>, IdentityError> {
    text.lines()
        .enumerate()
        .map(|(i, line)| (i + 1, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
        .map(|(n, line)| {
            PublicKey::from_openssh(line).map_err(|e| IdentityError::Parse {
                path: path.to_owned(),
                line: Some(n),
                message: format!("not an OpenSSH public key: {e}"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::CertificateAuthority;

    fn cluster(name: &str) -> ClusterName {
        ClusterName::new(name).expect("valid name")
    }

    fn key(name: &str) -> PublicKey {
        CertificateAuthority::generate(cluster(name))
            .expect("ca")
            .public_key()
            .clone()
    }

    #[test]
    fn sources_are_replaced_one_at_a_time_and_the_union_follows() {
        let (leaf, other) = (cluster("leaf"), cluster("other"));
        let (static_key, recorded_key) = (key("leaf"), key("leaf"));
        let mut store = TrustStore::new();
        store.insert(leaf.clone(), static_key.clone());
        let mut recorded = TrustStore::new();
        recorded.insert(leaf.clone(), recorded_key.clone());
        recorded.insert(other.clone(), key("other"));
        store.replace_source(TrustSource::Recorded, &recorded);
        assert_eq!(store.cas(&leaf).len(), 2);
        assert_eq!(
            store.sources(&leaf),
            [TrustSource::Static, TrustSource::Recorded]
        );
        assert_eq!(store.sources(&other), [TrustSource::Recorded]);

        // The records drop the leaf: the static key stays, the recorded one goes.
        let mut fewer = TrustStore::new();
        fewer.insert(other.clone(), key("other"));
        store.replace_source(TrustSource::Recorded, &fewer);
        assert!(same_keys(
            store.cas(&leaf),
            std::slice::from_ref(&static_key)
        ));
        assert_eq!(store.sources(&leaf), [TrustSource::Static]);

        store.remove_from(TrustSource::Static, &leaf);
        assert!(!store.contains(&leaf));
        assert!(store.contains(&other));
    }

    #[test]
    fn a_leaf_with_one_ca_holds_room_for_one_key_only() {
        // 10,000 leaves of one CA each: three empty slots per list were ~9 MiB of a proxy.
        let leaf = cluster("leaf");
        let mut store = TrustStore::new();
        store.insert(leaf.clone(), key("leaf"));
        let mut recorded = TrustStore::new();
        recorded.insert(leaf.clone(), key("leaf"));
        store.replace_source(TrustSource::Recorded, &recorded);
        store.remove_from(TrustSource::Recorded, &leaf);
        let lists = store.layers.values().chain([&store.cas]);
        for keys in lists.filter_map(|map| map.get(&leaf)) {
            assert_eq!((keys.len(), keys.capacity()), (1, 1));
        }
    }

    #[test]
    fn same_as_compares_keys_per_source() {
        let (leaf, k) = (cluster("leaf"), key("leaf"));
        let mut a = TrustStore::new();
        a.insert(leaf.clone(), k.clone());
        let mut b = TrustStore::new();
        b.insert_from(TrustSource::Joined, leaf.clone(), k.clone());
        assert!(!a.same_as(&b), "same keys, other source");
        let mut c = TrustStore::new();
        c.insert(leaf, k);
        assert!(a.same_as(&c));
        assert!(!a.same_as(&TrustStore::new()));
    }
}
