//! The `TrustedCluster` controller: joins a root once, then keeps a `ReverseTunnel` to it.
//!
//! For a `TrustedCluster` named N it owns three objects, all with an owner reference to N:
//! - Secret `N-root-ca`: the root's CA keys (`ca.pub`), written when the join succeeds. Its
//!   existence means "joined": the operator never joins twice (a single-use token would be
//!   refused), and deleting it asks for a new join.
//! - Secret `N-agent`: the agent's key and certificate, issued from the leaf CA and renewed
//!   when a third of its validity is left.
//! - `ReverseTunnel` N: written by server-side apply from N's spec, so allow-list edits flow
//!   through; the `ReverseTunnel` controller runs the agent.
//!
//! `enabled: false` deletes the `ReverseTunnel` and keeps the trust. Deleting N removes all
//! three through the finalizer (the root keeps its `RemoteCluster` until its administrator
//! deletes it).

mod join;
mod owned;
pub mod rotation;

use join::{ca_in_force, ca_key_in, ensure_joined, leaf_ca, leaf_ca_secret};
use owned::*;
use rotation::{Rotated, rotate};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ObjectMeta, PartialObjectMeta, Patch, PatchParams, PostParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use russh::keys::ssh_key::public::KeyData;
use russh::keys::{Certificate, PrivateKey, PublicKey};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::agent::join::{JoinRequest, join};
use crate::identity::{CertificateAuthority, Identity, fingerprint};
use crate::operator::FIELD_MANAGER;
use crate::operator::context::Context;
use crate::operator::crd::trusted_cluster::CaRotationStatus;
use crate::operator::crd::{
    ReverseTunnel, ReverseTunnelSpec, SecretReference, TrustedCluster, TrustedClusterStatus,
};
use crate::operator::error::{Error, Result};
use crate::operator::resolve::{IDENTITY_CERT, IDENTITY_KEY, ROOT_CA_KEY};
use crate::operator::secret_read::secret_text;
use crate::operator::stamps::condition;
use crate::protocol::ClusterName;
use crate::protocol::join::JoinToken;

/// The finalizer that removes what a `TrustedCluster` created.
pub const FINALIZER: &str = "tether.dev/trusted-cluster";
/// Key of the join token in the token Secret.
pub const TOKEN_KEY: &str = "token";
/// Key of the leaf CA's private key in its Secret.
pub const LEAF_CA_KEY: &str = "ca";
/// Label on every object a `TrustedCluster` created, naming it.
pub const OWNER_LABEL: &str = "tether.dev/trusted-cluster";
/// Annotation on the root CA Secret: the root cluster's name.
pub const ROOT_CLUSTER_ANNOTATION: &str = "tether.dev/root-cluster";

/// How long an agent certificate the operator issues is valid; renewed with a third left.
pub const AGENT_CERT_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long one join attempt may take.
const JOIN_TIMEOUT: Duration = Duration::from_secs(20);
/// How often a settled object is looked at anyway.
const RESYNC: Duration = super::MAX_RETRY_DELAY;

type Guarded = DeserializeGuard<TrustedCluster>;

/// State of the controller: the operator's shared context, and failure counts for backoff.
pub struct TrustContext {
    ctx: Arc<Context>,
    failures: super::Backoffs<ObjectRef<Guarded>>,
}

impl TrustContext {
    pub fn new(ctx: Arc<Context>) -> Self {
        Self {
            ctx,
            failures: super::Backoffs::default(),
        }
    }
}

/// A reconcile outcome worth a condition: (reason, message, retry after).
struct Blocked {
    reason: String,
    message: String,
    retry: Option<Duration>,
}

impl Blocked {
    fn new(reason: &str, message: impl Into<String>, retry: Option<Duration>) -> Self {
        Self {
            reason: reason.to_owned(),
            message: message.into(),
            retry,
        }
    }
}

