//! Who may reach which leaf, and how (a dial, its Kubernetes API): the interface between the proxy's client entries (`tether dial`,
//! HTTP CONNECT, SOCKS5), which know a client's name, and whatever keeps the root's access
//! rules (in Kubernetes, RBAC on the leaf's `RemoteCluster`, asked by `operator::root`).
//!
//! Authentication says who a client is (its certificate from the root CA, its line of the
//! token file, or a bearer token the root's API server vouches for); this says whether that client may reach a given leaf at all. The leaf keeps
//! the last word: a permitted dial still passes the agent's allow-list. Without an access
//! policy every authenticated client may dial every leaf, as before.

use std::fmt;

use futures::future::BoxFuture;

use crate::protocol::ClusterName;

/// A refusal by the root's access rules, in words the refused client may read: it names the
/// client, the leaf and the permission it lacks, and nothing else.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AccessDenied(pub String);

/// Who a client is, as the root's access rules see it: a name and the groups it belongs to.
/// A certificate gives its principal and the groups it names; the token file a name alone; a
/// bearer token reviewed by the root's API server ([`BearerTokens`]) its user's name and
/// groups.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Who {
    /// The user's name (a certificate's principal, a token file's name, or what the token's
    /// issuer says, e.g. `system:serviceaccount:NS:NAME`).
    pub user: String,
    /// The groups the certificate names or the token's issuer puts the user in; empty for
    /// the token file's clients.
    pub groups: Vec<String>,
}

impl Who {
    /// A client known by its name alone.
    pub fn named(user: impl Into<String>) -> Self {
        Self {
            user: user.into(),
            groups: Vec::new(),
        }
    }
}

/// What a client asks of a leaf; each is a permission of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reach {
    /// A TCP dial into the leaf (then judged by the agent's allow-list).
    Dial,
    /// The leaf's Kubernetes API, through the proxy's Kubernetes endpoint (then judged by the
    /// leaf's mapping and RBAC).
    Kube,
}

impl Reach {
    /// Its name, as the `RemoteCluster` subresource that grants it (`remoteclusters/dial`,
    /// `remoteclusters/kube`).
    pub fn as_str(self) -> &'static str {
        match self {
            Reach::Dial => "dial",
            Reach::Kube => "kube",
        }
    }
}

/// The root's access rules for leaves.
pub trait LeafAccess: Send + Sync + 'static {
    /// Whether client `who` may reach `leaf` that way. An error of the rules' source (an
    /// unreachable API server) refuses too: access fails closed.
    fn check<'a>(
        &'a self,
        who: &'a Who,
        leaf: &'a ClusterName,
        reach: Reach,
    ) -> BoxFuture<'a, Result<(), AccessDenied>>;
}

/// Bearer tokens the client entry accepts besides its token file: in Kubernetes, the root's
/// ServiceAccount (or OIDC) tokens, checked by TokenReview.
pub trait BearerTokens: Send + Sync + 'static {
    /// Who presents `token`, or `None` if it does not authenticate (or cannot be checked now:
    /// authentication fails closed too).
    fn review<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Option<Who>>;
}

impl fmt::Debug for dyn BearerTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerTokens")
    }
}

impl fmt::Debug for dyn LeafAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LeafAccess")
    }
}
