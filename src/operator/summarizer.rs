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
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::crd::{ReverseTunnel, ReverseTunnelStatus};
use super::events::{EventPublisher, transition_event};
use super::liveness::{LeaseReader, Liveness};
use super::replicas::{Stamp, plan, settled, write_summary};
use super::stamps::refresh_slot;

/// Changes closer together than this are summarized once.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// How long a summary written may take to come back through the watch before the store is
/// believed over it.
const STORE_LAG: Duration = Duration::from_secs(5);
/// Watch notes the loop has not taken yet (the watch waits beyond this).
const NOTES: usize = 4096;
/// Tunnels whose writes are in flight at once.
const CONCURRENCY: usize = 16;
/// How soon a failed write of the leader is tried again.
const RETRY: Duration = Duration::from_secs(2);
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
    pub recorder: Arc<EventPublisher>,
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

impl State {
    /// Marks what the watch showed; whether every tunnel needs a look (a relist).
    fn note(&mut self, note: Note) -> bool {
        match note {
            Note::Changed(key) => {
                self.dirty.insert(key);
                false
            }
            Note::Deleted(key) => {
                self.due.remove(&key);
                self.written.remove(&key);
                false
            }
            Note::Relisted => true,
        }
    }

    /// The tunnels a pass looks at: all of them, or those changed or due.
    fn take_keys(&mut self, store: &Store<Guarded>, everything: bool) -> Vec<Key> {
        if everything {
            self.dirty.clear();
            return store
                .state()
                .iter()
                .map(|o| ObjectRef::from_obj(&**o))
                .collect();
        }
        let now = SystemTime::now();
        let due = self.due.iter().filter(|(_, at)| **at <= now);
        let mut keys: HashSet<Key> = due.map(|(k, _)| k.clone()).collect();
        keys.extend(self.dirty.drain());
        keys.into_iter().collect()
    }

    /// How long the loop may sleep: until the next stamp is due or the Leases are read again
    /// (changes wake it earlier), and no less than the debounce.
    fn wake(&self, poll: Duration) -> Duration {
        let now = SystemTime::now();
        let since_read = self.read_at.map_or(poll, |t| t.elapsed());
        let until_poll = poll.saturating_sub(since_read);
        let until_due = self
            .due
            .values()
            .min()
            .map(|at| at.duration_since(now).unwrap_or_default());
        until_due
            .map_or(until_poll, |d| d.min(until_poll))
            .max(DEBOUNCE)
    }
}

