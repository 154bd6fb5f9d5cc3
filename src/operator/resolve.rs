//! From a `ReverseTunnel` spec and the Secrets it names to an [`AgentConfig`], or to the
//! [`Problem`] that explains, in the `Ready` condition, why there is none.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use super::crd::ReverseTunnel;
use super::secret_read::{Unusable, secret_text, unusable};
use crate::agent::AgentConfig;
use crate::agent::kube::{KubeAccess, KubeGateway, KubeUpstream};
use crate::egress::allow_list::AllowList;
use crate::identity::{Certificate, Identity, PrivateKey, PublicKey, fingerprint, parse_ca_keys};
use crate::protocol::ClusterName;
use crate::protocol::control::CaKeySet;

/// Secret key of the agent's private key.
pub const IDENTITY_KEY: &str = "key";
/// Secret key of the agent's certificate.
pub const IDENTITY_CERT: &str = "cert";
/// Secret key of the root CA public keys.
pub const ROOT_CA_KEY: &str = "ca.pub";

/// The shortest and longest heartbeat intervals accepted.
const HEARTBEAT_RANGE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(600));

/// A spec the operator can run.
pub struct Desired {
    /// The agent configuration (its `allow` is a fresh cell; the caller swaps in its own).
    pub config: AgentConfig,
    /// The parsed allow-list, applied in place to a running agent.
    pub allow: AllowList,
    /// Hash of everything that needs a reconnect when it changes (address, identity, CAs,
    /// names, API server, heartbeat); the allow-list is not part of it.
    pub fingerprint: u64,
    /// The leaf CA key set the agent publishes (`spec.caKeySet`), sent in place.
    pub ca_keys: Option<Arc<CaKeySet>>,
    /// Fingerprint of the CA key that signed the agent's certificate, for the status.
    pub identity_ca: String,
}

/// Checks the parts of a spec that need no API call: names, allow-list and interval.
pub fn check_spec(
    rt: &ReverseTunnel,
) -> Result<(ClusterName, ClusterName, AllowList, Duration), Unusable> {
    let spec = &rt.spec;
    let name = |field: &str, value: &str| {
        ClusterName::new(value).map_err(|e| {
            unusable(
                "InvalidClusterName",
                format!("spec.{field} {value:?}: {e}"),
                false,
            )
        })
    };
    let root = name("rootCluster", &spec.root_cluster)?;
    let leaf = name("leafCluster", &spec.leaf_cluster)?;
    let allow = AllowList::parse(&spec.tunnel.allow)
        .map_err(|e| unusable("InvalidAllowList", format!("spec.allow: {e}"), false))?;
    let heartbeat = humantime::parse_duration(&spec.tunnel.heartbeat_interval).map_err(|e| {
        unusable(
            "InvalidHeartbeatInterval",
            format!(
                "spec.heartbeatInterval {:?}: {e}",
                spec.tunnel.heartbeat_interval
            ),
            false,
        )
    })?;
    if heartbeat < HEARTBEAT_RANGE.0 || heartbeat > HEARTBEAT_RANGE.1 {
        return Err(unusable(
            "InvalidHeartbeatInterval",
            format!(
                "spec.heartbeatInterval {:?} is outside 1s..10m",
                spec.tunnel.heartbeat_interval
            ),
            false,
        ));
    }
    Ok((root, leaf, allow, heartbeat))
}

fn parse_identity(key_text: &str, cert_text: &str, secret: &str) -> Result<Identity, Unusable> {
    let bad = |message: String| unusable("InvalidIdentity", message, false);
    let key = PrivateKey::from_openssh(key_text.as_bytes()).map_err(|e| {
        bad(format!(
            "Secret {secret:?} key {IDENTITY_KEY:?}: not an OpenSSH private key: {e}"
        ))
    })?;
    if key.is_encrypted() {
        return Err(bad(format!(
            "Secret {secret:?} key {IDENTITY_KEY:?}: the private key is encrypted"
        )));
    }
    let certificate = Certificate::from_openssh(cert_text.trim()).map_err(|e| {
        bad(format!(
            "Secret {secret:?} key {IDENTITY_CERT:?}: not an OpenSSH certificate: {e}"
        ))
    })?;
    if certificate.public_key() != key.public_key().key_data() {
        return Err(bad(format!(
            "Secret {secret:?}: the certificate is not for this private key"
        )));
    }
    Ok(Identity { key, certificate })
}

