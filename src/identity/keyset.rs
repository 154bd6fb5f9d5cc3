//! A cluster's CA key set, vouched for by one of its CA keys: how a CA rotation carries a new
//! key to the other side of a trust without a join (#19).
//!
//! A leaf rotating its CA must tell the root "trust these keys for me now". The agent's tunnel
//! is an authenticated path, but an agent *certificate* must not be enough to say it: whoever
//! stole one would make its own key a CA of the leaf, and mint certificates for as long as it
//! liked. So the statement is signed with a CA key (an SSH signature, `ssh-keygen -Y` format,
//! namespace [`NAMESPACE`]), which only the leaf's operator holds; the root accepts it only
//! when the signer is among the keys it trusts for that cluster now, and when it is newer than
//! the last one it accepted (no replay of an old set after a rotation moved on):
//!
//! ```text
//!   phase      set published     signed by   the root trusts after
//!   standby    [old]             -           [old]
//!   init       [old, new]        old         [old, new]
//!   retire     [new]             new         [new]      (old's sessions are closed)
//!   replay of init after retire: signed by old, no longer trusted: refused
//! ```

use std::fmt;

use russh::keys::ssh_key::{HashAlg, SshSig};
use russh::keys::{PrivateKey, PublicKey};

use crate::protocol::ClusterName;

/// The SSH signature namespace of key-set statements: a signature made for anything else
/// (a Git commit, a file) does not verify here.
pub const NAMESPACE: &str = "tether-ca-keys@tether.dev";
/// Most keys a set holds (a rotation needs two or three).
pub const MAX_KEYS: usize = 8;

/// What a key set says: that `cluster`'s CA keys are `keys`, as of `issued_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySet {
    /// The cluster whose keys these are.
    pub cluster: ClusterName,
    /// When it was made, in seconds since the Unix epoch: a later set replaces an earlier one.
    pub issued_at: u64,
    /// The CA keys, in the order given.
    pub keys: Vec<PublicKey>,
}

/// A key set and its signature, as it travels (text, so it reads in a log and a packet).
pub use crate::protocol::control::CaKeySet as SignedKeySet;

/// Why a signed key set was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeySetError {
    #[error("the key set is not a statement of this form: {0}")]
    Malformed(&'static str),
    #[error("the key set names cluster {named}, not {expected}")]
    OtherCluster { named: String, expected: String },
    #[error("the key set holds {0} keys; at most {MAX_KEYS}")]
    TooManyKeys(usize),
    #[error("the key set's signature does not read: {0}")]
    BadSignature(String),
    #[error("the key set is not signed by a CA key trusted for {0} now")]
    UntrustedSigner(ClusterName),
    #[error("the key set was issued at {issued_at}, not after the last one accepted ({last})")]
    Replayed { issued_at: u64, last: u64 },
    #[error("signing the key set: {0}")]
    Signing(String),
}

const HEADER: &str = "tether CA key set v1";

impl KeySet {
    /// The canonical text that is signed: a header, the cluster, the time, one key a line.
    pub fn statement(&self) -> String {
        let mut text = format!(
            "{HEADER}\ncluster {}\nissued {}\n",
            self.cluster, self.issued_at
        );
        for key in &self.keys {
            text.push_str("key ");
            text.push_str(&key.to_openssh().unwrap_or_default());
            text.push('\n');
        }
        text
    }

    /// Signs the set with `ca`, which must be one of the keys the other side trusts now.
    pub fn sign(&self, ca: &PrivateKey) -> Result<SignedKeySet, KeySetError> {
        if self.keys.is_empty() || self.keys.len() > MAX_KEYS {
            return Err(KeySetError::TooManyKeys(self.keys.len()));
        }
        let statement = self.statement();
        let signature = ca
            .sign(NAMESPACE, HashAlg::Sha512, statement.as_bytes())
            .and_then(|s| s.to_pem(Default::default()))
            .map_err(|e| KeySetError::Signing(e.to_string()))?;
        Ok(SignedKeySet {
            statement,
            signature,
        })
    }

