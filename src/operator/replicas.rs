//! Every replica's holdings in one `ReverseTunnel` status, and the summary the leader folds
//! them into.
//!
//! Every operator replica runs an agent for every tunnel, so the leaf has one tunnel per proxy
//! per replica. Each replica writes its own entry of `status.replicas` ([`entry`], written by
//! [`super::status::StatusWriter`] under [`field_manager`]) when it changes: its agent's
//! phase and its tunnels. The leader ([`super::summarizer`]) turns the entries of the live
//! replicas into the fields `kubectl get rt` shows, from their union:
//!
//! ```text
//!   NAME     CLUSTER  STATUS     PROXIES  REPLICAS  SEEN  AGE
//!   to-root  root     Connected  3/3      2/2       12s   2d    both replicas hold all 3
//!   to-root  root     Connected  3/3      1/1       40s   2d    one replica died
//! ```
//!
//! `PROXIES` counts the proxies that hold a tunnel from *some* replica (a dial reaches the leaf
//! through any of them); `REPLICAS` is the replicas holding every expected proxy over the
//! replicas alive. Whether a replica is alive is its own Lease's to say
//! ([`super::liveness`]): the entries of a replica whose Lease expired or is gone stop
//! counting and the leader removes them ([`plan`]); a replica that stops cleanly removes its
//! entries and then its Lease. The leader stamps `observedAt` (`SEEN`) while a live replica's
//! entry is there, at most once a refresh per tunnel at rest, so when every replica is dead
//! `SEEN` passes a minute.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use super::FIELD_MANAGER;
use super::crd::reverse_tunnel::{Phase, ProxyState, ProxyTunnel, ReplicaHolding};
use super::crd::{ReverseTunnel, ReverseTunnelStatus};
use super::liveness::Liveness;
use super::stamps::{condition, rfc3339, until_slot};

/// The field manager of one replica's entry.
pub fn field_manager(replica: &str) -> String {
    format!("{FIELD_MANAGER}-{replica}")
}

/// This replica's entry, from its own composed view of the tunnel.
pub fn entry(replica: &str, view: &ReverseTunnelStatus) -> ReplicaHolding {
    let ready = view.conditions.iter().find(|c| c.type_ == "Ready");
    ReplicaHolding {
        name: replica.to_owned(),
        phase: view.phase.unwrap_or(Phase::Pending),
        connected: view.connected,
        expected: view.expected,
        reason: ready.map(|c| c.reason.clone()).unwrap_or_default(),
        message: ready.map(|c| c.message.clone()).unwrap_or_default(),
        proxies: view.proxies.clone(),
        observed_generation: view.observed_generation,
        observed_at: view.observed_at.clone(),
        identity_ca: None,
        ca_keys: None,
    }
}

/// The JSON patch removing the entries `drop` selects, or `None` when there are none. Each
/// removal tests the entry's name first, so a list changed meanwhile makes the patch fail
/// harmlessly (the next pass sees the new list).
pub fn removal_patch(
    status: &ReverseTunnelStatus,
    drop: impl Fn(&ReplicaHolding) -> bool,
) -> Option<json_patch::Patch> {
    let mut ops = Vec::new();
    for (i, entry) in status.replicas.iter().enumerate().rev() {
        if drop(entry) {
            let path = format!("/status/replicas/{i}");
            ops.push(json!({"op": "test", "path": format!("{path}/name"), "value": entry.name}));
            ops.push(json!({"op": "remove", "path": path}));
        }
    }
    if ops.is_empty() {
        return None;
    }
    serde_json::from_value(serde_json::Value::Array(ops)).ok()
}

/// Removes `replica`'s entry from tunnel `name` (a clean stop: it no longer carries it).
pub async fn withdraw(
    api: &Api<ReverseTunnel>,
    name: &str,
    replica: &str,
) -> Result<(), kube::Error> {
    let Some(rt) = api.get_opt(name).await? else {
        return Ok(());
    };
    let status = rt.status.unwrap_or_default();
    if let Some(patch) = removal_patch(&status, |e| e.name == replica) {
        api.patch_status(name, &PatchParams::default(), &Patch::<()>::Json(patch))
            .await?;
    }
    Ok(())
}