/// The gateway a spec's `kubeAccess` asks for, with the operator's way to its API server.
fn kube_gateway(
    rt: &ReverseTunnel,
    root: &ClusterName,
    upstream: Option<&Arc<KubeUpstream>>,
) -> Result<Option<Arc<KubeGateway>>, Unusable> {
    let rules = &rt.spec.tunnel.kube_access;
    if rules.is_empty() {
        return Ok(None);
    }
    let access = KubeAccess::new(root.clone(), rules.clone())
        .map_err(|e| unusable("InvalidKubeAccess", format!("spec.kubeAccess: {e}"), false))?;
    let upstream = upstream.cloned().ok_or_else(|| {
        unusable(
            "KubeAccessUnavailable",
            "spec.kubeAccess: the operator cannot lend its credentials to the agent (its log says why at start-up)".to_owned(),
            false,
        )
    })?;
    Ok(Some(Arc::new(KubeGateway { access, upstream })))
}

/// Resolves a spec and its Secrets into what an agent needs; `upstream` is how its agent
/// reaches this cluster's API server for the root's Kubernetes requests.
pub async fn resolve(
    rt: &ReverseTunnel,
    secrets: &Api<Secret>,
    upstream: Option<&Arc<KubeUpstream>>,
) -> Result<Desired, Unusable> {
    let (root, leaf, allow, heartbeat) = check_spec(rt)?;
    let kube = kube_gateway(rt, &root, upstream)?;
    let spec = &rt.spec;
    let id_secret = &spec.identity_secret_ref.name;
    let key_text = secret_text(secrets, id_secret, IDENTITY_KEY, "InvalidIdentity").await?;
    let cert_text = secret_text(secrets, id_secret, IDENTITY_CERT, "InvalidIdentity").await?;
    let identity = parse_identity(&key_text, &cert_text, id_secret)?;
    let ca_secret = &spec.root_ca_secret_ref.name;
    let ca_text = secret_text(secrets, ca_secret, ROOT_CA_KEY, "InvalidRootCA").await?;
    let label = format!("Secret {ca_secret}/{ROOT_CA_KEY}");
    let root_cas = parse_ca_keys(&ca_text, Path::new(&label))
        .map_err(|e| unusable("InvalidRootCA", e.to_string(), false))?;
    if root_cas.is_empty() {
        return Err(unusable(
            "InvalidRootCA",
            format!("{label} holds no CA key"),
            false,
        ));
    }

    let mut hasher = DefaultHasher::new();
    (
        &spec.proxy_address,
        &spec.root_cluster,
        &spec.leaf_cluster,
        &spec.tunnel.api_server,
        heartbeat,
        serde_json::to_string(&spec.tunnel.kube_access).unwrap_or_default(),
    )
        .hash(&mut hasher);
    (key_text.trim(), cert_text.trim(), ca_text.trim()).hash(&mut hasher);
    // `None`: the operator's own route, which the caller sets.
    let route = match &spec.tunnel.egress_proxy {
        Some(egress) => Some(super::egress_proxy::route(egress, secrets, &mut hasher).await?),
        None => None,
    };
    let identity_ca = fingerprint(&PublicKey::from(
        identity.certificate.signature_key().clone(),
    ));
    let ca_keys = spec.ca_key_set.as_ref().map(|set| {
        Arc::new(CaKeySet {
            statement: set.statement.clone(),
            signature: set.signature.clone(),
        })
    });
    let config = AgentConfig {
        api_server: spec.tunnel.api_server.clone(),
        kube,
        heartbeat_interval: heartbeat,
        route: route.unwrap_or_default(),
        ..AgentConfig::new(
            leaf,
            root,
            spec.proxy_address.clone(),
            Arc::new(identity),
            root_cas,
            allow.clone(),
        )
    };
    Ok(Desired {
        config,
        allow,
        fingerprint: hasher.finish(),
        ca_keys,
        identity_ca,
    })
}
