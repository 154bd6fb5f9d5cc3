//! Events whose message says what is true now.
//!
//! kube's `Recorder` folds an Event repeated on one object (same type, reason and action) into
//! a series: the count and last time move, the note stays the first one. A tunnel that went
//! `Degraded` at "1 of 3 proxies" and again, an hour's worth of churn later, at "4 of 5" kept
//! showing "1 of 3" (#14). [`EventPublisher`] keeps the series for a true repeat (the same
//! note) and starts a new Event when the note changed, so `kubectl describe` and
//! `kubectl events` read current.
//!
//! [`transition_event`] decides which changes of a tunnel's summary earn an Event: a Warning
//! when something broke (a proxy's tunnel lost, every tunnel lost, a failure that lasts until
//! someone changes a certificate or the root's trust), a Normal one when it comes up or grows,
//! and nothing for changes that only move counts or times.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use super::crd::ReverseTunnelStatus;
use super::crd::reverse_tunnel::{Phase, ProxyState};
use super::status::needs_action;

/// How long a series stays open: kube's `Recorder` forgets an Event this long after it was
/// last seen, so a note remembered longer would never be folded again anyway.
const SERIES_TTL: Duration = Duration::from_secs(6 * 60);

/// One object's Event of one type and reason: what the publisher last said of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SeriesKey {
    /// The object (its UID, else its namespace and name).
    object: String,
    /// Normal or Warning.
    type_: EventType,
    /// The Event's reason.
    reason: String,
}

/// The last Event of one [`SeriesKey`].
struct Series {
    /// Its note: a repeat with the same note joins the series.
    note: Option<String>,
    /// The recorder holding the series (kube's cache of it).
    recorder: Recorder,
    /// When it was last published, to forget it after [`SERIES_TTL`].
    at: Instant,
}

/// Publishes Events for the operator (one per replica, shared through its `Context`).
pub struct EventPublisher {
    /// For a new recorder when a note changes.
    client: Client,
    /// Who reports: the operator and this replica.
    reporter: Reporter,
    /// The open series; entries go after [`SERIES_TTL`], so deleted objects leave nothing.
    series: Mutex<HashMap<SeriesKey, Series>>,
}

impl EventPublisher {
    /// A publisher reporting as `reporter`.
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self {
            client,
            reporter,
            series: Mutex::default(),
        }
    }

    /// Publishes `event` on `reference`: into the open series if its note is the series' note,
    /// else as a new Event.
    pub async fn publish(
        &self,
        event: &Event,
        reference: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let (recorder, _) = self.recorder_for(event, reference);
        recorder.publish(event, reference).await
    }

    /// The recorder whose series `event` joins, and whether it is a new one (the note
    /// changed, or no series is open).
    fn recorder_for(&self, event: &Event, reference: &ObjectReference) -> (Recorder, bool) {
        let key = SeriesKey {
            object: reference.uid.clone().unwrap_or_else(|| {
                format!(
                    "{}/{}",
                    reference.namespace.as_deref().unwrap_or_default(),
                    reference.name.as_deref().unwrap_or_default()
                )
            }),
            type_: event.type_,
            reason: event.reason.clone(),
        };
        let now = Instant::now();
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        series.retain(|_, s| now.duration_since(s.at) < SERIES_TTL);
        match series.get_mut(&key) {
            Some(open) if open.note == event.note => {
                open.at = now;
                (open.recorder.clone(), false)
            }
            _ => {
                let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
                series.insert(
                    key,
                    Series {
                        note: event.note.clone(),
                        recorder: recorder.clone(),
                        at: now,
                    },
                );
                (recorder, true)
            }
        }
    }

    /// Open series (for tests).
    #[cfg(test)]
    fn open(&self) -> usize {
        self.series.lock().map(|s| s.len()).unwrap_or_default()
    }
}

/// The `Ready` condition's reason and message.
fn ready(status: &ReverseTunnelStatus) -> (&str, &str) {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map_or(("", ""), |c| (c.reason.as_str(), c.message.as_str()))
}

