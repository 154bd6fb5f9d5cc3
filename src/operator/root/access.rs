//! Who may reach which leaf, decided by the root cluster's RBAC: the proxy's
//! [`LeafAccess`](crate::proxy::LeafAccess) asks the API server with a SubjectAccessReview
//! whether the client may `create` the subresource `remoteclusters/dial` (a TCP dial) or
//! `remoteclusters/kube` (the leaf's Kubernetes API) of the leaf's `RemoteCluster` in the
//! proxies' namespace. A platform team grants it with the Roles and
//! RoleBindings it already writes (`resourceNames` for single leaves):
//!
//! ```yaml
//! rules:
//!   - apiGroups: ["tether.dev"]
//!     resources: ["remoteclusters/dial"]
//!     resourceNames: ["leaf-1"]
//!     verbs: ["create"]
//! ```
//!
//! The client is the Kubernetes user of its name: the principal of its certificate from the
//! root CA, or its name in the client entry's token file. Decisions are kept for
//! [`DECISION_TTL`] per client and leaf (at most [`MAX_DECISIONS`] of them), so a stream of
//! dials costs the API server one review every few seconds, and a new RoleBinding, or a
//! removed one, takes effect within that time. A review that fails (API server unreachable, the
//! proxy not allowed to create reviews) refuses the dial and is not kept.

use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::{Api, Client};
use tracing::warn;

use super::kept::{Kept, ask};
use crate::operator::crd::GROUP;
use crate::protocol::ClusterName;
use crate::proxy::{AccessDenied, LeafAccess, Reach, Who};

/// How long a decision stands: a grant or a revocation takes effect within it.
pub const DECISION_TTL: Duration = Duration::from_secs(5);

/// Decisions kept at most: one per client and leaf dialled within [`DECISION_TTL`]. Past it,
/// expired ones go first; if none has, the new decision is not kept (each dial asks).
pub const MAX_DECISIONS: usize = 4096;

/// Dial access by the root's RBAC, through SubjectAccessReviews.
pub struct RbacLeafAccess {
    /// Creates the reviews (cluster-scoped: the proxy's ClusterRole allows it).
    reviews: Api<SubjectAccessReview>,
    /// Where the `RemoteCluster` objects, and so the permissions on them, live.
    namespace: String,
    /// Recent decisions by (client, leaf, what it asks): `Ok` or the refusal.
    decisions: Kept<(Who, ClusterName, Reach), Result<(), AccessDenied>>,
}

impl RbacLeafAccess {
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            reviews: Api::all(client),
            namespace: namespace.to_owned(),
            decisions: Kept::new(DECISION_TTL, MAX_DECISIONS),
        }
    }

    /// Asks the API server, and words a refusal so the client knows what to ask for.
    async fn review(
        &self,
        who: &Who,
        leaf: &ClusterName,
        reach: Reach,
    ) -> Result<Result<(), AccessDenied>, AccessDenied> {
        let user = who.user.as_str();
        let subresource = reach.as_str();
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.to_owned()),
                groups: Some(who.groups.clone()).filter(|g| !g.is_empty()),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(GROUP.to_owned()),
                    resource: Some("remoteclusters".to_owned()),
                    subresource: Some(subresource.to_owned()),
                    verb: Some("create".to_owned()),
                    namespace: Some(self.namespace.clone()),
                    name: Some(leaf.to_string()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let answer = ask(self.reviews.create(&PostParams::default(), &review))
            .await
            .map_err(|e| {
                warn!(user, %leaf, error = %e, "could not ask the API server whether the client may dial the leaf; refusing");
                AccessDenied(format!(
                    "the root could not check whether user {user:?} may create remoteclusters/{subresource} {leaf:?} (its proxy's log says why); try again"
                ))
            })?;
        let allowed = answer.status.as_ref().is_some_and(|s| s.allowed);
        Ok(if allowed {
            Ok(())
        } else {
            Err(AccessDenied(format!(
                "user {user:?} may not create remoteclusters/{subresource} \"{leaf}\" (API group {GROUP}) in namespace {:?}: ask for a Role with that permission (resourceNames [{leaf}]) bound to you there",
                self.namespace
            )))
        })
    }
}

impl LeafAccess for RbacLeafAccess {
    fn check<'a>(
        &'a self,
        who: &'a Who,
        leaf: &'a ClusterName,
        reach: Reach,
    ) -> BoxFuture<'a, Result<(), AccessDenied>> {
        async move {
            let key = (who.clone(), leaf.clone(), reach);
            if let Some(decision) = self.decisions.get(&key) {
                return decision;
            }
            let decision = self.review(who, leaf, reach).await?;
            self.decisions.keep(key, decision.clone());
            decision
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An API server that accepts connections and never answers refuses the dial once
    /// [`ASK_TIMEOUT`](super::super::kept::ASK_TIMEOUT) passes, instead of holding it.
    #[tokio::test]
    async fn a_silent_api_server_refuses_the_dial_in_time() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let _silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let config = kube::Config::new(url.parse().expect("url"));
        let access = RbacLeafAccess::new(Client::try_from(config).expect("client"), "ns");
        let leaf = ClusterName::new("leaf-1").expect("name");
        let refused = access
            .check(&Who::named("alice"), &leaf, Reach::Dial)
            .await
            .expect_err("no answer, no dial");
        assert!(refused.0.contains("could not check"), "{refused}");
    }
}
