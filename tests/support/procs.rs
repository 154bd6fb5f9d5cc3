//! Child processes for tests and bench drivers: free ports, spawning so that nothing outlives
//! the test binary, polling a process's readiness with a deadline, HTTP GETs of admin and
//! health endpoints, and `tether` itself (long-running components and one-shot commands).

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use tether::demo::Pki;
use tether::identity::Identity;

/// The `tether` binary Cargo built for this test or bench; `TETHER_BIN` overrides it (the
/// benches' A/B of two builds). Examples, which Cargo builds without it, get `tether` on PATH.
pub fn tether_bin() -> PathBuf {
    std::env::var_os("TETHER_BIN")
        .map(PathBuf::from)
        .or_else(|| option_env!("CARGO_BIN_EXE_tether").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("tether"))
}

/// How often readiness is polled.
pub const POLL: Duration = Duration::from_millis(100);

/// A loopback port that was free a moment ago. Callers retry on a bind
/// conflict (another process may take it between here and the child's bind).
pub fn free_port() -> Result<u16, String> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("finding a free loopback port: {e}"))
}

/// [`free_port`] as a loopback address, for tests (panics if none is free).
pub fn free_addr() -> SocketAddr {
    let port = free_port().unwrap_or_else(|e| panic!("{e}"));
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// A running component. Killed (SIGKILL) and reaped on drop; the kernel also
/// kills it when the thread that spawned it exits (`PR_SET_PDEATHSIG`), so it
/// cannot outlive the test binary even if nothing is dropped.
#[derive(Debug)]
pub struct Proc {
    /// What it is, for messages.
    pub name: String,
    /// Where its stdout and stderr go, if anywhere (they are discarded otherwise).
    pub log: Option<PathBuf>,
    child: Child,
}

impl Proc {
    /// Spawns `program args...` with stdout and stderr appended to `log`.
    ///
    /// Must be called from a thread that lives as long as the child should:
    /// `PR_SET_PDEATHSIG` fires when the spawning *thread* exits.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        log: PathBuf,
    ) -> Result<Self, String> {
        let mut cmd = Command::new(program);
        cmd.args(args);
        Self::logged(name, &mut cmd, log)
    }

    /// Spawns `cmd` with stdout and stderr appended to `log` (see [`Proc::spawn`]).
    pub fn logged(name: &str, cmd: &mut Command, log: PathBuf) -> Result<Self, String> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| format!("opening {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("duplicating {}: {e}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let mut proc = Self::start(name, cmd)?;
        proc.log = Some(log);
        Ok(proc)
    }

    /// Spawns `cmd` as it is set up (stdio included), dying with its spawning thread.
    pub fn start(name: &str, cmd: &mut Command) -> Result<Self, String> {
        // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) run
        // between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() == 1 {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting {name} ({:?}): {e}", cmd.get_program()))?;
        Ok(Self {
            name: name.to_owned(),
            log: None,
            child,
        })
    }

    /// `Some(description)` if the process has exited.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!("{} exited: {status}", self.name)),
            Ok(None) => None,
            Err(e) => Some(format!("{}: waiting failed: {e}", self.name)),
        }
    }

    /// How it ended, once it has.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Its stdout, if `cmd` piped it, for the caller to read.
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        self.exited().is_none()
    }

    /// The end of the log for error messages: its last klog error/fatal
    /// lines (`E1126 ...`, `F1126 ...`) if any, else its last `lines` lines.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self
            .log
            .as_ref()
            .and_then(|log| fs::read_to_string(log).ok())
            .unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let errors: Vec<&str> = all
            .iter()
            .copied()
            .filter(|l| {
                let mut c = l.chars();
                matches!(c.next(), Some('E' | 'F')) && c.next().is_some_and(|d| d.is_ascii_digit())
            })
            .collect();
        let pick = if errors.is_empty() { &all } else { &errors };
        pick[pick.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether the log says a listen address was taken (worth a retry with
    /// other ports).
    pub fn port_conflict(&self) -> bool {
        self.log
            .as_ref()
            .and_then(|log| fs::read_to_string(log).ok())
            .is_some_and(|t| t.contains("address already in use"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (`libc::SIGSTOP`, ...) to the process.
    pub fn signal(&self, signal: libc::c_int) -> Result<(), String> {
        let pid = libc::pid_t::try_from(self.pid()).map_err(|e| e.to_string())?;
        // SAFETY: kill(2) on our own child, not yet reaped (that happens on drop).
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(format!(
                "signal {signal} to {} ({pid}): {}",
                self.name,
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Polls `check` every [`POLL`] until it returns `Ok(Some(_))`, the process
    /// exits, or `timeout` passes.
    pub fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> Result<Option<T>, String>,
    ) -> Result<T, String> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("not checked yet");
        loop {
            if let Some(exit) = self.exited() {
                return Err(format!(
                    "{exit} while waiting for {what}; {}",
                    self.log_note()
                ));
            }
            match check() {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(e) => last = e,
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "timed out after {timeout:?} waiting for {what} (last error: {last}); {}",
                    self.log_note()
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Whether it comes to accept connections on every one of `addrs` within `limit`; `false`
    /// as soon as it exits (a child that lost a race for its port does).
    pub fn accepts(&mut self, addrs: &[SocketAddr], limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline && self.running() {
            if addrs.iter().all(|a| TcpStream::connect(a).is_ok()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn log_note(&self) -> String {
        match &self.log {
            Some(log) => format!("log {}:\n{}", log.display(), self.log_tail(10)),
            None => "no log kept".to_owned(),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A plain-HTTP/1.0 GET; returns the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("writing to {addr}: {e}"))?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .map_err(|e| format!("reading from {addr}: {e}"))?;
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("malformed HTTP response from {addr}: {resp:?}"))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// GET `path` from an admin endpoint, whatever the status; `None` while it is not answering.
pub fn admin_get(addr: SocketAddr, path: &str) -> Option<String> {
    http_get(addr, path).ok().map(|(_, body)| body)
}

/// Takes an exclusive `flock` on `path`, blocking; released when the file is
/// closed (dropped) or the process exits.
pub fn lock_file(path: &Path) -> Result<File, String> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a valid, owned file descriptor.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(format!(
            "locking {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(f)
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
    let mut cmd = Command::new(tether_bin());
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

/// What a root replica runs in Kubernetes: `tether proxy --kubernetes` as pod `id` in `ns`,
/// following Service `service`'s EndpointSlices for its peers and issuing its certificates
/// from the CA at `ca`, through `kubeconfig`, with `extra` flags; its log in `log`.
pub struct KubeProxy<'a> {
    /// Its proxy ID, the pod name its EndpointSlice names.
    pub id: &'a str,
    /// The namespace of its Service, RemoteClusters and join tokens.
    pub ns: &'a str,
    /// The headless Service whose EndpointSlices list its peers.
    pub service: &'a str,
    /// The root CA's private key, from which it issues its own certificates.
    pub ca: &'a Path,
    /// How it reaches the API server.
    pub kubeconfig: &'a Path,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
    /// Flags of the test's own (heartbeat interval, limits).
    pub extra: &'a [&'a str],
}

impl KubeProxy<'_> {
    /// Starts it, on fresh ports again if it loses a race for one; its tunnel address.
    pub fn spawn(&self) -> Result<(Proc, SocketAddr), String> {
        for _ in 0..5 {
            let (listen, admin) = (free_addr(), free_addr());
            let mut cmd = Command::new(tether_bin());
            cmd.args(["proxy", "--cluster", "root", "--proxy-id", self.id])
                .args(["--kubernetes", "--namespace", self.ns])
                .args([
                    "--peers-service",
                    self.service,
                    "--peers-port-name",
                    "tunnel",
                ])
                .arg("--ca")
                .arg(self.ca)
                .arg("--listen")
                .arg(listen.to_string())
                .arg("--admin-listen")
                .arg(admin.to_string())
                .args(["--shutdown-grace", "1s"])
                .args(self.extra)
                .env("KUBECONFIG", self.kubeconfig)
                .env("RUST_LOG", "info");
            let mut proc = Proc::logged(self.id, &mut cmd, self.log.clone())?;
            // If it lost a port race it exits: then try others.
            if proc.accepts(&[listen, admin], Duration::from_secs(20)) {
                return Ok((proc, listen));
            }
        }
        Err(format!(
            "tether proxy {} did not start; its log: {}",
            self.id,
            self.log.display()
        ))
    }
}

/// A root replica in Kubernetes mode following `service`'s endpoints, its heartbeats every
/// 500 ms (a dead leaf shows within seconds), logging to `log`.
pub fn spawn_kube_proxy(
    id: &str,
    ns: &str,
    service: &str,
    ca: &Path,
    kubeconfig: &Path,
    log: &Path,
) -> (Proc, SocketAddr) {
    KubeProxy {
        id,
        ns,
        service,
        ca,
        kubeconfig,
        log: log.to_owned(),
        extra: &["--heartbeat-interval", "500ms"],
    }
    .spawn()
    .unwrap_or_else(|e| panic!("{e}"))
}

/// `tether operator` watching `ns` as `identity`, through `kubeconfig`, with none of the
/// environment variables that would override those flags (a developer's shell may set them).
pub fn operator_command(kubeconfig: &Path, ns: &str, identity: &str) -> Command {
    let mut cmd = Command::new(tether_bin());
    cmd.arg("operator")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--namespace", ns, "--identity", identity]);
    for var in [
        "KUBECONFIG",
        "POD_NAME",
        "POD_NAMESPACE",
        "TETHER_NAMESPACE",
        "TETHER_LEASE_NAME",
        "TETHER_STATUS_REFRESH",
    ] {
        cmd.env_remove(var);
    }
    without_egress_proxy(&mut cmd);
    cmd
}

/// A machine's forward proxy (`HTTPS_PROXY` set for the test run) would carry the child's
/// loopback dials to the root too: the children dial directly unless a test says otherwise.
pub fn without_egress_proxy(cmd: &mut Command) {
    for var in ["HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"] {
        cmd.env_remove(var);
    }
}

/// `tether agent` for the leaf, dialling `proxy`, with extra arguments.
pub fn spawn_agent(files: &Files, proxy: SocketAddr, extra: &[String]) -> Proc {
    let mut cmd = agent_command(
        "leaf",
        &proxy.to_string(),
        &files.path("agent"),
        &files.path("root-ca.pub"),
    );
    cmd.args(extra);
    spawn(cmd)
}

/// `tether agent` for leaf `cluster` of root `root`, dialling `proxy` with the identity at
/// `identity` and trusting the root CA at `root_ca`; flags of the caller's own follow.
pub fn agent_command(cluster: &str, proxy: &str, identity: &Path, root_ca: &Path) -> Command {
    let mut cmd = Command::new(tether_bin());
    cmd.args(["agent", "--cluster", cluster, "--root-cluster", "root"])
        .args(["--proxy", proxy])
        .arg("--identity")
        .arg(identity)
        .arg("--root-ca")
        .arg(root_ca);
    without_egress_proxy(&mut cmd);
    cmd
}

/// [`spawn_agent`] flags for a leaf that serves the loopback server `target` alone, with 200 ms
/// heartbeats so that a test sees heartbeats, and the loss of a path, within a second.
pub fn agent_flags_reaching(target: SocketAddr) -> Vec<String> {
    vec![
        "--heartbeat-interval".to_owned(),
        "200ms".to_owned(),
        "--allow".to_owned(),
        format!("127.0.0.1/32:{}", target.port()),
    ]
}

/// `tether agent ARGS` for the leaf dialling `proxy`, its identity `agent` and root CA
/// `root-ca.pub` named relative to the directory it runs in (as [`Files::write`] and
/// `tether cert` write them): for the tests of what it refuses at start-up.
pub fn agent_args(proxy: &str) -> [&str; 11] {
    [
        "agent",
        "--cluster",
        "leaf",
        "--root-cluster",
        "root",
        "--proxy",
        proxy,
        "--identity",
        "agent",
        "--root-ca",
        "root-ca.pub",
    ]
}

/// Starts `cmd` with its output discarded, killed when the returned [`Proc`] drops.
pub fn spawn(mut cmd: Command) -> Proc {
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    Proc::start("tether", &mut cmd).expect("tether starts")
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
    let mut cmd = Command::new(tether_bin());
    cmd.current_dir(dir)
        .args(args)
        .env_remove("TETHER_TOKEN")
        .env_remove("TETHER_TOKEN_FILE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    without_egress_proxy(&mut cmd);
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
