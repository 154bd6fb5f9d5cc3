//! A key with its certificate, as an SSH peer presents them (the files are [`super::keyfile`]'s).

use std::fmt;
use std::path::Path;
use std::time::Duration;

use russh::keys::ssh_key::{Certificate, PrivateKey};

use super::ca::CertificateAuthority;
use super::error::IdentityError;
use super::keyfile::{
    Overwrite, cert_path, generate_key, public_path, read_private_key, read_to_string,
    refuse_existing, write_file, write_key_pair,
};
use super::role::Role;
use super::verify::fingerprint;

/// A key and its certificate, as an SSH peer presents them: a proxy's host identity, an agent's
/// or a client's user identity.
#[derive(Clone)]
pub struct Identity {
    /// The private key the certificate certifies.
    pub key: PrivateKey,
    /// The certificate, signed by the cluster's CA.
    pub certificate: Certificate,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("key", &fingerprint(self.key.public_key()))
            .field("key_id", &self.certificate.key_id())
            .field("principals", &self.certificate.valid_principals())
            .finish()
    }
}

impl Identity {
    /// A fresh key with a host certificate for proxy replica `proxy_id` of `ca`'s cluster.
    pub fn generate_host(
        ca: &CertificateAuthority,
        proxy_id: &str,
        validity: Duration,
    ) -> Result<Self, IdentityError> {
        let key = generate_key(&format!("tether-proxy {proxy_id}.{}", ca.cluster()))?;
        let certificate = ca.issue_host(proxy_id, key.public_key(), validity)?;
        Ok(Self { key, certificate })
    }

    /// A fresh key with the agent certificate of `ca`'s cluster.
    pub fn generate_agent(
        ca: &CertificateAuthority,
        validity: Duration,
    ) -> Result<Self, IdentityError> {
        let key = generate_key(&format!("tether-agent {}", ca.cluster()))?;
        let certificate = ca.issue_agent(key.public_key(), validity)?;
        Ok(Self { key, certificate })
    }

    /// A fresh key with a client certificate for `name`, issued by the local cluster's CA.
    pub fn generate_client(
        ca: &CertificateAuthority,
        name: &str,
        validity: Duration,
    ) -> Result<Self, IdentityError> {
        Self::generate_client_in(ca, name, &[], validity)
    }

    /// [`generate_client`](Self::generate_client) for a client in `groups`, which the root's
    /// RBAC sees (see [`super::groups`]).
    pub fn generate_client_in(
        ca: &CertificateAuthority,
        name: &str,
        groups: &[String],
        validity: Duration,
    ) -> Result<Self, IdentityError> {
        let key = generate_key(&format!("tether-client {name}"))?;
        let certificate =
            ca.issue_user_in(Role::Client, name, groups, key.public_key(), validity)?;
        Ok(Self { key, certificate })
    }

    /// Loads the private key at `key_path` and its certificate at `<key_path>-cert.pub` (the
    /// layout `ssh` uses), checking the certificate is for that key.
    pub fn load(key_path: &Path) -> Result<Self, IdentityError> {
        let key = read_private_key(key_path)?;
        let cert_path = cert_path(key_path);
        let text = read_to_string(&cert_path)?;
        let certificate =
            Certificate::from_openssh(text.trim()).map_err(|e| IdentityError::Parse {
                path: cert_path.clone(),
                line: None,
                message: format!("not an OpenSSH certificate: {e}"),
            })?;
        if certificate.public_key() != key.public_key().key_data() {
            return Err(IdentityError::CertificateKeyMismatch {
                path: cert_path,
                key_id: certificate.key_id().to_owned(),
                cert_key: certificate
                    .public_key()
                    .fingerprint(Default::default())
                    .to_string(),
                private_key: fingerprint(key.public_key()),
            });
        }
        Ok(Self { key, certificate })
    }

    /// Saves the private key at `key_path` (mode 0600), the public key at `<key_path>.pub` and
    /// the certificate at `<key_path>-cert.pub`, as `ssh-keygen` would, replacing them if
    /// they exist.
    pub fn save(&self, key_path: &Path) -> Result<(), IdentityError> {
        self.save_with(key_path, Overwrite::Replace)
    }

    /// Like [`Identity::save`], but fails naming the first of the three files that already
    /// exists, and writes none of them then.
    pub fn save_new(&self, key_path: &Path) -> Result<(), IdentityError> {
        self.save_with(key_path, Overwrite::Refuse)
    }

