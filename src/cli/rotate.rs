//! `tether ca rotate`: moves a leaf's `TrustedCluster` to a CA rotation phase and waits until
//! the operator says the phase is complete, printing what it waits for on the way; and
//! `tether ca key-set`, the signed statement of the root's keys a root CA rotation announces.

use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tether::operator::crd::TrustedCluster;
use tether::operator::crd::trusted_cluster::{CaRotationStatus, RotationPhase};

/// The phases, as the command line names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PhaseArg {
    /// Publish a new CA key beside the old one (made if the leaf CA Secret has no `ca-next`).
    Init,
    /// Re-issue the agents' certificates from the new key.
    UpdateClients,
    /// Retire the old key: the root trusts the new one alone and closes the old one's tunnels.
    Retire,
    /// Go back to the old key alone (before retire completes).
    Rollback,
}

impl PhaseArg {
    fn phase(self) -> RotationPhase {
        match self {
            Self::Init => RotationPhase::Init,
            Self::UpdateClients => RotationPhase::UpdateClients,
            Self::Retire => RotationPhase::Retire,
            Self::Rollback => RotationPhase::Rollback,
        }
    }

    /// Whether `status` shows this phase reached. A completed retire or rollback leaves no
    /// `ca-next`, and then reads as standby.
    fn reached(self, status: &CaRotationStatus) -> bool {
        let settled = status.complete && status.next_key.is_none();
        match self {
            Self::Init | Self::UpdateClients => status.complete && status.phase == self.phase(),
            Self::Retire => settled && status.last_rotated.is_some(),
            Self::Rollback => settled && status.phase == RotationPhase::Standby,
        }
    }
}

/// `tether ca rotate`'s arguments.
#[derive(Debug, clap::Args)]
pub struct RotateArgs {
    /// The leaf's TrustedCluster whose CA (its `leafCaSecretRef`) rotates.
    #[arg(long)]
    trusted_cluster: String,
    /// Its namespace (default: the kubeconfig context's).
    #[arg(long)]
    namespace: Option<String>,
    /// The kubeconfig context of the leaf cluster (default: the current one).
    #[arg(long)]
    context: Option<String>,
    /// The phase to reach; each waits for the one before (see `kubectl explain
    /// trustedcluster.spec.caRotation`).
    #[arg(long, value_enum)]
    phase: PhaseArg,
    /// How long to wait for the phase to complete (`0s`: do not wait).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    wait: Duration,
}

/// Asks for the phase, then waits for it.
pub async fn run(args: RotateArgs) -> anyhow::Result<()> {
    let options = kube::config::KubeConfigOptions {
        context: args.context.clone(),
        ..Default::default()
    };
    let config = match &args.context {
        Some(context) => kube::Config::from_kubeconfig(&options)
            .await
            .with_context(|| format!("--context {context}: cannot use it"))?,
        None => kube::Config::infer()
            .await
            .context("no Kubernetes client (in-cluster, or KUBECONFIG)")?,
    };
    let client = Client::try_from(config).context("a Kubernetes client")?;
    let api: Api<TrustedCluster> = match &args.namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::default_namespaced(client),
    };
    let name = &args.trusted_cluster;
    let patch = json!({ "spec": { "caRotation": { "phase": args.phase.phase() } } });
    let asked = api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("--trusted-cluster {name}: cannot ask for the phase"))?;
    let generation = asked.metadata.generation;
    println!(
        "asked TrustedCluster {name} for CA rotation phase {:?}",
        args.phase.phase()
    );
    if args.wait.is_zero() {
        return Ok(());
    }
    let waited = tokio::time::timeout(args.wait, follow(&api, name, args.phase, generation)).await;
    match waited {
        Ok(result) => result,
        Err(_) => bail!(
            "the phase did not complete within --wait {}: `kubectl get trustedcluster {name} -o jsonpath='{{.status.caRotation}}'` says what it waits for",
            humantime::format_duration(args.wait)
        ),
    }
}

/// Prints each new message of the rotation until `phase` is reached (as of `generation`).
async fn follow(
    api: &Api<TrustedCluster>,
    name: &str,
    phase: PhaseArg,
    generation: Option<i64>,
) -> anyhow::Result<()> {
    let mut said = String::new();
    let mut changes = std::pin::pin!(watcher::watch_object(api.clone(), name));
    while let Some(change) = changes.next().await {
        let tc = match change {
            Ok(Some(tc)) => tc,
            Ok(None) => bail!("TrustedCluster {name} was deleted"),
            Err(e) => {
                eprintln!("watching TrustedCluster {name}: {e}; retrying");
                continue;
            }
        };
        let Some(status) = tc.status.as_ref() else {
            continue;
        };
        if status.observed_generation < generation {
            continue;
        }
        let Some(rotation) = &status.ca_rotation else {
            continue;
        };
        if rotation.message != said {
            println!("{:?}: {}", rotation.phase, rotation.message);
            said.clone_from(&rotation.message);
        }
        if phase.reached(rotation) {
            println!(
                "TrustedCluster {} reached {:?}",
                tc.name_any(),
                phase.phase()
            );
            return Ok(());
        }
    }
    bail!("the watch of TrustedCluster {name} ended")
}

/// `tether ca key-set`: signs the set of `keys` for `cluster` with the CA key `sign_with` and
/// writes it to `out` (never over an existing file unless `force`).
pub fn sign_key_set(
    cluster: &tether::protocol::ClusterName,
    sign_with: &std::path::Path,
    keys: &[std::path::PathBuf],
    out: &std::path::Path,
    force: bool,
) -> anyhow::Result<()> {
    use tether::identity::keyset::{KeySet, to_file_text};
    use tether::identity::{CertificateAuthority, PublicKey, fingerprint};
    let signer = CertificateAuthority::load(sign_with, cluster.clone())
        .with_context(|| format!("--sign-with {}", sign_with.display()))?;
    let keys = keys
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--key {}: cannot read it", path.display()))?;
            PublicKey::from_openssh(text.trim())
                .with_context(|| format!("--key {}: not an OpenSSH public key", path.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if !keys
        .iter()
        .any(|k| k.key_data() == signer.public_key().key_data())
    {
        bail!(
            "--sign-with {}: its key ({}) is not one of --key: the set must list the key that signs it",
            sign_with.display(),
            fingerprint(signer.public_key())
        );
    }
    let issued_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let set = KeySet {
        cluster: cluster.clone(),
        issued_at,
        keys,
    };
    let signed = set.sign(signer.private_key())?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(out).with_context(|| {
        format!(
            "--out {}: cannot write it (an existing file is replaced only with --force)",
            out.display()
        )
    })?;
    std::io::Write::write_all(&mut file, to_file_text(&signed).as_bytes())
        .with_context(|| format!("--out {}", out.display()))?;
    println!("wrote {} ({set})", out.display());
    Ok(())
}
