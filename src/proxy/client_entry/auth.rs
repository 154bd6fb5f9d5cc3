//! Client credentials: named bearer tokens, checked in constant time.
//!
//! The token file has one `name:token` per line; blank lines and lines starting with `#` are
//! ignored. Only SHA-256 digests of the tokens are kept in memory, so neither `Debug` output nor
//! an error message can leak one.
//!
//! Tokens are checked for strength when the file is loaded: length alone let
//! `0123456789abcdef` in. [`estimated_bits`] charges each character the bits of the alphabet the
//! token draws from, except what a guesser would try first: a character that continues a run
//! (`aaaa`, `1234`, `dcba`) costs 1 bit, and a repeat of an earlier stretch (`passwordpassword`)
//! costs one character. At least [`MIN_TOKEN_BITS`] (64) are required: `openssl rand -hex 32`
//! (~120 estimated) or `openssl rand -base64 24` pass; `0123456789abcdef` (~24),
//! `aaaaaaaaaaaaaaaa` (~9) and `passwordpassword` (~39) do not.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Shortest token accepted from the file: short tokens can be guessed.
pub const MIN_TOKEN_LEN: usize = 16;

/// Least estimated entropy of a token, in bits: 2^64 guesses are out of reach even without the
/// entry's per-source penalties.
pub const MIN_TOKEN_BITS: f64 = 64.0;

/// Only this many leading bytes are judged (the estimate is quadratic); a longer token only
/// gains strength from the rest.
const JUDGED_BYTES: usize = 256;

/// Why a token file could not be loaded. Messages name the file and line, never a token.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file could not be read.
    #[error("cannot read client token file {path}: {source}")]
    Io {
        /// The file named in the configuration.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// Others may read the file (the error names it, its mode and `chmod 600`).
    #[error(transparent)]
    Permissions(crate::identity::IdentityError),
    /// A line is malformed; `reason` says how (without quoting the line, which holds a token).
    #[error("client token file {path}, line {line}: {reason}")]
    Line {
        /// The file named in the configuration (`<inline>` for [`ClientTokens::parse`]).
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A token is too easy to guess.
    #[error(
        "client token file {path}, line {line}: the token of user {user:?} is too easy to guess \
         (about {bits:.0} bits estimated, at least 64 needed; runs like 1234 or \
         aaaa, repeats and a small alphabet weaken it): make one with `openssl rand -hex 32`"
    )]
    WeakToken {
        /// The file named in the configuration.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The client the token belongs to.
        user: String,
        /// The token's estimated entropy.
        bits: f64,
    },
}

type TokenDigest = [u8; 32];

/// The clients allowed to use the entry, by name, with their token digests.
///
/// It exists so that the entry authenticates every client (there is no anonymous access) and so
/// that logs can name *who* connected without ever holding the secret itself.
#[derive(Clone, Default)]
pub struct ClientTokens {
    entries: Vec<(String, TokenDigest)>,
    by_name: HashMap<String, usize>,
}