    /// What `text` states, unverified: for its signer's own records (which set it last
    /// published); a receiver uses [`verify`].
    pub fn read(text: &str) -> Result<Self, KeySetError> {
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            return Err(KeySetError::Malformed("no header"));
        }
        let cluster = lines
            .next()
            .and_then(|l| l.strip_prefix("cluster "))
            .and_then(|c| ClusterName::new(c).ok())
            .ok_or(KeySetError::Malformed("no cluster"))?;
        let issued_at = lines
            .next()
            .and_then(|l| l.strip_prefix("issued "))
            .and_then(|t| t.parse().ok())
            .ok_or(KeySetError::Malformed("no time"))?;
        let keys = lines
            .map(|l| {
                l.strip_prefix("key ")
                    .and_then(|k| PublicKey::from_openssh(k).ok())
                    .ok_or(KeySetError::Malformed("a line that is not a key"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() || keys.len() > MAX_KEYS {
            return Err(KeySetError::TooManyKeys(keys.len()));
        }
        let set = Self {
            cluster,
            issued_at,
            keys,
        };
        // Only the canonical form is accepted: what is signed is what is read.
        if set.statement() != text {
            return Err(KeySetError::Malformed("not in canonical form"));
        }
        Ok(set)
    }
}

/// The set `signed` states, if it speaks for `cluster`, is signed by one of `trusted` (the
/// keys the receiver trusts for `cluster` now), and is newer than `last_accepted`.
pub fn verify(
    signed: &SignedKeySet,
    cluster: &ClusterName,
    trusted: &[PublicKey],
    last_accepted: u64,
) -> Result<KeySet, KeySetError> {
    let set = KeySet::read(&signed.statement)?;
    if &set.cluster != cluster {
        return Err(KeySetError::OtherCluster {
            named: set.cluster.to_string(),
            expected: cluster.to_string(),
        });
    }
    let signature = SshSig::from_pem(signed.signature.as_bytes())
        .map_err(|e| KeySetError::BadSignature(e.to_string()))?;
    let signed_by_trusted = trusted.iter().any(|key| {
        key.key_data() == signature.public_key()
            && key
                .verify(NAMESPACE, signed.statement.as_bytes(), &signature)
                .is_ok()
    });
    if !signed_by_trusted {
        return Err(KeySetError::UntrustedSigner(cluster.clone()));
    }
    if set.issued_at <= last_accepted {
        return Err(KeySetError::Replayed {
            issued_at: set.issued_at,
            last: last_accepted,
        });
    }
    Ok(set)
}

/// Where the signature starts in a key set file.
const SIGNATURE_START: &str = "-----BEGIN SSH SIGNATURE-----";

/// A signed set as a file holds it: the statement, then its signature.
pub fn to_file_text(signed: &SignedKeySet) -> String {
    format!("{}{}\n", signed.statement, signed.signature.trim_end())
}

/// A signed set from the text [`to_file_text`] wrote (unverified: see [`verify`]).
pub fn from_file_text(text: &str) -> Result<SignedKeySet, KeySetError> {
    let at = text
        .find(SIGNATURE_START)
        .ok_or(KeySetError::Malformed("no signature"))?;
    let (statement, signature) = text.split_at(at);
    KeySet::read(statement)?;
    Ok(SignedKeySet {
        statement: statement.to_owned(),
        signature: signature.trim_end().to_owned(),
    })
}

impl fmt::Display for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prints: Vec<String> = self.keys.iter().map(super::fingerprint).collect();
        write!(
            f,
            "{} at {}: {}",
            self.cluster,
            self.issued_at,
            prints.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::CertificateAuthority;

    fn leaf() -> ClusterName {
        ClusterName::new("leaf-1").unwrap()
    }

    fn ca() -> CertificateAuthority {
        CertificateAuthority::generate(leaf()).unwrap()
    }

    fn set(at: u64, keys: &[&CertificateAuthority]) -> KeySet {
        KeySet {
            cluster: leaf(),
            issued_at: at,
            keys: keys.iter().map(|c| c.public_key().clone()).collect(),
        }
    }

    #[test]
    fn a_rotation_moves_the_trust_one_signed_step_at_a_time() {
        let (old, new) = (ca(), ca());
        let trusted = vec![old.public_key().clone()];
        // init: both keys, signed by the old one, which is trusted.
        let init = set(10, &[&old, &new]).sign(old.private_key()).unwrap();
        let accepted = verify(&init, &leaf(), &trusted, 0).unwrap();
        assert_eq!(accepted.keys.len(), 2);
        // retire: the new key alone, signed by it (trusted since init).
        let trusted = accepted.keys;
        let retire = set(20, &[&new]).sign(new.private_key()).unwrap();
        let accepted = verify(&retire, &leaf(), &trusted, 10).unwrap();
        assert_eq!(accepted.keys, [new.public_key().clone()]);
        // The init set again, after retire: its signer is no longer trusted.
        assert_eq!(
            verify(&init, &leaf(), &accepted.keys, 20),
            Err(KeySetError::UntrustedSigner(leaf()))
        );
    }

    #[test]
    fn a_signed_set_reads_back_from_its_file_text() {
        let ca = ca();
        let signed = set(10, &[&ca]).sign(ca.private_key()).unwrap();
        let text = to_file_text(&signed);
        let back = from_file_text(&text).unwrap();
        assert!(verify(&back, &leaf(), &[ca.public_key().clone()], 0).is_ok());
        assert!(matches!(
            from_file_text(&signed.statement),
            Err(KeySetError::Malformed("no signature"))
        ));
    }

    #[test]
    fn a_set_not_from_a_trusted_ca_or_not_newer_is_refused() {
        let (old, thief) = (ca(), ca());
        let trusted = vec![old.public_key().clone()];
        // Signed by a key of its own making (an agent certificate's key, say).
        let forged = set(10, &[&old, &thief]).sign(thief.private_key()).unwrap();
        assert_eq!(
            verify(&forged, &leaf(), &trusted, 0),
            Err(KeySetError::UntrustedSigner(leaf()))
        );
        // A replay of what was accepted.
        let fine = set(10, &[&old]).sign(old.private_key()).unwrap();
        assert!(verify(&fine, &leaf(), &trusted, 0).is_ok());
        assert!(matches!(
            verify(&fine, &leaf(), &trusted, 10),
            Err(KeySetError::Replayed { .. })
        ));
        // For another cluster.
        let other = ClusterName::new("leaf-2").unwrap();
        assert!(matches!(
            verify(&fine, &other, &trusted, 0),
            Err(KeySetError::OtherCluster { .. })
        ));
        // Changed after signing: a key added under the same signature.
        let mut tampered = fine.clone();
        tampered.statement = set(10, &[&old, &thief]).statement();
        assert_eq!(
            verify(&tampered, &leaf(), &trusted, 0),
            Err(KeySetError::UntrustedSigner(leaf()))
        );
        // Not canonical, or empty.
        let mut odd = fine.clone();
        odd.statement.push('\n');
        assert!(matches!(
            verify(&odd, &leaf(), &trusted, 0),
            Err(KeySetError::Malformed(_))
        ));
        assert!(matches!(
            set(10, &[]).sign(old.private_key()),
            Err(KeySetError::TooManyKeys(0))
        ));
    }
}