impl Summarizer {
    /// Keeps every `ReverseTunnel`'s summary up to date until `stop`.
    pub async fn run(self, namespace: Option<&str>, stop: CancellationToken) {
        let api: Api<Guarded> = match namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        };
        let (store, writer) = reflector::store();
        let events = watcher(api, watcher::Config::default().any_semantic())
            .default_backoff()
            .reflect(writer);
        // The watch is read by a task of its own, so the store keeps up while a pass writes:
        // read only between passes, it fell 20 s behind at 300 tunnels, and every write the
        // store did not show yet was made again.
        let (notes, mut noted) = tokio::sync::mpsc::channel(NOTES);
        let pump = AbortOnDrop(tokio::spawn(pump(events, notes)));
        let mut state = State::default();
        // The first list, in full, before the first pass.
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                note = noted.recv() => match note {
                    None => return,
                    Some(Note::Relisted) => break,
                    Some(_) => {}
                },
            }
        }
        let mut everything = true;
        loop {
            if state.read_at.is_none_or(|at| at.elapsed() >= self.poll) {
                everything |= self.read_leases(&store, &mut state).await;
            }
            let keys = state.take_keys(&store, everything);
            everything = false;
            self.pass(&store, keys, &mut state).await;
            let wake = state.wake(self.poll);
            tokio::select! {
                () = stop.cancelled() => break,
                note = noted.recv() => match note {
                    None => break,
                    Some(note) => {
                        everything |= state.note(note);
                        // Changes closer together than this are looked at once.
                        tokio::time::sleep(DEBOUNCE).await;
                    }
                },
                () = tokio::time::sleep(wake) => {}
            }
            while let Ok(note) = noted.try_recv() {
                everything |= state.note(note);
            }
            state.written.retain(|key, _| store.get(key).is_some());
            state.due.retain(|key, _| store.get(key).is_some());
        }
        drop(pump);
    }

    /// Reads the Leases of every replica named in an entry; whether a replica died or came
    /// back since the last read (then every tunnel needs a look).
    async fn read_leases(&self, store: &Store<Guarded>, state: &mut State) -> bool {
        let mut names = BTreeSet::new();
        for obj in store.state() {
            let Ok(rt) = &obj.0 else { continue };
            let entries = rt.status.iter().flat_map(|s| &s.replicas);
            names.extend(entries.map(|e| e.name.clone()));
        }
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

    /// Plans the writes of one tunnel (none if nothing is to be written).
    fn look(&self, store: &Store<Guarded>, key: &Key, state: &mut State) -> Option<Job> {
        let obj = store.get(key)?;
        let Ok(rt) = &obj.0 else { return None };
        if rt.metadata.deletion_timestamp.is_some() {
            state.due.remove(key);
            return None;
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
        let plan = plan(&status, &state.liveness, stamp, SystemTime::now());
        match plan.next_stamp {
            Some(at) => state.due.insert(key.clone(), at),
            None => state.due.remove(key),
        };
        // Written already; the watch has not shown it yet.
        let summary = plan.summary.filter(|summary| {
            !state
                .written
                .get(key)
                .is_some_and(|(w, _)| settled(w) == settled(summary))
        });
        if summary.is_none() && plan.prune.is_none() {
            return None;
        }
        Some(Job {
            key: key.clone(),
            api: Api::namespaced(self.client.clone(), &namespace),
            name,
            reference: rt.object_ref(&()),
            before: status,
            prune: plan.prune,
            summary,
        })
    }

    /// Makes one tunnel's writes: the prune, then the summary and its phase Event.
    async fn execute(&self, job: Job) -> Outcome {
        let Job {
            key,
            api,
            name,
            reference,
            before,
            prune,
            summary,
        } = job;
        let mut outcome = Outcome {
            key,
            written: None,
            failed: false,
        };
        if let Some(patch) = prune {
            match api
                .patch_status(&name, &PatchParams::default(), &Patch::<()>::Json(patch))
                .await
            {
                Ok(_) => debug!(%name, "removed dead replicas' entries"),
                Err(e) => {
                    debug!(%name, error = %e, "removing dead replicas' entries");
                    outcome.failed = true;
                }
            }
        }
        let Some(summary) = summary else {
            return outcome;
        };
        debug!(%name, summary = ?settled(&summary), stamp = ?summary.observed_at, "writing the summary");
        match write_summary(&api, &name, &summary).await {
            Ok(()) => {
                if let Some(event) = transition_event(&before, &summary)
                    && let Err(e) = self.recorder.publish(&event, &reference).await
                {
                    debug!(%name, error = %e, "could not publish an Event");
                }
                outcome.written = Some(summary);
            }
            Err(e) => {
                warn!(%name, error = %e, ?RETRY, "writing the ReverseTunnel summary; retrying");
                outcome.failed = true;
            }
        }
        outcome
    }

    /// Plans the writes of `keys` and makes them, [`CONCURRENCY`] tunnels at a time: at 1,000
    /// tunnels the stamps alone come 17 a second, more than one writer in turn keeps up with
    /// on a loaded API server.
    async fn pass(&self, store: &Store<Guarded>, keys: Vec<Key>, state: &mut State) {
        let jobs: Vec<Job> = keys
            .iter()
            .filter_map(|key| self.look(store, key, state))
            .collect();
        let outcomes: Vec<Outcome> = futures::stream::iter(jobs)
            .map(|job| self.execute(job))
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let now = SystemTime::now();
        for outcome in outcomes {
            if let Some(summary) = outcome.written {
                state
                    .written
                    .insert(outcome.key.clone(), (summary, Instant::now()));
            }
            if outcome.failed {
                // A stamp planned a refresh away was not written: try again soon, or SEEN
                // would age a whole period.
                state.due.insert(outcome.key, now + RETRY);
            }
        }
    }
}

/// One tunnel's planned writes.
struct Job {
    /// The tunnel.
    key: Key,
    /// Its namespace's API.
    api: Api<ReverseTunnel>,
    /// Its name.
    name: String,
    /// What its Events refer to.
    reference: k8s_openapi::api::core::v1::ObjectReference,
    /// Its status before the write, for the Event the change calls for.
    before: ReverseTunnelStatus,
    /// Removes dead replicas' entries.
    prune: Option<json_patch::Patch>,
    /// The summary (and stamp) to apply.
    summary: Option<ReverseTunnelStatus>,
}

/// What came of a [`Job`].
struct Outcome {
    /// The tunnel.
    key: Key,
    /// The summary applied, if one was.
    written: Option<ReverseTunnelStatus>,
    /// Whether a write failed (to be tried again soon).
    failed: bool,
}

/// What the watch showed, for the loop.
enum Note {
    /// The object changed (or appeared).
    Changed(Key),
    /// The object is gone.
    Deleted(Key),
    /// A (re)list completed: every object needs a look.
    Relisted,
}

/// Reads the watch (which keeps the store current) and tells the loop what changed, until the
/// loop is gone.
async fn pump(
    events: impl futures::Stream<Item = Result<watcher::Event<Guarded>, watcher::Error>>,
    notes: tokio::sync::mpsc::Sender<Note>,
) {
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        let note = match event {
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                Note::Changed(ObjectRef::from_obj(&o))
            }
            Ok(watcher::Event::Delete(o)) => Note::Deleted(ObjectRef::from_obj(&o)),
            Ok(watcher::Event::InitDone) => Note::Relisted,
            Ok(watcher::Event::Init) => continue,
            Err(e) => {
                debug!(error = %e, "watching ReverseTunnels");
                continue;
            }
        };
        if notes.send(note).await.is_err() {
            return;
        }
    }
}

/// Aborts the task when dropped (the loop returned).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
