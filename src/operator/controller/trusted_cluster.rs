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

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use russh::keys::{Certificate, PrivateKey, PublicKey};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::agent::join::{JoinRequest, join};
use crate::identity::{CertificateAuthority, Identity, fingerprint};
use crate::operator::FIELD_MANAGER;
use crate::operator::context::Context;
use crate::operator::crd::{
    ReverseTunnel, ReverseTunnelSpec, SecretReference, TrustedCluster, TrustedClusterStatus,
};
use crate::operator::error::{Error, Result};
use crate::operator::resolve::{IDENTITY_CERT, IDENTITY_KEY, ROOT_CA_KEY, secret_text};
use crate::operator::status::condition;
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
const RESYNC: Duration = Duration::from_secs(300);

type Guarded = DeserializeGuard<TrustedCluster>;

/// State of the controller: the operator's shared context, and failure counts for backoff.
pub struct TrustContext {
    ctx: Arc<Context>,
    failures: Mutex<HashMap<ObjectRef<Guarded>, u32>>,
}

impl TrustContext {
    pub fn new(ctx: Arc<Context>) -> Self {
        Self {
            ctx,
            failures: Mutex::default(),
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

fn root_ca_secret(tc: &str) -> String {
    format!("{tc}-root-ca")
}

fn agent_secret(tc: &str) -> String {
    format!("{tc}-agent")
}

fn owner_reference(tc: &TrustedCluster) -> Option<OwnerReference> {
    let mut owner = tc.controller_owner_ref(&())?;
    owner.block_owner_deletion = Some(true);
    Some(owner)
}

fn owned_meta(tc: &TrustedCluster, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: tc.namespace(),
        labels: Some(BTreeMap::from([(OWNER_LABEL.to_owned(), tc.name_any())])),
        owner_references: owner_reference(tc).map(|o| vec![o]),
        ..ObjectMeta::default()
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
    finalizer(&api, FINALIZER, tc, |event| async {
        match event {
            Finalizer::Apply(tc) => apply(&tc, &tctx.ctx, &namespace).await,
            Finalizer::Cleanup(tc) => cleanup(&tc, &tctx.ctx, &namespace).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// What apply decided, for the status.
struct Outcome {
    joined: Result<(ClusterName, String), Blocked>,
    tunnel: Result<Option<String>, Blocked>,
}

async fn apply(tc: &TrustedCluster, ctx: &Context, namespace: &str) -> Result<Action> {
    let client = ctx.client.clone();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let joined = ensure_joined(tc, ctx, &secrets).await;
    let tunnel = match &joined {
        Err(_) => Err(Blocked::new("NotJoined", "waiting for the join", None)),
        Ok((root, _)) if tc.spec.enabled => {
            ensure_tunnel(
                tc,
                root,
                &secrets,
                &Api::namespaced(client.clone(), namespace),
            )
            .await
        }
        Ok(_) => disable(tc, &Api::namespaced(client.clone(), namespace))
            .await
            .map(|()| None),
    };
    let retry = [&joined.as_ref().err(), &tunnel.as_ref().err()]
        .iter()
        .filter_map(|b| b.and_then(|b| b.retry))
        .min();
    write_status(tc, ctx, namespace, &Outcome { joined, tunnel }).await?;
    Ok(Action::requeue(retry.unwrap_or(RESYNC)))
}

/// Joins unless the root CA Secret shows an earlier join; returns the root's name and CA
/// fingerprint.
async fn ensure_joined(
    tc: &TrustedCluster,
    ctx: &Context,
    secrets: &Api<Secret>,
) -> std::result::Result<(ClusterName, String), Blocked> {
    let name = tc.name_any();
    let stored = secrets.get_opt(&root_ca_secret(&name)).await.map_err(|e| {
        Blocked::new(
            "SecretUnreadable",
            e.to_string(),
            Some(Duration::from_secs(10)),
        )
    })?;
    if let Some(secret) = stored {
        return joined_from(&secret);
    }
    if !tc.spec.enabled {
        return Err(Blocked::new(
            "Disabled",
            "enabled is false; not joining",
            None,
        ));
    }
    let request = join_request(tc, secrets).await?;
    info!(trusted_cluster = %name, root = %request.root_address, token = %request.token, "joining the root");
    let joined = join(&request).await.map_err(|e| {
        let retry = if e.is_transient() {
            Duration::from_secs(15)
        } else {
            // A refused token stays refused; a new token (a Secret change) or spec edit is
            // picked up at the next resync or edit.
            Duration::from_secs(60)
        };
        Blocked::new(e.reason(), e.to_string(), Some(retry))
    });
    let joined = match joined {
        Ok(j) => j,
        Err(blocked) => {
            publish(ctx, tc, EventType::Warning, "JoinFailed", &blocked.message).await;
            return Err(blocked);
        }
    };
    let keys = joined
        .root_cas
        .iter()
        .filter_map(|k| k.to_openssh().ok())
        .collect::<Vec<_>>()
        .join("\n");
    let mut meta = owned_meta(tc, root_ca_secret(&name));
    meta.annotations = Some(BTreeMap::from([(
        ROOT_CLUSTER_ANNOTATION.to_owned(),
        joined.root_cluster.to_string(),
    )]));
    let secret = Secret {
        metadata: meta,
        string_data: Some(BTreeMap::from([(
            ROOT_CA_KEY.to_owned(),
            format!("{keys}\n"),
        )])),
        ..Secret::default()
    };
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .map_err(|e| {
            Blocked::new(
                "SecretNotWritten",
                e.to_string(),
                Some(Duration::from_secs(10)),
            )
        })?;
    let message = format!(
        "joined root {} (CA {})",
        joined.root_cluster,
        joined.fingerprint()
    );
    publish(ctx, tc, EventType::Normal, "Joined", &message).await;
    Ok((joined.root_cluster.clone(), joined.fingerprint()))
}

/// The root's name and fingerprint from a root CA Secret this controller wrote.
fn joined_from(secret: &Secret) -> std::result::Result<(ClusterName, String), Blocked> {
    let broken = |what: &str| {
        Blocked::new(
            "RootCaSecretInvalid",
            format!(
                "Secret {} {what}; delete it to join again",
                secret.name_any()
            ),
            None,
        )
    };
    let root = secret
        .annotations()
        .get(ROOT_CLUSTER_ANNOTATION)
        .and_then(|n| ClusterName::new(n.as_str()).ok())
        .ok_or_else(|| broken("has no valid root-cluster annotation"))?;
    let first = secret
        .data
        .as_ref()
        .and_then(|d| d.get(ROOT_CA_KEY))
        .and_then(|b| std::str::from_utf8(&b.0).ok())
        .and_then(|t| t.lines().find(|l| !l.trim().is_empty()))
        .and_then(|l| PublicKey::from_openssh(l.trim()).ok())
        .ok_or_else(|| broken("holds no CA key"))?;
    Ok((root, fingerprint(&first)))
}

async fn join_request(
    tc: &TrustedCluster,
    secrets: &Api<Secret>,
) -> std::result::Result<JoinRequest, Blocked> {
    let from = |u: crate::operator::resolve::Unusable| {
        let retry = u.retry.then_some(Duration::from_secs(10));
        Blocked::new(u.problem.reason, u.problem.message, retry)
    };
    let token_text = secret_text(
        secrets,
        &tc.spec.token_secret_ref.name,
        TOKEN_KEY,
        "InvalidToken",
    )
    .await
    .map_err(from)?;
    let token = JoinToken::parse(&token_text).map_err(|e| {
        Blocked::new(
            "InvalidToken",
            format!(
                "Secret {:?} key {TOKEN_KEY:?}: {e}",
                tc.spec.token_secret_ref.name
            ),
            None,
        )
    })?;
    let leaf_ca = leaf_ca(tc, secrets).await?;
    Ok(JoinRequest {
        root_address: tc.spec.root_address.clone(),
        token,
        leaf_cluster: leaf_ca.cluster().clone(),
        leaf_cas: vec![leaf_ca.public_key().clone()],
        root_ca_pin: tc.spec.root_ca_fingerprint.clone(),
        timeout: JOIN_TIMEOUT,
    })
}

async fn leaf_ca(
    tc: &TrustedCluster,
    secrets: &Api<Secret>,
) -> std::result::Result<CertificateAuthority, Blocked> {
    let name = &tc.spec.leaf_ca_secret_ref.name;
    let text = secret_text(secrets, name, LEAF_CA_KEY, "InvalidLeafCa")
        .await
        .map_err(|u| {
            Blocked::new(
                u.problem.reason,
                u.problem.message,
                u.retry.then_some(Duration::from_secs(10)),
            )
        })?;
    let cluster = ClusterName::new(tc.spec.leaf_cluster.as_str())
        .map_err(|e| Blocked::new("InvalidLeafCluster", e.to_string(), None))?;
    let key = PrivateKey::from_openssh(text.as_bytes())
        .ok()
        .filter(|k| !k.is_encrypted())
        .ok_or_else(|| {
            Blocked::new(
                "InvalidLeafCa",
                format!(
                    "Secret {name:?} key {LEAF_CA_KEY:?} is not an unencrypted OpenSSH private key"
                ),
                None,
            )
        })?;
    Ok(CertificateAuthority::from_key(cluster, key))
}

/// Issues (or renews) the agent identity and applies the `ReverseTunnel`.
async fn ensure_tunnel(
    tc: &TrustedCluster,
    root: &ClusterName,
    secrets: &Api<Secret>,
    tunnels: &Api<ReverseTunnel>,
) -> std::result::Result<Option<String>, Blocked> {
    let name = tc.name_any();
    let identity_name = agent_secret(&name);
    let current = secrets.get_opt(&identity_name).await.map_err(|e| {
        Blocked::new(
            "SecretUnreadable",
            e.to_string(),
            Some(Duration::from_secs(10)),
        )
    })?;
    if current.as_ref().is_none_or(needs_renewal) {
        let ca = leaf_ca(tc, secrets).await?;
        let identity = Identity::generate_agent(&ca, AGENT_CERT_VALIDITY)
            .map_err(|e| Blocked::new("IdentityNotIssued", e.to_string(), None))?;
        write_identity(tc, secrets, &identity_name, &identity).await?;
        info!(trusted_cluster = %name, "issued the agent certificate");
    }
    let spec = ReverseTunnelSpec {
        root_cluster: root.to_string(),
        leaf_cluster: tc.spec.leaf_cluster.clone(),
        proxy_address: tc.spec.root_address.clone(),
        identity_secret_ref: SecretReference {
            name: identity_name,
        },
        root_ca_secret_ref: SecretReference {
            name: root_ca_secret(&name),
        },
        allow: tc.spec.allow.clone(),
        api_server: tc.spec.api_server.clone(),
        heartbeat_interval: tc.spec.heartbeat_interval.clone(),
    };
    // Reconciles follow the tunnel's status changes too; an unchanged spec is not rewritten.
    let existing = tunnels.get_opt(&name).await.map_err(|e| {
        Blocked::new(
            "TunnelUnreadable",
            e.to_string(),
            Some(Duration::from_secs(10)),
        )
    })?;
    let uid = tc.uid();
    if existing.is_some_and(|rt| {
        rt.spec == spec
            && rt
                .owner_references()
                .iter()
                .any(|o| Some(&o.uid) == uid.as_ref())
    }) {
        return Ok(Some(name));
    }
    let patch = json!({
        "apiVersion": "tether.dev/v1alpha1",
        "kind": "ReverseTunnel",
        "metadata": {
            "name": name,
            "labels": { OWNER_LABEL: name },
            "ownerReferences": owner_reference(tc).map(|o| vec![o]),
        },
        "spec": spec,
    });
    tunnels
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|e| match &e {
            kube::Error::Api(s) if s.code == 409 => Blocked::new(
                "TunnelNameTaken",
                format!("ReverseTunnel {name} exists and is managed by someone else: {e}"),
                Some(Duration::from_secs(60)),
            ),
            _ => Blocked::new(
                "TunnelNotWritten",
                e.to_string(),
                Some(Duration::from_secs(10)),
            ),
        })?;
    Ok(Some(name))
}

/// Whether the agent certificate in `secret` is missing, unreadable, or past two thirds of
/// its validity.
fn needs_renewal(secret: &Secret) -> bool {
    let cert = secret
        .data
        .as_ref()
        .and_then(|d| d.get(IDENTITY_CERT))
        .and_then(|b| std::str::from_utf8(&b.0).ok())
        .and_then(|t| Certificate::from_openssh(t.trim()).ok());
    let Some(cert) = cert else {
        return true;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let remaining = cert.valid_before().saturating_sub(now);
    remaining < AGENT_CERT_VALIDITY.as_secs() / 3
}

async fn write_identity(
    tc: &TrustedCluster,
    secrets: &Api<Secret>,
    name: &str,
    identity: &Identity,
) -> std::result::Result<(), Blocked> {
    let failed = |e: String| Blocked::new("IdentityNotIssued", e, Some(Duration::from_secs(10)));
    let key = identity
        .key
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .map_err(|e| failed(e.to_string()))?;
    let cert = identity
        .certificate
        .to_openssh()
        .map_err(|e| failed(e.to_string()))?;
    let mut meta = owned_meta(tc, name.to_owned());
    meta.managed_fields = None;
    let patch = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "type": "Opaque",
        "stringData": { IDENTITY_KEY: key.as_str(), IDENTITY_CERT: format!("{cert}\n") },
    });
    secrets
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map(|_| ())
        .map_err(|e| failed(e.to_string()))
}

async fn disable(
    tc: &TrustedCluster,
    tunnels: &Api<ReverseTunnel>,
) -> std::result::Result<(), Blocked> {
    delete_owned(tunnels, &tc.name_any(), tc)
        .await
        .map_err(|e| {
            Blocked::new(
                "TunnelNotDeleted",
                e.to_string(),
                Some(Duration::from_secs(10)),
            )
        })
}

/// Deletes `name` if it exists and `tc` owns it.
async fn delete_owned<K>(api: &Api<K>, name: &str, tc: &TrustedCluster) -> Result<(), kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let Some(obj) = api.get_opt(name).await? else {
        return Ok(());
    };
    let uid = tc.uid();
    let owned = obj
        .meta()
        .owner_references
        .iter()
        .flatten()
        .any(|o| Some(&o.uid) == uid.as_ref());
    if owned {
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn cleanup(tc: &TrustedCluster, ctx: &Context, namespace: &str) -> Result<Action> {
    let name = tc.name_any();
    info!(trusted_cluster = %name, "TrustedCluster deleted; removing its tunnel and Secrets");
    let tunnels: Api<ReverseTunnel> = Api::namespaced(ctx.client.clone(), namespace);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    delete_owned(&tunnels, &name, tc).await?;
    delete_owned(&secrets, &agent_secret(&name), tc).await?;
    delete_owned(&secrets, &root_ca_secret(&name), tc).await?;
    Ok(Action::await_change())
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
    let failures = {
        let mut map = tctx.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key.clone()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = Duration::from_secs(2)
        .saturating_mul(1u32 << failures.clamp(1, 8).saturating_sub(1))
        .min(RESYNC);
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
    let (trusts, tunnels): (Api<Guarded>, Api<ReverseTunnel>) = match namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        ),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let tctx = Arc::new(TrustContext::new(ctx));
    Controller::new(trusts, watcher::Config::default().any_semantic())
        .owns(tunnels, watcher::Config::default().any_semantic())
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(reconcile, error_policy, tctx)
        .for_each(|result| {
            if let Err(e) = result {
                debug!(error = %e, "TrustedCluster reconcile error");
            }
            std::future::ready(())
        })
        .await;
}
