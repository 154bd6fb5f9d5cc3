//! `tether login` saves a client profile; `tether ssh-config` prints the ssh_config block that
//! uses it, so `ssh db.leaf-1` reaches host `db` in leaf `leaf-1`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use tether::protocol::ClusterName;

use super::profile::{Profile, ProfileArgs, Profiles, read_root_cas, validate_name};

/// The flags of `tether login`: those of `tether dial`, checked once and saved.
#[derive(Args)]
pub struct LoginArgs {
    /// The proxy's address, HOST:PORT.
    #[arg(long, value_parser = super::parse_host_port)]
    pub proxy: String,
    /// The root cluster's name.
    #[arg(long)]
    pub root_cluster: ClusterName,
    /// The client key; its certificate is read from IDENTITY-cert.pub. Only its path is saved.
    #[arg(long)]
    pub identity: PathBuf,
    /// File of CA public keys trusted to sign the proxies' host certificates.
    #[arg(long)]
    pub root_ca: PathBuf,
    /// Replace a profile of the same name that says something else.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub profile: ProfileArgs,
}

/// Runs `tether login`: checks the files, then saves the profile.
pub fn run(args: LoginArgs) -> anyhow::Result<()> {
    validate_name(&args.profile.profile)?;
    let profile = checked_profile(&args)?;
    let path = args.profile.path()?;
    let name = &args.profile.profile;
    let mut all = Profiles::load(&path)?.unwrap_or_default();
    match all.profiles.get(name) {
        Some(old) if *old == profile => {
            println!("profile {name:?} in {} is already that", path.display());
            return Ok(());
        }
        Some(old) if !args.force => anyhow::bail!(
            "profile {name:?} in {} already exists for proxy {} (root {}): pass --force to \
             replace it, or --profile NAME to save another",
            path.display(),
            old.proxy,
            old.root_cluster
        ),
        _ => {}
    }
    all.profiles.insert(name.clone(), profile);
    all.save(&path)?;
    println!(
        "saved profile {name:?} in {}; now `tether dial LEAF HOST:PORT` needs no flags",
        path.display()
    );
    Ok(())
}

/// The profile the flags describe, once its files are shown to work: a client identity that
/// has not expired, and CA keys.
fn checked_profile(args: &LoginArgs) -> anyhow::Result<Profile> {
    let identity = super::load_identity("--identity", &args.identity)?;
    tether::client::check_client_identity(&identity, std::time::SystemTime::now())
        .with_context(|| format!("--identity {}", args.identity.display()))?;
    read_root_cas("--root-ca", &args.root_ca)?;
    Ok(Profile {
        proxy: args.proxy.clone(),
        root_cluster: args.root_cluster.clone(),
        identity: absolute("--identity", &args.identity)?,
        root_ca: absolute("--root-ca", &args.root_ca)?,
    })
}

fn absolute(flag: &str, path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("{flag} {}", path.display()))
}

/// The flags of `tether ssh-config`.
#[derive(Args)]
pub struct SshConfigArgs {
    /// The leaves to write a `Host *.LEAF` block for.
    #[arg(required = true)]
    pub leaves: Vec<ClusterName>,
    #[command(flatten)]
    pub profile: ProfileArgs,
}

/// Runs `tether ssh-config`: prints one block per leaf, for `~/.ssh/config` or `ssh -F`.
pub fn run_ssh_config(args: SshConfigArgs) -> anyhow::Result<()> {
    validate_name(&args.profile.profile)?;
    let path = args.profile.path()?;
    let name = &args.profile.profile;
    let exists = Profiles::load(&path)?.is_some_and(|all| all.profiles.contains_key(name));
    anyhow::ensure!(
        exists,
        "no profile {name:?} in {}: save it first with `tether login`",
        path.display()
    );
    let exe = std::env::current_exe().context("finding the tether binary to run")?;
    let config = args.profile.is_explicit().then_some(path.as_path());
    print!("{}", ssh_config(&exe, name, config, &args.leaves));
    Ok(())
}

/// The ssh_config text: `Host *.LEAF` blocks whose `ProxyCommand` dials `%h` with its
/// `.LEAF` removed (`--strip-leaf-suffix`), so the host reached is the one before it.
fn ssh_config(exe: &Path, profile: &str, config: Option<&Path>, leaves: &[ClusterName]) -> String {
    let mut command = vec![ssh_quote(&exe.to_string_lossy()), "dial".to_owned()];
    command.push(format!("--profile {}", ssh_quote(profile)));
    if let Some(config) = config {
        command.push(format!("--config {}", ssh_quote(&config.to_string_lossy())));
    }
    command.push("--strip-leaf-suffix".to_owned());
    let command = command.join(" ");
    let mut out = format!(
        "# tether ssh-config (profile {profile:?}): `ssh HOST.LEAF` reaches HOST in LEAF\n"
    );
    for leaf in leaves {
        out.push_str(&format!(
            "Host *.{leaf}\n    ProxyCommand {command} {leaf} %h:%p\n"
        ));
    }
    out
}

/// `text` as one word for the shell ssh runs `ProxyCommand` with, and with `%` doubled, since
/// ssh expands `%` tokens in it first.
fn ssh_quote(text: &str) -> String {
    let plain = text
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@".contains(&b));
    let quoted = if plain && !text.is_empty() {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    };
    quoted.replace('%', "%%")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_dials_the_host_before_the_leaf_suffix() {
        let leaves = [
            ClusterName::new("leaf-1").unwrap(),
            ClusterName::new("b").unwrap(),
        ];
        let text = ssh_config(Path::new("/opt/tether"), "default", None, &leaves);
        assert!(
            text.contains(
                "Host *.leaf-1\n    ProxyCommand /opt/tether dial --profile default \
             --strip-leaf-suffix leaf-1 %h:%p\n"
            ),
            "{text}"
        );
        assert!(text.contains("Host *.b\n"), "{text}");
        let text = ssh_config(
            Path::new("/my tools/50%/tether"),
            "work",
            Some(Path::new("/tmp/it's.yaml")),
            &leaves[..1],
        );
        assert!(
            text.contains(
                "ProxyCommand '/my tools/50%%/tether' dial --profile work \
                 --config '/tmp/it'\\''s.yaml' --strip-leaf-suffix leaf-1 %h:%p"
            ),
            "{text}"
        );
    }
}
