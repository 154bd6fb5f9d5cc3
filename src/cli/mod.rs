//! Subcommands big enough for a module of their own.

pub mod dial;
pub mod egress;
pub mod kube;
pub mod leaves;
pub mod login;
pub mod operator;
pub mod output;
pub mod profile;
pub mod proxy;
pub mod rotate;
pub mod stdio;
pub mod tls_port;

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use tether::identity::Identity;
use tokio::net::TcpListener;

/// Reads a file holding a secret (a token), refusing one other users may read, as key files
/// are refused ([`tether::identity::check_key_permissions`]).
pub fn read_secret_file(path: &Path) -> anyhow::Result<String> {
    tether::identity::check_key_permissions(path)?;
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Binds the listener a flag configures, naming the flag and the address if it cannot
/// ("Address already in use" alone said neither).
pub async fn bind(flag: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("{flag} {addr}: cannot listen"))
}

/// Loads the key (and its `-cert.pub`) a flag names, naming the flag if it cannot.
pub fn load_identity(flag: &str, path: &Path) -> anyhow::Result<Identity> {
    Identity::load(path)
        .with_context(|| format!("{flag} {}: cannot use this identity", path.display()))
}

/// Checks a root address flag value at start-up: `HOST:PORT` (the SSH port), or
/// `tls://HOST:PORT` / `ws://HOST:PORT` (the TLS port; see [`tether::transport::carrier`]). The
/// name is resolved later, on every dial, so a missing port would otherwise fail every dial
/// forever ("invalid socket address").
pub fn parse_host_port(text: &str) -> Result<String, String> {
    tether::transport::carrier::RootAddress::parse(text).map(|_| text.to_owned())
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

#[cfg(test)]
mod tests {
    use super::parse_host_port;

    #[test]
    fn host_port_values_are_checked_at_start_up() {
        for good in [
            "proxy.example.com:3024",
            "10.0.0.1:443",
            "[::1]:3024",
            "tls://root.example.com:443",
            "ws://lb:80",
        ] {
            assert_eq!(parse_host_port(good).as_deref(), Ok(good));
        }
        for (bad, says) in [
            ("proxy.example.com", "has no port"),
            (":3024", "has no host"),
            ("proxy:http", "is not a number"),
            ("proxy:0", "is not a number"),
            ("proxy:70000", "is not a number"),
            ("https://proxy:443", "unknown scheme"),
        ] {
            let e = parse_host_port(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
