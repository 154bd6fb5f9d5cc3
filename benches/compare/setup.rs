//! Packages and optional tools, file limits, the machine description.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::Res;
use crate::procs::{run, which};

// ---------------------------------------------------------------------------------------------
// Setup: packages and optional tools

pub(crate) fn ensure_packages() {
    let mut need = Vec::new();
    if which("iperf3", &[]).is_none() {
        need.push("iperf3");
    }
    if which("haproxy", &[]).is_none() {
        need.push("haproxy");
    }
    if which("sshd", &[]).is_none() {
        need.push("openssh-server");
    }
    if which("ssh", &[]).is_none() || which("ssh-keygen", &[]).is_none() {
        need.push("openssh-client");
    }
    if need.is_empty() {
        return;
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false);
    if !root || which("apt-get", &[]).is_none() {
        eprintln!(
            "missing {need:?}: install them (Debian: apt-get install {})",
            need.join(" ")
        );
        return;
    }
    eprintln!("installing {}", need.join(" "));
    let _ = run(
        Command::new("apt-get").args(["update", "-qq"]),
        Duration::from_secs(300),
    );
    if let Err(e) = run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&need)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        Duration::from_secs(600),
    ) {
        eprintln!("apt-get install failed: {e}");
    }
}

/// Installs rathole and chisel into target/bench/tools when missing, in parallel, each with a
/// time cap; a failure only leaves its rows out of the table.
pub(crate) fn install_others(tools: &Path) -> Vec<String> {
    let mut notes = Vec::new();
    let bin = tools.join("bin");
    let mut jobs: Vec<(&str, std::thread::JoinHandle<Res<String>>)> = Vec::new();
    if which("rathole", std::slice::from_ref(&bin)).is_none() {
        let root = tools.to_path_buf();
        eprintln!("installing rathole (cargo install, at most 8 min)");
        // Not --locked: rathole 0.5.0's lockfile pins a `time` release that current rustc
        // rejects (E0282); the resolver's newer one builds.
        jobs.push((
            "rathole",
            std::thread::spawn(move || {
                run(
                    Command::new("cargo")
                        .args(["install", "rathole", "--no-default-features"])
                        .args(["--features", "server,client,noise", "--root"])
                        .arg(&root)
                        .env("CARGO_TARGET_DIR", root.join("build")),
                    Duration::from_secs(480),
                )
            }),
        ));
    }
    if which("chisel", std::slice::from_ref(&bin)).is_none() {
        if which("go", &[PathBuf::from("/usr/local/go/bin")]).is_some() {
            let gobin = bin.clone();
            eprintln!("installing chisel (go install, at most 8 min)");
            jobs.push((
                "chisel",
                std::thread::spawn(move || {
                    let go = which("go", &[PathBuf::from("/usr/local/go/bin")])
                        .unwrap_or_else(|| "go".into());
                    run(
                        Command::new(go)
                            .args(["install", "github.com/jpillora/chisel@latest"])
                            .env("GOBIN", &gobin),
                        Duration::from_secs(480),
                    )
                }),
            ));
        } else {
            notes.push("chisel: no Go toolchain here".into());
        }
    }
    for (name, job) in jobs {
        match job.join() {
            Ok(Ok(_)) => eprintln!("{name} installed"),
            Ok(Err(e)) => notes.push(format!("{name}: install failed: {e}")),
            Err(_) => notes.push(format!("{name}: install panicked")),
        }
    }
    notes
}

pub(crate) fn raise_nofile() {
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

pub(crate) fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = status_kib_file("/proc/meminfo", "MemTotal:")
        .map(|k| k / 1024 / 1024)
        .unwrap_or(0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, {mem} GiB, Linux {}", kernel.trim())
}

pub(crate) fn status_kib_file(path: &str, field: &str) -> Option<u64> {
    fs::read_to_string(path)
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
