//! The join: how a leaf cluster and a root cluster come to trust each other with one token.
//!
//! The root's administrator issues a **join token** `ID.SECRET` (as kubeadm's bootstrap tokens:
//! the ID names it, the secret proves it) and hands it to the leaf out of band. The leaf dials
//! the root's proxies (the same port as tunnels), authenticates as [`JOIN_USER`] with no key,
//! and opens the [`JOIN_SUBSYSTEM`] on a session channel. Then, in length-prefixed JSON
//! (the control channel's framing):
//!
//! 1. leaf → root [`JoinerMessage::Hello`]: the token ID and a fresh nonce;
//! 2. root → leaf [`RootMessage::Challenge`]: the root's name and CA keys, a nonce, and an
//!    HMAC of all that (and the leaf's nonce) keyed with the token secret. The leaf checks it:
//!    only someone who knows the secret (the root) can produce it, so a man in the middle
//!    cannot substitute its own CA. The leaf then checks that the SSH host certificate it saw
//!    in this very session is signed by that CA.
//! 3. leaf → root [`JoinerMessage::Join`]: the leaf's name and CA keys, with an HMAC over them
//!    and the root's nonce keyed with the secret;
//! 4. root → leaf [`RootMessage::Joined`], or [`RootMessage::Refused`] at any step.
//!
//! The secret itself never crosses the wire, so a leaf that dialled an impostor loses nothing
//! but the token ID. Both HMACs are domain-separated, so one side's proof never serves as the
//! other's.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use serde::{Deserialize, Serialize};

/// The user name a joining leaf logs in as; the only name accepted without a key, and only for
/// the join subsystem.
pub const JOIN_USER: &str = "tether-join";

/// The subsystem that turns a session channel into a join exchange.
pub const JOIN_SUBSYSTEM: &str = "tether-join@tether.dev";

/// Length of a token ID (lowercase letters and digits).
pub const TOKEN_ID_LEN: usize = 6;
/// Length of a token secret (lowercase letters and digits: about 82 bits).
pub const TOKEN_SECRET_LEN: usize = 16;
/// Largest number of CA keys either side may send (a rotation needs two or three).
pub const MAX_CA_KEYS: usize = 8;

const TOKEN_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
const ROOT_PROOF_LABEL: &[u8] = b"tether-join-v1 root";
const LEAF_PROOF_LABEL: &[u8] = b"tether-join-v1 leaf";

/// A join token, `ID.SECRET`. `Debug` and `Display` show only the ID, so a token never ends up
/// in a log.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    id: String,
    secret: String,
}

/// Why a string is not a join token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a join token is ID.SECRET: {TOKEN_ID_LEN} then {TOKEN_SECRET_LEN} lowercase letters or digits ({0})"
)]
pub struct TokenFormatError(&'static str);

impl JoinToken {
    /// A fresh random token.
    pub fn generate() -> Self {
        Self {
            id: random_token_part(TOKEN_ID_LEN),
            secret: random_token_part(TOKEN_SECRET_LEN),
        }
    }

    /// Parses `ID.SECRET` (surrounding whitespace, as in a file, is ignored).
    pub fn parse(text: &str) -> Result<Self, TokenFormatError> {
        let (id, secret) = text
            .trim()
            .split_once('.')
            .ok_or(TokenFormatError("no '.'"))?;
        Self::from_parts(id, secret)
    }

    /// A token from its two halves, as a root stores them.
    pub fn from_parts(id: &str, secret: &str) -> Result<Self, TokenFormatError> {
        validate_token_id(id)?;
        if secret.len() != TOKEN_SECRET_LEN || !is_token_text(secret) {
            return Err(TokenFormatError("bad secret"));
        }
        Ok(Self {
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }

    /// The public half: names the token in messages, Secrets and logs.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The secret half; only for storing it, never for logging.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// `ID.SECRET`, for handing to the leaf's administrator.
    pub fn reveal(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }

    /// The root's proof that it knows the secret: over the leaf's nonce and what the root says.
    pub fn root_proof(&self, leaf_nonce: &str, root_cluster: &str, ca_keys: &[String]) -> String {
        self.proof(ROOT_PROOF_LABEL, leaf_nonce, root_cluster, ca_keys)
    }

    /// The leaf's proof that it knows the secret: over the root's nonce and what the leaf says.
    pub fn leaf_proof(&self, root_nonce: &str, leaf_cluster: &str, ca_keys: &[String]) -> String {
        self.proof(LEAF_PROOF_LABEL, root_nonce, leaf_cluster, ca_keys)
    }

    /// Checks a proof in constant time.
    pub fn verify_root_proof(
        &self,
        proof: &str,
        leaf_nonce: &str,
        root_cluster: &str,
        ca_keys: &[String],
    ) -> bool {
        self.verify(proof, ROOT_PROOF_LABEL, leaf_nonce, root_cluster, ca_keys)
    }

    /// Checks a proof in constant time.
    pub fn verify_leaf_proof(
        &self,
        proof: &str,
        root_nonce: &str,
        leaf_cluster: &str,
        ca_keys: &[String],
    ) -> bool {
        self.verify(proof, LEAF_PROOF_LABEL, root_nonce, leaf_cluster, ca_keys)
    }

    fn key(&self) -> ring::hmac::Key {
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.secret.as_bytes())
    }

    fn proof(&self, label: &[u8], nonce: &str, cluster: &str, ca_keys: &[String]) -> String {
        let message = proof_message(label, nonce, cluster, ca_keys);
        B64.encode(ring::hmac::sign(&self.key(), &message).as_ref())
    }

    fn verify(
        &self,
        proof: &str,
        label: &[u8],
        nonce: &str,
        cluster: &str,
        ca_keys: &[String],
    ) -> bool {
        let Ok(tag) = B64.decode(proof) else {
            return false;
        };
        let message = proof_message(label, nonce, cluster, ca_keys);
        ring::hmac::verify(&self.key(), &message, &tag).is_ok()
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinToken({}.<redacted>)", self.id)
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.id)
    }
}

/// Checks a token ID (what a leaf sends in `Hello`, before anything is known about it).
pub fn validate_token_id(id: &str) -> Result<(), TokenFormatError> {
    if id.len() == TOKEN_ID_LEN && is_token_text(id) {
        Ok(())
    } else {
        Err(TokenFormatError("bad ID"))
    }
}

fn is_token_text(s: &str) -> bool {
    s.bytes().all(|b| TOKEN_ALPHABET.contains(&b))
}

fn random_token_part(len: usize) -> String {
    use rand::Rng as _;
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(TOKEN_ALPHABET[rng.random_range(0..TOKEN_ALPHABET.len())]))
        .collect()
}

