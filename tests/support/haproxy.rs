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
        for _ in 0..5 {
            let addr = free_addr();
            let dir = tempfile::tempdir().expect("tempdir");
            let mut servers = String::new();
            for (i, b) in backends.iter().enumerate() {
                servers.push_str(&format!("  server s{i} {b}\n"));
            }
            let config = format!(
                "global\n  maxconn 4000\n\
                 defaults\n  mode tcp\n  timeout connect 1s\n  timeout client 120s\n  timeout server 120s\n  retries 3\n  option redispatch 1\n\
                 frontend tunnels\n  bind {addr}\n  default_backend proxies\n\
                 backend proxies\n  balance {balance}\n  default-server check inter 100ms fall 1 rise 1\n{servers}"
            );
            let path = dir.path().join("haproxy.cfg");
            std::fs::write(&path, config).expect("write haproxy.cfg");
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
