//! A key with its certificate, as an SSH peer presents them, and the files they live in.

use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::RngCore;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::{Certificate, LineEnding, PrivateKey};

use super::ca::CertificateAuthority;
use super::error::IdentityError;
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
        let key = generate_key(&format!("tether-client {name}"))?;
        let certificate = ca.issue_user(Role::Client, name, key.public_key(), validity)?;
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

/// A new Ed25519 key with `comment`.
pub(super) fn generate_key(comment: &str) -> Result<PrivateKey, IdentityError> {
    let mut seed = [0u8; 32];
    rand::rng().fill_bytes(&mut seed);
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    seed.fill(0);
    key.set_comment(comment);
    Ok(key)
}

/// Reads an unencrypted OpenSSH private key, refusing a file other users may read
/// ([`check_key_permissions`]).
pub(super) fn read_private_key(path: &Path) -> Result<PrivateKey, IdentityError> {
    // The `.pub` beside a key is the usual slip; say so before its mode (0644, as public keys
    // are) is blamed.
    if path.extension().is_some_and(|e| e == "pub") {
        return Err(IdentityError::Parse {
            path: path.to_owned(),
            line: None,
            message: format!(
                "a public key or certificate; give the private key file ({}) instead",
                path.with_extension("").display()
            ),
        });
    }
    check_key_permissions(path)?;
    let text = read_to_string(path)?;
    let key = PrivateKey::from_openssh(text.as_bytes()).map_err(|e| IdentityError::Parse {
        path: path.to_owned(),
        line: None,
        message: format!("not an OpenSSH private key: {e}"),
    })?;
    if key.is_encrypted() {
        return Err(IdentityError::EncryptedKey {
            path: path.to_owned(),
        });
    }
    Ok(key)
}

/// Permission bits a private key file may never have: any access for others, and group
/// write (whoever could replace the key could impersonate its owner).
const NEVER_ON_KEYS: u32 = 0o027;

/// Refuses a private key (or other secret) file that others may read, as `ssh` does: a
/// key readable by its group or by everyone has to be assumed copied.
///
/// One shape of group access is accepted, again as OpenSSH does: a file owned by root (not
/// by us) that our group may read. That is how Kubernetes mounts a Secret for a non-root
/// pod with an `fsGroup`: the kubelet makes every file `root:<fsGroup>` and ORs in `0440`,
/// whatever `defaultMode` asks (kubernetes#57923), so the pod cannot be given a `0400` file
/// of its own. Such a file is readable only by root and the pod's group.
pub fn check_key_permissions(path: &Path) -> Result<(), IdentityError> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path).map_err(|source| IdentityError::Io {
        action: "read",
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.mode() & 0o7777;
    if key_mode_acceptable(mode, meta.uid(), effective_uid()) {
        return Ok(());
    }
    Err(IdentityError::KeyPermissions {
        path: path.to_owned(),
        mode,
    })
}

/// Whether a key file with permission bits `mode`, owned by `owner`, may be used by a
/// process running as `euid` (see [`check_key_permissions`]).
pub(super) fn key_mode_acceptable(mode: u32, owner: u32, euid: u32) -> bool {
    let group_read = 0o050;
    let tolerated = if owner == 0 && owner != euid {
        group_read
    } else {
        0
    };
    mode & NEVER_ON_KEYS == 0 && mode & 0o077 & !tolerated == 0
}

/// The effective user id of this process.
fn effective_uid() -> u32 {
    unsafe extern "C" {
        fn geteuid() -> u32;
    }
    // SAFETY: geteuid takes no arguments, cannot fail and touches no memory of ours.
    unsafe { geteuid() }
}

/// Whether saving may replace files that already exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Overwrite {
    /// Fail on an existing file: replacing a CA key silently invalidates every certificate
    /// it issued, and replacing an identity strands whoever uses it.
    Refuse,
    /// Replace existing files (atomically, one by one).
    Replace,
}

/// Fails with [`IdentityError::Exists`] naming the first of `paths` that exists.
pub(super) fn refuse_existing(paths: &[&Path]) -> Result<(), IdentityError> {
    match paths.iter().find(|path| fs::symlink_metadata(path).is_ok()) {
        Some(path) => Err(IdentityError::Exists {
            path: path.to_path_buf(),
        }),
        None => Ok(()),
    }
}

/// Writes `key` at `path` (mode 0600) and its public half at `path.pub`.
pub(super) fn write_key_pair(
    key: &PrivateKey,
    path: &Path,
    overwrite: Overwrite,
) -> Result<(), IdentityError> {
    if overwrite == Overwrite::Refuse {
        refuse_existing(&[path, &public_path(path)])?;
    }
    let private = key
        .to_openssh(LineEnding::LF)
        .map_err(|source| IdentityError::Key {
            action: format!("encode private key for {}", path.display()),
            source,
        })?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|source| IdentityError::Key {
            action: format!("encode public key for {}", path.display()),
            source,
        })?;
    write_file(path, private.as_bytes(), 0o600, overwrite)?;
    let public_text = format!("{public}\n");
    write_file(&public_path(path), public_text.as_bytes(), 0o644, overwrite)
}

/// `<path>.pub`.
pub(super) fn public_path(path: &Path) -> PathBuf {
    with_suffix(path, ".pub")
}

/// `<path>-cert.pub`.
pub(super) fn cert_path(path: &Path) -> PathBuf {
    with_suffix(path, "-cert.pub")
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(suffix);
    PathBuf::from(s)
}

pub(super) fn read_to_string(path: &Path) -> Result<String, IdentityError> {
    fs::read_to_string(path).map_err(|source| IdentityError::Io {
        action: "read",
        path: path.to_owned(),
        source,
    })
}

/// Writes `data` to `path` with permissions `mode`, through a temporary file moved into place,
/// so readers never see a half-written key and a private key is never readable by others.
/// With [`Overwrite::Refuse`] the move is a hard link, which fails if `path` exists even when
/// another process created it after [`refuse_existing`] looked.
pub(super) fn write_file(
    path: &Path,
    data: &[u8],
    mode: u32,
    overwrite: Overwrite,
) -> Result<(), IdentityError> {
    let tmp = with_suffix(path, &format!(".tmp-{:08x}", rand::rng().next_u32()));
    let io = |action, source| IdentityError::Io {
        action,
        path: path.to_owned(),
        source,
    };
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(data)?;
        file.sync_all()
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io("write", e));
    }
    let placed = match overwrite {
        Overwrite::Replace => fs::rename(&tmp, path),
        Overwrite::Refuse => fs::hard_link(&tmp, path),
    };
    let _ = fs::remove_file(&tmp);
    match placed {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(IdentityError::Exists {
            path: path.to_owned(),
        }),
        Err(e) => Err(io("write", e)),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    use super::*;
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