async fn reconcile(obj: Arc<Guarded>, tctx: Arc<TrustContext>) -> Result<Action> {
    let tc = match &obj.0 {
        Ok(tc) => Arc::new(tc.clone()),
        Err(invalid) => {
            warn!(name = ?invalid.metadata.name, error = %invalid.error, "skipping a malformed TrustedCluster");
            return Ok(Action::await_change());
        }
    };
    let namespace = tc
        .namespace()
        .ok_or_else(|| Error::Malformed("a TrustedCluster without namespace".to_owned()))?;
    let api: Api<TrustedCluster> = Api::namespaced(tctx.ctx.client.clone(), &namespace);
    let action = finalizer(&api, FINALIZER, tc, |event| async {
        match event {
            Finalizer::Apply(tc) => apply(&tc, &tctx.ctx, &namespace).await,
            Finalizer::Cleanup(tc) => cleanup(&tc, &tctx.ctx, &namespace).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))?;
    tctx.failures.succeeded(&ObjectRef::from_obj(&*obj));
    Ok(action)
}

/// What apply decided, for the status.
struct Outcome {
    joined: Result<(ClusterName, String), Blocked>,
    tunnel: Result<Option<String>, Blocked>,
    /// The rotation's status, when this pass looked at it (else the previous one stays).
    rotation: Option<Option<CaRotationStatus>>,
}

async fn apply(tc: &TrustedCluster, ctx: &Context, namespace: &str) -> Result<Action> {
    let client = ctx.client.clone();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let joined = ensure_joined(tc, ctx, &secrets).await;
    let mut rotation = None;
    let tunnel = match &joined {
        Err(_) => Err(Blocked::new("NotJoined", "waiting for the join", None)),
        Ok((root, _)) if tc.spec.enabled => {
            let tunnels = Api::namespaced(client.clone(), namespace);
            let (tunnel, rotated) = rotate_and_keep(tc, ctx, root, (&secrets, &tunnels)).await;
            rotation = rotated;
            tunnel
        }
        Ok(_) => disable(tc, &Api::namespaced(client.clone(), namespace))
            .await
            .map(|()| None),
    };
    let retry = [&joined.as_ref().err(), &tunnel.as_ref().err()]
        .iter()
        .filter_map(|b| b.and_then(|b| b.retry))
        .min();
    let outcome = Outcome {
        joined,
        tunnel,
        rotation,
    };
    write_status(tc, ctx, namespace, &outcome).await?;
    Ok(Action::requeue(retry.unwrap_or(RESYNC)))
}

/// For a joined, enabled `tc`: the rotation's next step, then its tunnel (the agent identity
/// and the `ReverseTunnel`); the rotation's status when it was looked at.
async fn rotate_and_keep(
    tc: &TrustedCluster,
    ctx: &Context,
    root: &ClusterName,
    (secrets, tunnels): (&Api<Secret>, &Api<ReverseTunnel>),
) -> (
    Result<Option<String>, Blocked>,
    Option<Option<CaRotationStatus>>,
) {
    let owned = match read_owned(tc, secrets, tunnels).await {
        Ok(owned) => owned,
        Err(blocked) => return (Err(blocked), None),
    };
    let rotated = match rotate(tc, ctx, secrets, &owned).await {
        Ok(rotated) => rotated,
        Err(blocked) => return (Err(blocked), None),
    };
    let tunnel = ensure_tunnel(tc, root, (secrets, tunnels), &owned, &rotated).await;
    (tunnel, Some(rotated.status))
}

async fn write_status(
    tc: &TrustedCluster,
    ctx: &Context,
    namespace: &str,
    outcome: &Outcome,
) -> Result<()> {
    let now = SystemTime::now();
    let previous = tc.status.clone().unwrap_or_default();
    let generation = tc.metadata.generation;
    let joined = match &outcome.joined {
        Ok((root, _)) => condition(
            &previous.conditions,
            "Joined",
            true,
            "Joined",
            format!("root {root} trusts this cluster"),
            generation,
            now,
        ),
        Err(b) => condition(
            &previous.conditions,
            "Joined",
            false,
            &b.reason,
            b.message.clone(),
            generation,
            now,
        ),
    };
    let ready = match &outcome.tunnel {
        Ok(Some(rt)) => condition(
            &previous.conditions,
            "Ready",
            true,
            "TunnelConfigured",
            format!("ReverseTunnel {rt} keeps the tunnel (kubectl get rt {rt})"),
            generation,
            now,
        ),
        Ok(None) => condition(
            &previous.conditions,
            "Ready",
            false,
            "Disabled",
            "enabled is false: no tunnel".to_owned(),
            generation,
            now,
        ),
        Err(b) => condition(
            &previous.conditions,
            "Ready",
            false,
            &b.reason,
            b.message.clone(),
            generation,
            now,
        ),
    };
    let (root_cluster, fingerprint) = match &outcome.joined {
        Ok((root, fp)) => (Some(root.to_string()), Some(fp.clone())),
        Err(_) => (
            previous.root_cluster.clone(),
            previous.root_ca_fingerprint.clone(),
        ),
    };
    let status = TrustedClusterStatus {
        root_cluster,
        root_ca_fingerprint: fingerprint,
        reverse_tunnel: outcome.tunnel.as_ref().ok().cloned().flatten(),
        conditions: vec![joined, ready],
        observed_generation: generation,
        ca_rotation: outcome
            .rotation
            .clone()
            .unwrap_or_else(|| previous.ca_rotation.clone()),
    };
    if status == previous {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": "tether.dev/v1alpha1",
        "kind": "TrustedCluster",
        "status": status,
    });
    let api: Api<TrustedCluster> = Api::namespaced(ctx.client.clone(), namespace);
    api.patch_status(
        &tc.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

async fn publish(ctx: &Context, tc: &TrustedCluster, type_: EventType, reason: &str, note: &str) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note.chars().take(1000).collect()),
        action: "Join".to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &tc.object_ref(&())).await {
        debug!(error = %e, "could not publish an Event");
    }
}

