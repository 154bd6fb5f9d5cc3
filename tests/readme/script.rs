//! Reading a README section's shell blocks and running them as one script.
//!
//! The blocks of a section are meant to be pasted in order into one shell (background
//! processes started by one block are used by the next), so they run as one `bash` script.
//! That script runs in its own process group: the README starts servers with `&`, and
//! whatever it leaves behind (a proxy still draining, or everything, if the script hangs) is
//! killed with the group, and nothing else is.

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The README the tests run.
pub const README: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");

/// The words before the port (or list of ports) the README says its test changes.
const PORTS_ANNOUNCED: &str = "changing only the port";

/// Fails, naming the tool, unless `tool` is on `PATH` (`scripts/test` installs the tools the
/// README uses; a test that skipped itself would prove nothing).
pub fn require(tool: &str) {
    let found = Command::new("bash")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{tool} is not installed: the README uses it (scripts/test installs it)"
    );
}

/// One section of the README (from its heading to the next heading of any level).
pub struct Section {
    /// The heading, for messages.
    heading: String,
    /// The section's prose, code fences excluded, lines joined by spaces (a sentence may wrap).
    prose: String,
    /// The contents of its ```sh blocks, in order.
    blocks: Vec<String>,
}

impl Section {
    /// Reads the section under `heading` (the whole heading line, such as `## Quickstart`).
    pub fn read(heading: &str) -> Section {
        let text = std::fs::read_to_string(README).expect("reading README.md");
        Self::parse(&text, heading)
    }

    fn parse(text: &str, heading: &str) -> Section {
        let mut lines = text.lines().skip_while(|l| *l != heading);
        assert!(lines.next().is_some(), "README.md has no {heading:?}");
        let (mut prose, mut blocks) = (String::new(), Vec::new());
        let mut block: Option<String> = None;
        for line in lines {
            match (&mut block, line.trim_end()) {
                (None, "```sh") => block = Some(String::new()),
                (Some(code), "```") => {
                    blocks.push(std::mem::take(code));
                    block = None;
                }
                (Some(code), _) => {
                    code.push_str(line);
                    code.push('\n');
                }
                (None, l) if l.starts_with('#') => break,
                (None, l) => {
                    prose.push_str(l);
                    prose.push(' ');
                }
            }
        }
        assert!(!blocks.is_empty(), "{heading:?} has no ```sh block");
        Section {
            heading: heading.to_owned(),
            prose,
            blocks,
        }
    }

    /// The ports the section's prose says the test changes ("changing only the ports 3024,
    /// 3080 and 9090 to free ones", "changing only the port 3024 to a free one").
    pub fn announced_ports(&self) -> Vec<u16> {
        let (_, rest) = self.prose.split_once(PORTS_ANNOUNCED).unwrap_or_else(|| {
            panic!(
                "{:?} does not say which ports its test changes ({PORTS_ANNOUNCED:?}...)",
                self.heading
            )
        });
        let list = rest.split(" to ").next().unwrap_or_default();
        list.split(|c: char| !c.is_ascii_digit())
            .filter(|n| !n.is_empty())
            .map(|n| n.parse().expect("a port"))
            .collect()
    }

    /// The blocks' code, joined.
    pub fn code(&self) -> String {
        self.blocks.concat()
    }

    /// How many lines of code satisfy `pred` (given the line without leading spaces).
    pub fn lines_matching(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.code().lines().filter(|l| pred(l.trim_start())).count()
    }

    /// The script to run: the blocks in order, each of `ports` changed to a free port. The
    /// free ports come back bound, in the order of `ports`: whoever plays a server the README
    /// only names (a cloud load balancer) serves on its listener; the others are dropped just
    /// before the script binds their ports.
    pub fn script(&self, ports: &[u16]) -> (String, Vec<TcpListener>) {
        // All held at once so that they differ.
        let held: Vec<TcpListener> = ports
            .iter()
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("binding a free port"))
            .collect();
        let free: Vec<(u16, u16)> = ports
            .iter()
            .zip(&held)
            .map(|(port, l)| (*port, l.local_addr().expect("address").port()))
            .collect();
        (substitute_ports(&self.code(), &free), held)
    }
}

