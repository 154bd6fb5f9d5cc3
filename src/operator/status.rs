//! Turning what the agent reports ([`PoolStatus`]) and what the reconcile decided
//! ([`SpecState`]) into a `ReverseTunnel` status, and writing it only when it changed.
//!
//! One task per tunnel owns the status: it is the only writer, under one field manager, so
//! reconciles and agent events never race each other's writes. A write happens when the
//! composed status differs from the last one written (or read from the object at start), and
//! transition times are carried over while a condition's status holds.
//!
//! **Telling a dead operator from a live one.** The agents run inside the operator, so when
//! every replica is gone (`kill -9`, `helm uninstall`) nothing carries the tunnel and nothing
//! can write that either: the status keeps saying `Connected 3/3`. So every write stamps
//! `observedAt`, and a status that did not change is stamped again every [`SEEN_REFRESH`]
//! (one write per tunnel per minute, the whole cost at rest). `kubectl get rt` shows its age
//! as `SEEN`:
//!
//! ```text
//!   NAME      CLUSTER  STATUS     PROXIES  SEEN   AGE
//!   to-root   root     Connected  3/3      23s    2d     an operator carries it (SEEN ≤ 61s)
//!   to-root   root     Connected  3/3      7m     2d     nobody has for 7 minutes
//! ```
//!
//! Heartbeat times alone never cause a write: they ride along with the next refresh.
//!
//! **Spreading the stamps.** An operator that starts with 1,000 tunnels connects them within
//! seconds; stamped again "a minute after the last write", they would stay in lock-step and
//! hit the API server with 1,000 writes in the same second of every minute. Each tunnel
//! therefore has its own second of the minute, its [`RefreshSlot`] (a hash of its namespace and
//! name), and is restamped at the first such second more than a second after its last stamp:
//! never more than 61 s after it (so `SEEN ≤ 61s` still means carried), exactly a minute apart
//! at rest (one write per tunnel per minute), and the first refresh after a change comes
//! earlier, once, to move onto the slot. 1,000 tunnels then write ~17 stamps a second instead
//! of 1,000 at once.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Resource};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::FIELD_MANAGER;
use super::crd::reverse_tunnel::{Phase, ProxyState, ProxyTunnel};
use super::crd::{Condition, ConditionStatus, ReverseTunnel, ReverseTunnelStatus};
use crate::agent::status::{PoolStatus, TunnelState};

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
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// How often an unchanged status is stamped again, so that `observedAt` older than this (and a
/// second: the stamp drops fractions) means no operator carries the tunnel.
pub const SEEN_REFRESH: Duration = Duration::from_secs(60);

/// The second of each minute at which one tunnel's unchanged status is stamped again, so that
/// many tunnels' stamps spread over the minute instead of falling together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshSlot {
    /// Seconds past the minute, below `SEEN_REFRESH`'s seconds.
    second: u64,
}

impl RefreshSlot {
    /// The slot of the tunnel `namespace/name`: FNV-1a of the key (stable across restarts and
    /// replicas, so a new operator keeps the spread its predecessor had).
    pub fn of(namespace: &str, name: &str) -> Self {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in namespace.bytes().chain([b'/']).chain(name.bytes()) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        Self {
            second: hash % SEEN_REFRESH.as_secs(),
        }
    }

    /// The first instant on this slot more than a second after `stamped`: within
    /// (`stamped` + 1 s, `stamped` + `SEEN_REFRESH` + 1 s], the second being what the stamp
    /// drops.
    fn next_after(self, stamped: SystemTime) -> SystemTime {
        let period = SEEN_REFRESH.as_secs();
        let base = stamped
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            + 1;
        let wait = match (self.second + period - base % period) % period {
            0 => period,
            w => w,
        };
        SystemTime::UNIX_EPOCH + Duration::from_secs(base + wait)
    }
}

/// When `last` must be stamped again, or `None` if it carries no readable stamp.
fn refresh_due(last: &ReverseTunnelStatus, slot: RefreshSlot) -> Option<SystemTime> {
    let stamped = humantime::parse_rfc3339(last.observed_at.as_deref()?).ok()?;
    Some(slot.next_after(stamped))
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

/// Whether `next` must be written over `last` at `now`: it says something new, or the stamp
/// of `last` is due on the tunnel's `slot`.
pub fn needs_write(
    last: Option<&ReverseTunnelStatus>,
    next: &ReverseTunnelStatus,
    slot: RefreshSlot,
    now: SystemTime,
) -> bool {
    let Some(last) = last else { return true };
    settled(last) != settled(next) || refresh_due(last, slot).is_none_or(|due| now >= due)
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
                "Connecting",
                last_error.unwrap_or_else(|| "dialling the root's proxies".to_owned()),
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
    }
}

