//! What the root knows of each leaf from its agents' reports (the seed's `CachingAccessPoint`):
//! which agents run, of which release, on which Kubernetes version, enforcing which
//! allow-list; live while their tunnels carry the reports, remembered after.
//!
//! The remembered allow-lists let the root refuse, without a round trip, a dial every agent of
//! the leaf would refuse, in the agent's own words ([`crate::egress::connect::precheck`]). The
//! cache may refuse, never permit: the agent still judges every dial it receives, a name is
//! refused only when no rule could permit it after resolution, and a leaf with an agent whose
//! list is unknown (a 1.0 agent sends none) is never refused here.
//!
//! A changed allow-list reaches the root with the agent's next message (the agent watches its
//! list), so a widened list is refused here for at most that long; a replica holding none of
//! the leaf's tunnels learns it from the `RemoteCluster` (another replica's entry, then the
//! summary: about a second), and meanwhile refuses what it would otherwise have forwarded.
//!
//! ```text
//!   dial to leaf-1 10.9.9.9:22      agents report [10.0.0.0/8:5432]
//!   before: proxy ─ channel open ─▶ agent ─ "not in the agent's allow-list" ─▶ client (1 RTT)
//!   now:    proxy ─ "10.9.9.9:22 is not in the agent's allow-list" ─▶ client (no RTT; also
//!           while the leaf is offline, where before the client learnt only that it was)
//! ```

use std::sync::Arc;
use std::time::SystemTime;

use crate::egress::allow_list::AllowList;
use crate::egress::connect::precheck;
use crate::protocol::control::LeafReport;
use crate::protocol::{ClusterName, DialError, Endpoint, ProtocolVersion};

/// One agent as it reported itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AgentRecord {
    /// The agent's Tether release (from its hello).
    pub tether_version: String,
    /// The protocol version spoken with it.
    pub protocol: String,
    /// What it reported.
    #[serde(flatten)]
    pub report: LeafReport,
    /// Its allow-list as this proxy reads it; `None` when a rule does not parse here (a newer
    /// agent's rule form): no dial is refused on its account then.
    #[serde(skip)]
    pub allow: Option<AllowList>,
}

impl AgentRecord {
    /// A record of `report`, from an agent of `tether_version` speaking `protocol`.
    pub fn new(tether_version: String, protocol: ProtocolVersion, report: LeafReport) -> Self {
        Self {
            allow: AllowList::parse(&report.allow).ok(),
            tether_version,
            protocol: protocol.to_string(),
            report,
        }
    }

    /// When the agent started.
    pub fn since(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(self.report.started_at)
    }

    /// The agent's own refusal of `endpoint` in `cluster`, if it would certainly refuse it
    /// whatever names resolve to.
    fn refusal(&self, cluster: &ClusterName, endpoint: &Endpoint) -> Option<DialError> {
        match endpoint {
            Endpoint::Host { host, port } => precheck(self.allow.as_ref()?, host, *port).err(),
            Endpoint::ApiServer => (!self.report.api_server).then(DialError::no_api_server),
            Endpoint::KubeApi => (!self.report.kube_api).then(|| DialError::no_kube_api(cluster)),
        }
    }
}

/// A leaf's agents, as last reported.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    /// One record per agent replica.
    pub agents: Vec<Arc<AgentRecord>>,
}

impl Inventory {
    /// The agents' refusal of `endpoint` when every one of them would refuse it; `None` when
    /// any might permit it, or nothing is known.
    pub fn refusal(&self, cluster: &ClusterName, endpoint: &Endpoint) -> Option<DialError> {
        let mut refusals = self.agents.iter().map(|a| a.refusal(cluster, endpoint));
        let first = refusals.next()??;
        refusals.all(|r| r.is_some()).then_some(first)
    }

