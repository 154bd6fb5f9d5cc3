//! `tether dial`: reach HOST:PORT in a leaf over stdin/stdout, as ssh's `ProxyCommand`.
//!
//! Where and as whom comes from flags, or else from the client profile `tether login` saved
//! ([`super::profile`]); a flag given wins over the profile, value by value.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tether::client::{DialClient, DialClientConfig};
use tether::protocol::{ClusterName, Endpoint, Target};

use super::profile::{Profile, ProfileArgs, Profiles, read_root_cas};

/// The flags of `tether dial`.
#[derive(Args)]
pub struct DialArgs {
    /// The cluster the target is in.
    pub cluster: ClusterName,
    /// The target, HOST:PORT (`_apiserver:443` for the cluster's API server).
    pub target: String,
    /// The proxy's address, HOST:PORT [default: the profile's].
    #[arg(long, value_parser = super::parse_host_port)]
    pub proxy: Option<String>,
    /// The root cluster's name [default: the profile's].
    #[arg(long)]
    pub root_cluster: Option<ClusterName>,
    /// The client key; its certificate is read from IDENTITY-cert.pub [default: the
    /// profile's].
    #[arg(long)]
    pub identity: Option<PathBuf>,
    /// File of CA public keys trusted to sign the proxies' host certificates [default: the
    /// profile's].
    #[arg(long)]
    pub root_ca: Option<PathBuf>,
    /// HOST may end in `.CLUSTER`, as ssh's `%h` does for a `Host *.CLUSTER` block
    /// (`tether ssh-config`): that suffix is removed, so `ssh db.leaf-1` reaches `db`.
    #[arg(long)]
    pub strip_leaf_suffix: bool,
    #[command(flatten)]
    pub profile: ProfileArgs,
    #[command(flatten)]
    pub egress: super::egress::EgressArgs,
}

/// Runs `tether dial`.
pub async fn run(args: DialArgs) -> anyhow::Result<()> {
    let target = target(&args)?;
    let config = client_config(&args)?;
    let client = DialClient::connect(&config).await?;
    // The output really closes when the far end does, so an ssh ProxyCommand sees it end.
    let stdio = tokio::io::join(tokio::io::stdin(), super::stdio::ClosingStdout::new());
    client.splice(&target, stdio).await?;
    Ok(())
}

/// The target the arguments name, its `.CLUSTER` suffix removed if asked.
fn target(args: &DialArgs) -> anyhow::Result<Target> {
    let mut endpoint = Endpoint::parse(&args.target)?;
    if args.strip_leaf_suffix
        && let Endpoint::Host { host, port } = &endpoint
    {
        endpoint = Endpoint::host(strip_suffix(host, &args.cluster)?, *port)?;
    }
    Ok(Target {
        cluster: args.cluster.clone(),
        endpoint,
    })
}

/// `host` without its final `.CLUSTER` (any case: ssh lowercases `%h`); unchanged without it.
fn strip_suffix<'a>(host: &'a str, cluster: &ClusterName) -> anyhow::Result<&'a str> {
    let suffix_len = cluster.as_str().len() + 1;
    let Some(split) = host.len().checked_sub(suffix_len) else {
        return Ok(host);
    };
    let matches =
        host.is_char_boundary(split) && host[split..].eq_ignore_ascii_case(&format!(".{cluster}"));
    if !matches {
        return Ok(host);
    }
    anyhow::ensure!(
        split > 0,
        "{host:?}: no host is left once .{cluster} is removed (--strip-leaf-suffix)"
    );
    Ok(&host[..split])
}

