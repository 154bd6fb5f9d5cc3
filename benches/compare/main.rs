//! Tether's tunnels against direct TCP, haproxy, OpenSSH `ssh -R`, rathole and chisel, in one
//! run on loopback. See BENCHMARKS.md.
//!
//! ```sh
//! cargo bench --bench compare              # the full table (installs what it needs)
//! cargo bench --bench compare -- --smoke   # seconds: checks every quick path moves bytes
//! cargo bench --bench compare -- --only soak --soak-secs 3600   # the long soak (issue #18)
//! ```
//!
//! Every server binds 127.0.0.1 on a free port; every child process is killed when the run ends,
//! fails or is interrupted (they die with this process). The table goes to stdout and to
//! `target/bench/results.md`.
//!
//! Modules: `procs` (child processes, ports, /proc), `workloads` (bulk, round trips, setup rate,
//! iperf3), `paths` (each path's setup and [`paths::measure`]), `tunnel` (Tether's path, idle
//! memory, convergence), `soak` (steady dials through one tunnel, memory over time), `setup` (packages, tools, machine), `report` (the table and targets).

use std::fs;
use std::time::{Duration, Instant};

mod paths;
mod procs;
mod report;
mod setup;
mod soak;
#[path = "../../tests/support/mod.rs"]
mod support;
mod tunnel;
mod workloads;

use paths::{Env, PathUnderTest, chisel, direct, haproxy, measure, openssh, rathole};
use procs::{Procs, target_dir, which};
use report::report;
use setup::{ensure_packages, install_others, raise_nofile};
use tunnel::{Carrier, TetherFiles, convergence, idle_memory, tether_path_over};
use workloads::bench_server;

type Res<T> = Result<T, String>;

const TOKEN: &str = "bench-token-0123456789abcdef";
const GCM: &str = "aes128-gcm@openssh.com";

#[derive(Clone)]
struct Opts {
    smoke: bool,
    /// iperf3 seconds per run (after one omitted second in full mode).
    secs: u32,
    /// 64-byte round trips per latency measurement.
    round_trips: usize,
    /// New streams per setup-rate measurement (bounded by `setup_time` too).
    dials: usize,
    setup_time: Duration,
    idle_agents: usize,
    idle_streams: usize,
    /// Try `cargo install rathole` / `go install chisel` when they are missing.
    install_others: bool,
    /// Only run paths whose name contains one of these (empty: all).
    only: Vec<String>,
    /// Run the soak this long (`--soak-secs`; 300 s with `--only soak`).
    soak_secs: Option<u64>,
    /// The soak's dials a second (`--soak-rate`, 50 as in issue #18).
    soak_rate: u32,
}

impl Opts {
    fn parse() -> Self {
        let mut o = Opts {
            smoke: false,
            secs: 4,
            round_trips: 5000,
            dials: 1000,
            setup_time: Duration::from_secs(3),
            idle_agents: 1000,
            idle_streams: 1000,
            install_others: true,
            only: Vec::new(),
            soak_secs: None,
            soak_rate: 50,
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--smoke" => {
                    o.smoke = true;
                    o.secs = 1;
                    o.round_trips = 200;
                    o.dials = 20;
                    o.setup_time = Duration::from_secs(2);
                    o.idle_agents = 20;
                    o.idle_streams = 20;
                    o.install_others = false;
                }
                "--secs" => o.secs = args.next().and_then(|v| v.parse().ok()).unwrap_or(o.secs),
                "--no-install" => o.install_others = false,
                "--only" => o.only.extend(args.next()),
                "--soak-secs" => o.soak_secs = args.next().and_then(|v| v.parse().ok()),
                "--soak-rate" => {
                    o.soak_rate = args.next().and_then(|v| v.parse().ok()).unwrap_or(50)
                }
                // `cargo bench` passes --bench; filters and other harness flags are ignored.
                _ => {}
            }
        }
        o
    }

    /// How long to soak, if asked (never by default: it is the long run).
    fn soak(&self) -> Option<u64> {
        self.soak_secs
            .or_else(|| self.only.iter().any(|o| o == "soak").then_some(300))
    }

    fn wants(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| name.contains(o.as_str()))
    }
}