fn error_policy(obj: Arc<Guarded>, error: &Error, tctx: Arc<TrustContext>) -> Action {
    let key = ObjectRef::from_obj(&*obj);
    let delay = tctx.failures.failed(&key);
    warn!(name = %key.name, %error, ?delay, "TrustedCluster reconcile failed; retrying");
    Action::requeue(delay)
}

/// Runs the controller over `namespace` (or all namespaces) until `stop`.
pub async fn run(
    client: Client,
    namespace: Option<&str>,
    ctx: Arc<Context>,
    stop: CancellationToken,
) {
    let (trusts, tunnels, secrets): (
        Api<Guarded>,
        Api<ReverseTunnel>,
        Api<PartialObjectMeta<Secret>>,
    ) = match namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client),
        ),
    };
    let tctx = Arc::new(TrustContext::new(ctx));
    let controller = Controller::new(trusts, watcher::Config::default().any_semantic())
        .owns(tunnels, watcher::Config::default().any_semantic());
    // A token Secret written or corrected after its TrustedCluster joins at once, not at the
    // next retry (60 s after a refused token). Metadata only: the tokens stay unread until a
    // join needs one.
    let store = controller.store();
    let token_changes = watcher(secrets, watcher::Config::default().any_semantic())
        .default_backoff()
        .touched_objects();
    let joins_waiting_for = move |secret: PartialObjectMeta<Secret>| {
        let (name, namespace) = (secret.name_any(), secret.namespace());
        store
            .state()
            .into_iter()
            .filter(|obj| {
                obj.0.as_ref().is_ok_and(|tc| {
                    tc.namespace() == namespace && tc.spec.token_secret_ref.name == name
                })
            })
            .map(|obj| ObjectRef::from_obj(&*obj))
            .collect::<Vec<_>>()
    };
    controller
        .watches_stream(token_changes, joins_waiting_for)
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(
            |obj, s| super::measured(s.ctx.metrics.clone(), "trusted_cluster", reconcile(obj, s)),
            error_policy,
            tctx,
        )
        .for_each(|result| {
            if let Err(e) = result {
                debug!(error = %e, "TrustedCluster reconcile error");
            }
            std::future::ready(())
        })
        .await;
}
