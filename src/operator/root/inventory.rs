//! The leaf inventory in `RemoteCluster` status: each replica's entry lists the agents whose
//! tunnels it holds, as they reported themselves; the summary writer folds the entries into
//! `status.inventory`, which stays when the last agent goes (Cached, with the time it turned),
//! and every proxy reads it back so it can refuse dials for a leaf it holds no tunnel from
//! (`proxy::inventory`).
//!
//! Like the rest of the status it is written on change only: an agent reports when it starts
//! and when its allow-list or Kubernetes version changes, so a steady fleet writes nothing.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::operator::crd::remote_cluster::{
    AgentRecord, InventoryState, LeafInventory, RemoteClusterStatus,
};
use crate::protocol::control::LeafReport;
use crate::proxy::inventory::{self, Inventory};

/// Most agents kept in one entry or in the inventory (as the CRD's schema allows): a leaf runs
/// one per operator replica, and each carries up to 16 KiB of rules
/// (`MAX_REPORTED_ALLOW_BYTES`), so a `RemoteCluster` stays far below the API server's limit.
pub const MAX_AGENTS: usize = 8;

/// An agent's record in an entry, from what this proxy holds.
pub fn record(agent: &inventory::AgentRecord) -> AgentRecord {
    AgentRecord {
        replica: agent.report.replica.clone(),
        since: rfc3339(agent.since()),
        tether_version: agent.tether_version.clone(),
        protocol_version: agent.protocol.clone(),
        kubernetes_version: agent.report.kubernetes_version.clone(),
        allow: agent.report.allow.clone(),
        api_server: agent.report.api_server,
        kube_api: agent.report.kube_api,
        root_keys: agent.report.root_keys.clone(),
    }
}

/// The records of `agents`, at most [`MAX_AGENTS`].
pub fn records(agents: &[Arc<inventory::AgentRecord>]) -> Vec<AgentRecord> {
    agents.iter().take(MAX_AGENTS).map(|a| record(a)).collect()
}

/// What a proxy remembers of a leaf from its status (a proxy that never held its tunnels, or
/// restarted while it was offline).
pub fn remembered(inventory: &LeafInventory) -> Inventory {
    let agents = inventory.agents.iter().filter_map(|a| {
        let since = humantime::parse_rfc3339(&a.since).ok()?;
        let report = LeafReport {
            replica: a.replica.clone(),
            started_at: since.duration_since(UNIX_EPOCH).ok()?.as_secs(),
            kubernetes_version: a.kubernetes_version.clone(),
            allow: a.allow.clone(),
            api_server: a.api_server,
            kube_api: a.kube_api,
            root_keys: a.root_keys.clone(),
        };
        report.validate().ok()?;
        let protocol = a.protocol_version.parse().ok()?;
        Some(Arc::new(inventory::AgentRecord::new(
            a.tether_version.clone(),
            protocol,
            report,
        )))
    });
    Inventory::of_agents(agents)
}

/// The inventory `status`'s entries call for: Live from the agents they list; without any,
/// the last one kept, Cached from `now` on. `confirmedAt` moves only when something else
/// does, so an unchanged inventory is never written again.
pub fn summarize(status: &RemoteClusterStatus, now: SystemTime) -> Option<LeafInventory> {
    let mut agents: Vec<AgentRecord> = status
        .proxies
        .iter()
        .flat_map(|p| p.agents.iter().cloned())
        .collect();
    agents.sort_by(|a, b| (&a.replica, &b.since).cmp(&(&b.replica, &a.since)));
    agents.dedup_by(|later, kept| later.replica == kept.replica);
    agents.truncate(MAX_AGENTS);
    let previous = status.inventory.as_ref();
    if agents.is_empty() {
        return previous.map(|kept| match kept.state {
            InventoryState::Live => LeafInventory {
                state: InventoryState::Cached,
                confirmed_at: rfc3339(now),
                ..kept.clone()
            },
            InventoryState::Cached => kept.clone(),
        });
    }
    let live = LeafInventory {
        state: InventoryState::Live,
        confirmed_at: rfc3339(now),
        tether_version: distinct(agents.iter().map(|a| a.tether_version.as_str())),
        kubernetes_version: agents.iter().find_map(|a| a.kubernetes_version.clone()),
        allowed: distinct(
            agents
                .iter()
                .flat_map(|a| a.allow.iter().map(String::as_str)),
        ),
        agents,
    };
    match previous {
        Some(kept) if same_but_time(kept, &live) => Some(kept.clone()),
        _ => Some(live),
    }
}

