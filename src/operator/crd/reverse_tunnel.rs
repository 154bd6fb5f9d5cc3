//! `ReverseTunnel`: "keep a tunnel from this (leaf) cluster to that root's proxies". The leaf
//! side's main resource: `kubectl apply -f reversetunnel.yaml`, `kubectl get rt`.

#![allow(
    clippy::duplicated_attributes,
    reason = "each printcolumn(...) repeats type_ = ...; clippy reads them as duplicates"
)]

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Condition, SecretReference};

/// A coarse RE2 form of the allow-list rule syntax (`tether::egress::allow_list`), so that the
/// API server rejects obvious typos at `kubectl apply` time. It accepts a superset of what the
/// parser accepts; the operator parses every rule again and reports the precise error in the
/// `Ready` condition.
pub const ALLOW_RULE_PATTERN: &str = r"^(\[[0-9A-Fa-f:.]+(/[0-9]{1,3})?\]|(\*\.)?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?(/[0-9]{1,2})?):(\*|[0-9]{1,5}(-[0-9]{1,5})?(,[0-9]{1,5}(-[0-9]{1,5})?)*)$";

/// Durations as Go and humantime write them: one or more `<number><unit>` with unit ms, s, m
/// or h (`15s`, `1m30s`).
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h))+$";

/// What the operator keeps running for one tunnel: an agent in this (leaf) cluster dialling
/// out to the root cluster's proxies, serving the dials the allow-list permits.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tether.dev",
    version = "v1alpha1",
    kind = "ReverseTunnel",
    doc = "A tunnel this leaf cluster keeps to a root cluster: the operator runs its agent, which dials out to the root's proxies and serves the dials the allow-list permits.",
    plural = "reversetunnels",
    shortname = "rt",
    category = "tether",
    namespaced,
    status = "ReverseTunnelStatus",
    printcolumn(
        name = "Cluster",
        type_ = "string",
        json_path = ".spec.rootCluster",
        description = "The root cluster the tunnel goes to"
    ),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Connecting, Connected, Degraded or Failed"
    ),
    printcolumn(
        name = "Proxies",
        type_ = "string",
        json_path = ".status.proxiesReady",
        description = "Proxies with a live tunnel from some replica / proxies expected"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "string",
        json_path = ".status.replicasReady",
        description = "Operator replicas holding a tunnel to every expected proxy / replicas alive"
    ),
    printcolumn(
        name = "Seen",
        type_ = "date",
        json_path = ".status.observedAt",
        description = "When an operator replica last confirmed it carries the tunnel; each replica refreshes it every minute, so an older age means no replica does"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        description = "Why the tunnel is or is not ready",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ReverseTunnelSpec {
    /// Name of the root cluster; the proxies' host certificates must name it.
    #[schemars(length(min = 1, max = 63))]
    pub root_cluster: String,
    /// Name of this (leaf) cluster; the agent's certificate must carry it, and the root
    /// addresses this cluster's targets as `HOST.<leafCluster>.tether`.
    #[schemars(length(min = 1, max = 63))]
    pub leaf_cluster: String,
    /// `host:port` of the root's proxies (their load balancer's tunnel port), or
    /// `tls://host:port` for their TLS port (SSH by ALPN, or over WebSocket behind an L7 load
    /// balancer that terminates TLS), or `ws://host:port` (WebSocket in plain HTTP). Resolved
    /// again on every connection attempt, so a changed DNS record is followed.
    #[schemars(
        length(min = 3, max = 268),
        regex(pattern = r"^((tls|ws)://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}/?$")
    )]
    pub proxy_address: String,
    /// Secret holding the agent's identity: `key` (OpenSSH private key, unencrypted) and
    /// `cert` (its OpenSSH user certificate, signed by this cluster's CA).
    pub identity_secret_ref: SecretReference,
    /// Secret whose key `ca.pub` holds the root cluster's CA public keys (OpenSSH format, one
    /// per line; several during a CA rotation). Proxies not signed by one of them are refused.
    pub root_ca_secret_ref: SecretReference,
    /// What the tunnel carries and how: its allow-list, the API server address, the
    /// heartbeat (shared with `TrustedCluster`, which passes them on to the tunnel it owns).
    #[serde(flatten)]
    pub tunnel: TunnelSettings,
    /// This cluster's CA keys as the root should trust them, signed by a CA key the root
    /// trusts now: a CA rotation's step, which the agent sends the root over its tunnel. Set
    /// by the `TrustedCluster` controller during a rotation (`tether ca rotate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_key_set: Option<SignedKeySet>,
}

