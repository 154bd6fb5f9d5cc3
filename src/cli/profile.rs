//! Client profiles: where `tether login` keeps the root's address, its name and the client's
//! files, so `tether dial` needs no flags.
//!
//! One YAML file holds every profile by name:
//!
//! ```yaml
//! profiles:
//!   default:
//!     proxy: proxy.example.com:3024
//!     rootCluster: root
//!     identity: /home/alice/.tether/alice        # paths only, never a key's contents
//!     rootCa: /home/alice/.tether/root-ca.pub
//! ```
//!
//! The file is `--config FILE`, else `$TETHER_CONFIG`, else `$XDG_CONFIG_HOME/tether/config.yaml`,
//! else `~/.config/tether/config.yaml`. It is written whole, to a new file renamed over the old
//! (a crash leaves the old or the new, never half of one), with mode 0600: it says where a key
//! is and which root it opens.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use serde::{Deserialize, Serialize};
use tether::identity::PublicKey;
use tether::protocol::ClusterName;

/// The profile used when none is named.
pub const DEFAULT_PROFILE: &str = "default";

/// The environment variable naming the profiles file.
pub const CONFIG_ENV: &str = "TETHER_CONFIG";

/// Which profile, in which file: the flags every profile-aware command shares.
#[derive(Args, Debug, Clone)]
pub struct ProfileArgs {
    /// The profile to use (as `tether login --profile` saved it).
    #[arg(long, env = "TETHER_PROFILE", default_value = DEFAULT_PROFILE)]
    pub profile: String,
    /// The profiles file [default: $XDG_CONFIG_HOME/tether/config.yaml or
    /// ~/.config/tether/config.yaml].
    #[arg(long = "config", env = CONFIG_ENV, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl ProfileArgs {
    /// The profiles file these flags name, absolute (an `ssh` running the printed
    /// `ProxyCommand` may start elsewhere).
    pub fn path(&self) -> anyhow::Result<PathBuf> {
        let path = match &self.config {
            Some(path) => path.clone(),
            None => default_path()?,
        };
        std::path::absolute(&path).with_context(|| format!("profiles file {}", path.display()))
    }

    /// Whether the file is another than the one found without `--config`/`$TETHER_CONFIG`:
    /// then a printed `ProxyCommand` must name it.
    pub fn is_explicit(&self) -> bool {
        self.config.is_some()
    }
}

/// Where the profiles live when no file is named.
fn default_path() -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir,
        _ => match std::env::var_os("HOME").map(PathBuf::from) {
            Some(home) if home.is_absolute() => home.join(".config"),
            _ => anyhow::bail!(
                "no profiles file: set --config FILE, {CONFIG_ENV}, XDG_CONFIG_HOME or HOME"
            ),
        },
    };
    Ok(base.join("tether").join("config.yaml"))
}

/// One root as a client sees it: what `tether dial` would otherwise take as four flags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Profile {
    /// The proxies' address, HOST:PORT (`--proxy`).
    pub proxy: String,
    /// The root cluster's name, which the proxy's host certificate must carry
    /// (`--root-cluster`).
    pub root_cluster: ClusterName,
    /// The client key's absolute path; its certificate is IDENTITY-cert.pub (`--identity`).
    /// The path, not the key: the profile may be copied or shown where a key must not go.
    pub identity: PathBuf,
    /// The absolute path of the CA keys trusted to sign the proxies' host certificates
    /// (`--root-ca`).
    pub root_ca: PathBuf,
}

/// The whole file: every profile by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profiles {
    /// Profiles by name; sorted, so the file is written the same way each time.
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
}

/// Checks a profile name: it lands in files and printed shell commands, so only letters,
/// digits, `-`, `_` and `.` are allowed.
pub fn validate_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    anyhow::ensure!(
        ok,
        "--profile {name:?}: use 1-63 letters, digits, '-', '_' or '.'"
    );
    Ok(())
}

impl Profiles {
    /// Reads `path`; `None` if it does not exist.
    pub fn load(path: &Path) -> anyhow::Result<Option<Self>> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| format!("reading profiles file {}", path.display()));
            }
        };
        let profiles = serde_yaml::from_str(&text).with_context(|| {
            format!(
                "profiles file {}: not a valid profiles file",
                path.display()
            )
        })?;
        Ok(Some(profiles))
    }

    /// Writes the profiles to `path` atomically, mode 0600, creating its directory (0700).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = format!(
            "# tether client profiles, written by `tether login`: paths only, never a key\n{}",
            serde_yaml::to_string(self).context("encoding the profiles")?
        );
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        let dir = dir.unwrap_or(Path::new("."));
        create_private_dir(dir)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        write_private(&temp, text.as_bytes())
            .and_then(|()| std::fs::rename(&temp, path))
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&temp);
            })
            .with_context(|| format!("writing profiles file {}", path.display()))
    }
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating directory {}", dir.display()))
}

/// Writes a new file readable by its owner alone, and flushes it to disk before it is renamed
/// into place.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Reads the CA public keys of a `--root-ca` file, naming `what` (the flag, or the profile
/// entry) if it cannot.
pub fn read_root_cas(what: &str, path: &Path) -> anyhow::Result<Vec<PublicKey>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{what} {}: cannot read it", path.display()))?;
    let keys = tether::identity::parse_ca_keys(&text, path)
        .with_context(|| format!("{what} {}: not a file of CA public keys", path.display()))?;
    anyhow::ensure!(
        !keys.is_empty(),
        "{what} {}: holds no CA public key",
        path.display()
    );
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> Profile {
        Profile {
            proxy: "proxy.example.com:3024".into(),
            root_cluster: ClusterName::new("root").unwrap(),
            identity: "/keys/alice".into(),
            root_ca: "/keys/root-ca.pub".into(),
        }
    }

    #[test]
    fn profiles_round_trip_through_a_private_file() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/config.yaml");
        assert_eq!(Profiles::load(&path).unwrap(), None);
        let mut profiles = Profiles::default();
        profiles.profiles.insert("default".into(), profile());
        profiles.save(&path).unwrap();
        profiles.save(&path).unwrap();
        assert_eq!(Profiles::load(&path).unwrap(), Some(profiles));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("rootCluster: root"), "{text}");
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn a_damaged_file_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, "profiles: {default: {proxy: 3}}\n").unwrap();
        let err = format!("{:#}", Profiles::load(&path).unwrap_err());
        assert!(
            err.contains("config.yaml") && err.contains("not a valid"),
            "{err}"
        );
    }

    #[test]
    fn profile_names_are_checked() {
        for good in ["default", "prod-eu.1", "a_b"] {
            validate_name(good).unwrap();
        }
        for bad in ["", "a b", "x;rm", "é", "a/b"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
