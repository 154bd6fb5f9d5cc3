//! Client credentials: named bearer tokens, checked in constant time.
//!
//! The token file has one `name:token` per line; blank lines and lines starting with `#` are
//! ignored. Only SHA-256 digests of the tokens are kept in memory, so neither `Debug` output nor
//! an error message can leak one.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Shortest token accepted from the file: short tokens can be guessed.
pub const MIN_TOKEN_LEN: usize = 16;

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
    /// A line is malformed; `reason` says how (without quoting the line, which holds a token).
    #[error("client token file, line {line}: {reason}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: &'static str,
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
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses the text of a token file. Names must be unique and free of whitespace; tokens must
    /// be at least [`MIN_TOKEN_LEN`] bytes without whitespace.
    pub fn parse(text: &str) -> Result<Self, TokenFileError> {
        let mut tokens = ClientTokens::default();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let err = |reason| TokenFileError::Line { line, reason };
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