/// A leaf's CA key set and the SSH signature that vouches for it (`identity::keyset`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SignedKeySet {
    /// The statement signed: the cluster, when it was issued, and its keys.
    #[schemars(length(min = 1, max = 8192))]
    pub statement: String,
    /// The SSH signature (`-----BEGIN SSH SIGNATURE-----`) of the statement.
    #[schemars(length(min = 1, max = 4096))]
    pub signature: String,
}

/// The root's answer to a leaf's CA key set, as one replica's agent heard it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeySetAnswer {
    /// When the set answered was issued (seconds since the Unix epoch).
    pub issued_at: u64,
    /// Whether the root trusts exactly that set's keys for this cluster now.
    pub accepted: bool,
    /// Why the root refused it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// The settings of a tunnel that a `ReverseTunnel` and a `TrustedCluster` both take, so their
/// schema, validation and documentation are written once.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TunnelSettings {
    /// What the root may reach in this cluster through the tunnel; default deny. One rule per
    /// entry: `CIDR:PORTS` (`10.0.0.0/8:443`, `[fd00::/8]:80-90`) or `HOST:PORTS`
    /// (`db.internal:5432`, `*.svc.cluster.local:*`). Edits apply at once, without reconnecting.
    #[serde(default)]
    #[schemars(length(max = 256), inner(length(min = 1, max = 300)))]
    #[x_kube(validation = Rule::new(format!("self.all(r, r.matches(r'{ALLOW_RULE_PATTERN}'))")).message("each allow rule must be CIDR:PORTS or HOST:PORTS, e.g. 10.0.0.0/8:443, [fd00::/8]:80-90, db.internal:5432 or *.svc.cluster.local:*"))]
    pub allow: Vec<String>,
    /// Address (`host:port`) that `_apiserver.<leafCluster>.tether` reaches: this cluster's
    /// Kubernetes API server. Unset: such dials are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 3, max = 261))]
    pub api_server: Option<String>,
    /// Root callers who may use this cluster's Kubernetes API through the root, and who they
    /// are here: each rule names root `users` and/or `groups` and the `leafGroups` they act
    /// in (bind Roles to those). The agent impersonates `tether:ROOT:USER` in those groups
    /// with the operator's own credentials; callers no rule names are refused. Empty: the
    /// root's Kubernetes requests are refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub kube_access: Vec<crate::agent::kube::AccessRule>,
    /// How often the agent and proxy exchange heartbeats (`15s`, `1m`). Keep it below every
    /// load balancer's idle timeout; a tunnel silent for 3 intervals is replaced.
    #[serde(default = "default_heartbeat_interval")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub heartbeat_interval: String,
    /// The forward proxy the agent (and a `TrustedCluster`'s join) reaches the root through,
    /// with HTTP CONNECT, instead of the operator's own (its `HTTPS_PROXY`, `NO_PROXY`). Unset:
    /// the operator's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_proxy: Option<EgressProxy>,
}

/// A forward proxy between this cluster and the root (issue #17).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressProxy {
    /// `http://HOST:PORT` or `https://HOST:PORT` (TLS to the proxy itself), without
    /// credentials: they go in `credentialsSecretRef`, out of every reader's sight. Empty:
    /// direct, whatever the operator's environment says.
    #[schemars(
        length(max = 300),
        regex(pattern = r"^$|^[Hh][Tt][Tt][Pp][Ss]?://[^@/?#]+/?$")
    )]
    pub url: String,
    /// Roots reached directly although a proxy is set, as `NO_PROXY` lists them: `*`, host
    /// names (and the names under them), `.domain` suffixes, IPs and CIDRs, each with an
    /// optional `:port`, comma-separated.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 4096))]
    pub no_proxy: String,
    /// A Secret key holding the proxy's Basic credentials as one line `user:password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretKeyReference>,
    /// A Secret key holding the PEM CA certificates an `https://` proxy's certificate must
    /// chain to. Unset: the system's CA certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyReference>,
}