/// The better of two states of one proxy's tunnel, across replicas.
fn rank(state: ProxyState) -> u8 {
    match state {
        ProxyState::Connected => 2,
        ProxyState::Draining => 1,
        ProxyState::Connecting => 0,
    }
}

/// Every proxy any live replica knows, at the best state any replica holds it in.
fn union(entries: &[&ReplicaHolding]) -> Vec<ProxyTunnel> {
    let mut proxies: BTreeMap<&str, ProxyTunnel> = BTreeMap::new();
    for p in entries.iter().flat_map(|e| &e.proxies) {
        let merged = proxies.entry(&p.id).or_insert_with(|| p.clone());
        if rank(p.state) > rank(merged.state) {
            *merged = p.clone();
        } else if p.state == merged.state && p.state == ProxyState::Connected {
            merged.connected_since = merged
                .connected_since
                .clone()
                .min(p.connected_since.clone());
            merged.last_heartbeat = merged.last_heartbeat.clone().max(p.last_heartbeat.clone());
        }
    }
    proxies.into_values().collect()
}

/// The phase and `Ready` reason and message the union of `entries` calls for.
fn phase_of(entries: &[&ReplicaHolding], connected: u32, expected: u32) -> (Phase, String, String) {
    let discovered = entries
        .iter()
        .any(|e| matches!(e.phase, Phase::Connected | Phase::Degraded));
    let counted = format!("{connected} of {expected} proxies hold a tunnel");
    if connected > 0 && discovered {
        return if connected < expected {
            (Phase::Degraded, "PartiallyConnected".to_owned(), counted)
        } else {
            (Phase::Connected, "Connected".to_owned(), counted)
        };
    }
    // Nothing carries the tunnel: say what the most advanced replica says.
    let order = |p: Phase| match p {
        Phase::Connected | Phase::Degraded | Phase::Connecting => 3,
        Phase::Pending => 2,
        Phase::Failed => 1,
    };
    match entries.iter().max_by_key(|e| order(e.phase)) {
        Some(e) => (
            match e.phase {
                Phase::Connected | Phase::Degraded => Phase::Connecting,
                other => other,
            },
            e.reason.clone(),
            e.message.clone(),
        ),
        None => (
            Phase::Pending,
            "NoReplica".to_owned(),
            "no live operator replica reports this tunnel".to_owned(),
        ),
    }
}

/// The summary fields for the live `entries`, reusing `previous` transition times while a
/// condition's status holds.
pub fn summarize(
    entries: &[&ReplicaHolding],
    previous: Option<&ReverseTunnelStatus>,
    now: SystemTime,
) -> ReverseTunnelStatus {
    let proxies = union(entries);
    let connected = proxies
        .iter()
        .filter(|p| p.state == ProxyState::Connected)
        .count();
    let connected = u32::try_from(connected).unwrap_or(u32::MAX);
    let expected = entries
        .iter()
        .map(|e| e.expected)
        .max()
        .unwrap_or(0)
        .max(connected);
    let (phase, reason, message) = phase_of(entries, connected, expected);
    let ready = matches!(phase, Phase::Connected | Phase::Degraded);
    let degraded = phase == Phase::Degraded;
    let generation = entries.iter().filter_map(|e| e.observed_generation).max();
    let previous_conditions = previous.map_or(&[][..], |p| p.conditions.as_slice());
    let degraded_reason = match phase {
        Phase::Degraded => "ProxiesMissing",
        Phase::Connected => "AllProxiesConnected",
        Phase::Failed => "NotRunning",
        _ => "NotConnected",
    };
    let degraded_message = if degraded {
        message.clone()
    } else {
        String::new()
    };
    let full = entries
        .iter()
        .filter(|e| e.phase == Phase::Connected)
        .count();
    ReverseTunnelStatus {
        phase: Some(phase),
        last_heartbeat: proxies
            .iter()
            .filter_map(|p| p.last_heartbeat.clone())
            .max(),
        proxies,
        connected,
        expected,
        proxies_ready: Some(format!("{connected}/{expected}")),
        replicas: Vec::new(),
        replicas_ready: Some(format!("{full}/{}", entries.len())),
        conditions: vec![
            condition(
                previous_conditions,
                "Ready",
                ready,
                &reason,
                message,
                generation,
                now,
            ),
            condition(
                previous_conditions,
                "Degraded",
                degraded,
                degraded_reason,
                degraded_message,
                generation,
                now,
            ),
        ],
        observed_generation: generation,
        // The leader's stamp, set when it writes ([`plan`]).
        observed_at: None,
    }
}

