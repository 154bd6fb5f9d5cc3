//! A real haproxy (Debian's) in TCP mode in front of the proxies, as a root cluster's load
//! balancer would be.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::procs::{Proc, free_addr};

/// A running haproxy; killed on drop.
pub struct Haproxy {
    /// The haproxy process (killed when this drops).
    proc: Proc,
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Holds its configuration file.
    _dir: tempfile::TempDir,
}

impl Haproxy {
    /// Starts haproxy balancing (`random`, `roundrobin`, ...) over `backends`, with fast health
    /// checks and redispatch, and waits until it accepts connections.
    pub fn start(balance: &str, backends: &[SocketAddr]) -> Haproxy {
        Self::tcp(balance, backends, "check inter 100ms fall 1 rise 1")
    }

    /// Starts haproxy in front of `backends` prepending a PROXY protocol header to each
    /// connection (`send` is `send-proxy-v2` or `send-proxy`, version 1), without health
    /// checks: every connection a backend sees is a client's.
    pub fn start_sending_proxy_header(backends: &[SocketAddr], send: &str) -> Haproxy {
        Self::tcp("roundrobin", backends, send)
    }

    /// haproxy in `mode tcp` over `backends`, each with `server_options`.
    fn tcp(balance: &str, backends: &[SocketAddr], server_options: &str) -> Haproxy {
        let mut servers = String::new();
        for (i, b) in backends.iter().enumerate() {
            servers.push_str(&format!("  server s{i} {b}\n"));
        }
        Self::launch(|addr| {
            format!(
                "global\n  maxconn 4000\n\
                 defaults\n  mode tcp\n  timeout connect 1s\n  timeout client 120s\n  timeout server 120s\n  retries 3\n  option redispatch 1\n\
                 frontend tunnels\n  bind {addr}\n  default_backend proxies\n\
                 backend proxies\n  balance {balance}\n  default-server {server_options}\n{servers}"
            )
        })
    }

    /// Starts haproxy as an L7 load balancer, the way clouds put one on 443: `mode http`,
    /// terminating TLS with `pem` (certificate chain and key) and no ALPN, forwarding HTTP to
    /// `backends` in the clear or, with `reencrypt`, in TLS without ALPN and without checking
    /// their certificates. Either way a backend sees no ALPN from the client.
    pub fn start_l7(backends: &[SocketAddr], pem: &std::path::Path, reencrypt: bool) -> Haproxy {
        let tls = if reencrypt { " ssl verify none" } else { "" };
        let mut servers = String::new();
        for (i, b) in backends.iter().enumerate() {
            servers.push_str(&format!("  server s{i} {b}{tls}\n"));
        }
        let pem = pem.display().to_string();
        Self::launch(|addr| {
            format!(
                "global\n  maxconn 4000\n\
                 defaults\n  mode http\n  timeout connect 1s\n  timeout client 120s\n  timeout server 120s\n  timeout tunnel 1h\n\
                 frontend https\n  bind {addr} ssl crt {pem}\n  default_backend proxies\n\
                 backend proxies\n  balance roundrobin\n{servers}"
            )
        })
    }

    /// Runs haproxy with the configuration `config(addr)` on a free address, trying another
    /// if it loses the port race, and waits until it accepts connections.
    fn launch(config: impl Fn(SocketAddr) -> String) -> Haproxy {
        for _ in 0..5 {
            let addr = free_addr();
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("haproxy.cfg");
            std::fs::write(&path, config(addr)).expect("write haproxy.cfg");
            let mut cmd = Command::new("haproxy");
            cmd.arg("-db")
                .arg("-f")
                .arg(&path)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let proc = Proc::start("haproxy", &mut cmd)
                .unwrap_or_else(|e| panic!("{e} (apt-get install haproxy)"));
            let mut haproxy = Haproxy {
                proc,
                addr,
                _dir: dir,
            };
            // If it lost the port race it exits: then try another port.
            if haproxy.proc.accepts(&[addr], Duration::from_secs(10)) {
                return haproxy;
            }
        }
        panic!("haproxy did not start");
    }
}
