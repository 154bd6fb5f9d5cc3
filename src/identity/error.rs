//! Errors from handling keys and certificates, and from checking a peer's certificate.
//!
//! Messages name files, clusters, users and certificate key ids so an operator can act on them,
//! but never include key material (only SHA-256 fingerprints).

use std::fmt;
use std::path::PathBuf;

use crate::protocol::target::ClusterName;

use super::role::Role;

/// Failures creating, issuing, loading or saving keys, certificates and trust stores.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file or directory could not be read or written.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done ("read", "write", "list", ...).
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A key or certificate could not be parsed.
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Parse {
        /// The file (or other source) that held it.
        path: PathBuf,
        /// The 1-based line, when the file holds one item per line.
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
    /// A trust directory holds a file whose name is not `<cluster>.pub`.
    #[error(
        "{}: trust store files must be named <cluster>.pub, with <cluster> a valid cluster name: {reason}",
        path.display()
    )]
    BadTrustFileName {
        /// The offending file.
        path: PathBuf,
        /// Why the name was refused.
        reason: String,
    },
    /// A private key file is passphrase-protected; Tether keys live in Kubernetes Secrets instead.
    #[error("{}: the private key is encrypted; Tether needs an unencrypted key", path.display())]
    EncryptedKey {
        /// The key file.
        path: PathBuf,
    },
    /// A file a command would write exists already; replacing it is refused unless asked for.
    #[error("{} already exists; not overwriting it", path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// A private key (or other secret) file others may read: it must be assumed copied, so
    /// it is not used.
    #[error(
        "{}: mode {mode:04o} lets other users read this secret file; run `chmod 600 {}` \
         (for a Kubernetes Secret volume: defaultMode 0440 with the pod's fsGroup)",
        path.display(),
        path.display()
    )]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A certificate does not certify the private key it is stored with.
    #[error(
        "{}: the certificate {key_id:?} is for key {cert_key}, but the private key is {private_key}",
        path.display()
    )]
    CertificateKeyMismatch {
        /// The certificate file.
        path: PathBuf,
        /// The certificate's key id.
        key_id: String,
        /// Fingerprint of the key named in the certificate.
        cert_key: String,
        /// Fingerprint of the private key.
        private_key: String,
    },
    /// A CA key made for one cluster was given as another's: its certificates would name the
    /// wrong cluster and be refused wherever they are used.
    #[error(
        "{}: this is the CA of cluster {made_for:?} (it was made with --cluster {made_for}), \
         not of \"{given}\"",
        path.display()
    )]
    CaClusterMismatch {
        /// The CA key file.
        path: PathBuf,
        /// The cluster named in the key's comment when `tether ca init` made it.
        made_for: String,
        /// The cluster it was loaded for.
        given: ClusterName,
    },
    /// A proxy id, user name or principal cannot go into a certificate.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        /// What the value is ("proxy id", "user name").
        what: &'static str,
        /// The refused value.
        value: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// A validity period that does not fit a certificate (overflow, or a clock before 1970).
    #[error("invalid certificate validity: {0}")]
    Validity(String),
    /// The SSH key library refused an operation (key generation, signing, encoding).
    #[error("cannot {action}: {source}")]
    Key {
        /// What was being done.
        action: String,
        /// The library's error.
        source: russh::keys::ssh_key::Error,
    },
}

