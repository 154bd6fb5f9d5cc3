//! What several targets share: running a handshake or a frame reader over in-memory bytes.
#![allow(dead_code)]

use std::future::Future;

thread_local! {
    /// One current-thread runtime for the whole run: building one per input would cost more
    /// than the decoding under test. In-memory readers never wait, so nothing needs timers.
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
}

/// Runs `future` to completion on the shared runtime.
pub fn block_on<F: Future>(future: F) -> F::Output {
    RUNTIME.with(|rt| rt.block_on(future))
}

/// A duplex stream that reads `input` and swallows what is written (the replies).
pub fn duplex(input: &[u8]) -> tokio::io::Join<&[u8], tokio::io::Sink> {
    tokio::io::join(input, tokio::io::sink())
}

/// The one client the entry targets know, and its token.
pub const CLIENT: &str = "alice";
pub const CLIENT_TOKEN: &str = "alice-token-0123456789";

/// An entry configuration knowing [`CLIENT`], with a small head limit so the fuzzer reaches
/// the "too large" path without megabyte inputs.
pub fn entry_config() -> tether::proxy::client_entry::ClientEntryConfig {
    let mut tokens = tether::proxy::client_entry::ClientTokens::default();
    tokens
        .insert(CLIENT, CLIENT_TOKEN.as_bytes())
        .expect("one client");
    let mut config = tether::proxy::client_entry::ClientEntryConfig::new(tokens);
    config.max_header_bytes = 2048;
    config
}