/// A condition of `type_`, keeping its `lastTransitionTime` from `previous` while its status
/// holds (so an unchanged condition is byte-identical and causes no write).
pub fn condition(
    previous: &[Condition],
    type_: &str,
    holds: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: SystemTime,
) -> Condition {
    let status = if holds {
        ConditionStatus::True
    } else {
        ConditionStatus::False
    };
    let since = previous
        .iter()
        .find(|c| c.type_ == type_)
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| rfc3339(now));
    Condition {
        type_: type_.to_owned(),
        status,
        reason: reason.to_owned(),
        message,
        last_transition_time: since,
        observed_generation: generation,
    }
}

/// The Event announcing a phase change, if the change is one users care about.
fn phase_event(before: Option<Phase>, after: &ReverseTunnelStatus) -> Option<Event> {
    let after_phase = after.phase?;
    if before == Some(after_phase) {
        return None;
    }
    let message = after
        .conditions
        .first()
        .map(|c| c.message.clone())
        .unwrap_or_default();
    let (type_, reason) = match after_phase {
        Phase::Connected => (EventType::Normal, "Connected".to_owned()),
        Phase::Degraded => (EventType::Warning, "Degraded".to_owned()),
        Phase::Connecting if matches!(before, Some(Phase::Connected | Phase::Degraded)) => {
            (EventType::Warning, "Disconnected".to_owned())
        }
        Phase::Failed => (
            EventType::Warning,
            after
                .conditions
                .first()
                .map_or_else(|| "Failed".to_owned(), |c| c.reason.clone()),
        ),
        Phase::Pending | Phase::Connecting => return None,
    };
    Some(Event {
        type_,
        reason,
        note: Some(message.chars().take(1000).collect()),
        action: "Reconcile".to_owned(),
        secondary: None,
    })
}

/// Everything the status task of one tunnel needs.
pub struct StatusWriter {
    /// The tunnel's namespace's `ReverseTunnel` API.
    pub api: Api<ReverseTunnel>,
    /// The tunnel's name.
    pub name: String,
    /// Publishes Events on the tunnel.
    pub recorder: Recorder,
    /// The tunnel, as Events refer to it.
    pub reference: ObjectReference,
    /// The status the object carried when the task started.
    pub last: Option<ReverseTunnelStatus>,
}

