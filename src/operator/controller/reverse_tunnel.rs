//! The `ReverseTunnel` controller: reconciles each object into a running agent. Every operator
//! replica runs it (no Lease), so every replica carries every tunnel; what needs one writer
//! (the finalizer, the status summary) is the leader's ([`super::tunnel_finalizer`],
//! [`crate::operator::replicas`]).
//!
//! - The watch reads objects through [`DeserializeGuard`], so one malformed object is logged,
//!   gets a Warning event and its agent stopped, and never stalls the stream for the others.
//! - Only spec (generation) and finalizer changes trigger a reconcile; status writes do not,
//!   so the operator's own writes cannot loop.
//! - Secrets are watched by metadata only (no key material cached); a change to a Secret a
//!   tunnel names reconciles that tunnel, which restarts the agent if the identity or root CA
//!   actually changed.
//! - Deletion: once an object carries a deletion timestamp (the leader's finalizer holds it),
//!   every replica stops its agent, which closes its tunnels and removes its status entry; the
//!   leader removes the finalizer when no live entry is left. An object that is gone (a delete
//!   event, or missing from a relist) stops its agent too.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::operator::context::{Context, TunnelKey};
use crate::operator::crd::ReverseTunnel;
use crate::operator::error::{Error, Result};
use crate::operator::resolve::resolve;
use crate::operator::status::Problem;

/// How often a healthy tunnel is reconciled anyway (catches anything a watch missed).
const RESYNC: Duration = super::MAX_RETRY_DELAY;

type Guarded = DeserializeGuard<ReverseTunnel>;

/// Reconciles asked for by a deletion, waiting to run.
const RERUN_QUEUE: usize = 1024;

/// What this controller's reconciles share: the operator's [`Context`], and what a
/// reconcile needs to tell one tunnel from another of the same leaf.
struct Tunnels {
    ctx: Arc<Context>,
    /// Every `ReverseTunnel` watched, to find the others that carry the same leaf.
    store: reflector::Store<Guarded>,
    /// Tunnels to reconcile again: a leaf's other tunnels when the one carrying it goes.
    /// Bounded; a request dropped when it is full is made up by the periodic resync.
    rerun: mpsc::Sender<ObjectRef<Guarded>>,
}

/// The tunnel that carries `rt`'s leaf when several name it: the oldest not being deleted
/// (then by namespace and name), or `None` when it is `rt` itself.
///
/// Two `ReverseTunnel`s for one leaf and root would run two agents with one identity,
/// dialling the same proxies, each with its own allow-list: a dial would get one list or the
/// other by chance. The newer ones fail with `DuplicateLeaf` instead, naming the one that
/// carries the leaf, and take over when it goes.
fn carrier_of<'a>(rt: &ReverseTunnel, all: &'a [Arc<Guarded>]) -> Option<&'a ReverseTunnel> {
    let order = |t: &ReverseTunnel| {
        (
            t.metadata.creation_timestamp.clone(),
            t.namespace(),
            t.name_any(),
        )
    };
    let carrier = all
        .iter()
        .filter_map(|o| o.0.as_ref().ok())
        .filter(|t| t.metadata.deletion_timestamp.is_none() && same_leaf(t, rt))
        .min_by_key(|t| order(t))?;
    (order(carrier) != order(rt)).then_some(carrier)
}

/// Whether `a` and `b` carry the same leaf to the same root.
fn same_leaf(a: &ReverseTunnel, b: &ReverseTunnel) -> bool {
    a.spec.root_cluster == b.spec.root_cluster && a.spec.leaf_cluster == b.spec.leaf_cluster
}

/// Reconciles again every other tunnel of `rt`'s leaf (one may take over from it).
fn rerun_others(tunnels: &Tunnels, rt: &ReverseTunnel) {
    for other in tunnels.store.state() {
        let Ok(t) = &other.0 else { continue };
        if same_leaf(t, rt) && (t.namespace(), t.name_any()) != (rt.namespace(), rt.name_any()) {
            let _ = tunnels.rerun.try_send(ObjectRef::from_obj(&*other));
        }
    }
}

pub(super) fn key_of(meta: &kube::api::ObjectMeta) -> TunnelKey {
    let name = meta.name.clone().unwrap_or_default();
    match &meta.namespace {
        Some(ns) => ObjectRef::new(&name).within(ns),
        None => ObjectRef::new(&name),
    }
}

