//! The client token file (`name:token` lines) the proxy loads at start and on reload.
//!
//! Invariants: every accepted line's client verifies with its token (by name and as bearer);
//! the number of clients is the number of such lines; `Debug` never shows a token; an error
//! names a line of the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether::proxy::client_entry::{ClientTokens, MIN_TOKEN_LEN, TokenFileError};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let entries: Vec<(&str, &str)> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(':'))
        .map(|(n, t)| (n.trim(), t.trim()))
        .collect();
    match ClientTokens::parse(text) {
        Ok(tokens) => {
            assert_eq!(tokens.len(), entries.len());
            for (name, token) in &entries {
                assert!(token.len() >= MIN_TOKEN_LEN);
                assert!(
                    tokens.verify(name, token.as_bytes()),
                    "{name} does not verify"
                );
                assert!(tokens.verify_bearer(token.as_bytes()).is_some());
                assert!(!tokens.verify(name, b""));
            }
            // `Debug` shows the names and nothing else.
            let names: Vec<&str> = entries.iter().map(|(name, _)| *name).collect();
            let expected = format!("ClientTokens {{ names: {names:?} }}");
            assert_eq!(format!("{tokens:?}"), expected);
        }
        // The reason is a fixed text by type, so an error cannot quote a token; the line it
        // names must be one of the file's.
        Err(TokenFileError::Line { line, .. }) => {
            assert!(
                line >= 1 && line <= text.lines().count(),
                "line {line} out of range"
            );
        }
        // A weak token is named by its line and user, never quoted.
        Err(ref e @ TokenFileError::WeakToken { line, ref user, .. }) => {
            assert!(
                line >= 1 && line <= text.lines().count(),
                "line {line} out of range"
            );
            let token = entries.iter().find(|(name, _)| name == user).map(|e| e.1);
            // (The user's own name may happen to contain the token's text.)
            let message = e.to_string().replace(&format!("{user:?}"), "");
            assert!(
                token.is_none_or(|t| t.is_empty() || !message.contains(t)),
                "the error quotes the token: {message}"
            );
        }
        Err(e @ (TokenFileError::Io { .. } | TokenFileError::Permissions(_))) => {
            panic!("parsing text touched a file: {e}")
        }
    }
});
