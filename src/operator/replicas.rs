//! Every replica's holdings in one `ReverseTunnel` status, and the summary the leader folds
//! them into.
//!
//! Every operator replica runs an agent for every tunnel, so the leaf has one tunnel per proxy
//! per replica. Each replica writes its own entry of `status.replicas` ([`entry`], written by
//! [`super::status::StatusWriter`] under [`field_manager`]): its agent's phase, its tunnels,
//! and an `observedAt` it stamps about once a minute. The leader ([`run`]) turns the live
//! entries into the fields `kubectl get rt` shows, from their union:
//!
//! ```text
//!   NAME     CLUSTER  STATUS     PROXIES  REPLICAS  SEEN  AGE
//!   to-root  root     Connected  3/3      2/2       12s   2d    both replicas hold all 3
//!   to-root  root     Connected  3/3      1/1       40s   2d    one replica died a minute ago
//! ```
//!
//! `PROXIES` counts the proxies that hold a tunnel from *some* replica (a dial reaches the leaf
//! through any of them); `REPLICAS` is the replicas holding every expected proxy over the
//! replicas alive. An entry whose stamp is older than [`stale_after`] (65 s at the default
//! minute) is a dead replica's: it stops counting and the leader removes it. A replica that
//! stops cleanly removes its own entry at once. When every replica is dead nobody can write
//! anything, and `SEEN` (the newest stamp of any replica) passes a minute instead.
//!
//! The leader writes the summary only when it changes (heartbeat times and stamps ride along),
//! so at rest the tunnel costs one write per replica per minute: the replicas' stamps.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime};

use futures::{FutureExt, StreamExt};
use kube::api::{Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::FIELD_MANAGER;
use super::crd::reverse_tunnel::{Phase, ProxyState, ProxyTunnel, ReplicaHolding};
use super::crd::{ReverseTunnel, ReverseTunnelStatus};
use super::status::{condition, phase_event, stale_after};

/// How often the leader looks at the entries even without a change: a dead replica's entry
/// expires without any event. Bounded by the refresh, so short test refreshes expire quickly.
const RECHECK: Duration = Duration::from_secs(10);
/// Changes closer together than this are summarized once.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// How long a summary written may take to come back through the watch before the store is
/// believed over it.
const STORE_LAG: Duration = Duration::from_secs(5);

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
    }
}

/// Whether `entry` was stamped within `stale_after(refresh)` of `now`.
pub fn is_live(entry: &ReplicaHolding, refresh: Duration, now: SystemTime) -> bool {
    entry
        .observed_at
        .as_deref()
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        .is_some_and(|at| now.duration_since(at).unwrap_or_default() <= stale_after(refresh))
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
        observed_at: entries.iter().filter_map(|e| e.observed_at.clone()).max(),
    }
}

/// The summary fields of `status` without what moves on its own (stamps, heartbeat times).
fn settled(status: &ReverseTunnelStatus) -> ReverseTunnelStatus {
    let mut s = status.clone();
    s.replicas = Vec::new();
    s.observed_at = None;
    s.last_heartbeat = None;
    for p in &mut s.proxies {
        p.last_heartbeat = None;
    }
    s
}

/// What the leader does for one tunnel: the summary to write (if it changed) and the removal of
/// dead replicas' entries (if any).
pub struct Plan {
    /// The new summary, when it differs from the object's.
    pub summary: Option<ReverseTunnelStatus>,
    /// Removes the entries of replicas whose stamp is stale.
    pub prune: Option<json_patch::Patch>,
    /// When the first live entry goes stale, if nothing else happens first.
    pub next_expiry: Option<SystemTime>,
}

/// Plans the leader's writes for `status` at `now`.
pub fn plan(status: &ReverseTunnelStatus, refresh: Duration, now: SystemTime) -> Plan {
    let live: Vec<&ReplicaHolding> = status
        .replicas
        .iter()
        .filter(|e| is_live(e, refresh, now))
        .collect();
    let next = summarize(&live, Some(status), now);
    let next_expiry = live
        .iter()
        .filter_map(|e| humantime::parse_rfc3339(e.observed_at.as_deref()?).ok())
        .map(|at| at + stale_after(refresh) + Duration::from_millis(100))
        .min();
    Plan {
        summary: (settled(&next) != settled(status)).then_some(next),
        prune: removal_patch(status, |e| !is_live(e, refresh, now)),
        next_expiry,
    }
}