async fn reconcile(obj: Arc<Guarded>, tunnels: Arc<Tunnels>) -> Result<Action> {
    let ctx = &tunnels.ctx;
    let rt = match &obj.0 {
        Ok(rt) => Arc::new(rt.clone()),
        Err(invalid) => {
            warn!(name = ?invalid.metadata.name, namespace = ?invalid.metadata.namespace,
                error = %invalid.error, "skipping a malformed ReverseTunnel");
            ctx.remove(&key_of(&invalid.metadata)).join().await;
            let reference = obj.object_ref(&());
            let event = Event {
                type_: EventType::Warning,
                reason: "Malformed".to_owned(),
                note: Some(invalid.error.chars().take(1000).collect()),
                action: "Reconcile".to_owned(),
                secondary: None,
            };
            if let Err(e) = ctx.recorder.publish(&event, &reference).await {
                debug!(error = %e, "could not publish an Event");
            }
            return Ok(Action::await_change());
        }
    };
    if rt.namespace().is_none() {
        return Err(Error::Malformed(
            "a ReverseTunnel without namespace".to_owned(),
        ));
    }
    if rt.metadata.deletion_timestamp.is_some() {
        rerun_others(&tunnels, &rt);
        return cleanup(&rt, ctx).await;
    }
    if let Some(carrier) = carrier_of(&rt, &tunnels.store.state()) {
        let problem = Problem {
            reason: "DuplicateLeaf",
            message: format!(
                "ReverseTunnel {}/{} already carries leaf {} to root {}: two would run two \
                 agents with one identity and two allow-lists; delete one (this one takes over \
                 when that one goes)",
                carrier.namespace().unwrap_or_default(),
                carrier.name_any(),
                rt.spec.leaf_cluster,
                rt.spec.root_cluster
            ),
        };
        ctx.ensure_failed(&rt, problem).join().await;
        return Ok(Action::requeue(RESYNC));
    }
    apply(&rt, ctx).await
}

async fn apply(rt: &ReverseTunnel, ctx: &Context) -> Result<Action> {
    let key = ObjectRef::from_obj(rt);
    let namespace = rt.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    match resolve(rt, &secrets, ctx.kube_upstream.as_ref()).await {
        Ok(mut desired) => {
            // The operator's own route, unless the spec names one; its TLS settings either way.
            if rt.spec.tunnel.egress_proxy.is_none() {
                desired.config.route = ctx.route.clone();
            }
            desired.config.route.tls = ctx.route.tls.clone();
            ctx.ensure_running(rt, desired);
            ctx.failures.succeeded(&key);
            Ok(Action::requeue(RESYNC))
        }
        Err(unusable) => {
            let problem = unusable.problem.clone();
            ctx.ensure_failed(rt, unusable.problem).join().await;
            if unusable.retry {
                Err(Error::Unresolved {
                    reason: problem.reason,
                    message: problem.message,
                })
            } else {
                ctx.failures.succeeded(&key);
                Ok(Action::await_change())
            }
        }
    }
}

async fn cleanup(rt: &ReverseTunnel, ctx: &Context) -> Result<Action> {
    if ctx.is_known(&ObjectRef::from_obj(rt)) {
        info!(name = %rt.name_any(), namespace = ?rt.namespace(), "ReverseTunnel deleted; closing this replica's tunnels");
    }
    ctx.remove(&ObjectRef::from_obj(rt)).join().await;
    Ok(Action::await_change())
}

/// What a change must touch to trigger a reconcile: the spec (generation), the finalizers,
/// or deletion. Status and other metadata changes (including the operator's own status
/// writes) do not.
fn predicate_key(obj: &Guarded) -> Option<u64> {
    let meta = obj.meta();
    let mut hasher = DefaultHasher::new();
    (
        meta.generation,
        &meta.finalizers,
        meta.deletion_timestamp.is_some(),
    )
        .hash(&mut hasher);
    Some(hasher.finish())
}