/// The client's settings: each flag, else the profile's value.
fn client_config(args: &DialArgs) -> anyhow::Result<DialClientConfig> {
    // With every value given, no profile is read: a damaged profiles file cannot stop a
    // dial that does not need it.
    let all_given = args.proxy.is_some()
        && args.root_cluster.is_some()
        && args.identity.is_some()
        && args.root_ca.is_some();
    let from = if all_given {
        ProfileSource::unused()
    } else {
        ProfileSource::read(&args.profile)?
    };
    let proxy = pick("--proxy", args.proxy.clone(), &from, |p| p.proxy.clone())?;
    let root_cluster = pick("--root-cluster", args.root_cluster.clone(), &from, |p| {
        p.root_cluster.clone()
    })?;
    let identity_path = pick("--identity", args.identity.clone(), &from, |p| {
        p.identity.clone()
    })?;
    let root_ca = pick("--root-ca", args.root_ca.clone(), &from, |p| {
        p.root_ca.clone()
    })?;
    let identity_flag = from.describe("--identity", args.identity.is_some());
    let identity = super::load_identity(&identity_flag, &identity_path)?;
    tether::client::check_client_identity(&identity, std::time::SystemTime::now())
        .with_context(|| format!("{identity_flag} {}", identity_path.display()))?;
    Ok(DialClientConfig {
        proxy_addr: proxy,
        route: args.egress.route()?,
        root_cluster,
        root_cas: read_root_cas(
            &from.describe("--root-ca", args.root_ca.is_some()),
            &root_ca,
        )?,
        identity: Arc::new(identity),
        timeout: Duration::from_secs(15),
    })
}

/// The profile a dial falls back on, and where it was looked for (for the errors).
struct ProfileSource {
    /// The profile's name.
    name: String,
    /// The profiles file it was looked for in.
    path: PathBuf,
    /// The profile; `None` if the file or the profile does not exist.
    profile: Option<Profile>,
    /// Why there is no profile, in words for an error.
    missing: String,
}

impl ProfileSource {
    /// No profile: every value came from a flag.
    fn unused() -> Self {
        Self {
            name: String::new(),
            path: PathBuf::new(),
            profile: None,
            missing: "not read".to_owned(),
        }
    }

    fn read(args: &ProfileArgs) -> anyhow::Result<Self> {
        let path = args.path()?;
        let name = args.profile.clone();
        let (profile, missing) = match Profiles::load(&path)? {
            None => (
                None,
                format!("profiles file {} does not exist", path.display()),
            ),
            Some(mut all) => match all.profiles.remove(&name) {
                Some(p) => (Some(p), String::new()),
                None => (
                    None,
                    format!("profiles file {} has no profile {name:?}", path.display()),
                ),
            },
        };
        Ok(Self {
            name,
            path,
            profile,
            missing,
        })
    }

    /// How an error names a value: the flag, or the profile entry it came from.
    fn describe(&self, flag: &str, given: bool) -> String {
        if given || self.profile.is_none() {
            return flag.to_owned();
        }
        format!(
            "{flag} (from profile {:?} in {})",
            self.name,
            self.path.display()
        )
    }
}

/// The flag's value, else the profile's; an error naming both when neither gives one.
fn pick<T>(
    flag: &str,
    given: Option<T>,
    from: &ProfileSource,
    field: impl FnOnce(&Profile) -> T,
) -> anyhow::Result<T> {
    if let Some(value) = given {
        return Ok(value);
    }
    match &from.profile {
        Some(profile) => Ok(field(profile)),
        None => anyhow::bail!(
            "no {flag} given, and no profile to take it from ({}): pass {flag}, or save a \
             profile with `tether login`",
            from.missing
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf() -> ClusterName {
        ClusterName::new("leaf-1").unwrap()
    }

    #[test]
    fn the_leaf_suffix_is_removed_only_where_it_is() {
        for (host, want) in [
            ("db.leaf-1", "db"),
            ("DB.Leaf-1", "DB"),
            ("db.prod.leaf-1", "db.prod"),
            ("db", "db"),
            ("db.leaf-12", "db.leaf-12"),
            ("xleaf-1", "xleaf-1"),
        ] {
            assert_eq!(strip_suffix(host, &leaf()).unwrap(), want, "{host}");
        }
        assert!(strip_suffix(".leaf-1", &leaf()).is_err());
    }

    #[test]
    fn a_missing_value_names_the_flag_and_the_profile() {
        let from = ProfileSource {
            name: "work".into(),
            path: "/nowhere/config.yaml".into(),
            profile: None,
            missing: "profiles file /nowhere/config.yaml does not exist".into(),
        };
        let err = pick("--proxy", None::<String>, &from, |p| p.proxy.clone()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("--proxy") && text.contains("/nowhere/config.yaml"),
            "{text}"
        );
        assert!(text.contains("tether login"), "{text}");
        let given = pick("--proxy", Some("p:1".to_owned()), &from, |p| {
            p.proxy.clone()
        });
        assert_eq!(given.unwrap(), "p:1");
    }
}