impl StatusWriter {
    /// Writes the status whenever `spec` or `pool` change it, and stamps it again every
    /// [`SEEN_REFRESH`] on the tunnel's [`RefreshSlot`], until `stop`.
    pub async fn run(
        mut self,
        mut spec: watch::Receiver<SpecState>,
        mut pool: watch::Receiver<Option<PoolStatus>>,
        stop: CancellationToken,
    ) {
        let namespace = self.reference.namespace.clone().unwrap_or_default();
        let slot = RefreshSlot::of(&namespace, &self.name);
        let mut retry = Duration::from_millis(200);
        loop {
            let now = SystemTime::now();
            let mut next = {
                let spec_now = spec.borrow_and_update().clone();
                let pool_now = pool.borrow_and_update().clone();
                compose(&spec_now, pool_now.as_ref(), self.last.as_ref(), now)
            };
            if needs_write(self.last.as_ref(), &next, slot, now) {
                next.observed_at = Some(rfc3339(now));
                match self.write(&next).await {
                    Ok(()) => {
                        retry = Duration::from_millis(200);
                        let before = self.last.as_ref().and_then(|s| s.phase);
                        if let Some(event) = phase_event(before, &next)
                            && let Err(e) = self.recorder.publish(&event, &self.reference).await
                        {
                            debug!(name = %self.name, error = %e, "could not publish an Event");
                        }
                        self.last = Some(next);
                    }
                    Err(e) => {
                        warn!(name = %self.name, error = %e, ?retry, "status write failed; retrying");
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(retry) => {}
                        }
                        retry = (retry * 2).min(Duration::from_secs(30));
                        continue;
                    }
                }
            }
            let due = self.last.as_ref().and_then(|last| refresh_due(last, slot));
            let until_due = due.map_or(SEEN_REFRESH, |due| {
                due.duration_since(SystemTime::now()).unwrap_or_default()
            });
            tokio::select! {
                () = stop.cancelled() => return,
                r = spec.changed() => if r.is_err() { return },
                r = pool.changed() => if r.is_err() { return },
                () = tokio::time::sleep(until_due) => {}
            }
        }
    }

    async fn write(&self, status: &ReverseTunnelStatus) -> Result<(), kube::Error> {
        let patch = json!({
            "apiVersion": ReverseTunnel::api_version(&()),
            "kind": ReverseTunnel::kind(&()),
            "status": status,
        });
        self.api
            .patch_status(
                &self.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::status::ProxyTunnelStatus;
    use std::collections::BTreeMap;

    #[test]
    fn steady_state_composes_identically() {
        let spec = SpecState {
            generation: Some(1),
            problem: None,
        };
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let proxy = |state, since| ProxyTunnelStatus {
            proxy_id: "p1".into(),
            state,
            connected_since: since,
            last_heartbeat: since,
        };
        let mut pool = PoolStatus {
            proxies: vec![proxy(TunnelState::Connected, Some(t0))],
            expected: 1,
            discovered: false,
            last_error: None,
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
        pool.last_error = Some("eof".into());
        let down = compose(&spec, Some(&pool), Some(&first), later);
        assert_eq!(down.phase, Some(Phase::Connecting));
        assert_eq!(down.proxies_ready.as_deref(), Some("0/1"));
        assert_ne!(
            down.conditions[0].last_transition_time,
            first.conditions[0].last_transition_time
        );
        let event = phase_event(first.phase, &down).map(|e| e.reason);
        assert_eq!(event.as_deref(), Some("Disconnected"));
    }

    #[test]
    fn an_unchanged_status_is_stamped_again_once_a_minute() {
        let spec = SpecState {
            generation: Some(1),
            problem: None,
        };
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let heartbeat_at = |t| PoolStatus {
            proxies: vec![ProxyTunnelStatus {
                proxy_id: "p1".into(),
                state: TunnelState::Connected,
                connected_since: Some(t0),
                last_heartbeat: Some(t),
            }],
            expected: 1,
            discovered: true,
            last_error: None,
        };
        let slot = RefreshSlot::of("default", "to-root");
        let mut written = compose(&spec, Some(&heartbeat_at(t0)), None, t0);
        assert!(needs_write(None, &written, slot, t0));
        written.observed_at = Some(rfc3339(t0));
        // The first refresh falls on the tunnel's slot, within the minute and the second the
        // stamp drops.
        let due = slot.next_after(t0);
        assert!(
            due > t0 + Duration::from_secs(1) && due <= t0 + SEEN_REFRESH + Duration::from_secs(1)
        );
        // A newer heartbeat alone: no write before the slot.
        let early = due - Duration::from_secs(1);
        let next = compose(&spec, Some(&heartbeat_at(early)), Some(&written), early);
        assert!(!needs_write(Some(&written), &next, slot, early));
        // On the slot: stamped again, heartbeat included; from then on a minute apart.
        assert!(needs_write(Some(&written), &next, slot, due));
        let mut restamped = next.clone();
        restamped.observed_at = Some(rfc3339(due));
        assert_eq!(refresh_due(&restamped, slot), Some(due + SEEN_REFRESH));
        // A change is written at once.
        let mut down = heartbeat_at(early);
        down.proxies[0].state = TunnelState::Connecting;
        let changed = compose(&spec, Some(&down), Some(&written), early);
        assert!(needs_write(Some(&written), &changed, slot, early));
        // A status read back without a stamp (written by an older operator) is stamped.
        written.observed_at = None;
        assert!(needs_write(Some(&written), &next, slot, early));
    }

    /// 1,000 tunnels connected in the same second (an operator starting) must not restamp in
    /// the same second of every minute: their stamps spread over the minute, each still within
    /// 61 s of the last one and a minute apart at rest.
    #[test]
    fn the_stamps_of_many_tunnels_spread_over_the_minute() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_007);
        let mut per_second: BTreeMap<SystemTime, usize> = BTreeMap::new();
        for i in 0..1000 {
            let slot = RefreshSlot::of("fleet", &format!("rt-{i}"));
            let stamped = ReverseTunnelStatus {
                observed_at: Some(rfc3339(t0)),
                ..Default::default()
            };
            let first = refresh_due(&stamped, slot).expect("a readable stamp");
            let age = first.duration_since(t0).expect("after the stamp");
            assert!(
                age > Duration::from_secs(1) && age <= SEEN_REFRESH + Duration::from_secs(1),
                "rt-{i} restamped {age:?} after its stamp"
            );
            let again = ReverseTunnelStatus {
                observed_at: Some(rfc3339(first)),
                ..Default::default()
            };
            assert_eq!(refresh_due(&again, slot), Some(first + SEEN_REFRESH));
            *per_second.entry(first).or_default() += 1;
        }
        // 1,000 over 60 seconds is ~17 a second; lock-step would be 1,000 in one.
        let busiest = per_second.values().copied().max().unwrap_or_default();
        assert!(
            per_second.len() >= 55 && busiest <= 40,
            "{} distinct seconds, busiest {busiest}: {per_second:?}",
            per_second.len()
        );
    }
}