/// The summary fields of `status` without what moves on its own (stamps, heartbeat times).
pub(crate) fn settled(status: &ReverseTunnelStatus) -> ReverseTunnelStatus {
    let mut s = status.clone();
    s.replicas = Vec::new();
    s.observed_at = None;
    s.last_heartbeat = None;
    for p in &mut s.proxies {
        p.last_heartbeat = None;
    }
    s
}

/// When and how the leader stamps a tunnel's `observedAt`.
#[derive(Debug, Clone, Copy)]
pub struct Stamp {
    /// The tunnel's second within the period ([`super::stamps::refresh_slot`]).
    pub slot: Duration,
    /// The period (`--status-refresh`).
    pub refresh: Duration,
}

impl Stamp {
    /// When a stamp written at `stamped` (RFC 3339, whole seconds) must be renewed.
    fn due(self, stamped: Option<&str>) -> Option<SystemTime> {
        let at = humantime::parse_rfc3339(stamped?).ok()?;
        Some(at + until_slot(self.slot, self.refresh, at))
    }
}

/// What the leader does for one tunnel: the summary to write (if it changed, or the stamp is
/// due) and the removal of dead replicas' entries (if any).
#[derive(Debug)]
pub struct Plan {
    /// The status to apply: a changed summary, or the same one with a new stamp.
    pub summary: Option<ReverseTunnelStatus>,
    /// Removes the entries of replicas whose Lease says they are dead.
    pub prune: Option<json_patch::Patch>,
    /// When the stamp is due next, if a live replica carries the tunnel.
    pub next_stamp: Option<SystemTime>,
}

/// Plans the leader's writes for `status` at `now`, given what the replicas' Leases say
/// (`liveness`; a replica not in it counts until its Lease is read).
pub fn plan(
    status: &ReverseTunnelStatus,
    liveness: &BTreeMap<String, Liveness>,
    stamp: Stamp,
    now: SystemTime,
) -> Plan {
    let dead = |e: &ReplicaHolding| liveness.get(&e.name) == Some(&Liveness::Dead);
    let live: Vec<&ReplicaHolding> = status.replicas.iter().filter(|e| !dead(e)).collect();
    let mut next = summarize(&live, Some(status), now);
    let carried = !live.is_empty();
    let stamp_due = carried
        && stamp
            .due(status.observed_at.as_deref())
            .is_none_or(|due| now >= due);
    let write = settled(&next) != settled(status) || stamp_due;
    // Only a live replica's entry vouches for the tunnel; otherwise the old stamp stays, and
    // ages.
    next.observed_at = if carried {
        Some(rfc3339(now))
    } else {
        status.observed_at.clone()
    };
    let next_stamp = if !carried {
        None
    } else if write {
        stamp.due(next.observed_at.as_deref())
    } else {
        stamp.due(status.observed_at.as_deref())
    };
    Plan {
        summary: write.then_some(next),
        prune: removal_patch(status, dead),
        next_stamp,
    }
}

/// Applies the summary fields and the stamp under the operator's shared field manager, so
/// whichever replica leads takes them over without a conflict.
pub async fn write_summary(
    api: &Api<ReverseTunnel>,
    name: &str,
    summary: &ReverseTunnelStatus,
) -> Result<(), kube::Error> {
    let patch = json!({
        "apiVersion": <ReverseTunnel as kube::Resource>::api_version(&()),
        "kind": <ReverseTunnel as kube::Resource>::kind(&()),
        "status": summary,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(|_| ())
}

#[cfg(test)]
#[path = "replicas_tests.rs"]
mod tests;
