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
    ),
    printcolumn(
        name = "Version",
        type_ = "string",
        json_path = ".status.inventory.tetherVersion",
        description = "The Tether release of the leaf's agents",
        priority = 1
    ),
    printcolumn(
        name = "Kubernetes",
        type_ = "string",
        json_path = ".status.inventory.kubernetesVersion",
        description = "The leaf's Kubernetes API server version",
        priority = 1
    ),
    printcolumn(
        name = "Allowed",
        type_ = "string",
        json_path = ".status.inventory.allowed",
        description = "What the root may reach in the leaf: its agents' allow-list",
        priority = 1
    ),
    printcolumn(
        name = "Inventory",
        type_ = "string",
        json_path = ".status.inventory.state",
        description = "Live while agents report it; Cached after the last one went",
        priority = 1
    ),
    printcolumn(
        name = "Confirmed",
        type_ = "date",
        json_path = ".status.inventory.confirmedAt",
        description = "When the inventory last changed while Live, or when it turned Cached",
        priority = 1
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
    /// The summary only: offline for longer than the proxies' `--stale-leaf-after`.
    Stale,
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
    /// The leaf's agents whose tunnels this replica holds, as they report themselves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub agents: Vec<AgentRecord>,
    /// Why this replica refused the leaf's last agent, if it did (an unsupported protocol).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// One of the leaf's agents, as it reported itself over its tunnel.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentRecord {
    /// The agent's replica (the leaf operator's pod).
    pub replica: String,
    /// When the agent started (RFC 3339).
    pub since: String,
    /// Its Tether release.
    pub tether_version: String,
    /// The control protocol version spoken with it.
    pub protocol_version: String,
    /// The leaf's Kubernetes API server version, as the agent read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes_version: Option<String>,
    /// The allow-list it enforces.
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub allow: Vec<String>,
    /// Whether it serves `_apiserver` dials.
    #[serde(default)]
    pub api_server: bool,
    /// Whether it serves the root's Kubernetes requests.
    #[serde(default)]
    pub kube_api: bool,
    /// Fingerprints of the root CA keys it trusts: before a root CA rotation updates the
    /// proxies' certificates, every leaf's agents should list the new key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub root_keys: Vec<String>,
}

/// Whether the inventory is what connected agents say now, or what they last said.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum InventoryState {
    /// Agents connected to some replica report it now.
    Live,
    /// No agent is connected: the root keeps what they last reported.
    Cached,
}

/// What the root knows of the leaf from its agents: kept while the leaf is offline, marked
/// with when it was last confirmed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LeafInventory {
    /// Live or Cached.
    pub state: InventoryState,
    /// When the inventory last changed while Live, or when it turned Cached (RFC 3339).
    pub confirmed_at: String,
    /// The agents' Tether releases, comma-separated (two during a leaf's rolling upgrade).
    pub tether_version: String,
    /// The leaf's Kubernetes API server version, if an agent knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes_version: Option<String>,
    /// Every rule of the agents' allow-lists, comma-separated, for `kubectl get -o wide`.
    pub allowed: String,
    /// The agents as they last reported themselves.
    #[schemars(length(max = 8))]
    pub agents: Vec<AgentRecord>,
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
    /// When `connection` last changed (RFC 3339), as a condition's `lastTransitionTime`
    /// (Offline turning Stale keeps it: the leaf has been away since then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// What the leaf's agents report of it, kept while it is offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory: Option<LeafInventory>,
    /// Why a replica refused the leaf's agents, from the entries (an unsupported protocol).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}
