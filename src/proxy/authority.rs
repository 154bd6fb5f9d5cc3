//! Who decides a join: the interface between the proxy, which speaks the join protocol
//! ([`super::join`]), and whatever keeps the root's tokens and admitted leaves (in Kubernetes,
//! `operator::root`). Apart from the protocol so the configuration can name an authority
//! without importing the code that serves joins.

use std::fmt;

use futures::future::BoxFuture;
use russh::keys::PublicKey;

use crate::protocol::ClusterName;
use crate::protocol::join::{JoinRefusal, JoinToken};

/// A refused join: the reason the leaf's status shows, and a message for its administrator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct Refused {
    /// Machine-readable reason (a condition reason on the leaf).
    pub reason: JoinRefusal,
    /// What went wrong, in words; never contains a secret.
    pub message: String,
}

impl Refused {
    pub fn new(reason: JoinRefusal, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// A leaf asking to be trusted, after it proved it holds the token.
#[derive(Debug, Clone)]
pub struct Admission {
    /// The token it proved (its ID names it in records).
    pub token_id: String,
    /// The name its agents' certificates carry.
    pub leaf: ClusterName,
    /// The CA keys that sign its agents' certificates.
    pub ca_keys: Vec<PublicKey>,
}

/// Where the root's join state lives: issued tokens and admitted leaves.
pub trait JoinAuthority: Send + Sync + 'static {
    /// The token with this ID, if it exists and has not expired.
    fn token<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<JoinToken, Refused>>;

    /// Records the leaf as trusted, consuming the token if it is single-use. Refuses a name
    /// another CA already holds, and a single-use token already used (by another leaf, with
    /// other CA keys, or by a leaf since revoked). Must be idempotent for the same leaf, CA and
    /// token while the leaf's record stands (a leaf retries when an answer is lost).
    fn admit<'a>(&'a self, admission: &'a Admission) -> BoxFuture<'a, Result<(), Refused>>;

    /// Makes `keys` the CA keys `leaf`'s record trusts, as a key set issued at `issued_at`
    /// and signed by a key the root trusts now says (the caller checked the signature:
    /// `identity::keyset`). The set already applied is answered as applied (every tunnel of
    /// the leaf sends it on connecting); an older one, or a leaf the authority keeps no record
    /// of (its trust is static), is refused: the `Err` says why, for the leaf.
    fn rotate<'a>(
        &'a self,
        leaf: &'a ClusterName,
        keys: &'a [PublicKey],
        issued_at: u64,
    ) -> BoxFuture<'a, Result<(), String>> {
        let _ = (keys, issued_at);
        Box::pin(async move {
            Err(format!(
                "this root keeps no record of {leaf} to rotate: its trust is static"
            ))
        })
    }
}

impl fmt::Debug for dyn JoinAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JoinAuthority")
    }
}
