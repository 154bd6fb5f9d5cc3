//! Rotating a leaf's CA (`spec.caRotation`, `tether ca rotate`): the keys in the leaf CA
//! Secret, the key set the agents publish to the root, and the key that issues the agents'
//! certificates, moved one confirmed step at a time ([`plan`] decides; this module reads what
//! it needs and carries the decision out).
//!
//! The leaf CA Secret holds `ca` (the key in force) and, during a rotation, `ca-next` (made
//! by `Init` if missing, so a key made elsewhere can be brought in). A completed rotation
//! moves `ca-next` to `ca` and keeps the old key as `ca-retired`; every change is made under
//! the Secret's resourceVersion, so no key is ever overwritten by a writer that did not see
//! it.

mod plan;

use plan::{Facts, Plan, SecretChange, Which, plan};

use super::*;
use crate::identity::keyset::KeySet;
use crate::operator::crd::reverse_tunnel::SignedKeySet;
use crate::operator::crd::trusted_cluster::{CaRotationStatus, RotationPhase};
use crate::operator::stamps::rfc3339;

/// Key of the key being rotated in, in the leaf CA Secret.
pub const NEXT_CA_KEY: &str = "ca-next";
/// Key of the key a completed rotation retired.
pub const RETIRED_CA_KEY: &str = "ca-retired";

/// What the rotation decided for this reconcile.
pub(super) struct Rotated {
    /// Issues the agents' certificate; `None` when no rotation was ever asked (the agent's
    /// certificate is then renewed from the key in force, read only when it is due).
    pub agent_ca: Option<CertificateAuthority>,
    /// The key set the agents publish.
    pub key_set: Option<SignedKeySet>,
    /// For `status.caRotation` (`None`: this cluster never rotated).
    pub status: Option<CaRotationStatus>,
}

/// The leaf CA Secret's keys.
struct LeafKeys {
    current: CertificateAuthority,
    next: Option<CertificateAuthority>,
    /// The Secret as read, for changes under its resourceVersion.
    secret: Secret,
}

impl LeafKeys {
    fn get(&self, which: Which) -> &CertificateAuthority {
        match (which, &self.next) {
            (Which::Next, Some(next)) => next,
            _ => &self.current,
        }
    }
}

fn blocked(reason: &str, message: impl Into<String>) -> Blocked {
    Blocked::new(reason, message, Some(Duration::from_secs(10)))
}

/// Moves the rotation of `tc` one step as far as the facts allow.
pub(super) async fn rotate(
    tc: &TrustedCluster,
    ctx: &Context,
    secrets: &Api<Secret>,
    owned: &Owned,
) -> std::result::Result<Rotated, Blocked> {
    let asked = tc
        .spec
        .ca_rotation
        .as_ref()
        .map_or(RotationPhase::Standby, |r| r.phase);
    let previous = tc.status.as_ref().and_then(|s| s.ca_rotation.clone());
    if asked == RotationPhase::Standby && previous.is_none() {
        // Never rotated: nothing to read, publish or report.
        return Ok(Rotated {
            agent_ca: None,
            key_set: None,
            status: None,
        });
    }
    let mut keys = leaf_keys(tc, secrets).await?;
    if asked == RotationPhase::Init && keys.next.is_none() {
        keys = make_next_key(tc, ctx, secrets, keys).await?;
    }
    let published = previous
        .as_ref()
        .and_then(|s| s.key_set.as_ref())
        .and_then(|set| KeySet::read(&set.statement).ok())
        .filter(|set| set.cluster == *keys.current.cluster());
    let replicas = owned
        .tunnel
        .as_ref()
        .and_then(|rt| rt.status.as_ref())
        .map_or(&[][..], |s| s.replicas.as_slice());
    let agent_signer = agent_signer(owned.agent.as_ref(), &keys);
    let facts = Facts {
        asked,
        previous: previous
            .as_ref()
            .map_or(RotationPhase::Standby, |s| s.phase),
        current: keys.current.public_key(),
        next: keys.next.as_ref().map(|n| n.public_key()),
        published: published.as_ref(),
        trusted_set_of: previous.as_ref().and_then(|s| s.root_trusts_set_of),
        agent_signer,
        replicas,
    };
    let decided = plan(&facts);
    let root_trusts_set_of = facts.trusted_set();
    let owner = format!("{}/{}", tc.namespace().unwrap_or_default(), tc.name_any());
    let issue_time = |published| ctx.key_set_clock.next(&owner, published);
    let key_set = key_set(
        &decided,
        &keys,
        published.as_ref(),
        previous.as_ref(),
        issue_time,
    )?;
    let mut last_rotated = previous.as_ref().and_then(|s| s.last_rotated.clone());
    if let Some(change) = decided.change {
        change_secret(tc, ctx, secrets, &keys, change).await?;
        if change == SecretChange::Promote {
            last_rotated = Some(rfc3339(SystemTime::now()));
        }
    }
    // The keys as the Secret holds them after the change.
    let (current_key, next_key) = match decided.change {
        Some(SecretChange::Promote) => (keys.get(Which::Next), None),
        Some(SecretChange::DropNext) => (&keys.current, None),
        None => (&keys.current, keys.next.as_ref()),
    };
    let status = CaRotationStatus {
        phase: decided.phase,
        complete: decided.complete,
        message: decided.message.clone(),
        current_key: fingerprint(current_key.public_key()),
        next_key: next_key.map(|n| fingerprint(n.public_key())),
        key_set: key_set.clone(),
        root_trusts_set_of,
        last_rotated,
    };
    let agent_ca = keys.get(decided.agent_ca).clone();
    Ok(Rotated {
        agent_ca: Some(agent_ca),
        key_set,
        status: Some(status),
    })
}

