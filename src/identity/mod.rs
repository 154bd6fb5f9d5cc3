//! Certificate authorities, OpenSSH certificates and the trust store.
//!
//! Every cluster has its own certificate authority (an Ed25519 key). It signs:
//!
//! - **host certificates** for the root's proxies, with principal `<proxy_id>.<cluster>`, so an
//!   agent learns which proxy replica it reached and that the replica belongs to the cluster it
//!   meant to dial;
//! - **user certificates** for agents (principal = the agent's cluster, role `agent`) and for
//!   root-side clients (principal = the client's name, role `client`), the role being carried in
//!   the [`ROLE_EXTENSION`] extension.
//!
//! The proxy keeps a [`TrustStore`] (cluster name → CA public keys) to check the agents that dial
//! in; agents check the proxy's host certificate with [`verify_host_certificate`]. Verification
//! checks the CA signature itself rather than trusting the SSH library to have done it. Proof that
//! the peer holds the certified key is the SSH handshake's job.

mod ca;
mod error;
pub mod groups;
mod keyfile;
mod keypair;
pub mod keyset;
mod role;
mod trust;
mod verify;

#[cfg(test)]
mod tests;

pub use ca::{CLOCK_SKEW_ALLOWANCE, CertificateAuthority};
pub use error::{AuthError, IdentityError, Timestamp};
pub use groups::{GROUPS_EXTENSION, groups_of};
pub use keyfile::check_key_permissions;
pub use keypair::Identity;
pub use role::{ROLE_EXTENSION, Role};
pub use trust::{TrustSource, TrustStore, parse_ca_keys, same_keys};
pub use verify::{
    check_own_host_certificate, fingerprint, validate_proxy_id, validate_user_name,
    verify_host_certificate, verify_proxy_key,
};

/// The SSH key and certificate types this module works with, re-exported so callers need not
/// name `russh`'s internals.
pub use russh::keys::ssh_key::{Certificate, PrivateKey, PublicKey, certificate::CertType};