fn error_policy(obj: Arc<Guarded>, error: &Error, tunnels: Arc<Tunnels>) -> Action {
    let key = key_of(obj.meta());
    let delay = tunnels.ctx.failures.failed(&key);
    warn!(name = %key.name, namespace = ?key.namespace, %error, ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}

/// Stops the agents of objects that are gone: on a delete event, and after a relist, those the
/// store no longer holds (deleted while the watch was away). The finalizer normally makes every
/// replica see the deletion timestamp first, but the last update and the delete may arrive
/// together, and the reconcile of an object gone from the store never runs.
fn forget_deleted(
    tunnels: Arc<Tunnels>,
) -> impl FnMut(watcher::Event<Guarded>) -> watcher::Event<Guarded> {
    move |event| {
        let (ctx, store) = (&tunnels.ctx, &tunnels.store);
        let stopped = match &event {
            watcher::Event::Delete(obj) => {
                if let Ok(rt) = &obj.0 {
                    rerun_others(&tunnels, rt);
                }
                ctx.remove(&key_of(obj.meta()))
            }
            watcher::Event::InitDone => {
                let live = store.state().iter().map(|o| key_of(o.meta())).collect();
                ctx.retain(&live)
            }
            _ => return event,
        };
        tokio::spawn(stopped.join());
        event
    }
}

/// Runs the controller over `namespace` (or all namespaces) until `stop`; then stops every
/// agent it started (and so removes this replica's status entries).
pub async fn run(
    client: Client,
    namespace: Option<&str>,
    ctx: Arc<Context>,
    stop: CancellationToken,
) {
    let (tunnels, secrets): (Api<Guarded>, Api<PartialObjectMeta<Secret>>) = match namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        ),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let (reader, writer) = reflector::store();
    let (rerun, reruns) = mpsc::channel(RERUN_QUEUE);
    let tunnels_ctx = Arc::new(Tunnels {
        ctx: ctx.clone(),
        store: reader.clone(),
        rerun,
    });
    let gone = forget_deleted(tunnels_ctx.clone());
    let trigger = watcher(tunnels, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(writer)
        .map_ok(gone)
        .applied_objects()
        .predicate_filter(predicate_key, Default::default());
    let store = reader.clone();
    let secret_changes = watcher(secrets, watcher::Config::default().any_semantic())
        .default_backoff()
        .touched_objects();
    let mapper = move |secret: PartialObjectMeta<Secret>| {
        let name = secret.name_any();
        let namespace = secret.namespace();
        store
            .state()
            .into_iter()
            .filter(|obj| {
                obj.0.as_ref().is_ok_and(|rt| {
                    rt.namespace() == namespace
                        && (rt.spec.identity_secret_ref.name == name
                            || rt.spec.root_ca_secret_ref.name == name)
                })
            })
            .map(|obj| ObjectRef::from_obj(&*obj))
            .collect::<Vec<_>>()
    };
    Controller::for_stream(trigger, reader)
        .watches_stream(secret_changes, mapper)
        .reconcile_on(futures::stream::unfold(reruns, |mut rx| async move {
            rx.recv().await.map(|r| (r, rx))
        }))
        .graceful_shutdown_on(stop.clone().cancelled_owned())
        .run(
            |obj, t| super::measured(t.ctx.metrics.clone(), "reverse_tunnel", reconcile(obj, t)),
            error_policy,
            tunnels_ctx,
        )
        .for_each(|result| {
            match result {
                Ok((obj, _)) => debug!(name = %obj.name, "reconciled"),
                Err(e) => debug!(error = %e, "reconcile error"),
            }
            std::future::ready(())
        })
        .await;
    ctx.remove_all().join().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tunnel(name: &str, leaf: &str, created: u64, deleting: bool) -> Arc<Guarded> {
        let mut value = serde_json::json!({
            "apiVersion": "tether.dev/v1alpha1",
            "kind": "ReverseTunnel",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {
                "rootCluster": "root", "leafCluster": leaf,
                "proxyAddress": "proxy:3024",
                "identitySecretRef": {"name": "id"}, "rootCaSecretRef": {"name": "ca"},
            },
        });
        let at = |secs: u64| {
            let t = std::time::UNIX_EPOCH + Duration::from_secs(secs);
            serde_json::json!(humantime::format_rfc3339_seconds(t).to_string())
        };
        value["metadata"]["creationTimestamp"] = at(created);
        if deleting {
            value["metadata"]["deletionTimestamp"] = at(created + 1);
        }
        Arc::new(DeserializeGuard(Ok(
            serde_json::from_value(value).expect("a ReverseTunnel")
        )))
    }

    fn carrier(of: &Arc<Guarded>, all: &[Arc<Guarded>]) -> Option<String> {
        let rt = of.0.as_ref().expect("valid");
        carrier_of(rt, all).map(ResourceExt::name_any)
    }

    #[test]
    fn the_oldest_tunnel_of_a_leaf_carries_it_and_one_being_deleted_does_not() {
        let first = tunnel("b-first", "leaf-1", 100, false);
        let second = tunnel("a-second", "leaf-1", 200, false);
        let other_leaf = tunnel("c-other", "leaf-2", 50, false);
        let all = [first.clone(), second.clone(), other_leaf.clone()];
        assert_eq!(carrier(&first, &all), None);
        assert_eq!(carrier(&second, &all).as_deref(), Some("b-first"));
        assert_eq!(carrier(&other_leaf, &all), None);
        // Created in the same second: the name decides, the same way on every replica.
        let twin = tunnel("a-twin", "leaf-1", 100, false);
        let all = [first.clone(), twin.clone()];
        assert_eq!(carrier(&first, &all).as_deref(), Some("a-twin"));
        assert_eq!(carrier(&twin, &all), None);
        // The carrier being deleted hands over at once.
        let going = tunnel("b-first", "leaf-1", 100, true);
        assert_eq!(carrier(&second, &[going, second.clone()]), None);
    }
}