/// Why a peer's certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The SSH user name cannot be a cluster or client name.
    #[error("SSH user name {user:?} is not a valid {expected}")]
    InvalidUserName {
        /// The user name as presented (printed escaped).
        user: String,
        /// What it should have been ("cluster name", "client name").
        expected: &'static str,
    },
    /// No CA is trusted for the cluster.
    #[error(
        "no certificate authority is trusted for cluster {cluster:?}; add its CA public key to the trust store"
    )]
    UnknownCluster {
        /// The cluster named by the peer.
        cluster: String,
    },
    /// The certificate is signed by a key that is not a CA of the expected cluster.
    #[error(
        "certificate {key_id:?} is signed by {fingerprint}, which is not a trusted certificate authority of cluster {cluster}"
    )]
    UntrustedCa {
        /// The cluster whose CAs were tried.
        cluster: ClusterName,
        /// The certificate's key id.
        key_id: String,
        /// SHA-256 fingerprint of the key that signed the certificate.
        fingerprint: String,
    },
    /// The signature does not verify against the CA named in the certificate: forged or corrupt.
    #[error(
        "certificate {key_id:?} claims to be signed by CA {fingerprint} of cluster {cluster}, but its signature does not verify"
    )]
    BadSignature {
        /// The cluster whose CA was claimed.
        cluster: ClusterName,
        /// The certificate's key id.
        key_id: String,
        /// SHA-256 fingerprint of the claimed CA.
        fingerprint: String,
    },
    /// The certificate's validity ended; it must be renewed.
    #[error("certificate {key_id:?} expired at {valid_before} (checked at {now})")]
    Expired {
        /// The certificate's key id.
        key_id: String,
        /// End of validity.
        valid_before: Timestamp,
        /// The time it was checked at.
        now: Timestamp,
    },
    /// The certificate's validity has not begun: usually a clock out of sync.
    #[error(
        "certificate {key_id:?} is not valid before {valid_after} (checked at {now}); check the clocks"
    )]
    NotYetValid {
        /// The certificate's key id.
        key_id: String,
        /// Start of validity.
        valid_after: Timestamp,
        /// The time it was checked at.
        now: Timestamp,
    },
    /// A host certificate presented as a user's, or the other way round.
    #[error("certificate {key_id:?} is a {found} certificate, expected a {expected} certificate")]
    WrongCertType {
        /// The certificate's key id.
        key_id: String,
        /// "user" or "host".
        expected: &'static str,
        /// "user" or "host".
        found: &'static str,
    },
    /// The certificate does not name the principal it is used for.
    #[error("certificate {key_id:?} is valid for {principals:?}, not for {expected:?}")]
    PrincipalMismatch {
        /// The certificate's key id.
        key_id: String,
        /// The principal required (or its pattern, such as `<id>.leaf-1`).
        expected: String,
        /// The principals the certificate names.
        principals: Vec<String>,
    },
    /// The certificate grants another role (or none).
    #[error(
        "certificate {key_id:?} has role {}, expected {expected}",
        found.as_deref().map(|r| format!("{r:?}")).unwrap_or_else(|| "(none)".to_owned())
    )]
    WrongRole {
        /// The certificate's key id.
        key_id: String,
        /// The role required.
        expected: Role,
        /// The role the certificate carries, if any.
        found: Option<String>,
    },
    /// The certificate carries a critical option Tether does not implement, so it must be refused.
    #[error(
        "certificate {key_id:?} carries critical option {option:?}, which Tether does not support"
    )]
    UnsupportedCriticalOption {
        /// The certificate's key id.
        key_id: String,
        /// The option's name.
        option: String,
    },
    /// A proxy presented a bare host key where a certificate from the root CA is required.
    #[error("the proxy presented a bare host key, not a certificate signed by the root CA")]
    BareHostKey,
    /// The certificate could not be re-encoded to check its signature.
    #[error("certificate {key_id:?} cannot be encoded: {message}")]
    Malformed {
        /// The certificate's key id.
        key_id: String,
        /// The encoder's complaint.
        message: String,
    },
}

impl AuthError {
    /// What a proxy may tell the peer it refused: what the peer's own certificate says and
    /// whether its CA is trusted for the cluster it claims, never which names or keys the proxy
    /// does trust. An unknown cluster, a CA that is not the cluster's and a bad signature all
    /// read the same, so a prober with a self-made CA learns nothing from the difference.
    pub fn disclosed(&self) -> String {
        match self {
            AuthError::UnknownCluster { cluster } => untrusted(cluster),
            AuthError::UntrustedCa { cluster, .. } | AuthError::BadSignature { cluster, .. } => {
                untrusted(cluster.as_str())
            }
            other => other.to_string(),
        }
    }
}

fn untrusted(cluster: &str) -> String {
    format!("the certificate's authority is not trusted for cluster {cluster:?}")
}

/// A certificate time (seconds since the Unix epoch), shown as UTC date and time in messages so
/// an operator can compare it with a clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub u64);

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == u64::MAX {
            return f.write_str("forever");
        }
        let secs = self.0;
        let days = secs / 86_400;
        let rem = secs % 86_400;
        let (y, m, d) = civil_from_days(days);
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
            rem / 3600,
            (rem % 3600) / 60,
            rem % 60
        )
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day); Howard Hinnant's algorithm.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}
