//! `TrustedCluster`: "this (leaf) cluster should join that root". Types only: the join
//! protocol that fills the status comes later.

#![allow(
    clippy::duplicated_attributes,
    reason = "each printcolumn(...) repeats type_ = ...; clippy reads them as duplicates"
)]

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Condition, SecretReference};

/// A root cluster this leaf trusts and joins with a one-time token; joining yields the root's
/// CA and the agent identity a `ReverseTunnel` then uses.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tether.dev",
    version = "v1alpha1",
    kind = "TrustedCluster",
    plural = "trustedclusters",
    shortname = "tc",
    category = "tether",
    namespaced,
    status = "TrustedClusterStatus",
    printcolumn(
        name = "Root",
        type_ = "string",
        json_path = ".spec.rootAddress",
        description = "The root's join address"
    ),
    printcolumn(name = "Enabled", type_ = "boolean", json_path = ".spec.enabled"),
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
    /// `host:port` of the root's join endpoint.
    #[schemars(
        length(min = 3, max = 261),
        regex(pattern = r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}$")
    )]
    pub root_address: String,
    /// Secret whose key `token` holds the one-time join token the root issued.
    pub token_secret_ref: SecretReference,
    /// Whether to keep the trust (and its tunnels). `false` keeps the object but disconnects.
    #[serde(default = "enabled_default")]
    pub enabled: bool,
}

fn enabled_default() -> bool {
    true
}

/// What the join produced.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrustedClusterStatus {
    /// SHA256 fingerprint of the root CA learned at join time, to compare out of band.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_ca_fingerprint: Option<String>,
    /// `Joined` and `Ready`, per API conventions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
