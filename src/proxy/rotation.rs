//! A leaf's rotated CA keys arriving over its tunnel (protocol 1.2): checked against the
//! keys this proxy trusts for the leaf now, then applied to the leaf's record by the join
//! authority, whose change every replica's trust follows (closing what the old keys alone
//! authenticated once they are retired). See `identity::keyset` for why the set must be
//! signed by a CA key rather than merely come from an authenticated agent.

use std::time::Duration;

use tracing::{info, warn};

use super::shared::ProxyShared;
use crate::identity::keyset;
use crate::protocol::ClusterName;
use crate::protocol::control::{CaKeySet, ProxyMessage};

/// How long applying a key set may take before the leaf is told to send it again.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The answer to `set`, sent by an agent of `leaf`: applied, or why not.
pub(super) async fn answer(
    shared: &ProxyShared,
    leaf: &ClusterName,
    set: CaKeySet,
) -> ProxyMessage {
    let trusted = shared.config.trust.load().cas(leaf).to_vec();
    let outcome = match keyset::verify(&set, leaf, &trusted, 0) {
        Err(e) => Err((0, e.to_string())),
        Ok(keys) => {
            let issued_at = keys.issued_at;
            apply(shared, leaf, &keys.keys, issued_at)
                .await
                .map(|()| issued_at)
                .map_err(|why| (issued_at, why))
        }
    };
    match outcome {
        Ok(issued_at) => {
            info!(%leaf, issued_at, "the leaf's CA keys were rotated");
            ProxyMessage::CaKeysAnswer {
                issued_at,
                refused: None,
            }
        }
        Err((issued_at, why)) => {
            warn!(%leaf, issued_at, reason = %why, "refused the leaf's CA key set");
            ProxyMessage::CaKeysAnswer {
                issued_at,
                refused: Some(why),
            }
        }
    }
}

async fn apply(
    shared: &ProxyShared,
    leaf: &ClusterName,
    keys: &[russh::keys::PublicKey],
    issued_at: u64,
) -> Result<(), String> {
    let Some(authority) = &shared.config.join else {
        return Err("this root keeps no records of its leaves (no --kubernetes): its trust is static, edit it there".to_owned());
    };
    tokio::time::timeout(APPLY_TIMEOUT, authority.rotate(leaf, keys, issued_at))
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the root did not record the key set within {APPLY_TIMEOUT:?}; send it again"
            ))
        })
}
