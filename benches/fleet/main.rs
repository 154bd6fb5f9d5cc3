//! Tether at fleet scale, with real processes (issue #12). See BENCHMARKS.md, "Fleet" and
//! "Fleet on Kubernetes".
//!
//! ```sh
//! cargo bench --bench fleet                         # every section, full size
//! cargo bench --bench fleet -- --smoke              # small counts; asserts outcomes only (CI)
//! cargo bench --bench fleet -- --only tunnels --tunnels 2000
//! cargo bench --bench fleet -- --only root --leaves 200
//! ```
//!
//! Sections, each a module returning a [`Section`] of the report:
//! - `tunnels`: one `tether proxy` holding N leaf tunnels of N distinct clusters (default
//!   10,000): memory, CPU at rest, cold start, `kill -9` and restart;
//! - `root`: N leaves (default 1,000) × 3 `tether proxy --kubernetes` replicas against a real
//!   kube-apiserver: time to Online, writes at rest, Offline after a frozen agent, memory;
//! - `leaf`: one `tether operator` reconciling N ReverseTunnels (default 1,000): start-up,
//!   memory, CPU and writes at rest.
//!
//! This file parses the options, runs the sections asked for, and prints and writes the report
//! (`target/bench/fleet.md`, or `fleet-smoke.md`). Child processes die with the driver.
//! `TETHER_BIN=PATH` runs another build of `tether` as the processes under test (A/B).

use std::fs;
use std::future::Future;
use std::time::{Duration, Instant};

// Shared with the `compare` bench and the tests rather than copied; each is used in part.
#[allow(dead_code)]
#[path = "../compare/procs.rs"]
mod procs;
#[allow(dead_code)]
#[path = "../compare/setup.rs"]
mod setup;
#[path = "../../tests/support/mod.rs"]
mod support;

mod leaf;
mod root;
mod tunnels;

type Res<T> = Result<T, String>;

/// What the command line asked for.
#[derive(Clone, Debug)]
pub(crate) struct Opts {
    /// Small counts, short waits; only outcomes are asserted (the exit code says).
    pub(crate) smoke: bool,
    /// Only sections whose name contains one of these (empty: all).
    pub(crate) only: Vec<String>,
    /// Leaf tunnels the `tunnels` section holds on one proxy.
    pub(crate) tunnels: usize,
    /// Leaves declared to the root (`root`).
    pub(crate) leaves: usize,
    /// ReverseTunnels the leaf operator reconciles (`leaf`).
    pub(crate) reverse_tunnels: usize,
    /// The quiet window over which writes at rest are counted.
    pub(crate) quiet: Duration,
}

impl Opts {
    fn parse() -> Res<Self> {
        let mut o = Opts {
            smoke: false,
            only: Vec::new(),
            tunnels: 10_000,
            leaves: 1000,
            reverse_tunnels: 1000,
            quiet: Duration::from_secs(65),
        };
        let number = |flag: &str, v: Option<String>| -> Res<usize> {
            v.and_then(|v| v.parse().ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{flag} takes a positive number"))
        };
        let (mut tunnels, mut leaves, mut reverse_tunnels) = (None, None, None);
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--smoke" => o.smoke = true,
                "--only" => o.only.extend(args.next()),
                "--tunnels" => tunnels = Some(number("--tunnels", args.next())?),
                "--leaves" => leaves = Some(number("--leaves", args.next())?),
                "--reverse-tunnels" => {
                    reverse_tunnels = Some(number("--reverse-tunnels", args.next())?)
                }
                // `cargo bench` passes --bench; other harness flags are ignored.
                _ => {}
            }
        }
        if o.smoke {
            (o.tunnels, o.leaves, o.reverse_tunnels) = (200, 20, 20);
            o.quiet = Duration::from_secs(15);
        }
        o.tunnels = tunnels.unwrap_or(o.tunnels);
        o.leaves = leaves.unwrap_or(o.leaves);
        o.reverse_tunnels = reverse_tunnels.unwrap_or(o.reverse_tunnels);
        Ok(o)
    }

    fn wants(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| name.contains(o.as_str()))
    }
}

/// One measurement's part of the report.
pub(crate) struct Section {
    /// Markdown: a heading, the table, notes.
    pub(crate) markdown: String,
    /// Whether every asserted outcome held (what `--smoke` exits on).
    pub(crate) ok: bool,
}

/// A section's measurement, by name in `main`.
type SectionRun = fn(&Opts) -> Res<Section>;

/// One row of a Kubernetes section: what, the figure, and the target it is held to (if any).
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

/// User plus system CPU time of `pid` so far (`/proc/PID/stat`, in clock ticks of 10 ms).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at state, field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// Runs a Kubernetes part (`root` or `leaf`) on its own runtime; its rows as a section.
fn kube_section<F: Future<Output = Res<Vec<Row>>>>(name: &str, part: F) -> Res<Section> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let rows = rt.block_on(part)?;
    let mut markdown = format!("## {name}\n\n| measure | figure | target |\n|---|---|---|\n");
    for r in rows {
        markdown.push_str(&format!("| {} | {} | {} |\n", r.what, r.value, r.target));
    }
    markdown.push('\n');
    Ok(Section { markdown, ok: true })
}

fn root_section(opts: &Opts) -> Res<Section> {
    kube_section("root (Kubernetes)", async {
        root::measure(opts).await.map(|f| f.rows())
    })
}

fn leaf_section(opts: &Opts) -> Res<Section> {
    kube_section("leaf (Kubernetes)", async {
        leaf::measure(opts).await.map(|f| f.rows())
    })
}

fn main() {
    let opts = match Opts::parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("fleet: {e}");
            std::process::exit(2);
        }
    };
    let started = Instant::now();
    setup::raise_nofile();
    let out_dir = procs::target_dir().join("bench");
    let _ = fs::create_dir_all(&out_dir);
    let mut report = format!(
        "# Fleet ({})\n\nMachine: {}. Run started with load average {}.\n\n",
        if opts.smoke { "smoke" } else { "full" },
        setup::machine(),
        load_average(),
    );
    let mut ok = true;
    let sections: [(&str, SectionRun); 3] = [
        ("tunnels", tunnels::run),
        ("root", root_section),
        ("leaf", leaf_section),
    ];
    for (name, run) in sections {
        if !opts.wants(name) {
            continue;
        }
        match run(&opts) {
            Ok(s) => {
                ok &= s.ok;
                report.push_str(&s.markdown);
            }
            Err(e) => {
                ok = false;
                report.push_str(&format!("## {name}\n\n**failed**: {e}\n\n"));
            }
        }
    }
    report.push_str(&format!(
        "Total time {:.0} s; load average at the end {}.\n",
        started.elapsed().as_secs_f64(),
        load_average()
    ));
    println!("\n{report}");
    let file = out_dir.join(if opts.smoke {
        "fleet-smoke.md"
    } else {
        "fleet.md"
    });
    match fs::write(&file, &report) {
        Ok(()) => println!("written to {}", file.display()),
        Err(e) => eprintln!("writing {}: {e}", file.display()),
    }
    if !ok {
        std::process::exit(1);
    }
}

/// The 1, 5 and 15 minute load averages: the machine is shared, so every figure is noted with
/// the load it was taken under.
pub(crate) fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
