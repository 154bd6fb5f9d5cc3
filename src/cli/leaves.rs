//! `tether proxy`'s flags for leaves that have been away a long time.

use std::time::Duration;

use tether::operator::root::summary::StalePolicy;

/// What the root does about leaves offline a long time (with `--kubernetes`).
#[derive(Debug, Clone, clap::Args)]
pub struct StaleLeafArgs {
    /// A leaf offline longer than this shows as `Stale` in `kubectl get remoteclusters`
    /// (`0s`: never). Its inventory stays, marked with when it was last confirmed.
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    pub stale_leaf_after: Duration,
    /// Delete the RemoteCluster of a stale leaf, revoking its trust: it must join again to
    /// come back. Off by default: a stale leaf is only reported.
    #[arg(long)]
    pub remove_stale_leaves: bool,
}

impl StaleLeafArgs {
    /// The policy the proxies' status writer applies.
    pub fn policy(&self) -> anyhow::Result<StalePolicy> {
        if self.remove_stale_leaves && self.stale_leaf_after.is_zero() {
            anyhow::bail!("--remove-stale-leaves needs a --stale-leaf-after other than 0s");
        }
        Ok(StalePolicy {
            after: (!self.stale_leaf_after.is_zero()).then_some(self.stale_leaf_after),
            remove: self.remove_stale_leaves,
        })
    }
}
