//! Who presents a bearer token, decided by the root's API server: the client entry's
//! [`BearerTokens`](crate::proxy::BearerTokens) by TokenReview, so root workloads reach leaves
//! with their ServiceAccount tokens (and people with whatever the API server accepts, such as
//! OIDC tokens), as user and groups that the root's RBAC then judges
//! ([`super::access`]).
//!
//! **Audience.** A token is accepted only if it was issued for [`AUDIENCE`] (`kubectl create
//! token NAME --audience tether`), not one for the API server itself: a token for the API
//! server would let whoever receives it act as its owner there, so sending one to a proxy would
//! hand the proxy that power. A token bound to this audience is worth nothing elsewhere.
//!
//! **Cost.** Reviews are kept [`REVIEW_TTL`] by the token's SHA-256 digest (never the token),
//! at most [`MAX_REVIEWS`]; a refused token is kept too, so one client repeating a bad token
//! costs one review per TTL (and the entry's per-source penalties stop it soon). A review that
//! fails (API server unreachable) authenticates nobody and is not kept.

use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};
use sha2::{Digest, Sha256};
use tracing::warn;

use super::kept::{Kept, ask};
use crate::proxy::{BearerTokens, Who};

/// The audience a client's token must be issued for.
pub const AUDIENCE: &str = "tether";

/// How long a review stands: a revoked token (its ServiceAccount deleted) is refused within it.
pub const REVIEW_TTL: Duration = Duration::from_secs(10);

/// Reviews kept at most; past it expired ones go first, and if none has, the new one is not
/// kept.
pub const MAX_REVIEWS: usize = 4096;

/// Bearer tokens reviewed by the root's API server.
pub struct TokenReviews {
    /// Creates the reviews (cluster-scoped: the proxy's ClusterRole allows it).
    reviews: Api<TokenReview>,
    /// Recent reviews by the token's digest: who it is, or `None` (it authenticates nobody).
    kept: Kept<[u8; 32], Option<Who>>,
}

impl TokenReviews {
    pub fn new(client: Client) -> Self {
        Self {
            reviews: Api::all(client),
            kept: Kept::new(REVIEW_TTL, MAX_REVIEWS),
        }
    }

    /// Asks the API server; `Err` if it could not answer (in time).
    async fn ask_api_server(&self, token: &str) -> Result<Option<Who>, String> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![AUDIENCE.to_owned()]),
            },
            ..TokenReview::default()
        };
        let answer = ask(self.reviews.create(&PostParams::default(), &review)).await?;
        let status = answer.status.unwrap_or_default();
        let audience_ok = status
            .audiences
            .as_ref()
            .is_some_and(|a| a.iter().any(|a| a == AUDIENCE));
        Ok(status
            .user
            .filter(|_| status.authenticated == Some(true) && audience_ok)
            .and_then(|user| {
                Some(Who {
                    user: user.username.filter(|u| !u.is_empty())?,
                    groups: user.groups.unwrap_or_default(),
                })
            }))
    }
}

impl BearerTokens for TokenReviews {
    fn review<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Option<Who>> {
        async move {
            let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            if let Some(who) = self.kept.get(&digest) {
                return who;
            }
            match self.ask_api_server(token).await {
                Ok(who) => {
                    self.kept.keep(digest, who.clone());
                    who
                }
                Err(e) => {
                    warn!(error = %e, "could not review a client's bearer token; refusing it");
                    None
                }
            }
        }
        .boxed()
    }
}