fn main() {
    let opts = Opts::parse();
    let started = Instant::now();
    raise_nofile();
    let out_dir = target_dir().join("bench");
    let tools_dir = out_dir.join("tools");
    let _ = fs::create_dir_all(&tools_dir);
    ensure_packages();
    let mut notes = Vec::new();
    if opts.install_others {
        notes.extend(install_others(&tools_dir));
    }
    let tmp = match tempfile::Builder::new().prefix("tether-bench").tempdir() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("cannot create a temporary directory: {e}");
            std::process::exit(2);
        }
    };
    let logs = tmp.path().join("logs");
    let _ = fs::create_dir_all(&logs);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokio: {e}");
            std::process::exit(2);
        }
    };
    let echo = match rt.block_on(bench_server()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("echo server: {e}");
            std::process::exit(2);
        }
    };
    let env = Env {
        opts: opts.clone(),
        tmp: tmp.path().to_path_buf(),
        logs,
        echo,
        rt,
        tools: vec![tools_dir.join("bin")],
    };
    let mut results = Vec::new();
    type Setup<'a> = Box<dyn Fn(&Env, &mut Procs, u16) -> Res<PathUnderTest> + 'a>;
    let files = TetherFiles::create(&env);
    // Tether's path with the agent's tunnel over `carrier` (#17: what TLS and WebSocket cost).
    let tether = |carrier: Carrier| -> Setup {
        let files = &files;
        Box::new(move |e, pr, p| match files {
            Ok(f) => tether_path_over(e, f, pr, p, carrier),
            Err(err) => Err(format!("certificates: {err}")),
        })
    };
    let mut paths: Vec<(&str, Setup)> = vec![
        ("direct TCP", Box::new(|e, _, p| direct(e, p))),
        ("haproxy", Box::new(haproxy)),
        (
            "ssh -R aes128-gcm",
            Box::new(|e, pr, p| openssh(e, pr, p, Some(GCM))),
        ),
        (
            "ssh -R default cipher",
            Box::new(|e, pr, p| openssh(e, pr, p, None)),
        ),
        ("tether", tether(Carrier::Ssh)),
        ("tether tls-alpn", tether(Carrier::TlsAlpn)),
        ("tether websocket", tether(Carrier::WebSocket)),
        (
            "tether websocket via L7 haproxy",
            tether(Carrier::L7WebSocket),
        ),
    ];
    let have = |n: &str| which(n, &env.tools).is_some();
    if have("rathole") {
        paths.push(("rathole tcp", Box::new(|e, pr, p| rathole(e, pr, p, false))));
        paths.push((
            "rathole noise",
            Box::new(|e, pr, p| rathole(e, pr, p, true)),
        ));
    } else if !opts.smoke {
        notes.push(
            "rathole: not installed here (cargo install rathole failed or was skipped)".into(),
        );
    }
    if have("chisel") {
        paths.push(("chisel", Box::new(chisel)));
    } else if !opts.smoke {
        notes.push("chisel: not installed here (go install failed or was skipped)".into());
    }
    for (name, setup) in &paths {
        if opts.wants(name) {
            results.push(measure(&env, name, |procs, port| setup(&env, procs, port)));
        }
    }
    let idle = match &files {
        Ok(f) if opts.wants("idle") || opts.only.is_empty() => idle_memory(&env, f),
        Ok(_) => Err("skipped (--only)".into()),
        Err(e) => Err(e.clone()),
    };
    let converge = match &files {
        Ok(f) if !opts.smoke && (opts.wants("converge") || opts.only.is_empty()) => {
            convergence(&env, f, 10)
        }
        Ok(_) => Err("skipped".into()),
        Err(e) => Err(e.clone()),
    };
    let (mut table, ok) = report(&opts, &results, &idle, &converge, &notes, started.elapsed());
    if let (Some(secs), Ok(f)) = (opts.soak(), &files) {
        match soak::soak(&env, f, secs, opts.soak_rate) {
            Ok(soak) => {
                table.push_str(&format!("\n{}", soak.render()));
                let csv = out_dir.join("soak.csv");
                if let Err(e) = fs::write(&csv, soak.csv()) {
                    eprintln!("writing {}: {e}", csv.display());
                }
            }
            Err(e) => table.push_str(&format!("\n## Soak\n\nfailed: {e}\n")),
        }
    }
    println!("\n{table}");
    let file = out_dir.join(if opts.smoke {
        "results-smoke.md"
    } else {
        "results.md"
    });
    match fs::write(&file, &table) {
        Ok(()) => println!("written to {}", file.display()),
        Err(e) => eprintln!("writing {}: {e}", file.display()),
    }
    drop(env);
    if opts.smoke && !ok {
        std::process::exit(1);
    }
}