/// One key of a Secret in the namespace of this object.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyReference {
    /// Name of the Secret, in the namespace of this object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key in it.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_heartbeat_interval() -> String {
    "15s".to_owned()
}

/// Where a tunnel is, as one word for `kubectl get`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// No operator has acted yet (then `Ready`'s reason is `WaitingForOperator`), or the
    /// agent has not reported yet.
    Pending,
    /// The agent is dialling, or waiting to redial after a failure.
    Connecting,
    /// Every expected proxy holds a live tunnel.
    Connected,
    /// Some, but not all, expected proxies hold a live tunnel.
    Degraded,
    /// The spec cannot be honoured (invalid rule, missing Secret, bad key); see `Ready`.
    Failed,
}

/// The state of the tunnel to one proxy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ProxyState {
    /// Dialling, or waiting to redial after a failure.
    Connecting,
    /// Up: heartbeats flow, dials are served.
    Connected,
    /// The proxy asked the agent to leave; a tunnel elsewhere replaces it.
    Draining,
}

/// The agent's tunnel to one proxy replica.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxyTunnel {
    /// The proxy replica's ID, from its host certificate.
    pub id: String,
    /// Connecting, Connected or Draining.
    pub state: ProxyState,
    /// When the current tunnel came up (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected_since: Option<String>,
    /// When the proxy last answered a heartbeat (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<String>,
}

/// One operator replica's holdings: its own agent's tunnels, as that replica sees them.
///
/// Every replica runs an agent for every tunnel, so each writes its own entry (server-side
/// apply under its own field manager, `tether-operator-<replica>`) when it changes; its own
/// Lease (`<lease-name>.<replica>`) says it lives. The leader folds the live replicas' entries
/// into the summary fields above and removes the entries of a replica whose Lease expired.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaHolding {
    /// The replica's identity (its pod name): the list's key.
    pub name: String,
    /// This replica's agent: Pending, Connecting, Connected, Degraded or Failed.
    pub phase: Phase,
    /// Proxies this replica holds a live tunnel to.
    #[serde(default)]
    pub connected: u32,
    /// Proxies the root announced to this replica.
    #[serde(default)]
    pub expected: u32,
    /// Why the replica's agent is in its phase (the `Ready` condition's reason it would give).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// The same, in words (an unusable spec's error, the last dial error).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The tunnels of this replica's agent, one per proxy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["id"]))]
    pub proxies: Vec<ProxyTunnel>,
    /// The `metadata.generation` this replica acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the replica last changed this entry (RFC 3339); its liveness is its Lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_at: Option<String>,
    /// Fingerprint of the CA key that signed the certificate all of this replica's agents
    /// use; absent while a new identity takes over from an old one (a CA rotation waits for
    /// every replica to report the new key before it retires the old).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_ca: Option<String>,
    /// The root's answer to `spec.caKeySet`, as this replica's agent heard it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_keys: Option<KeySetAnswer>,
}

/// What the operator observes about a `ReverseTunnel`; written only by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReverseTunnelStatus {
    /// Pending, Connecting, Connected, Degraded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// One entry per proxy the agent holds or wants a tunnel to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["id"]))]
    pub proxies: Vec<ProxyTunnel>,
    /// Proxies with a live tunnel.
    #[serde(default)]
    pub connected: u32,
    /// Proxies the root says exist (at least 1 once any answered).
    #[serde(default)]
    pub expected: u32,
    /// `connected/expected`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxies_ready: Option<String>,
    /// The latest heartbeat any proxy answered (RFC 3339), as of `observedAt`: heartbeats
    /// alone cause no write, so this is up to a few minutes old.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<String>,
    /// When the leader last confirmed that a live operator replica carries the tunnel (RFC
    /// 3339): stamped with every summary it writes and at least every minute while nothing
    /// changes, so its age (`kubectl get rt`, column `SEEN`) passing a minute means no replica
    /// runs an agent and the rest of the status is dead processes' last word.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_at: Option<String>,
    /// Each operator replica's own entry (see [`ReplicaHolding`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub replicas: Vec<ReplicaHolding>,
    /// `ready/alive` over the live replica entries, for `kubectl get`: replicas holding a
    /// tunnel to every expected proxy / replicas whose Lease is current.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas_ready: Option<String>,
    /// `Ready` (the tunnel serves dials) and `Degraded` (some proxies are missing).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