type Guarded = DeserializeGuard<ReverseTunnel>;

/// Keeps every `ReverseTunnel`'s summary up to date with its replicas' entries until `stop`:
/// the leader's half of the status.
pub async fn run(
    client: Client,
    namespace: Option<&str>,
    recorder: Recorder,
    refresh: Duration,
    stop: CancellationToken,
) {
    let api: Api<Guarded> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (store, writer) = reflector::store();
    let mut events = watcher(api, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(writer)
        .boxed();
    // What this leader wrote per tunnel and the watch has not shown yet, so a pass in between
    // does not write it again.
    let mut written: HashMap<ObjectRef<Guarded>, (ReverseTunnelStatus, Instant)> = HashMap::new();
    // The first list, in full, before the first pass (the stream fills the store only while
    // polled).
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            event = events.next() => match event {
                None => return,
                Some(Ok(watcher::Event::InitDone)) => break,
                Some(Err(e)) => debug!(error = %e, "watching ReverseTunnels"),
                Some(Ok(_)) => {}
            },
        }
    }
    loop {
        let now = SystemTime::now();
        let mut wake = now + RECHECK.min(refresh);
        for obj in store.state() {
            let Ok(rt) = &obj.0 else { continue };
            if rt.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let key = ObjectRef::from_obj(&*obj);
            let status = rt.status.clone().unwrap_or_default();
            if written
                .get(&key)
                .is_some_and(|(w, at)| settled(w) == settled(&status) || at.elapsed() > STORE_LAG)
            {
                written.remove(&key);
            }
            let plan = plan(&status, refresh, now);
            if let Some(at) = plan.next_expiry {
                wake = wake.min(at);
            }
            let api: Api<ReverseTunnel> =
                Api::namespaced(client.clone(), &rt.namespace().unwrap_or_default());
            let name = rt.name_any();
            if let Some(patch) = plan.prune {
                match api
                    .patch_status(&name, &PatchParams::default(), &Patch::<()>::Json(patch))
                    .await
                {
                    Ok(_) => debug!(%name, "removed dead replicas' entries"),
                    Err(e) => debug!(%name, error = %e, "removing dead replicas' entries"),
                }
            }
            let Some(summary) = plan.summary else {
                continue;
            };
            if written
                .get(&key)
                .is_some_and(|(w, _)| settled(w) == settled(&summary))
            {
                continue;
            }
            debug!(%name, before = ?settled(&status), after = ?settled(&summary), "writing the summary");
            match write_summary(&api, &name, &summary).await {
                Ok(()) => {
                    if let Some(event) = phase_event(status.phase, &summary)
                        && let Err(e) = recorder.publish(&event, &rt.object_ref(&())).await
                    {
                        debug!(%name, error = %e, "could not publish an Event");
                    }
                    written.insert(key, (summary, Instant::now()));
                }
                Err(e) => warn!(%name, error = %e, "writing the ReverseTunnel summary"),
            }
        }
        let until = wake
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .max(DEBOUNCE);
        tokio::select! {
            () = stop.cancelled() => return,
            event = events.next() => match event {
                None => return,
                Some(Err(e)) => debug!(error = %e, "watching ReverseTunnels"),
                Some(Ok(_)) => tokio::time::sleep(DEBOUNCE).await,
            },
            () = tokio::time::sleep(until) => {}
        }
        // Everything the watch has delivered meanwhile, so the pass sees the objects as they
        // are (a store one event behind would have every pass rewrite what it just wrote).
        while let Some(Some(event)) = events.next().now_or_never() {
            if let Err(e) = event {
                debug!(error = %e, "watching ReverseTunnels");
            }
        }
        written.retain(|key, _| store.get(key).is_some());
    }
}

/// Applies the summary fields under the operator's shared field manager, so whichever replica
/// leads takes them over without a conflict.
async fn write_summary(
    api: &Api<ReverseTunnel>,
    name: &str,
    summary: &ReverseTunnelStatus,
) -> Result<(), kube::Error> {
    let patch = json!({
        "apiVersion": ReverseTunnel::api_version(&()),
        "kind": ReverseTunnel::kind(&()),
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