/// Every field is length-prefixed, so no two different inputs give the same message.
fn proof_message(label: &[u8], nonce: &str, cluster: &str, ca_keys: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    let mut field = |bytes: &[u8]| {
        out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
        out.extend_from_slice(bytes);
    };
    field(label);
    field(nonce.as_bytes());
    field(cluster.as_bytes());
    for key in ca_keys {
        field(key.as_bytes());
    }
    out
}

/// A fresh 256-bit nonce, base64.
pub fn nonce() -> String {
    B64.encode(rand::random::<[u8; 32]>())
}

/// Messages from the joining leaf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JoinerMessage {
    /// "I hold token `token_id`; prove you know its secret over `nonce`."
    Hello {
        /// The leaf's Tether version, for logs.
        version: String,
        token_id: String,
        nonce: String,
    },
    /// "Trust this cluster's CA": the leaf's name and CA keys (OpenSSH), with its proof.
    Join {
        leaf_cluster: String,
        ca_keys: Vec<String>,
        proof: String,
    },
}

/// Messages from the root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RootMessage {
    /// The root's name and CA keys (OpenSSH), its proof, and a nonce for the leaf's proof.
    Challenge {
        root_cluster: String,
        ca_keys: Vec<String>,
        nonce: String,
        proof: String,
    },
    /// The leaf's CA is trusted; its agents may connect now.
    Joined,
    /// The join failed, and why.
    Refused {
        reason: JoinRefusal,
        message: String,
    },
}

/// Why a root refused a join; each becomes a condition reason on the leaf's `TrustedCluster`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinRefusal {
    /// No such token was issued (or it was deleted).
    TokenUnknown,
    /// The token's expiry has passed.
    TokenExpired,
    /// A single-use token already admitted another join.
    TokenAlreadyUsed,
    /// The leaf's proof does not match the token's secret.
    TokenInvalid,
    /// Another leaf with a different CA already has this name.
    NameTaken,
    /// A message was malformed or out of order.
    BadRequest,
    /// The root could not record the join (its API is unreachable); try again.
    Unavailable,
}

impl JoinRefusal {
    /// The CamelCase word used as a condition reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TokenUnknown => "TokenUnknown",
            Self::TokenExpired => "TokenExpired",
            Self::TokenAlreadyUsed => "TokenAlreadyUsed",
            Self::TokenInvalid => "TokenInvalid",
            Self::NameTaken => "NameTaken",
            Self::BadRequest => "BadRequest",
            Self::Unavailable => "Unavailable",
        }
    }

    /// Whether trying again with the same token could succeed.
    pub fn is_transient(self) -> bool {
        matches!(self, Self::Unavailable)
    }
}

impl fmt::Display for JoinRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_and_never_print_their_secret() {
        let token = JoinToken::generate();
        let again = JoinToken::parse(&format!(" {}\n", token.reveal())).unwrap();
        assert_eq!(token, again);
        assert!(!format!("{token:?} {token}").contains(token.secret()));
        for bad in [
            "",
            "abcdef",
            "abcdef.",
            "ABCDEF.0123456789abcdef",
            "abcde.0123456789abcdef",
            "abcdef.0123456789abcde",
            "abcdef.0123456789abcdeF",
            "abcdef.0123456789abcdef.x",
        ] {
            assert!(JoinToken::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn proofs_bind_every_field_and_the_side() {
        let token = JoinToken::parse("abcdef.0123456789abcdef").unwrap();
        let keys = vec!["ssh-ed25519 AAAA root".to_owned()];
        let proof = token.root_proof("n1", "root", &keys);
        assert!(token.verify_root_proof(&proof, "n1", "root", &keys));
        assert!(!token.verify_root_proof(&proof, "n2", "root", &keys));
        assert!(!token.verify_root_proof(&proof, "n1", "roo", &keys));
        assert!(!token.verify_root_proof(&proof, "n1", "root", &[]));
        assert!(!token.verify_leaf_proof(&proof, "n1", "root", &keys));
        let other = JoinToken::parse("abcdef.0123456789abcdee").unwrap();
        assert!(!other.verify_root_proof(&proof, "n1", "root", &keys));
        assert!(!token.verify_root_proof("not base64!", "n1", "root", &keys));
        // Moving bytes between fields changes the message.
        assert_ne!(
            proof_message(b"l", "ab", "c", &[]),
            proof_message(b"l", "a", "bc", &[])
        );
    }
}