/// The signed set `decided` publishes: the one published before when it holds the same keys
/// (so the root is not asked again), else a new one, issued at `issue_time(published's)`.
fn key_set(
    decided: &Plan,
    keys: &LeafKeys,
    published: Option<&KeySet>,
    previous: Option<&CaRotationStatus>,
    issue_time: impl FnOnce(Option<u64>) -> u64,
) -> std::result::Result<Option<SignedKeySet>, Blocked> {
    let Some(which) = &decided.publish else {
        return Ok(None);
    };
    let wanted: Vec<PublicKey> = which
        .iter()
        .map(|w| keys.get(*w).public_key().clone())
        .collect();
    let same = published.is_some_and(|set| {
        set.keys.len() == wanted.len()
            && set
                .keys
                .iter()
                .zip(&wanted)
                .all(|(a, b)| a.key_data() == b.key_data())
    });
    if same {
        return Ok(previous.and_then(|s| s.key_set.clone()));
    }
    let issued_at = issue_time(published.map(|p| p.issued_at));
    let signer = keys.get(which[0]);
    let set = KeySet {
        cluster: signer.cluster().clone(),
        issued_at,
        keys: wanted,
    };
    let signed = set
        .sign(signer.private_key())
        .map_err(|e| blocked("KeySetNotSigned", e.to_string()))?;
    Ok(Some(SignedKeySet {
        statement: signed.statement,
        signature: signed.signature,
    }))
}

/// The leaf CA Secret's keys, read once.
async fn leaf_keys(
    tc: &TrustedCluster,
    secrets: &Api<Secret>,
) -> std::result::Result<LeafKeys, Blocked> {
    let secret = leaf_ca_secret(tc, secrets).await?;
    Ok(LeafKeys {
        current: ca_in_force(tc, &secret)?,
        next: ca_key_in(tc, &secret, NEXT_CA_KEY)?,
        secret,
    })
}

/// Which of the leaf's keys signed the certificate in the agent Secret `agent`, if either.
fn agent_signer(agent: Option<&Secret>, keys: &LeafKeys) -> Option<Which> {
    let signer = certificate_signer(agent?)?;
    let signed = |ca: &CertificateAuthority| ca.public_key().key_data() == &signer;
    if signed(&keys.current) {
        Some(Which::Current)
    } else {
        keys.next
            .as_ref()
            .filter(|n| signed(n))
            .map(|_| Which::Next)
    }
}

/// Writes a new `ca-next` into the leaf CA Secret (under its resourceVersion: a key written
/// meanwhile by someone else is read, not replaced, on the next pass).
async fn make_next_key(
    tc: &TrustedCluster,
    ctx: &Context,
    secrets: &Api<Secret>,
    keys: LeafKeys,
) -> std::result::Result<LeafKeys, Blocked> {
    let next = CertificateAuthority::generate(keys.current.cluster().clone())
        .map_err(|e| blocked("KeyNotMade", e.to_string()))?;
    let text = next
        .private_key()
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .map_err(|e| blocked("KeyNotMade", e.to_string()))?;
    let patch = json!({
        "metadata": { "resourceVersion": keys.secret.resource_version() },
        "stringData": { NEXT_CA_KEY: text.as_str() },
    });
    patch_leaf_ca(secrets, &keys.secret, &patch).await?;
    let note = format!(
        "made the new CA key {} (Secret {} key {NEXT_CA_KEY})",
        fingerprint(next.public_key()),
        keys.secret.name_any()
    );
    info!(trusted_cluster = %tc.name_any(), "{note}");
    publish(ctx, tc, EventType::Normal, "CaKeyCreated", &note).await;
    Ok(LeafKeys {
        next: Some(next),
        ..keys
    })
}

/// Promotes `ca-next` to `ca` (keeping the old key as `ca-retired`) or drops it.
async fn change_secret(
    tc: &TrustedCluster,
    ctx: &Context,
    secrets: &Api<Secret>,
    keys: &LeafKeys,
    change: SecretChange,
) -> std::result::Result<(), Blocked> {
    let data = keys.secret.data.clone().unwrap_or_default();
    let version = keys.secret.resource_version();
    let (patch, note) = match change {
        SecretChange::Promote => (
            json!({
                "metadata": { "resourceVersion": version },
                "data": {
                    LEAF_CA_KEY: data.get(NEXT_CA_KEY),
                    RETIRED_CA_KEY: data.get(LEAF_CA_KEY),
                    NEXT_CA_KEY: null,
                },
            }),
            format!(
                "CA rotation complete: {} is the key in force; the retired {} is kept as {RETIRED_CA_KEY}",
                fingerprint(keys.get(Which::Next).public_key()),
                fingerprint(keys.current.public_key())
            ),
        ),
        SecretChange::DropNext => (
            json!({
                "metadata": { "resourceVersion": version },
                "data": { NEXT_CA_KEY: null },
            }),
            format!(
                "CA rotation rolled back: {} stays the key in force; {} is dropped",
                fingerprint(keys.current.public_key()),
                fingerprint(keys.get(Which::Next).public_key())
            ),
        ),
    };
    patch_leaf_ca(secrets, &keys.secret, &patch).await?;
    info!(trusted_cluster = %tc.name_any(), "{note}");
    publish(ctx, tc, EventType::Normal, "CaRotated", &note).await;
    Ok(())
}

async fn patch_leaf_ca(
    secrets: &Api<Secret>,
    secret: &Secret,
    patch: &serde_json::Value,
) -> std::result::Result<(), Blocked> {
    secrets
        .patch(
            &secret.name_any(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
        .map(|_| ())
        .map_err(|e| {
            blocked(
                "LeafCaNotWritten",
                format!("Secret {:?}: {e}", secret.name_any()),
            )
        })
}
