//! `tether` processes for the tests that need a real process: signals, kill -9, per-process
//! metrics.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream as StdStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tether::demo::Pki;
use tether::identity::Identity;

/// A child process, killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Identities and trust files on disk, as the CLI reads them.
pub struct Files {
    pub dir: tempfile::TempDir,
}

impl Files {
    /// Writes proxy host identities for `proxy_ids`, an agent identity, a peering client
    /// identity, the trust directory and the root CA file.
    pub fn write(pki: &Pki, proxy_ids: &[&str]) -> Files {
        let dir = tempfile::tempdir().expect("tempdir");
        let year = Duration::from_secs(3600);
        for id in proxy_ids {
            Identity::generate_host(&pki.root, id, year)
                .expect("host identity")
                .save(&dir.path().join(id))
                .expect("save");
        }
        Identity::generate_agent(&pki.leaf, year)
            .expect("agent identity")
            .save(&dir.path().join("agent"))
            .expect("save");
        Identity::generate_client(&pki.root, "proxy-peering", year)
            .expect("peer identity")
            .save(&dir.path().join("peer"))
            .expect("save");
        std::fs::create_dir(dir.path().join("trust")).expect("trust dir");
        for ca in [&pki.root, &pki.leaf] {
            std::fs::write(
                dir.path()
                    .join("trust")
                    .join(format!("{}.pub", ca.cluster())),
                ca.public_key().to_openssh().expect("encode"),
            )
            .expect("write trust");
        }
        std::fs::write(
            dir.path().join("root-ca.pub"),
            pki.root.public_key().to_openssh().expect("encode"),
        )
        .expect("write root CA");
        Files { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// `tether proxy` with an admin endpoint and peers (`ID=ADDR`).
pub fn spawn_proxy(
    files: &Files,
    id: &str,
    listen: SocketAddr,
    admin: SocketAddr,
    peers: &[(String, SocketAddr)],
) -> Proc {
    spawn(proxy_command(files, id, listen, admin, peers))
}

/// The command line of [`spawn_proxy`], for tests that add flags or limits of their own.
pub fn proxy_command(
    files: &Files,
    id: &str,
    listen: SocketAddr,
    admin: SocketAddr,
    peers: &[(String, SocketAddr)],
) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether"));
    cmd.args(["proxy", "--cluster", "root", "--proxy-id", id])
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--admin-listen")
        .arg(admin.to_string())
        .arg("--identity")
        .arg(files.path(id))
        .arg("--trust-dir")
        .arg(files.path("trust"))
        .arg("--peer-identity")
        .arg(files.path("peer"))
        .args(["--heartbeat-interval", "200ms", "--shutdown-grace", "2s"]);
    for (peer, addr) in peers {
        cmd.arg("--peer").arg(format!("{peer}={addr}"));
    }
    cmd
}

/// `tether agent` for the leaf, dialling `proxy`, with extra arguments.
pub fn spawn_agent(files: &Files, proxy: SocketAddr, extra: &[String]) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether"));
    cmd.args(["agent", "--cluster", "leaf", "--root-cluster", "root"])
        .arg("--proxy")
        .arg(proxy.to_string())
        .arg("--identity")
        .arg(files.path("agent"))
        .arg("--root-ca")
        .arg(files.path("root-ca.pub"))
        .args(extra);
    spawn(cmd)
}

/// Starts `cmd` with its output discarded, killed when the returned [`Proc`] drops.
pub fn spawn(mut cmd: Command) -> Proc {
    Proc(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tether starts"),
    )
}

/// GET `path` from an admin endpoint; `None` while it is not answering.
pub fn admin_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = StdStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())
}

// ---- one-shot commands ----------------------------------------------------------------

/// Runs `tether ARGS` in `dir` to completion, killing it (and failing) if it is still
/// running after 30 s: a command that should have refused may instead be serving.
pub fn tether(dir: &Path, args: &[&str]) -> Output {
    let child = tether_command(dir, args).spawn().expect("tether runs");
    finish(child, args)
}

/// [`tether`], with `input` on its standard input (then closed): `tether dial` sends it.
pub fn tether_with_input(dir: &Path, args: &[&str], input: &[u8]) -> Output {
    let mut child = tether_command(dir, args)
        .stdin(Stdio::piped())
        .spawn()
        .expect("tether runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("writing tether's input");
    finish(child, args)
}

fn tether_command(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether"));
    cmd.current_dir(dir)
        .args(args)
        .env_remove("TETHER_TOKEN")
        .env_remove("TETHER_TOKEN_FILE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Waits for `child` (`tether args`), killing it and failing after 30 s.
fn finish(mut child: Child, args: &[&str]) -> Output {
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tether {args:?} still running after 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

pub fn ok(dir: &Path, args: &[&str]) {
    let out = tether(dir, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `tether ARGS`, expecting failure; its stderr.
pub fn fails(dir: &Path, args: &[&str]) -> String {
    let out = tether(dir, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} succeeded: {stderr}");
    stderr
}
