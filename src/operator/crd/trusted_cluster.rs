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

use super::reverse_tunnel::TunnelSettings;
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
    /// `host:port` of the root's proxies (their load balancer): joins and tunnels both go
    /// there.
    #[schemars(
        length(min = 3, max = 261),
        regex(pattern = r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}$")
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
    /// The tunnel's allow-list, API server address and heartbeat, passed on to the
    /// `ReverseTunnel` this object owns (edits apply to it at once).
    #[serde(flatten)]
    pub tunnel: TunnelSettings,
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
}
