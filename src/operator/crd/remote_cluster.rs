//! `RemoteCluster`: the root side's view of one leaf, written by the proxies. Types only:
//! the proxy-side status writer comes later.

#![allow(
    clippy::duplicated_attributes,
    reason = "each printcolumn(...) repeats type_ = ...; clippy reads them as duplicates"
)]

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Condition;

/// A leaf cluster known to the root. Proxies report in its status whether the leaf is online
/// and which replicas hold its tunnels.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tether.dev",
    version = "v1alpha1",
    kind = "RemoteCluster",
    plural = "remoteclusters",
    shortname = "rc",
    category = "tether",
    namespaced,
    status = "RemoteClusterStatus",
    printcolumn(name = "Status", type_ = "string", json_path = ".status.connection"),
    printcolumn(
        name = "Last Heartbeat",
        type_ = "date",
        json_path = ".status.lastHeartbeat"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RemoteClusterSpec {
    /// The leaf's cluster name (its agents' certificates carry it). Defaults to the object's
    /// name when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub cluster_name: Option<String>,
}

/// Whether a leaf is reachable.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Connection {
    /// At least one tunnel keeps its heartbeats.
    Online,
    /// No tunnel, or every tunnel missed its heartbeats.
    Offline,
}

/// One proxy replica holding tunnels from the leaf.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxyHolding {
    /// The proxy replica's ID.
    pub proxy_id: String,
    /// How many tunnels from the leaf it holds.
    pub tunnels: u32,
    /// That proxy's latest heartbeat from the leaf (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<String>,
}

/// Written by the proxies, each under its own field manager.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RemoteClusterStatus {
    /// Online or Offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<Connection>,
    /// The latest heartbeat any proxy saw (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<String>,
    /// The proxies holding tunnels from this leaf.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["proxyId"]))]
    pub proxies: Vec<ProxyHolding>,
    /// `Online`, per API conventions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