impl fmt::Debug for ClientTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTokens")
            .field(
                "names",
                &self.entries.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl ClientTokens {
    /// Reads and parses a token file (see the module documentation for its format).
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        // A token file is a secret like a key: one others may read is assumed copied.
        crate::identity::check_key_permissions(path).map_err(TokenFileError::Permissions)?;
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_file(&text, path)
    }

    /// Parses the text of a token file. Names must be unique and free of whitespace; tokens must
    /// be at least [`MIN_TOKEN_LEN`] bytes without whitespace, with at least
    /// [`MIN_TOKEN_BITS`] of estimated entropy.
    pub fn parse(text: &str) -> Result<Self, TokenFileError> {
        Self::parse_file(text, Path::new("<inline>"))
    }

    /// [`parse`](Self::parse), with errors naming `path`.
    fn parse_file(text: &str, path: &Path) -> Result<Self, TokenFileError> {
        let mut tokens = ClientTokens::default();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let err = |reason| TokenFileError::Line {
                path: path.to_owned(),
                line,
                reason,
            };
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let (name, token) = trimmed
                .split_once(':')
                .ok_or_else(|| err("expected name:token"))?;
            let (name, token) = (name.trim(), token.trim());
            if name.is_empty() || name.chars().any(char::is_whitespace) {
                return Err(err("the name is empty or contains whitespace"));
            }
            if token.len() < MIN_TOKEN_LEN || token.chars().any(char::is_whitespace) {
                return Err(err(
                    "the token is shorter than 16 bytes or contains whitespace",
                ));
            }
            let bits = estimated_bits(token.as_bytes());
            if bits < MIN_TOKEN_BITS {
                return Err(TokenFileError::WeakToken {
                    path: path.to_owned(),
                    line,
                    user: name.to_owned(),
                    bits,
                });
            }
            tokens.insert(name, token.as_bytes()).map_err(err)?;
        }
        Ok(tokens)
    }

    /// Adds a client; fails if the name is already present.
    pub fn insert(&mut self, name: &str, token: &[u8]) -> Result<(), &'static str> {
        if self.by_name.contains_key(name) {
            return Err("the name appears twice");
        }
        self.by_name.insert(name.to_owned(), self.entries.len());
        self.entries.push((name.to_owned(), digest(token)));
        Ok(())
    }

    /// How many clients are known.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no client is known (then every connection is refused).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Checks `token` for client `name` (HTTP Basic, SOCKS5 username/password). Takes the same
    /// time whether or not the name exists and wherever the tokens differ.
    pub fn verify(&self, name: &str, token: &[u8]) -> bool {
        let presented = digest(token);
        match self.by_name.get(name) {
            Some(&i) => ct_eq(&self.entries[i].1, &presented),
            None => {
                // Same work as a real comparison, so timing does not reveal which names exist.
                let _ = ct_eq(&[0u8; 32], &presented);
                false
            }
        }
    }

    /// Finds the client whose token is `token` (HTTP Bearer). Every entry is compared, without
    /// early exit; returns that client's name.
    pub fn verify_bearer(&self, token: &[u8]) -> Option<&str> {
        let presented = digest(token);
        let mut found = None;
        for (name, expected) in &self.entries {
            if ct_eq(expected, &presented) && found.is_none() {
                found = Some(name.as_str());
            }
        }
        found
    }
}

/// A guesser's view of a token's entropy, in bits (see the module documentation).
pub fn estimated_bits(token: &[u8]) -> f64 {
    let token = &token[..token.len().min(JUDGED_BYTES)];
    let per_char = alphabet_size(token).log2();
    let mut bits = 0.0;
    let mut i = 0;
    while i < token.len() {
        if earlier_repeat(token, i) >= 3 {
            bits += per_char;
            i += earlier_repeat(token, i);
            continue;
        }
        let continues_run = i > 0 && token[i].abs_diff(token[i - 1]) <= 1;
        bits += if continues_run { 1.0 } else { per_char };
        i += 1;
    }
    bits
}

/// Tells whether a byte belongs to a character class.
type CharClass = fn(&u8) -> bool;

/// Size of the alphabet a token draws from: the sum of the character classes it uses.
fn alphabet_size(token: &[u8]) -> f64 {
    let classes: [(CharClass, f64); 4] = [
        (u8::is_ascii_digit, 10.0),
        (u8::is_ascii_lowercase, 26.0),
        (u8::is_ascii_uppercase, 26.0),
        (|c| !c.is_ascii_alphanumeric(), 33.0),
    ];
    classes
        .iter()
        .filter(|(is, _)| token.iter().any(is))
        .map(|(_, size)| size)
        .sum::<f64>()
        .max(2.0)
}

