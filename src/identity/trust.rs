//! Which certificate authorities the proxy trusts, per cluster.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::SystemTime;

use russh::keys::ssh_key::{Certificate, PublicKey};

use crate::protocol::target::ClusterName;

use super::error::{AuthError, IdentityError};
use super::keypair::read_to_string;
use super::role::Role;
use super::verify::{check_user, validate_user_name};

/// Cluster name → the CA public keys trusted for it (several during a CA rotation). The proxy
/// keeps one behind an `Arc` and swaps in a new one when the configuration changes, so it is
/// plain data: cheap to clone and build.
#[derive(Debug, Clone, Default)]
pub struct TrustStore {
    cas: BTreeMap<ClusterName, Vec<PublicKey>>,
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

    /// Trusts `ca` for `cluster`, in addition to the CAs already trusted for it (so a rotation
    /// can add the new CA before removing the old one). Adding a key twice changes nothing.
    pub fn insert(&mut self, cluster: ClusterName, ca: PublicKey) {
        let cas = self.cas.entry(cluster).or_default();
        if !cas.iter().any(|k| k.key_data() == ca.key_data()) {
            cas.push(ca);
        }
    }

    /// Stops trusting any CA for `cluster`; returns whether it was known.
    pub fn remove(&mut self, cluster: &ClusterName) -> bool {
        self.cas.remove(cluster).is_some()
    }

    /// Whether some CA is trusted for `cluster`.
    pub fn contains(&self, cluster: &ClusterName) -> bool {
        self.cas.contains_key(cluster)
    }

    /// The clusters with a trusted CA, in name order.
    pub fn clusters(&self) -> impl Iterator<Item = &ClusterName> {
        self.cas.keys()
    }

    /// The CAs trusted for `cluster` (empty if none).
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