    fn save_with(&self, key_path: &Path, overwrite: Overwrite) -> Result<(), IdentityError> {
        let cert_path = cert_path(key_path);
        if overwrite == Overwrite::Refuse {
            refuse_existing(&[key_path, &public_path(key_path), &cert_path])?;
        }
        write_key_pair(&self.key, key_path, overwrite)?;
        let cert = self
            .certificate
            .to_openssh()
            .map_err(|source| IdentityError::Key {
                action: format!("encode certificate {:?}", self.certificate.key_id()),
                source,
            })?;
        write_file(&cert_path, format!("{cert}\n").as_bytes(), 0o644, overwrite)
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    use super::*;
    use crate::identity::keyfile::key_mode_acceptable;
    use crate::protocol::ClusterName;

    fn ca() -> CertificateAuthority {
        CertificateAuthority::generate(ClusterName::new("root").expect("name")).expect("ca")
    }

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn keys_others_may_read_are_refused_with_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let authority = ca();
        let ca_path = dir.path().join("ca");
        authority.save(&ca_path).expect("save ca");
        let id_path = dir.path().join("agent");
        Identity::generate_agent(&authority, Duration::from_secs(600))
            .expect("identity")
            .save(&id_path)
            .expect("save identity");
        for mode in [0o640, 0o644, 0o604, 0o660, 0o620, 0o400 | 0o004] {
            chmod(&ca_path, mode);
            chmod(&id_path, mode);
            let cluster = ClusterName::new("root").expect("name");
            let errors = [
                CertificateAuthority::load(&ca_path, cluster).expect_err("ca"),
                Identity::load(&id_path).expect_err("identity"),
            ];
            for (err, path) in errors.iter().zip([&ca_path, &id_path]) {
                assert!(
                    matches!(err, IdentityError::KeyPermissions { mode: m, .. } if *m == mode),
                    "{mode:o}: {err}"
                );
                let text = err.to_string();
                assert!(text.contains(&format!("mode {mode:04o}")), "{text}");
                assert!(
                    text.contains(&format!("chmod 600 {}", path.display())),
                    "{text}"
                );
            }
        }
        for mode in [0o600, 0o400] {
            chmod(&ca_path, mode);
            chmod(&id_path, mode);
            let cluster = ClusterName::new("root").expect("name");
            CertificateAuthority::load(&ca_path, cluster).expect("private ca");
            Identity::load(&id_path).expect("private identity");
        }
    }

    #[test]
    fn only_root_owned_group_readable_keys_are_tolerated() {
        let me = 1000;
        let pod = 65532;
        // (mode, owner, euid, acceptable)
        let cases = [
            (0o600, me, me, true),
            (0o400, me, me, true),
            (0o640, me, me, false),
            (0o440, me, me, false),
            (0o604, me, me, false),
            // A Kubernetes Secret mounted for a non-root pod with an fsGroup.
            (0o440, 0, pod, true),
            (0o640, 0, pod, true),
            (0o444, 0, pod, false),
            (0o460, 0, pod, false),
            (0o441, 0, pod, false),
            // Group access to a key owned by another ordinary user, or by us as root.
            (0o440, me, pod, false),
            (0o440, 0, 0, false),
            (0o600, 0, 0, true),
        ];
        for (mode, owner, euid, ok) in cases {
            assert_eq!(
                key_mode_acceptable(mode, owner, euid),
                ok,
                "{mode:o} owner {owner} euid {euid}"
            );
        }
    }

    #[test]
    fn save_new_refuses_to_overwrite_and_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_path = dir.path().join("ca");
        ca().save_new(&ca_path).expect("first init");
        let before = fs::read(&ca_path).expect("read");
        let err = ca().save_new(&ca_path).expect_err("second init");
        assert!(
            matches!(&err, IdentityError::Exists { path } if *path == ca_path),
            "{err}"
        );
        assert!(err.to_string().contains(&ca_path.display().to_string()));
        assert_eq!(fs::read(&ca_path).expect("read"), before, "key replaced");
        // With only the public half present, nothing is written either.
        let other = dir.path().join("other");
        fs::write(public_path(&other), "x").expect("write");
        let err = ca().save_new(&other).expect_err("pub exists");
        assert!(
            matches!(&err, IdentityError::Exists { path } if *path == public_path(&other)),
            "{err}"
        );
        assert!(!other.exists());
        // Replacing is still possible when asked for.
        ca().save(&ca_path).expect("replace");
        assert_ne!(fs::read(&ca_path).expect("read"), before);

        let authority = ca();
        let id = Identity::generate_client(&authority, "alice", Duration::from_secs(600))
            .expect("identity");
        let key = dir.path().join("alice");
        fs::write(cert_path(&key), "old certificate").expect("write");
        let err = id.save_new(&key).expect_err("cert exists");
        assert!(
            matches!(&err, IdentityError::Exists { path } if *path == cert_path(&key)),
            "{err}"
        );
        assert!(!key.exists(), "the private key was written");
        fs::remove_file(cert_path(&key)).expect("rm");
        id.save_new(&key).expect("fresh save");
        let mode = fs::metadata(&key).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            id.save_new(&key),
            Err(IdentityError::Exists { .. })
        ));
    }

    #[test]
    fn refusing_write_never_replaces_a_file_created_after_the_check() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raced");
        fs::write(&path, "theirs").expect("write");
        // write_file alone (no pre-check) must still refuse: the hard link fails.
        let err = write_file(&path, b"ours", 0o600, Overwrite::Refuse).expect_err("exists");
        assert!(matches!(err, IdentityError::Exists { .. }), "{err}");
        assert_eq!(fs::read(&path).expect("read"), b"theirs");
        let leftovers = fs::read_dir(dir.path()).expect("ls").count();
        assert_eq!(leftovers, 1, "temporary file left behind");
    }
}