/// Whether two inventories say the same but for when.
fn same_but_time(a: &LeafInventory, b: &LeafInventory) -> bool {
    LeafInventory {
        confirmed_at: String::new(),
        ..a.clone()
    } == LeafInventory {
        confirmed_at: String::new(),
        ..b.clone()
    }
}

/// The distinct values of `items`, in first-seen order, comma-separated.
fn distinct<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let mut seen: Vec<&str> = Vec::new();
    for item in items {
        if !seen.contains(&item) {
            seen.push(item);
        }
    }
    seen.join(",")
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

/// Whether a leaf offline since `since` (RFC 3339) has been away longer than `after` at `now`.
pub fn stale(since: Option<&str>, after: Option<Duration>, now: SystemTime) -> bool {
    let (Some(since), Some(after)) = (since, after) else {
        return false;
    };
    humantime::parse_rfc3339(since)
        .ok()
        .and_then(|t| now.duration_since(t).ok())
        .is_some_and(|away| away > after)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::crd::remote_cluster::{Connection, ProxyHolding};

    fn agent(replica: &str, version: &str, allow: &[&str]) -> AgentRecord {
        AgentRecord {
            replica: replica.into(),
            since: "2026-12-01T10:00:00Z".into(),
            tether_version: version.into(),
            protocol_version: "1.1".into(),
            kubernetes_version: Some("v1.37.2".into()),
            allow: allow.iter().map(|r| (*r).to_owned()).collect(),
            api_server: true,
            kube_api: false,
            root_keys: Vec::new(),
        }
    }

    fn holding(id: &str, agents: Vec<AgentRecord>) -> ProxyHolding {
        ProxyHolding {
            proxy_id: id.into(),
            connection: Connection::Online,
            tunnels: agents.len() as u32,
            since: None,
            agents,
            refused: None,
        }
    }

    #[test]
    fn the_inventory_is_live_while_agents_report_and_cached_after() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_000_000);
        let mut status = RemoteClusterStatus {
            proxies: vec![
                holding("p0", vec![agent("a", "0.2.0", &["10.0.0.0/8:*"])]),
                holding(
                    "p1",
                    vec![
                        agent("a", "0.2.0", &["10.0.0.0/8:*"]),
                        agent("b", "0.3.0", &["10.0.0.0/8:*", "db:5432"]),
                    ],
                ),
            ],
            ..Default::default()
        };
        let live = summarize(&status, t0).unwrap();
        assert_eq!(live.state, InventoryState::Live);
        assert_eq!(live.tether_version, "0.2.0,0.3.0");
        assert_eq!(live.allowed, "10.0.0.0/8:*,db:5432");
        assert_eq!(live.kubernetes_version.as_deref(), Some("v1.37.2"));
        assert_eq!(live.agents.len(), 2);
        // Unchanged later: the same inventory, time and all, so nothing is written.
        status.inventory = Some(live.clone());
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(summarize(&status, later), Some(live.clone()));
        // Every agent gone: the same view, Cached since then; and it stays so.
        status.proxies.clear();
        let cached = summarize(&status, later).unwrap();
        assert_eq!(cached.state, InventoryState::Cached);
        assert_eq!(cached.confirmed_at, rfc3339(later));
        assert_eq!(cached.agents, live.agents);
        status.inventory = Some(cached.clone());
        assert_eq!(
            summarize(&status, later + Duration::from_secs(60)),
            Some(cached.clone())
        );
        // A proxy reads it back with the allow-lists that refuse early.
        let remembered = remembered(&cached);
        assert_eq!(remembered.agents.len(), 2);
        assert!(remembered.agents.iter().all(|a| a.allow.is_some()));
    }

    #[test]
    fn staleness_counts_from_when_the_leaf_went_offline() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_000_000);
        let since = rfc3339(t0);
        let day = Duration::from_secs(86_400);
        assert!(!stale(Some(&since), Some(day), t0 + day / 2));
        assert!(stale(Some(&since), Some(day), t0 + day * 2));
        assert!(!stale(Some(&since), None, t0 + day * 2));
        assert!(!stale(None, Some(day), t0 + day * 2));
    }
}
