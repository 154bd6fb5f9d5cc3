//! Turning what the agent reports ([`PoolStatus`]) and what the reconcile decided
//! ([`SpecState`]) into this replica's view of a `ReverseTunnel`, and writing it, as this
//! replica's entry of `status.replicas`, only when it changed.
//!
//! Every operator replica runs an agent for every tunnel (see [`super::leader`]), so each
//! replica has one task per tunnel that owns its entry: the only writer of that entry, under the
//! replica's own field manager ([`super::replicas::field_manager`]), so reconciles and agent
//! events never race each other's writes, and replicas never overwrite each other. The leader
//! folds the live entries into the summary (`phase`, `proxiesReady`, conditions:
//! [`super::replicas`]). A write happens when the composed view differs from the last one
//! written (heartbeat times alone never cause one: they ride along with the next change), and
//! transition times are carried over while a condition's status holds. At rest a replica
//! writes no entry at all: its liveness is its Lease ([`super::liveness`]), one renewal every
//! 10 s whatever the number of tunnels, not a stamp per entry.
//!
//! **Telling a dead operator from a live one.** The agents run inside the operator, so when
//! every replica is gone (`kill -9`, `helm uninstall`) nothing carries the tunnel and nothing
//! can write that either: the status keeps saying `Connected 3/3`. So the leader stamps the
//! object's `observedAt` while some live replica's entry is there: on every summary it writes,
//! and at least every refresh ([`super::stamps::SEEN_REFRESH`] by default) on the tunnel's own second of the
//! period ([`super::stamps::refresh_slot`], so tunnels created together do not stamp together): at most one
//! write per tunnel per minute, whatever the number of replicas. `kubectl get rt` shows the
//! stamp's age as `SEEN`; past [`super::stamps::stale_after`] (65 s) it means no operator runs:
//!
//! ```text
//!   NAME      CLUSTER  STATUS     PROXIES  REPLICAS  SEEN   AGE
//!   to-root   root     Connected  3/3      2/2       23s    2d   a replica carries it
//!   to-root   root     Connected  3/3      2/2       7m     2d   none has for 7 minutes
//! ```

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use kube::api::{Patch, PatchParams};
use kube::{Api, Resource};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::crd::reverse_tunnel::{KeySetAnswer, Phase, ProxyState, ProxyTunnel, ReplicaHolding};
use super::crd::{ReverseTunnel, ReverseTunnelStatus};
use super::stamps::{condition, rfc3339};
use crate::agent::status::{FailureKind, PoolStatus, TunnelState};

/// Why the spec cannot be honoured, for the `Ready` condition and a Warning event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// CamelCase condition reason, e.g. `InvalidAllowList`.
    pub reason: &'static str,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// What the reconcile last decided for a tunnel: the generation it acted on and whether the
/// spec could be honoured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecState {
    /// `metadata.generation` of the spec acted on.
    pub generation: Option<i64>,
    /// Set when no agent runs because the spec (or a Secret it names) is unusable.
    pub problem: Option<Problem>,
    /// Fingerprint of the CA key that signed the running agent's certificate.
    pub identity_ca: Option<String>,
    /// Handovers under way (their numbers): while any is, an older agent still holds
    /// tunnels with its own identity, so no single identity is reported.
    pub handovers: BTreeSet<u64>,
}

/// What one replica says of a CA rotation in its entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RotationView {
    /// See [`ReplicaHolding::identity_ca`].
    pub identity_ca: Option<String>,
    /// See [`ReplicaHolding::ca_keys`].
    pub ca_keys: Option<KeySetAnswer>,
}

impl RotationView {
    /// The view for an agent run as `spec` says, whose pool reports `pool`.
    pub fn of(spec: &SpecState, pool: Option<&PoolStatus>) -> Self {
        let running = spec.problem.is_none() && pool.is_some();
        Self {
            identity_ca: spec
                .identity_ca
                .clone()
                .filter(|_| running && spec.handovers.is_empty()),
            ca_keys: pool.and_then(|p| p.ca_keys.as_ref()).map(|v| KeySetAnswer {
                issued_at: v.issued_at,
                accepted: v.refused.is_none(),
                message: v.refused.clone().unwrap_or_default(),
            }),
        }
    }
}

/// `status` without what changes on its own (the stamp, heartbeat times).
fn settled(status: &ReverseTunnelStatus) -> ReverseTunnelStatus {
    let mut s = status.clone();
    s.observed_at = None;
    s.last_heartbeat = None;
    for p in &mut s.proxies {
        p.last_heartbeat = None;
    }
    s
}

