//! Key files on disk: a new key, reading one back, writing a key pair or any file so that
//! no reader sees half of it and nothing replaces a key silently, and the permission check that
//! refuses keys others may read. Below both [`super::ca`] and [`super::keypair`], which each
//! save and load keys through it.

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rand::RngCore;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::{LineEnding, PrivateKey};

use super::error::IdentityError;

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
