//! `spec.egressProxy` of a `ReverseTunnel` or a `TrustedCluster`: the URL checked and its
//! Secrets read into the [`Route`] the agent and the join take. A missing or wrong Secret is a
//! `Failed` tunnel (or a blocked join) whose condition names the field, never a panic; the
//! Secrets' text never reaches a message.

use std::hash::{Hash, Hasher};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use super::crd::reverse_tunnel::{EgressProxy, SecretKeyReference};
use super::secret_read::{Unusable, secret_text, unusable};
use crate::transport::{Credentials, Egress, EgressError, ForwardProxy, NoProxy, Route};

/// The reason of every condition this module sets.
pub const REASON: &str = "InvalidEgressProxy";

/// The route `spec` describes (an empty URL: direct), its Secrets read; what needs a reconnect
/// when it changes (the URL, the list, the Secrets' text) is fed to `hasher`.
pub async fn route(
    spec: &EgressProxy,
    secrets: &Api<Secret>,
    hasher: &mut impl Hasher,
) -> Result<Route, Unusable> {
    (&spec.url, &spec.no_proxy).hash(hasher);
    if spec.url.trim().is_empty() {
        return Ok(Route::direct());
    }
    let proxy = ForwardProxy::parse(&spec.url, "spec.egressProxy.url").map_err(invalid)?;
    if proxy.credentials().is_some() {
        return Err(unusable(
            REASON,
            "spec.egressProxy.url holds credentials, which every reader of this object sees: put them in the Secret of credentialsSecretRef".into(),
            false,
        ));
    }
    let proxy = match &spec.credentials_secret_ref {
        None => proxy,
        Some(r) => {
            let text = read(secrets, r, "credentialsSecretRef", hasher).await?;
            proxy.with_credentials(Credentials::parse(&text, origin(r)).map_err(invalid)?)
        }
    };
    let proxy = match &spec.ca_secret_ref {
        None => proxy,
        Some(r) => {
            let text = read(secrets, r, "caSecretRef", hasher).await?;
            proxy
                .with_ca(text.as_bytes(), &origin(r))
                .map_err(invalid)?
        }
    };
    Ok(Route::via(Egress::via(
        proxy,
        NoProxy::parse(&spec.no_proxy),
    )))
}

/// The key `r` names, its absence said to be the egress proxy's (`field` names which).
async fn read(
    secrets: &Api<Secret>,
    r: &SecretKeyReference,
    field: &str,
    hasher: &mut impl Hasher,
) -> Result<String, Unusable> {
    let text = secret_text(secrets, &r.name, &r.key, REASON)
        .await
        .map_err(|mut u| {
            u.problem.message = format!("spec.egressProxy.{field}: {}", u.problem.message);
            u
        })?;
    text.hash(hasher);
    Ok(text)
}

fn origin(r: &SecretKeyReference) -> String {
    format!("Secret {:?} key {:?}", r.name, r.key)
}

/// A configuration error: fixed only by an edit (of the spec or the Secret, which is watched).
fn invalid(e: EgressError) -> Unusable {
    unusable(REASON, e.to_string(), false)
}
