//! Child processes of the test control plane: free ports, spawning so that
//! nothing outlives the test binary, and polling with deadlines.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

/// A running component. Killed (SIGKILL) and reaped on drop; the kernel also
/// kills it when the thread that spawned it exits (`PR_SET_PDEATHSIG`), so it
/// cannot outlive the test binary even if nothing is dropped.
#[derive(Debug)]
pub struct Proc {
    pub name: &'static str,
    pub log: PathBuf,
    child: Child,
}

impl Proc {
    /// Spawns `program args...` with stdout and stderr appended to `log`.
    ///
    /// Must be called from a thread that lives as long as the child should:
    /// `PR_SET_PDEATHSIG` fires when the spawning *thread* exits.
    pub fn spawn(
        name: &'static str,
        program: &Path,
        args: &[String],
        log: PathBuf,
    ) -> Result<Self, String> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| format!("opening {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("duplicating {}: {e}", log.display()))?;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
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
            .map_err(|e| format!("starting {name} ({}): {e}", program.display()))?;
        Ok(Self { name, log, child })
    }

    /// `Some(description)` if the process has exited.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!("{} exited: {status}", self.name)),
            Ok(None) => None,
            Err(e) => Some(format!("{}: waiting failed: {e}", self.name)),
        }
    }

    /// The end of the log for error messages: its last klog error/fatal
    /// lines (`E1126 ...`, `F1126 ...`) if any, else its last `lines` lines.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
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
        fs::read_to_string(&self.log)
            .map(|t| t.contains("address already in use"))
            .unwrap_or(false)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every [`POLL`] until it returns `Ok(Some(_))`, the process
/// exits, or `timeout` passes.
pub fn wait_for<T>(
    what: &str,
    proc: &mut Proc,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("not checked yet");
    loop {
        if let Some(exit) = proc.exited() {
            return Err(format!(
                "{exit} while waiting for {what}; log {}:\n{}",
                proc.log.display(),
                proc.log_tail(10)
            ));
        }
        match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = e,
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "timed out after {timeout:?} waiting for {what} (last error: {last}); log {}:\n{}",
                proc.log.display(),
                proc.log_tail(10)
            ));
        }
        std::thread::sleep(POLL);
    }
}

/// A plain-HTTP GET on loopback; returns the status code and the body.
pub fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), POLL * 10)
        .map_err(|e| format!("connecting to 127.0.0.1:{port}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("writing to 127.0.0.1:{port}: {e}"))?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .map_err(|e| format!("reading from 127.0.0.1:{port}: {e}"))?;
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("malformed HTTP response: {resp:?}"))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
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
