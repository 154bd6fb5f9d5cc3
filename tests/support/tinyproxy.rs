//! A real tinyproxy (Debian's) as a leaf's forward proxy: Basic auth, CONNECT to chosen ports
//! only, clients from loopback, every CONNECT in its log (issue #17).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::procs::{Proc, free_addr};

/// The user tinyproxy accepts.
pub const USER: &str = "user";
/// Its password.
pub const PASSWORD: &str = "pass-7f3a9c";

/// A running tinyproxy: Basic auth `USER:PASSWORD`, CONNECT only to `ports`, clients from
/// loopback, its log (every CONNECT request) in a file. Killed on drop.
pub struct Tinyproxy {
    /// The process.
    pub proc: Proc,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its log: `CONNECT ... Request (file descriptor N): CONNECT host:port HTTP/1.1`.
    log: PathBuf,
    /// Holds its configuration and log.
    _dir: tempfile::TempDir,
}

impl Tinyproxy {
    /// Starts tinyproxy letting clients CONNECT to `ports` only, and waits until it accepts
    /// connections (another port if it lost the race for its own).
    pub fn start(ports: &[u16]) -> Tinyproxy {
        for _ in 0..5 {
            let addr = free_addr();
            let dir = tempfile::tempdir().expect("tempdir");
            let mut config = format!(
                "Port {}\nListen 127.0.0.1\nTimeout 120\nAllow 127.0.0.1\nMaxClients 200\nLogLevel Connect\nBasicAuth {USER} {PASSWORD}\n",
                addr.port()
            );
            for port in ports {
                config.push_str(&format!("ConnectPort {port}\n"));
            }
            let path = dir.path().join("tinyproxy.conf");
            std::fs::write(&path, config).expect("write tinyproxy.conf");
            let log = dir.path().join("tinyproxy.log");
            let mut cmd = Command::new("tinyproxy");
            cmd.arg("-d").arg("-c").arg(&path);
            let proc = Proc::logged("tinyproxy", &mut cmd, log.clone())
                .unwrap_or_else(|e| panic!("{e} (apt-get install tinyproxy)"));
            let mut proxy = Tinyproxy {
                proc,
                addr,
                log,
                _dir: dir,
            };
            // If it lost the port race it exits: then try another port.
            if proxy.proc.accepts(&[addr], Duration::from_secs(10)) {
                return proxy;
            }
        }
        panic!("tinyproxy did not start");
    }

    /// `http://USER:PASSWORD@ADDR` with `password` instead of the right one.
    pub fn url(&self, password: &str) -> String {
        format!("http://{USER}:{password}@{}", self.addr)
    }

    /// How many CONNECT requests it logged (accepted or not).
    pub fn connects(&self) -> usize {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().filter(|l| l.contains("): CONNECT ")).count()
    }
}
