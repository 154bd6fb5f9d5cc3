//! `TrustedCluster`: "this (leaf) cluster joins that root". The operator presents the join
//! token and this cluster's CA to the root, stores the root's CA, issues the agent's identity,
//! and creates (and owns) the `ReverseTunnel` that keeps the tunnel.

#![allow(
    clippy::duplicated_attributes,
    reason = "each printcolumn(...) repeats type_ = ...; clippy reads them as duplicates"
)]

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::reverse_tunnel::{SignedKeySet, TunnelSettings};
use super::{Condition, SecretReference};

/// A root cluster this leaf joins with a token. Joining yields the root's CA (in the Secret
/// `<name>-root-ca`), the agent's identity (`<name>-agent`) and a `ReverseTunnel` `<name>`,
/// all owned by this object and removed with it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tether.dev",
    version = "v1alpha1",
    kind = "TrustedCluster",
    doc = "A root cluster this leaf joins with a one-time token; joining yields the root's CA, the agent's identity and a ReverseTunnel, all removed with this object.",
    plural = "trustedclusters",
    shortname = "tc",
    category = "tether",
    namespaced,
    status = "TrustedClusterStatus",
    printcolumn(
        name = "Root",
        type_ = "string",
        json_path = ".status.rootCluster",
        description = "The root cluster's name, learned at join"
    ),
    printcolumn(name = "Enabled", type_ = "boolean", json_path = ".spec.enabled"),
    printcolumn(
        name = "Joined",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Joined\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Joined\")].reason"
    ),
    printcolumn(
        name = "CA Rotation",
        type_ = "string",
        json_path = ".status.caRotation.phase",
        description = "The CA rotation's phase in effect",
        priority = 1
    ),
    printcolumn(
        name = "Fingerprint",
        type_ = "string",
        json_path = ".status.rootCaFingerprint",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TrustedClusterSpec {
    /// `host:port` of the root's proxies (their load balancer), or `tls://host:port` for
    /// their TLS port, or `ws://host:port` (as a ReverseTunnel's `proxyAddress`): joins and
    /// tunnels both go there.
    #[schemars(
        length(min = 3, max = 268),
        regex(pattern = r"^((tls|ws)://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}/?$")
    )]
    pub root_address: String,
    /// Secret whose key `token` holds the join token (`ID.SECRET`) the root issued with
    /// `tether join-token`.
    pub token_secret_ref: SecretReference,
    /// This (leaf) cluster's name: the root addresses its targets as `HOST.<leafCluster>.tether`.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
    )]
    pub leaf_cluster: String,
    /// Secret whose key `ca` holds this cluster's CA private key (`tether ca init`); it signs
    /// the agent's certificate, and its public key is what the root learns to trust.
    pub leaf_ca_secret_ref: SecretReference,
    /// If set, the join fails unless the root CA's SHA256 fingerprint (`SHA256:...`, as
    /// `tether ca init` prints it) is this. The token already authenticates the root; a pin
    /// also guards against a leaked token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 8, max = 100))]
    pub root_ca_fingerprint: Option<String>,
    /// Whether to keep the tunnel. `false` removes the `ReverseTunnel` but keeps the trust, so
    /// re-enabling needs no new token.
    #[serde(default = "enabled_default")]
    pub enabled: bool,
    /// The tunnel's allow-list, API server address, heartbeat and egress proxy, passed on to the
    /// `ReverseTunnel` this object owns (edits apply to it at once).
    #[serde(flatten)]
    pub tunnel: TunnelSettings,
    /// Rotating this cluster's CA without a dropped dial (`tether ca rotate`): the phase to
    /// reach. Each phase waits for the one before it; `status.caRotation` says where the
    /// rotation is and what it waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_rotation: Option<CaRotation>,
}

/// The CA rotation asked for.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaRotation {
    /// The phase to reach.
    pub phase: RotationPhase,
}

/// The phases of a CA rotation, in order (`Rollback` leaves it before `Retire` completes).
///
/// | phase | the root trusts | agents' certificates from | done when |
/// |---|---|---|---|
/// | `Standby` | the key in force (`ca`) | `ca` | - |
/// | `Init` | `ca` and the new key (`ca-next`, made if missing) | `ca` | the root trusts both |
/// | `UpdateClients` | both | `ca-next` | every replica's agents use it |
/// | `Retire` | `ca-next` only, which becomes `ca` (the old key stays as `ca-retired`) | the new key | the root trusts only it; the old key's tunnels are closed |
/// | `Rollback` | `ca` only (`ca-next` is dropped) | `ca` | the root trusts only `ca` |
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RotationPhase {
    /// No rotation: the key in force alone.
    Standby,
    /// Publish the new key beside the old one.
    Init,
    /// Re-issue the agents' certificates from the new key.
    UpdateClients,
    /// Retire the old key: the last phase, which cannot be rolled back.
    Retire,
    /// Go back to the old key alone, before `Retire`.
    Rollback,
}

/// Where a CA rotation is; written only by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaRotationStatus {
    /// The phase in effect: the one asked for, or an earlier one it waits on.
    pub phase: RotationPhase,
    /// Whether the phase's work is done, so the next may be asked.
    pub complete: bool,
    /// What the phase waits for, or what it did.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// SHA256 fingerprint of the key in force (the leaf CA Secret's `ca`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub current_key: String,
    /// SHA256 fingerprint of the key being rotated in (`ca-next`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_key: Option<String>,
    /// The key set the agents publish to the root, as signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_set: Option<SignedKeySet>,
    /// When the set the root was last seen to trust was issued (seconds since the Unix
    /// epoch): remembered, so that a replica's agent starting afresh, which has no answer
    /// yet, does not make the rotation step back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_trusts_set_of: Option<u64>,
    /// When a rotation last retired an old key (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotated: Option<String>,
}

fn enabled_default() -> bool {
    true
}

/// What the join produced; written only by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrustedClusterStatus {
    /// The root cluster's name, as its proxies' certificates carry it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_cluster: Option<String>,
    /// SHA256 fingerprint of the root CA learned at join time, to compare out of band.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_ca_fingerprint: Option<String>,
    /// The `ReverseTunnel` this object created and owns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverse_tunnel: Option<String>,
    /// `Joined` (the root trusts this cluster and its CA is stored) and `Ready` (the tunnel
    /// is configured), per API conventions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Where the CA rotation is (`spec.caRotation`), once one was asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_rotation: Option<CaRotationStatus>,
}
