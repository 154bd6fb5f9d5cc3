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
    /// the certificate at `<key_path>-cert.pub`, as `ssh-keygen` would.
    pub fn save(&self, key_path: &Path) -> Result<(), IdentityError> {
        write_key_pair(&self.key, key_path)?;
        let cert = self
            .certificate
            .to_openssh()
            .map_err(|source| IdentityError::Key {
                action: format!("encode certificate {:?}", self.certificate.key_id()),
                source,
            })?;
        write_file(&cert_path(key_path), format!("{cert}\n").as_bytes(), 0o644)
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

/// Reads an unencrypted OpenSSH private key.
pub(super) fn read_private_key(path: &Path) -> Result<PrivateKey, IdentityError> {
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

/// Writes `key` at `path` (mode 0600) and its public half at `path.pub`.
pub(super) fn write_key_pair(key: &PrivateKey, path: &Path) -> Result<(), IdentityError> {
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
    write_file(path, private.as_bytes(), 0o600)?;
    write_file(&public_path(path), format!("{public}\n").as_bytes(), 0o644)
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

/// Writes `data` to `path` with permissions `mode`, through a temporary file renamed into place,
/// so readers never see a half-written key and a private key is never readable by others.
pub(super) fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), IdentityError> {
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
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io("write", e)
    })
}
