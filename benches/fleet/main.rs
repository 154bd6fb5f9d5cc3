//! Fleet benchmarks against a real Kubernetes control plane (issue #12): etcd and
//! kube-apiserver from `tests/kube/build.sh`, real `tether` processes, counted by the API
//! server's own `apiserver_request_total`. See BENCHMARKS.md, "Fleet on Kubernetes".
//!
//! ```sh
//! cargo bench --bench fleet                           # 1,000 leaves, 1,000 ReverseTunnels
//! cargo bench --bench fleet -- --smoke                # 20 of each, asserts outcomes only
//! cargo bench --bench fleet -- --only root --leaves 200
//! ```
//!
//! Modules: `root` (N leaves × 3 `tether proxy --kubernetes` replicas: time to Online,
//! writes at rest, Offline after a frozen agent, proxies' memory), `leaf` (one `tether
//! operator` reconciling N ReverseTunnels: start-up, memory, CPU and writes at rest).
//! The table goes to stdout and `target/bench/fleet-kube.md`. `TETHER_BIN=PATH` runs another
//! build of `tether` as the proxies, agents and operator under test.

#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "../../tests/support/haproxy.rs"]
mod haproxy;
#[allow(dead_code)]
#[path = "../../tests/support/procs.rs"]
mod procs;
#[path = "../../tests/common/tunnel_e2e.rs"]
mod tunnel_e2e;

mod leaf;
mod root;

use std::fmt::Write as _;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

type Res<T> = Result<T, String>;

/// What one run measures and how big it is.
#[derive(Clone, Debug)]
pub struct Opts {
    /// Small counts and short windows; only outcomes are asserted.
    pub smoke: bool,
    /// `root`, `leaf`, or both when `None`.
    pub only: Option<String>,
    /// Leaves declared to the root (the root part).
    pub leaves: usize,
    /// ReverseTunnels the leaf operator reconciles (the leaf part).
    pub tunnels: usize,
    /// The quiet window over which writes at rest are counted.
    pub quiet: Duration,
}

impl Opts {
    fn parse() -> Res<Self> {
        let mut o = Opts {
            smoke: false,
            only: None,
            leaves: 1000,
            tunnels: 1000,
            quiet: Duration::from_secs(65),
        };
        let mut args = std::env::args().skip(1);
        let number = |flag: &str, v: Option<String>| -> Res<usize> {
            v.and_then(|v| v.parse().ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{flag} takes a positive number"))
        };
        let mut leaves = None;
        let mut tunnels = None;
        while let Some(a) = args.next() {
            match a.as_str() {
                "--smoke" => o.smoke = true,
                "--only" => match args.next().as_deref() {
                    Some(part @ ("root" | "leaf")) => o.only = Some(part.to_owned()),
                    other => return Err(format!("--only takes root or leaf, not {other:?}")),
                },
                "--leaves" => leaves = Some(number("--leaves", args.next())?),
                "--tunnels" => tunnels = Some(number("--tunnels", args.next())?),
                // `cargo bench` passes --bench; other harness flags are ignored.
                _ => {}
            }
        }
        if o.smoke {
            o.leaves = 20;
            o.tunnels = 20;
            o.quiet = Duration::from_secs(15);
        }
        o.leaves = leaves.unwrap_or(o.leaves);
        o.tunnels = tunnels.unwrap_or(o.tunnels);
        Ok(o)
    }

    fn wants(&self, part: &str) -> bool {
        self.only.as_deref().is_none_or(|o| o == part)
    }
}

/// The `tether` binary this bench was built with; `TETHER_BIN` overrides it for the processes
/// under test (an A/B of two builds).
pub fn tether_bin() -> PathBuf {
    std::env::var_os("TETHER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_tether")))
}

/// One row of the report: what, the figure, and the target it is held to (if any).
pub struct Row {
    /// What was measured.
    pub what: String,
    /// The figure, with its unit.
    pub value: String,
    /// The done-when target and whether it was met; empty when there is none.
    pub target: String,
}

impl Row {
    fn new(what: impl Into<String>, value: impl Into<String>, target: impl Into<String>) -> Row {
        Row {
            what: what.into(),
            value: value.into(),
            target: target.into(),
        }
    }
}

/// `met` as the report shows it next to `target`.
pub fn verdict(target: &str, met: bool) -> String {
    format!("{target}: {}", if met { "met" } else { "**missed**" })
}

/// Polls `check` every `every` until it yields, or fails naming `what` after `deadline`.
pub async fn poll<T, F, Fut>(
    what: &str,
    deadline: Duration,
    every: Duration,
    mut check: F,
) -> Res<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if started.elapsed() > deadline {
            return Err(format!("timed out after {deadline:?} waiting for {what}"));
        }
        tokio::time::sleep(every).await;
    }
}

/// A field of `/proc/PID/status` in KiB (`VmRSS:`), `None` once the process is gone.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// User plus system CPU time of `pid` so far (`/proc/PID/stat`, in clock ticks of 10 ms).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at state, field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// More descriptors than the default soft limit: 1,000 leaves hold 3,000 sockets here.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max.min(65536);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn uptime() -> String {
    std::process::Command::new("uptime")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn main() {
    let opts = match Opts::parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("fleet: {e}");
            std::process::exit(2);
        }
    };
    raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let started = Instant::now();
    let mut report = String::new();
    let _ = writeln!(
        report,
        "# Fleet on Kubernetes ({})\n\nload before: {}\n",
        if opts.smoke { "smoke" } else { "full" },
        uptime()
    );
    let _ = writeln!(
        report,
        "| part | measure | figure | target |\n|---|---|---|---|"
    );
    let mut failed = Vec::new();
    let mut parts: Vec<(&str, Res<Vec<Row>>)> = Vec::new();
    if opts.wants("root") {
        let result = rt.block_on(root::measure(&opts));
        parts.push(("root", result.map(|f| f.rows())));
    }
    if opts.wants("leaf") {
        let result = rt.block_on(leaf::measure(&opts));
        parts.push(("leaf", result.map(|f| f.rows())));
    }
    for (part, result) in parts {
        match result {
            Ok(rows) => {
                for r in rows {
                    let _ = writeln!(
                        report,
                        "| {part} | {} | {} | {} |",
                        r.what, r.value, r.target
                    );
                }
            }
            Err(e) => {
                let _ = writeln!(report, "| {part} | FAILED | {e} | |");
                failed.push(format!("{part}: {e}"));
            }
        }
    }
    let _ = writeln!(
        report,
        "\nload after: {}; {:.0?} in all",
        uptime(),
        started.elapsed()
    );
    println!("{report}");
    let out: PathBuf = [env!("CARGO_MANIFEST_DIR"), "target", "bench"]
        .iter()
        .collect();
    if let Err(e) = std::fs::create_dir_all(&out)
        .and_then(|()| std::fs::write(out.join("fleet-kube.md"), &report))
    {
        eprintln!("fleet: writing {}: {e}", out.display());
    }
    if !failed.is_empty() {
        eprintln!("fleet: failed: {failed:#?}");
        std::process::exit(1);
    }
}
