//! The root's CA keys as its proxies announce them (protocol 1.3), kept in the Secret a
//! `ReverseTunnel` names as its root CA (`rootCaSecretRef`, key `ca.pub`): how a root CA
//! rotation reaches a leaf without anyone editing the leaf.
//!
//! The agent passes a set on only when one of the root CA keys it trusts now signed it; this
//! writer then replaces the Secret's keys if the set is newer than the last one written
//! (annotation [`ISSUED_AT`]) and names other keys. The Secret's change gives the tunnel a new
//! agent trusting the new keys, which takes over from the old one without a gap (the handover
//! of `context.rs`). Proxies of one root announcing different sets for a while (a rolling
//! restart) cannot make it flap: an older set is never written over a newer one.
//!
//! ```text
//!   the leaf trusts   announced (signed by)        the leaf trusts after
//!   [old]             [old, new] (old)             [old, new]
//!   [old, new]        [new] (new)                  [new]
//!   [new]             [old, new] (old), replayed   [new]: old is no longer trusted
//! ```

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::resolve::ROOT_CA_KEY;
use crate::agent::status::{PoolStatus, RootKeys};
use crate::identity::{PublicKey, fingerprint, same_keys};

/// Annotation on the root CA Secret: when the key set written there was issued.
pub const ISSUED_AT: &str = "tether.dev/root-keys-issued-at";

/// How long after a failed write it is tried again.
const RETRY: Duration = Duration::from_secs(5);

/// Keeps one tunnel's root CA Secret in step with what its agents verified.
pub struct RootCaWriter {
    /// The tunnel's namespace's Secrets.
    pub api: Api<Secret>,
    /// The name of the Secret the tunnel's spec names now.
    pub name: watch::Receiver<String>,
}

impl RootCaWriter {
    /// Writes each newer set `pool` reports until `stop`.
    pub async fn run(
        mut self,
        mut pool: watch::Receiver<Option<PoolStatus>>,
        stop: CancellationToken,
    ) {
        let mut written: Option<(String, u64)> = None;
        loop {
            let announced = pool
                .borrow_and_update()
                .as_ref()
                .and_then(|p| p.root_keys.clone());
            let name = self.name.borrow_and_update().clone();
            let mut retry = false;
            if let Some(keys) = announced
                && written.as_ref() != Some(&(name.clone(), keys.issued_at))
            {
                match self.apply(&name, &keys).await {
                    Ok(()) => written = Some((name, keys.issued_at)),
                    Err(e) => {
                        warn!(secret = %name, error = %e, "could not keep the root's CA keys; trying again");
                        retry = true;
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                r = pool.changed() => if r.is_err() { return },
                r = self.name.changed() => if r.is_err() { return },
                () = tokio::time::sleep(RETRY), if retry => {}
            }
        }
    }

    /// Writes `keys` into Secret `name` if they are newer than what it holds and differ.
    async fn apply(&self, name: &str, keys: &RootKeys) -> Result<(), kube::Error> {
        let Some(secret) = self.api.get_opt(name).await? else {
            return Ok(());
        };
        let last: u64 = secret
            .annotations()
            .get(ISSUED_AT)
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        let held = secret
            .data
            .as_ref()
            .and_then(|d| d.get(ROOT_CA_KEY))
            .and_then(|b| std::str::from_utf8(&b.0).ok())
            .unwrap_or_default();
        let Some(announced) = to_write(held, last, keys) else {
            return Ok(());
        };
        let text: String = keys.keys.iter().map(|k| format!("{k}\n")).collect();
        let patch = json!({
            "metadata": {
                "resourceVersion": secret.resource_version(),
                "annotations": { ISSUED_AT: keys.issued_at.to_string() },
            },
            "stringData": { ROOT_CA_KEY: text },
        });
        self.api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        let prints: Vec<String> = announced.iter().map(fingerprint).collect();
        info!(secret = %name, keys = ?prints, "the root's CA keys changed; the tunnel's agent follows");
        Ok(())
    }
}

/// The keys to write over `held` (the Secret's text, its set issued at `last`), if `keys` is
/// newer and names other keys.
fn to_write(held: &str, last: u64, keys: &RootKeys) -> Option<Vec<PublicKey>> {
    if keys.issued_at <= last {
        return None;
    }
    let parse = |lines: &mut dyn Iterator<Item = &str>| -> Vec<PublicKey> {
        lines
            .filter_map(|l| PublicKey::from_openssh(l.trim()).ok())
            .collect()
    };
    let held = parse(&mut held.lines());
    let announced = parse(&mut keys.keys.iter().map(String::as_str));
    (!announced.is_empty() && !same_keys(&held, &announced)).then_some(announced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::CertificateAuthority;
    use crate::protocol::ClusterName;

    fn key() -> String {
        CertificateAuthority::generate(ClusterName::new("root").unwrap())
            .unwrap()
            .public_key()
            .to_openssh()
            .unwrap()
    }

    #[test]
    fn only_a_newer_set_of_other_keys_is_written() {
        let (old, new) = (key(), key());
        let both = RootKeys {
            issued_at: 20,
            keys: vec![old.clone(), new.clone()],
        };
        // The leaf's Secret from its join: no time, the old key.
        assert_eq!(
            to_write(&format!("{old}\n"), 0, &both).map(|k| k.len()),
            Some(2)
        );
        // The same keys: nothing to write, whatever the time.
        assert_eq!(to_write(&format!("{new}\n{old}\n"), 0, &both), None);
        // An older set (a proxy not restarted yet) never replaces a newer one.
        let stale = RootKeys {
            issued_at: 10,
            keys: vec![old.clone()],
        };
        assert_eq!(to_write(&format!("{old}\n{new}\n"), 20, &stale), None);
        // And among the proxies' sets, the agent keeps the newest.
        assert_eq!(RootKeys::newest(Some(both.clone()), stale).issued_at, 20);
        let later = RootKeys {
            issued_at: 30,
            keys: vec![new],
        };
        assert_eq!(RootKeys::newest(Some(both), later).issued_at, 30);
    }
}