/// Whether `next` must be written over `last`: it says something new (not only newer
/// heartbeat times).
pub fn needs_write(last: Option<&ReverseTunnelStatus>, next: &ReverseTunnelStatus) -> bool {
    last.is_none_or(|last| settled(last) != settled(next))
}

/// The status for `spec` and `pool`, reusing `previous` transition times where a condition's
/// status did not change.
pub fn compose(
    spec: &SpecState,
    pool: Option<&PoolStatus>,
    previous: Option<&ReverseTunnelStatus>,
    now: SystemTime,
) -> ReverseTunnelStatus {
    let connected = pool.map_or(0, PoolStatus::connected);
    let expected = pool.map_or(0, |p| p.expected.max(connected));
    let last_error = pool.and_then(|p| p.last_error.clone());
    let (phase, ready, ready_reason, ready_message, degraded, degraded_reason) =
        match (&spec.problem, pool) {
            (Some(problem), _) => (
                Phase::Failed,
                false,
                problem.reason,
                problem.message.clone(),
                false,
                "NotRunning",
            ),
            (None, None) => (
                Phase::Pending,
                false,
                "Pending",
                "the agent is starting".to_owned(),
                false,
                "NotConnected",
            ),
            (None, Some(_)) if connected == 0 => (
                Phase::Connecting,
                false,
                last_error
                    .as_ref()
                    .map_or("Connecting", |e| failure_reason(e.kind)),
                last_error.map_or_else(|| "dialling the root's proxies".to_owned(), |e| e.message),
                false,
                "NotConnected",
            ),
            (None, Some(p)) if !p.discovered => (
                Phase::Connecting,
                false,
                "AwaitingDiscovery",
                "a proxy answered; waiting for it to announce its peers".to_owned(),
                false,
                "NotConnected",
            ),
            (None, Some(_)) if connected < expected => (
                Phase::Degraded,
                true,
                "PartiallyConnected",
                format!("{connected} of {expected} proxies hold a tunnel"),
                true,
                "ProxiesMissing",
            ),
            (None, Some(_)) => (
                Phase::Connected,
                true,
                "Connected",
                format!("{connected} of {expected} proxies hold a tunnel"),
                false,
                "AllProxiesConnected",
            ),
        };
    let previous_conditions = previous.map_or(&[][..], |p| p.conditions.as_slice());
    let condition = |type_: &str, holds: bool, reason: &str, message: String| {
        condition(
            previous_conditions,
            type_,
            holds,
            reason,
            message,
            spec.generation,
            now,
        )
    };
    let proxies: Vec<ProxyTunnel> = pool
        .map(|p| {
            p.proxies
                .iter()
                .map(|t| ProxyTunnel {
                    id: t.proxy_id.clone(),
                    state: match t.state {
                        TunnelState::Connecting => ProxyState::Connecting,
                        TunnelState::Connected => ProxyState::Connected,
                        TunnelState::Draining => ProxyState::Draining,
                    },
                    connected_since: t.connected_since.map(rfc3339),
                    last_heartbeat: t.last_heartbeat.map(rfc3339),
                })
                .collect()
        })
        .unwrap_or_default();
    let last_heartbeat = pool
        .and_then(|p| p.proxies.iter().filter_map(|t| t.last_heartbeat).max())
        .map(rfc3339);
    let degraded_message = if degraded {
        ready_message.clone()
    } else {
        String::new()
    };
    ReverseTunnelStatus {
        phase: Some(phase),
        proxies,
        connected: u32::try_from(connected).unwrap_or(u32::MAX),
        expected: u32::try_from(expected).unwrap_or(u32::MAX),
        proxies_ready: Some(format!("{connected}/{expected}")),
        last_heartbeat,
        conditions: vec![
            condition("Ready", ready, ready_reason, ready_message),
            condition("Degraded", degraded, degraded_reason, degraded_message),
        ],
        observed_generation: spec.generation,
        observed_at: None,
        replicas: Vec::new(),
        replicas_ready: None,
    }
}

/// The `Ready` reason of a tunnel no proxy holds, when the latest attempt failed for `kind`.
pub fn failure_reason(kind: FailureKind) -> &'static str {
    match kind {
        FailureKind::Unreachable => "ProxyUnreachable",
        FailureKind::TimedOut => "ProxyTimedOut",
        FailureKind::RefusedByProxy => "ProxyRefusedAgent",
        FailureKind::CertificateInvalid => "CertificateInvalid",
        FailureKind::ProxyNotTrusted => "ProxyNotTrusted",
        FailureKind::UnsupportedVersion => "UnsupportedProtocol",
        FailureKind::Other => "Connecting",
    }
}

