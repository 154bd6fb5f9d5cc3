//! `RemoteCluster`: the root side's record of one leaf. A join creates it (the leaf's CA is
//! in its spec, so every proxy replica trusts the leaf's agents); each proxy replica writes its
//! own entry of the status by server-side apply, under its own field manager, and one replica
//! (the lowest live ID) keeps the summary fields in step with the entries.
//!
//! No status field is refreshed on a timer (that would cost writes per leaf at rest): entries
//! change when tunnels do, and a replica's entries are vouched for by its ready endpoint, not
//! by a timestamp (see `operator::root::holdings`).

#![allow(
    clippy::duplicated_attributes,
    reason = "each printcolumn(...) repeats type_ = ...; clippy reads them as duplicates"
)]

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A leaf cluster the root trusts; the object's name is the leaf's cluster name. Deleting it
/// revokes the trust: every proxy closes the leaf's tunnels and refuses its agents.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tether.dev",
    version = "v1alpha1",
    kind = "RemoteCluster",
    doc = "A leaf cluster the root trusts, named after it: its CA keys, and which proxy replicas hold its tunnels. Deleting it revokes the trust.",
    plural = "remoteclusters",
    shortname = "rmc",
    category = "tether",
    namespaced,
    status = "RemoteClusterStatus",
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.connection",
        description = "Online when some live replica holds a tunnel with on-time heartbeats"
    ),
    printcolumn(
        name = "Held By",
        type_ = "string",
        json_path = ".status.heldBy",
        description = "Proxy replicas holding tunnels from the leaf"
    ),
    printcolumn(name = "Tunnels", type_ = "integer", json_path = ".status.tunnels"),
    printcolumn(
        name = "Since",
        type_ = "date",
        json_path = ".status.since",
        description = "When the leaf last went Online or Offline"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RemoteClusterSpec {
    /// The leaf's CA public keys (OpenSSH format); agents with certificates they sign are
    /// admitted as this cluster. Several during a CA rotation.
    #[schemars(length(min = 1, max = 8), inner(length(min = 16, max = 8192)))]
    pub ca_keys: Vec<String>,
    /// ID of the join token the leaf joined with (the secret half is never stored here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub join_token: Option<String>,
}

/// Whether a replica's tunnels from the leaf keep their heartbeats.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Connection {
    /// At least one tunnel keeps its heartbeats.
    Online,
    /// Every tunnel missed its heartbeats.
    Offline,
}

/// One proxy replica holding tunnels from the leaf; written by that replica only.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxyHolding {
    /// The proxy replica's ID (its pod name).
    pub proxy_id: String,
    /// Online or Offline, as this replica sees the leaf.
    pub connection: Connection,
    /// How many tunnels from the leaf it holds.
    pub tunnels: u32,
    /// When this entry last changed (RFC 3339): a tunnel came or went, or the connection
    /// turned. Never refreshed while nothing changes, so a steady root makes no writes; the
    /// replica's ready endpoint, not this time, says the entry is current.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
}

/// Which replicas hold the leaf's tunnels: one entry per replica, and a summary of them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RemoteClusterStatus {
    /// One entry per replica holding tunnels from this leaf, keyed by `proxyId`; each replica
    /// writes only its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["proxyId"]))]
    pub proxies: Vec<ProxyHolding>,
    /// Summary of `proxies`: Online if any replica sees the leaf online.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<Connection>,
    /// Summary of `proxies`: the replicas' IDs, comma-separated, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_by: Option<String>,
    /// Summary of `proxies`: tunnels in total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnels: Option<u32>,
    /// When `connection` last changed (RFC 3339), as a condition's `lastTransitionTime`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
}
