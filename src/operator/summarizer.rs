//! The leader's half of the `ReverseTunnel` status: folding the live replicas' entries into the
//! summary, pruning dead replicas' entries, and stamping `observedAt` ([`super::replicas`] has
//! the pure parts).
//!
//! The loop looks at a tunnel when the watch shows it changed, when its stamp is due (once a
//! refresh, on the tunnel's own second: 1,000 tunnels make about 17 stamps a second, not 1,000
//! in one), and all of them when the replicas' Leases say a replica died or came back. It reads
//! the Leases of the replicas named in the entries every `poll` (half the Lease, at most 10 s):
//! O(replicas) reads, no writes. So a dead replica's entries stop counting within its Lease, the
//! clock-skew margin and one poll after its last renewal (about 25 s with the default 15 s
//! Lease).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use futures::{FutureExt, StreamExt};
use kube::api::{Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::crd::{ReverseTunnel, ReverseTunnelStatus};
use super::liveness::{LeaseReader, Liveness};
use super::replicas::{Stamp, plan, settled, write_summary};
use super::status::{phase_event, refresh_slot};

/// Changes closer together than this are summarized once.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// How long a summary written may take to come back through the watch before the store is
/// believed over it.
const STORE_LAG: Duration = Duration::from_secs(5);
/// The longest the leader goes without reading the replicas' Leases.
const MAX_POLL: Duration = Duration::from_secs(10);

type Guarded = DeserializeGuard<ReverseTunnel>;
type Key = ObjectRef<Guarded>;

/// How often the leader reads the replicas' Leases for a Lease of `duration`.
pub fn poll_for(duration: Duration) -> Duration {
    (duration / 2).clamp(Duration::from_secs(1), MAX_POLL)
}

/// What the leader needs besides the API.
pub struct Summarizer {
    /// The API client.
    pub client: Client,
    /// Publishes phase-change Events.
    pub recorder: Recorder,
    /// Reads the replicas' Leases.
    pub leases: LeaseReader,
    /// How often the Leases are read.
    pub poll: Duration,
    /// The stamp period (`--status-refresh`).
    pub refresh: Duration,
}

/// The loop's memory between passes.
#[derive(Default)]
struct State {
    /// What this leader wrote per tunnel and the watch has not shown yet, so a pass in between
    /// does not write it again.
    written: HashMap<Key, (ReverseTunnelStatus, Instant)>,
    /// When each tunnel's stamp is due next.
    due: HashMap<Key, SystemTime>,
    /// Tunnels the watch showed changed since their last look.
    dirty: HashSet<Key>,
    /// What the Leases said at the last read.
    liveness: BTreeMap<String, Liveness>,
    /// When the Leases were last read.
    read_at: Option<Instant>,
}

impl Summarizer {
    /// Keeps every `ReverseTunnel`'s summary up to date until `stop`.
    pub async fn run(self, namespace: Option<&str>, stop: CancellationToken) {
        let api: Api<Guarded> = match namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        };
        let (store, writer) = reflector::store();
        let mut events = watcher(api, watcher::Config::default().any_semantic())
            .default_backoff()
            .reflect(writer)
            .boxed();
        let mut state = State::default();
        let mut everything = true;
        // The first list, in full, before the first pass (the stream fills the store only
        // while polled).
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
            if state.read_at.is_none_or(|at| at.elapsed() >= self.poll) {
                everything |= self.read_leases(&store, &mut state).await;
            }
            let keys: Vec<Key> = if everything {
                store
                    .state()
                    .iter()
                    .map(|o| ObjectRef::from_obj(&**o))
                    .collect()
            } else {
                let now = SystemTime::now();
                let due = state.due.iter().filter(|(_, at)| **at <= now);
                let mut keys: HashSet<Key> = due.map(|(k, _)| k.clone()).collect();
                keys.extend(state.dirty.drain());
                keys.into_iter().collect()
            };
            everything = false;
            state.dirty.clear();
            for key in keys {
                self.look(&store, &key, &mut state).await;
            }
            let now = SystemTime::now();
            let since_read = state.read_at.map_or(self.poll, |t| t.elapsed());
            let until_poll = self.poll.saturating_sub(since_read);
            let until_due = state
                .due
                .values()
                .min()
                .map(|at| at.duration_since(now).unwrap_or_default());
            let wake = until_due
                .map_or(until_poll, |d| d.min(until_poll))
                .max(DEBOUNCE);
            tokio::select! {
                () = stop.cancelled() => return,
                event = events.next() => match event {
                    None => return,
                    Some(event) => {
                        everything |= note(event, &mut state);
                        tokio::time::sleep(DEBOUNCE).await;
                    }
                },
                () = tokio::time::sleep(wake) => {}
            }
            // Everything the watch has delivered meanwhile, so the pass sees the objects as
            // they are (a store one event behind would have every pass rewrite what it just
            // wrote).
            while let Some(Some(event)) = events.next().now_or_never() {
                everything |= note(event, &mut state);
            }
            state.written.retain(|key, _| store.get(key).is_some());
            state.due.retain(|key, _| store.get(key).is_some());
        }
    }

    /// Reads the Leases of every replica named in an entry; whether a replica died or came
    /// back since the last read (then every tunnel needs a look).
    async fn read_leases(&self, store: &Store<Guarded>, state: &mut State) -> bool {
        let names: BTreeSet<String> = store
            .state()
            .iter()
            .filter_map(|o| o.0.as_ref().ok()?.status.clone())
            .flat_map(|s| s.replicas.into_iter().map(|e| e.name))
            .collect();
        let liveness = self.leases.read(&names, SystemTime::now()).await;
        let dead = |m: &BTreeMap<String, Liveness>| -> BTreeSet<String> {
            m.iter()
                .filter(|(_, l)| !l.counts())
                .map(|(n, _)| n.clone())
                .collect()
        };
        let changed = dead(&liveness) != dead(&state.liveness);
        if changed {
            debug!(dead = ?dead(&liveness), "the replicas' Leases changed");
        }
        state.liveness = liveness;
        state.read_at = Some(Instant::now());
        changed
    }

    /// Plans and makes the writes of one tunnel.
    async fn look(&self, store: &Store<Guarded>, key: &Key, state: &mut State) {
        let Some(obj) = store.get(key) else { return };
        let Ok(rt) = &obj.0 else { return };
        if rt.metadata.deletion_timestamp.is_some() {
            state.due.remove(key);
            return;
        }
        let status = rt.status.clone().unwrap_or_default();
        if state.written.get(key).is_some_and(|(w, at)| {
            (settled(w) == settled(&status) && w.observed_at == status.observed_at)
                || at.elapsed() > STORE_LAG
        }) {
            state.written.remove(key);
        }
        let namespace = rt.namespace().unwrap_or_default();
        let name = rt.name_any();
        let stamp = Stamp {
            slot: refresh_slot(&namespace, &name, self.refresh),
            refresh: self.refresh,
        };
        let now = SystemTime::now();
        let plan = plan(&status, &state.liveness, stamp, now);
        match plan.next_stamp {
            Some(at) => state.due.insert(key.clone(), at),
            None => state.due.remove(key),
        };
        let api: Api<ReverseTunnel> = Api::namespaced(self.client.clone(), &namespace);
        if let Some(patch) = plan.prune {
            match api
                .patch_status(&name, &PatchParams::default(), &Patch::<()>::Json(patch))
                .await
            {
                Ok(_) => debug!(%name, "removed dead replicas' entries"),
                Err(e) => debug!(%name, error = %e, "removing dead replicas' entries"),
            }
        }
        let Some(summary) = plan.summary else { return };
        if state
            .written
            .get(key)
            .is_some_and(|(w, _)| settled(w) == settled(&summary))
        {
            return;
        }
        debug!(%name, before = ?settled(&status), after = ?settled(&summary), "writing the summary");
        match write_summary(&api, &name, &summary).await {
            Ok(()) => {
                if let Some(event) = phase_event(status.phase, &summary)
                    && let Err(e) = self.recorder.publish(&event, &rt.object_ref(&())).await
                {
                    debug!(%name, error = %e, "could not publish an Event");
                }
                state.written.insert(key.clone(), (summary, Instant::now()));
            }
            Err(e) => warn!(%name, error = %e, "writing the ReverseTunnel summary"),
        }
    }
}

/// Marks what a watch event changed; whether every tunnel needs a look (a relist).
fn note(event: Result<watcher::Event<Guarded>, watcher::Error>, state: &mut State) -> bool {
    match event {
        Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
            state.dirty.insert(ObjectRef::from_obj(&o));
            false
        }
        Ok(watcher::Event::Delete(o)) => {
            let key = ObjectRef::from_obj(&o);
            state.due.remove(&key);
            state.written.remove(&key);
            false
        }
        Ok(watcher::Event::Init) => false,
        Ok(watcher::Event::InitDone) => true,
        Err(e) => {
            debug!(error = %e, "watching ReverseTunnels");
            false
        }
    }
}
