//! Who may dial which leaf: the interface between the proxy's client entries (`tether dial`,
//! HTTP CONNECT, SOCKS5), which know a client's name, and whatever keeps the root's access
//! rules (in Kubernetes, RBAC on the leaf's `RemoteCluster`, asked by `operator::root`).
//!
//! Authentication says who a client is (its certificate from the root CA, or its line of the
//! token file); this says whether that client may reach a given leaf at all. The leaf keeps
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

/// The root's access rules for dials into leaves.
pub trait DialAccess: Send + Sync + 'static {
    /// Whether client `user` may dial targets in `leaf`. An error of the rules' source (an
    /// unreachable API server) refuses too: access fails closed.
    fn check<'a>(
        &'a self,
        user: &'a str,
        leaf: &'a ClusterName,
    ) -> BoxFuture<'a, Result<(), AccessDenied>>;
}

impl fmt::Debug for dyn DialAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DialAccess")
    }
}