/// Replaces every whole number in `text` equal to a port of `free` by its free port (`3024`
/// in `127.0.0.1:3024`, but not in `30240`).
pub fn substitute_ports(text: &str, free: &[(u16, u16)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(|c: char| c.is_ascii_digit()) {
        out.push_str(&rest[..start]);
        let digits = &rest[start..];
        let len = digits
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(digits.len());
        let number = &digits[..len];
        match free.iter().find(|(port, _)| port.to_string() == number) {
            Some((_, to)) => out.push_str(&to.to_string()),
            None => out.push_str(number),
        }
        rest = &digits[len..];
    }
    out.push_str(rest);
    out
}

/// A finished (or timed-out) run of a script.
pub struct Run {
    /// Where it ran; its files (the background processes' logs) are read for reports.
    dir: tempfile::TempDir,
    /// How bash exited; `None` if it was still running at the deadline.
    status: Option<ExitStatus>,
    /// Its standard output and error, interleaved as written.
    transcript: String,
}

impl Run {
    /// Runs `script` with `bash -euo pipefail` in a new temporary directory, the built
    /// `tether` first on `PATH`, killing its process group when it ends or at `deadline`.
    pub fn execute(script: &str, deadline: Duration) -> Run {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::execute_in(dir, script, &Shell::default(), deadline)
    }

    /// [`Run::execute`] in `dir`, with `shell`'s additions to the environment.
    pub fn execute_in(
        dir: tempfile::TempDir,
        script: &str,
        shell: &Shell,
        deadline: Duration,
    ) -> Run {
        std::fs::write(dir.path().join("script.sh"), script).expect("writing the script");
        let transcript_path = dir.path().join("transcript");
        let out = File::create(&transcript_path).expect("transcript file");
        let err = out.try_clone().expect("transcript file");
        let mut child = Command::new("bash")
            .args(["-euo", "pipefail", "script.sh"])
            .current_dir(dir.path())
            // A machine's forward proxy would carry the blocks' loopback dials to the root.
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env("PATH", search_path(&shell.path))
            .envs(shell.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .expect("starting bash");
        let group = child.id();
        let (done_tx, done_rx) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let status = child.wait();
            let _ = done_tx.send(());
            status
        });
        let finished = done_rx.recv_timeout(deadline).is_ok();
        kill_group(group);
        let status = waiter.join().expect("waiter").expect("waiting for bash");
        let transcript = std::fs::read_to_string(&transcript_path).unwrap_or_default();
        Run {
            dir,
            status: finished.then_some(status),
            transcript,
        }
    }

    /// What the script printed.
    pub fn transcript(&self) -> &str {
        &self.transcript
    }

    /// A file the script left in its directory (empty if there is none).
    pub fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// The transcript and every `*.log` the script wrote, for a failure message.
    pub fn report(&self) -> String {
        let mut report = format!("--- transcript\n{}", self.transcript);
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .map(|entries| entries.filter_map(|e| Some(e.ok()?.path())).collect())
            .unwrap_or_default();
        logs.retain(|p| p.extension().is_some_and(|e| e == "log"));
        logs.sort();
        for log in logs {
            let name = log.file_name().unwrap_or_default().to_string_lossy();
            report.push_str(&format!("--- {name}\n{}", self.file(&name)));
        }
        report
    }

    /// Whether the script ran to its end with status 0.
    pub fn succeeded(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// Fails, with the report, unless the script ran to its end with status 0.
    pub fn assert_succeeded(&self) {
        match self.status {
            Some(status) if status.success() => {}
            Some(status) => panic!("the script failed ({status})\n{}", self.report()),
            None => panic!(
                "the script was still running at its deadline\n{}",
                self.report()
            ),
        }
    }

    /// Fails, with the report, unless the transcript contains `needle`.
    pub fn assert_contains(&self, needle: &str) {
        assert!(
            self.transcript.contains(needle),
            "the transcript lacks {needle:?}\n{}",
            self.report()
        );
    }
}

/// What a script's environment adds to the test's own.
#[derive(Default)]
pub struct Shell {
    /// Directories put on `PATH` after the built `tether`'s (the tools the README uses).
    pub path: Vec<PathBuf>,
    /// Variables set for the script (such as `KUBECONFIG`).
    pub env: Vec<(String, PathBuf)>,
}

/// `PATH` with the directory of the built `tether` first, then `extra`.
fn search_path(extra: &[PathBuf]) -> String {
    let bin = Path::new(env!("CARGO_BIN_EXE_tether"))
        .parent()
        .expect("tether's directory");
    let mut dirs = vec![bin.to_path_buf()];
    dirs.extend(extra.iter().cloned());
    let mut path = std::env::join_paths(dirs).expect("PATH entries");
    path.push(":");
    path.push(std::env::var_os("PATH").unwrap_or_default());
    path.to_string_lossy().into_owned()
}

/// Kills the process group the script leads: bash, and what it started in the background.
fn kill_group(group: u32) {
    let Ok(group) = libc::pid_t::try_from(group) else {
        return;
    };
    // SAFETY: kill(2) with a negative pid signals the process group we created for the
    // script (process_group(0)); it touches no memory. ESRCH (all gone already) is fine.
    unsafe {
        libc::kill(-group, libc::SIGKILL);
    }
}