/// Length of the longest stretch starting at `at` that also starts earlier (it may overlap
/// itself, as in `aaaa`).
fn earlier_repeat(token: &[u8], at: usize) -> usize {
    (0..at)
        .map(|from| {
            token[at..]
                .iter()
                .zip(&token[from..])
                .take_while(|(a, b)| a == b)
                .count()
        })
        .max()
        .unwrap_or(0)
}

fn digest(token: &[u8]) -> TokenDigest {
    Sha256::digest(token).into()
}

/// Compares two digests without an early exit.
fn ct_eq(a: &TokenDigest, b: &TokenDigest) -> bool {
    let mut acc = 0u8;
    for (x, y) in a.iter().zip(b.iter()) {
        acc |= x ^ y;
    }
    std::hint::black_box(acc) == 0
}

/// Decodes standard base64 (RFC 4648 §4), with or without trailing `=` padding, as clients send
/// it in `Proxy-Authorization: Basic`. `None` on anything malformed.
pub(super) fn base64_decode(input: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    LENIENT.decode(input).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# clients\n\nalice: alice-token-0123456789\nbob:bob-token-abcdefghijkl\r\n";

    #[test]
    fn parses_and_verifies() {
        let t = ClientTokens::parse(FILE).unwrap();
        assert_eq!(t.len(), 2);
        assert!(t.verify("alice", b"alice-token-0123456789"));
        assert!(!t.verify("alice", b"bob-token-abcdefghijkl"));
        assert!(!t.verify("carol", b"alice-token-0123456789"));
        assert_eq!(t.verify_bearer(b"bob-token-abcdefghijkl"), Some("bob"));
        assert_eq!(t.verify_bearer(b"nope"), None);
        let debug = format!("{t:?}");
        assert!(debug.contains("alice") && !debug.contains("0123456789"));
    }

    #[test]
    fn rejects_bad_lines_without_quoting_them() {
        for bad in [
            "alice",
            ":tok-0123456789abcdef",
            "alice:short",
            "a:tok-0123456789abcdef\na:tok-0123456789abcdef",
        ] {
            let err = ClientTokens::parse(bad).unwrap_err().to_string();
            assert!(!err.contains("tok-"), "{err}");
        }
    }

    #[test]
    fn weak_tokens_are_refused_naming_the_file_user_and_cause() {
        for weak in ["0123456789abcdef", "aaaaaaaaaaaaaaaa", "passwordpassword"] {
            let err = ClientTokens::parse_file(&format!("# c\nalice:{weak}\n"), Path::new("t.txt"))
                .unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(err, TokenFileError::WeakToken { line: 2, .. }),
                "{text}"
            );
            assert!(
                text.contains("t.txt") && text.contains("\"alice\"") && text.contains("guess"),
                "{text}"
            );
            assert!(!text.contains(weak), "the token is not quoted: {text}");
        }
    }

    #[test]
    fn random_tokens_pass_the_strength_check() {
        use rand::Rng as _;
        let mut rng = rand::rng();
        for _ in 0..200 {
            let bytes: [u8; 24] = rng.random();
            let hex: String = bytes[..16].iter().map(|b| format!("{b:02x}")).collect();
            assert!(estimated_bits(hex.as_bytes()) >= MIN_TOKEN_BITS, "{hex}");
            use base64::Engine as _;
            let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
            assert!(estimated_bits(b64.as_bytes()) >= MIN_TOKEN_BITS, "{b64}");
        }
    }

    #[test]
    fn base64_round_trips() {
        assert_eq!(base64_decode("YWxpY2U6c2VjcmV0").unwrap(), b"alice:secret");
        assert_eq!(base64_decode("YQ==").unwrap(), b"a");
        assert_eq!(base64_decode("YWI").unwrap(), b"ab");
        assert_eq!(base64_decode("").unwrap(), b"");
        assert!(base64_decode("Y").is_none());
        assert!(base64_decode("YW!i").is_none());
        assert!(base64_decode("YQ===").is_none());
    }
}