/// Whether `reason` (a `Ready` reason) names a failure that lasts until someone acts.
pub fn needs_action(reason: &str) -> bool {
    FailureKind::ALL
        .iter()
        .any(|k| k.needs_action() && failure_reason(*k) == reason)
}

/// Everything the status task of one tunnel needs.
pub struct StatusWriter {
    /// The tunnel's namespace's `ReverseTunnel` API.
    pub api: Api<ReverseTunnel>,
    /// The tunnel's name.
    pub name: String,
    /// This replica's identity: the key of its entry and the name in its field manager.
    pub replica: String,
    /// Bumped when this replica's Lease was renewed after it may have expired: the leader
    /// may have pruned the entry meanwhile, so it is written again.
    pub epoch: watch::Receiver<u64>,
}

impl StatusWriter {
    /// Writes this replica's entry whenever `spec` or `pool` change it (or the Lease epoch
    /// moves), until `stop`; then removes the entry (the replica no longer carries the tunnel:
    /// shutdown, or the object is going).
    pub async fn run(
        mut self,
        mut spec: watch::Receiver<SpecState>,
        mut pool: watch::Receiver<Option<PoolStatus>>,
        stop: CancellationToken,
    ) {
        let mut last: Option<ReverseTunnelStatus> = None;
        let mut last_rotation: Option<RotationView> = None;
        let mut retry = Duration::from_millis(200);
        self.epoch.mark_unchanged();
        let mut epoch_open = true;
        loop {
            let now = SystemTime::now();
            let (mut next, rotation) = {
                let spec_now = spec.borrow_and_update().clone();
                let pool_now = pool.borrow_and_update().clone();
                (
                    compose(&spec_now, pool_now.as_ref(), last.as_ref(), now),
                    RotationView::of(&spec_now, pool_now.as_ref()),
                )
            };
            if needs_write(last.as_ref(), &next) || last_rotation.as_ref() != Some(&rotation) {
                next.observed_at = Some(rfc3339(now));
                match self.write(&next, &rotation).await {
                    Ok(()) => {
                        retry = Duration::from_millis(200);
                        last = Some(next);
                        last_rotation = Some(rotation);
                    }
                    Err(e) => {
                        warn!(name = %self.name, error = %e, ?retry, "status write failed; retrying");
                        tokio::select! {
                            () = stop.cancelled() => break,
                            () = tokio::time::sleep(retry) => {}
                        }
                        retry = (retry * 2).min(Duration::from_secs(30));
                        continue;
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => break,
                r = spec.changed() => if r.is_err() { break },
                r = pool.changed() => if r.is_err() { break },
                r = self.epoch.changed(), if epoch_open => match r {
                    // Written again in full on the next turn.
                    Ok(()) => last = None,
                    // The Lease task ended (shutdown): keep reporting until stopped.
                    Err(_) => epoch_open = false,
                },
            }
        }
        let withdrawn = super::replicas::withdraw(&self.api, &self.name, &self.replica);
        match tokio::time::timeout(Duration::from_secs(5), withdrawn).await {
            Ok(Ok(())) => debug!(name = %self.name, "removed this replica's status entry"),
            Ok(Err(e)) => {
                debug!(name = %self.name, error = %e, "removing this replica's status entry")
            }
            Err(_) => debug!(name = %self.name, "removing this replica's status entry timed out"),
        }
    }

    /// Applies this replica's entry (only its entry: the object's `observedAt` is the
    /// leader's).
    async fn write(
        &self,
        status: &ReverseTunnelStatus,
        rotation: &RotationView,
    ) -> Result<(), kube::Error> {
        let entry = ReplicaHolding {
            identity_ca: rotation.identity_ca.clone(),
            ca_keys: rotation.ca_keys.clone(),
            ..super::replicas::entry(&self.replica, status)
        };
        let patch = json!({
            "apiVersion": ReverseTunnel::api_version(&()),
            "kind": ReverseTunnel::kind(&()),
            "status": { "replicas": [entry] },
        });
        let manager = super::replicas::field_manager(&self.replica);
        self.api
            .patch_status(
                &self.name,
                &PatchParams::apply(&manager).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::status::{ProxyTunnelStatus, TunnelFailure};

    #[test]
    fn steady_state_composes_identically() {
        let spec = SpecState {
            generation: Some(1),
            ..SpecState::default()
        };
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let proxy = |state, since| ProxyTunnelStatus {
            proxy_id: "p1".into(),
            state,
            connected_since: since,
            last_heartbeat: since,
            carrier: None,
        };
        let mut pool = PoolStatus {
            proxies: vec![proxy(TunnelState::Connected, Some(t0))],
            expected: 1,
            discovered: false,
            last_error: None,
            ..PoolStatus::default()
        };
        // A tunnel up before its proxy announced the set is not "Connected 1/1" yet.
        let early = compose(&spec, Some(&pool), None, t0);
        assert_eq!(early.phase, Some(Phase::Connecting));
        pool.discovered = true;
        let first = compose(&spec, Some(&pool), None, t0);
        assert_eq!(first.phase, Some(Phase::Connected));
        assert_eq!(first.proxies_ready.as_deref(), Some("1/1"));
        let later = t0 + Duration::from_secs(60);
        assert_eq!(compose(&spec, Some(&pool), Some(&first), later), first);
        pool.proxies = vec![proxy(TunnelState::Connecting, None)];
        pool.last_error = Some(TunnelFailure {
            kind: FailureKind::Other,
            message: "eof".into(),
        });
        let down = compose(&spec, Some(&pool), Some(&first), later);
        assert_eq!(down.phase, Some(Phase::Connecting));
        assert_eq!(down.conditions[0].reason, "Connecting");
        assert_eq!(down.conditions[0].message, "eof");
        assert_eq!(down.proxies_ready.as_deref(), Some("0/1"));
        assert_ne!(
            down.conditions[0].last_transition_time,
            first.conditions[0].last_transition_time
        );
        // A failure that lasts until someone acts has its own reason.
        pool.last_error = Some(TunnelFailure {
            kind: FailureKind::RefusedByProxy,
            message: "the proxy refused the agent's certificate: expired".into(),
        });
        let refused = compose(&spec, Some(&pool), Some(&down), later);
        assert_eq!(refused.conditions[0].reason, "ProxyRefusedAgent");
        assert!(needs_action(&refused.conditions[0].reason));
        assert!(!needs_action("ProxyUnreachable"));
    }

    #[test]
    fn an_unchanged_entry_is_never_written_again() {
        let spec = SpecState {
            generation: Some(1),
            ..SpecState::default()
        };
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let heartbeat_at = |t| PoolStatus {
            proxies: vec![ProxyTunnelStatus {
                proxy_id: "p1".into(),
                state: TunnelState::Connected,
                connected_since: Some(t0),
                last_heartbeat: Some(t),
                carrier: None,
            }],
            expected: 1,
            discovered: true,
            last_error: None,
            ..PoolStatus::default()
        };
        let mut written = compose(&spec, Some(&heartbeat_at(t0)), None, t0);
        assert!(needs_write(None, &written));
        written.observed_at = Some(rfc3339(t0));
        // Newer heartbeats alone, however late: no write (the Lease says the replica lives).
        for later in [59, 61, 3600] {
            let later = t0 + Duration::from_secs(later);
            let next = compose(&spec, Some(&heartbeat_at(later)), Some(&written), later);
            assert!(!needs_write(Some(&written), &next), "{later:?}");
        }
        // A change is written at once.
        let later = t0 + Duration::from_secs(5);
        let mut down = heartbeat_at(later);
        down.proxies[0].state = TunnelState::Connecting;
        let changed = compose(&spec, Some(&down), Some(&written), later);
        assert!(needs_write(Some(&written), &changed));
    }

    #[test]
    fn an_identity_is_reported_only_once_no_older_agent_holds_tunnels() {
        let mut spec = SpecState {
            identity_ca: Some("SHA256:new".to_owned()),
            handovers: BTreeSet::from([3]),
            ..SpecState::default()
        };
        let pool = PoolStatus {
            ca_keys: Some(crate::agent::status::CaKeysVerdict {
                issued_at: 7,
                refused: Some("not newer".to_owned()),
            }),
            ..PoolStatus::default()
        };
        let during = RotationView::of(&spec, Some(&pool));
        assert_eq!(during.identity_ca, None);
        let answer = during.ca_keys.expect("the root's answer");
        assert_eq!((answer.issued_at, answer.accepted), (7, false));
        spec.handovers.clear();
        let after = RotationView::of(&spec, Some(&pool));
        assert_eq!(after.identity_ca.as_deref(), Some("SHA256:new"));
        // No agent runs (the spec failed, or none reported yet): no identity either.
        assert_eq!(RotationView::of(&spec, None).identity_ca, None);
    }
}