/// Whether some proxy that held a tunnel in `before` has lost it in `after` (a drain, or a
/// proxy no longer announced, is not a loss).
fn lost_a_proxy(before: &ReverseTunnelStatus, after: &ReverseTunnelStatus) -> bool {
    before
        .proxies
        .iter()
        .filter(|p| p.state == ProxyState::Connected)
        .any(|p| {
            after
                .proxies
                .iter()
                .any(|q| q.id == p.id && q.state == ProxyState::Connecting)
        })
}

/// The Event that the change of a tunnel's summary from `before` to `after` calls for, if any:
///
/// | to | from | Event |
/// | --- | --- | --- |
/// | Connected | anything else | Normal `Connected` |
/// | Degraded | a summary in which a proxy now lost held a tunnel | Warning `Degraded` |
/// | Degraded | coming up, or a proxy added | Normal `PartiallyConnected` |
/// | Connecting, for a failure that needs action | another reason | Warning, that reason (`ProxyRefusedAgent`, `CertificateInvalid`, `ProxyNotTrusted`) |
/// | Connecting | Connected or Degraded | Warning `Disconnected` |
/// | Failed | another reason | Warning, that reason |
///
/// A change of counts or times within one phase and reason earns none.
pub fn transition_event(
    before: &ReverseTunnelStatus,
    after: &ReverseTunnelStatus,
) -> Option<Event> {
    let phase = after.phase?;
    let (reason, message) = ready(after);
    if before.phase == Some(phase) && ready(before).0 == reason {
        return None;
    }
    let (type_, reason) = match phase {
        Phase::Connected => (EventType::Normal, "Connected"),
        Phase::Degraded if lost_a_proxy(before, after) => (EventType::Warning, "Degraded"),
        Phase::Degraded => (EventType::Normal, "PartiallyConnected"),
        Phase::Connecting if needs_action(reason) => (EventType::Warning, reason),
        Phase::Connecting if matches!(before.phase, Some(Phase::Connected | Phase::Degraded)) => {
            (EventType::Warning, "Disconnected")
        }
        Phase::Failed => (EventType::Warning, reason),
        Phase::Pending | Phase::Connecting => return None,
    };
    Some(Event {
        type_,
        reason: reason.to_owned(),
        note: Some(message.chars().take(1000).collect()),
        action: "Reconcile".to_owned(),
        secondary: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> Client {
        let config = kube::Config::new("http://127.0.0.1:9".parse().expect("url"));
        Client::try_from(config).expect("client")
    }

    fn event(reason: &str, note: &str) -> Event {
        Event {
            type_: EventType::Warning,
            reason: reason.to_owned(),
            note: Some(note.to_owned()),
            action: "Reconcile".to_owned(),
            secondary: None,
        }
    }

    fn reference(uid: &str) -> ObjectReference {
        ObjectReference {
            uid: Some(uid.to_owned()),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_repeated_note_joins_its_series_and_a_new_note_starts_one() {
        let publisher = EventPublisher::new(
            client(),
            Reporter {
                controller: "test".to_owned(),
                instance: None,
            },
        );
        let new = |reason: &str, note: &str, uid: &str| {
            publisher
                .recorder_for(&event(reason, note), &reference(uid))
                .1
        };
        assert!(new("Degraded", "1 of 3", "a"));
        assert!(!new("Degraded", "1 of 3", "a"), "a repeat joins the series");
        assert!(
            new("Degraded", "4 of 5", "a"),
            "a new note starts a new Event"
        );
        assert!(!new("Degraded", "4 of 5", "a"));
        assert_eq!(publisher.open(), 1, "the new note replaced the series");
        assert!(new("Degraded", "4 of 5", "b"), "another object has its own");
        assert!(
            new("Connected", "4 of 5", "a"),
            "another reason has its own"
        );
        assert_eq!(publisher.open(), 3);
    }

    /// A summary in `phase` for `reason`, with each proxy of `proxies` in its state.
    fn summary(phase: Phase, reason: &str, proxies: &[(&str, ProxyState)]) -> ReverseTunnelStatus {
        use crate::operator::crd::{Condition, ConditionStatus};
        ReverseTunnelStatus {
            phase: Some(phase),
            proxies: proxies
                .iter()
                .map(
                    |(id, state)| crate::operator::crd::reverse_tunnel::ProxyTunnel {
                        id: (*id).to_owned(),
                        state: *state,
                        connected_since: None,
                        last_heartbeat: None,
                    },
                )
                .collect(),
            conditions: vec![Condition {
                type_: "Ready".to_owned(),
                status: ConditionStatus::Unknown,
                reason: reason.to_owned(),
                message: format!("{reason} message"),
                last_transition_time: String::new(),
                observed_generation: None,
            }],
            ..Default::default()
        }
    }

    fn said(
        before: &ReverseTunnelStatus,
        after: &ReverseTunnelStatus,
    ) -> Option<(EventType, String)> {
        transition_event(before, after).map(|e| (e.type_, e.reason))
    }

    #[test]
    fn coming_up_and_scaling_up_are_normal_and_losing_a_proxy_warns() {
        use ProxyState::{Connected, Connecting, Draining};
        let nothing = ReverseTunnelStatus::default();
        let dialling = summary(Phase::Connecting, "Connecting", &[]);
        let one_of_three = summary(
            Phase::Degraded,
            "PartiallyConnected",
            &[("p1", Connected), ("p2", Connecting), ("p3", Connecting)],
        );
        let all_three = summary(
            Phase::Connected,
            "Connected",
            &[("p1", Connected), ("p2", Connected), ("p3", Connected)],
        );
        let p4_added = summary(
            Phase::Degraded,
            "PartiallyConnected",
            &[
                ("p1", Connected),
                ("p2", Connected),
                ("p3", Connected),
                ("p4", Connecting),
            ],
        );
        let p3_lost = summary(
            Phase::Degraded,
            "PartiallyConnected",
            &[("p1", Connected), ("p2", Connected), ("p3", Connecting)],
        );
        let p3_draining = summary(
            Phase::Degraded,
            "PartiallyConnected",
            &[("p1", Connected), ("p2", Connected), ("p3", Draining)],
        );
        let normal = |reason: &str| Some((EventType::Normal, reason.to_owned()));
        let warning = |reason: &str| Some((EventType::Warning, reason.to_owned()));
        assert_eq!(said(&nothing, &dialling), None);
        assert_eq!(said(&dialling, &one_of_three), normal("PartiallyConnected"));
        assert_eq!(said(&one_of_three, &all_three), normal("Connected"));
        assert_eq!(said(&all_three, &p4_added), normal("PartiallyConnected"));
        assert_eq!(said(&all_three, &p3_draining), normal("PartiallyConnected"));
        assert_eq!(said(&all_three, &p3_lost), warning("Degraded"));
        assert_eq!(
            said(&p3_lost, &all_three),
            normal("Connected"),
            "a reconnect"
        );
        assert_eq!(said(&p3_lost, &one_of_three), None, "only the counts moved");
        assert_eq!(said(&all_three, &dialling), warning("Disconnected"));
    }

    #[test]
    fn a_failure_that_needs_action_warns_once_and_one_that_passes_does_not() {
        let dialling = summary(Phase::Connecting, "Connecting", &[]);
        let refused = summary(Phase::Connecting, "ProxyRefusedAgent", &[]);
        let expired = summary(Phase::Connecting, "CertificateInvalid", &[]);
        let untrusted = summary(Phase::Connecting, "ProxyNotTrusted", &[]);
        let unreachable = summary(Phase::Connecting, "ProxyUnreachable", &[]);
        let warning = |reason: &str| Some((EventType::Warning, reason.to_owned()));
        assert_eq!(said(&dialling, &refused), warning("ProxyRefusedAgent"));
        assert_eq!(said(&refused, &refused), None, "the retries repeat nothing");
        assert_eq!(said(&refused, &expired), warning("CertificateInvalid"));
        assert_eq!(said(&dialling, &untrusted), warning("ProxyNotTrusted"));
        assert_eq!(
            said(&dialling, &unreachable),
            None,
            "a proxy may be restarting"
        );
        let note = transition_event(&dialling, &refused).and_then(|e| e.note);
        assert_eq!(note.as_deref(), Some("ProxyRefusedAgent message"));
        let failed = summary(Phase::Failed, "SecretMissing", &[]);
        assert_eq!(said(&dialling, &failed), warning("SecretMissing"));
    }
}
