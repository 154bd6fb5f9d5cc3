//! A real haproxy (Debian's) in TCP mode in front of the proxies, as a root cluster's load
//! balancer would be.

use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running haproxy; killed on drop.
pub struct Haproxy {
    child: Child,
    /// Where clients connect.
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

/// A free loopback port, found by binding port 0 and letting go.
pub fn free_port() -> SocketAddr {
    let l = StdListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

impl Haproxy {
    /// Starts haproxy balancing (`random`, `roundrobin`, ...) over `backends`, with fast health
    /// checks and redispatch, and waits until it accepts connections.
    pub fn start(balance: &str, backends: &[SocketAddr]) -> Haproxy {
        for _ in 0..5 {
            let addr = free_port();
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
            let child = Command::new("haproxy")
                .arg("-db")
                .arg("-f")
                .arg(&path)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("haproxy starts (apt-get install haproxy)");
            let mut haproxy = Haproxy {
                child,
                addr,
                _dir: dir,
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = haproxy.child.try_wait() {
                    break; // lost the port race: try another
                }
                if StdStream::connect(addr).is_ok() {
                    return haproxy;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = haproxy.child.kill();
        }
        panic!("haproxy did not start");
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