    /// Records of several tunnels, one per agent replica (an agent holds a tunnel to each
    /// proxy, and two briefly while it reconnects), sorted by replica.
    pub fn of_agents(records: impl IntoIterator<Item = Arc<AgentRecord>>) -> Self {
        let mut agents: Vec<Arc<AgentRecord>> = records.into_iter().collect();
        agents.sort_by(|a, b| {
            (&a.report.replica, b.report.started_at).cmp(&(&b.report.replica, a.report.started_at))
        });
        agents.dedup_by(|later, kept| later.report.replica == kept.report.replica);
        Self { agents }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::DialErrorKind;

    fn agent(replica: &str, allow: &[&str]) -> Arc<AgentRecord> {
        let report = LeafReport {
            replica: replica.into(),
            started_at: 1_764_000_000,
            kubernetes_version: None,
            allow: allow.iter().map(|r| (*r).to_owned()).collect(),
            api_server: false,
            kube_api: true,
            root_keys: Vec::new(),
        };
        Arc::new(AgentRecord::new(
            "0.2.0".into(),
            ProtocolVersion::CURRENT,
            report,
        ))
    }

    fn host(host: &str, port: u16) -> Endpoint {
        Endpoint::host(host, port).unwrap()
    }

    #[test]
    fn a_dial_is_refused_only_when_every_agent_would_refuse_it() {
        let leaf: ClusterName = "leaf-1".parse().unwrap();
        let one = Inventory::of_agents([agent("a", &["10.0.0.0/8:5432"])]);
        let refused = one.refusal(&leaf, &host("10.9.9.9", 22)).unwrap();
        assert_eq!(refused.kind, DialErrorKind::Forbidden);
        assert_eq!(
            refused.message,
            "10.9.9.9:22 is not in the agent's allow-list"
        );
        assert!(one.refusal(&leaf, &host("10.9.9.9", 5432)).is_none());
        // A name the address rule might cover after resolution is left to the agent.
        assert!(one.refusal(&leaf, &host("db.internal", 5432)).is_none());
        assert!(one.refusal(&leaf, &host("db.internal", 22)).is_some());
        // A rolling update: one agent permits it, so the root does not refuse.
        let two = Inventory::of_agents([
            agent("a", &["10.0.0.0/8:5432"]),
            agent("b", &["10.0.0.0/8:*"]),
        ]);
        assert!(two.refusal(&leaf, &host("10.9.9.9", 22)).is_none());
        assert!(
            Inventory::default()
                .refusal(&leaf, &host("10.9.9.9", 22))
                .is_none()
        );
    }

    #[test]
    fn special_endpoints_follow_what_the_agents_serve() {
        let leaf: ClusterName = "leaf-1".parse().unwrap();
        let inv = Inventory::of_agents([agent("a", &[])]);
        assert_eq!(
            inv.refusal(&leaf, &Endpoint::ApiServer),
            Some(DialError::no_api_server())
        );
        assert!(inv.refusal(&leaf, &Endpoint::KubeApi).is_none());
    }

    #[test]
    fn an_unreadable_list_never_refuses() {
        let leaf: ClusterName = "leaf-1".parse().unwrap();
        let inv = Inventory::of_agents([agent("a", &["a-rule-of-a-later-release"])]);
        assert!(inv.agents[0].allow.is_none());
        assert!(inv.refusal(&leaf, &host("10.9.9.9", 22)).is_none());
    }

    #[test]
    fn one_record_per_replica_the_newest() {
        let mut newer = (*agent("a", &["10.0.0.0/8:*"])).clone();
        newer.report.started_at += 60;
        let inv = Inventory::of_agents([agent("a", &[]), Arc::new(newer), agent("b", &[])]);
        let replicas: Vec<_> = inv
            .agents
            .iter()
            .map(|a| a.report.replica.as_str())
            .collect();
        assert_eq!(replicas, ["a", "b"]);
        assert_eq!(inv.agents[0].report.allow, ["10.0.0.0/8:*"]);
    }
}
