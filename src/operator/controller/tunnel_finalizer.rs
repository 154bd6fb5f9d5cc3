//! The leader's part of `ReverseTunnel` objects: their finalizer.
//!
//! Every replica runs the agents ([`super::reverse_tunnel`]); adding and removing the
//! finalizer needs one writer, so only the Lease holder runs this controller. The finalizer
//! keeps a deleted object until no replica carries it any more: each replica, on seeing the
//! deletion timestamp, stops its agent (closing its tunnels) and removes its status entry; the
//! leader removes the finalizer once no live entry is left (a dead replica's stale entry does
//! not hold it back).

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::Backoffs;
use crate::admin::metrics::OperatorMetrics;
use crate::operator::context::TunnelKey;
use crate::operator::crd::ReverseTunnel;
use crate::operator::error::{Error, Result};
use crate::operator::events::EventPublisher;
use crate::operator::liveness::LeaseReader;

/// The finalizer that keeps an object until its tunnels are closed.
pub const FINALIZER: &str = "tether.dev/reverse-tunnel";

type Guarded = DeserializeGuard<ReverseTunnel>;

/// What the finalizer's reconciles share.
struct Leader {
    client: Client,
    recorder: Arc<EventPublisher>,
    /// Reads the replicas' Leases: a replica whose Lease expired no longer holds deletion back.
    leases: LeaseReader,
    failures: Backoffs<TunnelKey>,
}

async fn reconcile(obj: Arc<Guarded>, leader: Arc<Leader>) -> Result<Action> {
    // A malformed object has no agent anywhere (every replica stops it): nothing to finalize.
    let Ok(rt) = &obj.0 else {
        return Ok(Action::await_change());
    };
    let rt = Arc::new(rt.clone());
    let namespace = rt
        .namespace()
        .ok_or_else(|| Error::Malformed("a ReverseTunnel without namespace".to_owned()))?;
    let api: Api<ReverseTunnel> = Api::namespaced(leader.client.clone(), &namespace);
    let result = finalizer(&api, FINALIZER, rt, |event| async {
        match event {
            Finalizer::Apply(_) => Ok(Action::await_change()),
            Finalizer::Cleanup(rt) => cleanup(&rt, &leader).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    if result.is_ok() {
        leader
            .failures
            .succeeded(&super::reverse_tunnel::key_of(obj.meta()));
    }
    result
}

/// Lets the object go once no live replica still reports holding it.
async fn cleanup(rt: &ReverseTunnel, leader: &Leader) -> Result<Action> {
    let named: std::collections::BTreeSet<String> = rt
        .status
        .iter()
        .flat_map(|s| &s.replicas)
        .map(|e| e.name.clone())
        .collect();
    let liveness = leader.leases.read(&named, SystemTime::now()).await;
    let carrying: Vec<&String> = liveness
        .iter()
        .filter(|(_, l)| l.counts())
        .map(|(name, _)| name)
        .collect();
    if !carrying.is_empty() {
        return Err(Error::Unresolved {
            reason: "ReplicasCarrying",
            message: format!("replicas {carrying:?} still carry the tunnel"),
        });
    }
    info!(name = %rt.name_any(), namespace = ?rt.namespace(), "every replica closed the tunnel; removing the finalizer");
    let event = Event {
        type_: EventType::Normal,
        reason: "Stopped".to_owned(),
        note: Some("every replica closed the tunnel; removing the finalizer".to_owned()),
        action: "Delete".to_owned(),
        secondary: None,
    };
    if let Err(e) = leader.recorder.publish(&event, &rt.object_ref(&())).await {
        debug!(error = %e, "could not publish an Event");
    }
    Ok(Action::await_change())
}

/// Reconciles on finalizer and deletion changes, and on status changes once deleting (the
/// replicas' entries going is what cleanup waits for).
fn predicate_key(obj: &Guarded) -> Option<u64> {
    let meta = obj.meta();
    let mut hasher = DefaultHasher::new();
    (&meta.finalizers, meta.deletion_timestamp.is_some()).hash(&mut hasher);
    if meta.deletion_timestamp.is_some() {
        meta.resource_version.hash(&mut hasher);
    }
    Some(hasher.finish())
}

fn error_policy(obj: Arc<Guarded>, error: &Error, leader: Arc<Leader>) -> Action {
    let key = super::reverse_tunnel::key_of(obj.meta());
    let delay = leader.failures.failed(&key).min(Duration::from_secs(10));
    debug!(name = %key.name, %error, ?delay, "finalizer: retrying");
    Action::requeue(delay)
}

/// Runs the finalizer controller over `namespace` (or all) until `stop`.
pub async fn run(
    client: Client,
    namespace: Option<&str>,
    recorder: Arc<EventPublisher>,
    leases: LeaseReader,
    metrics: OperatorMetrics,
    stop: CancellationToken,
) {
    let api: Api<Guarded> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (reader, writer) = kube::runtime::reflector::store();
    let trigger = watcher(api, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicate_key, Default::default());
    let leader = Arc::new(Leader {
        client,
        recorder,
        leases,
        failures: Backoffs::default(),
    });
    Controller::for_stream(trigger, reader)
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(
            move |obj, leader| {
                super::measured(
                    metrics.clone(),
                    "reverse_tunnel_finalizer",
                    reconcile(obj, leader),
                )
            },
            error_policy,
            leader,
        )
        .for_each(|result| {
            if let Err(e) = result {
                debug!(error = %e, "finalizer reconcile error");
            }
            std::future::ready(())
        })
        .await;
}
