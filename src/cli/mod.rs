//! Subcommands big enough for a module of their own.

pub mod proxy;
pub mod stdio;

use std::path::Path;

use anyhow::Context;

/// Reads a file holding a secret (a token), refusing one other users may read, as key files
/// are refused ([`tether::identity::check_key_permissions`]).
pub fn read_secret_file(path: &Path) -> anyhow::Result<String> {
    tether::identity::check_key_permissions(path)?;
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
