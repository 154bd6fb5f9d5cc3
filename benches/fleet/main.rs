//! Tether at fleet scale, with real processes (issue #12). See BENCHMARKS.md, "Fleet".
//!
//! ```sh
//! cargo bench --bench fleet                       # 10,000 leaf tunnels on one proxy
//! cargo bench --bench fleet -- --smoke            # ~200 tunnels, well under a minute; asserts outcomes
//! cargo bench --bench fleet -- --tunnels 2000 --only tunnels
//! ```
//!
//! Each measurement is a module returning a [`Section`] of the report; this file only parses
//! the options, runs the sections asked for, and prints and writes the report
//! (`target/bench/fleet.md`, or `fleet-smoke.md` for `--smoke`). Child processes die with the
//! driver (`procs`, shared with the `compare` bench).
//!
//! Sections: `tunnels` (one `tether proxy` holding N leaf tunnels of N distinct clusters:
//! memory, CPU at rest, cold start, `kill -9` and restart).

use std::fs;
use std::time::Instant;

// Shared with the `compare` bench rather than copied; this bench uses a part of each.
#[allow(dead_code)]
#[path = "../compare/procs.rs"]
mod procs;
#[allow(dead_code)]
#[path = "../compare/setup.rs"]
mod setup;
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
}

impl Opts {
    fn parse() -> Self {
        let mut o = Opts {
            smoke: false,
            only: Vec::new(),
            tunnels: 10_000,
        };
        let mut tunnels = None;
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--smoke" => o.smoke = true,
                "--only" => o.only.extend(args.next()),
                "--tunnels" => tunnels = args.next().and_then(|v| v.parse().ok()),
                // `cargo bench` passes --bench; other harness flags are ignored.
                _ => {}
            }
        }
        o.tunnels = tunnels.unwrap_or(if o.smoke { 200 } else { 10_000 });
        o
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

fn main() {
    let opts = Opts::parse();
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
    let sections: [(&str, SectionRun); 1] = [("tunnels", tunnels::run)];
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

/// The 1, 5 and 15 minute load averages (`uptime`): the machine is shared, so every figure
/// is noted with the load it was taken under.
pub(crate) fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
