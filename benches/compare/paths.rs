//! The paths under test and how one is measured: direct TCP, haproxy, OpenSSH, rathole, chisel.

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::procs::{Procs, cpu_secs, local, peak_kib, run, wait_listening, wait_port, which};
use crate::support::procs::free_port;
use crate::workloads::{Dial, bulk, iperf, latency, setup_rate};
use crate::{Opts, Res, TOKEN};

// ---------------------------------------------------------------------------------------------
// Paths

/// A path under test, set up and running.
pub(crate) struct PathUnderTest {
    /// Plain TCP address that reaches the iperf3 server through the path.
    pub(crate) iperf: u16,
    /// How the Rust clients reach the echo server.
    pub(crate) echo: Dial,
    /// The root-side process (proxy, sshd, haproxy, rathole/chisel server).
    pub(crate) server_pids: Vec<u32>,
    /// The leaf-side process (agent, ssh client, rathole/chisel client).
    pub(crate) agent_pids: Vec<u32>,
    pub(crate) note: String,
}

#[derive(Default)]
pub(crate) struct PathResult {
    pub(crate) name: String,
    pub(crate) note: String,
    /// Gbit/s with the Rust bulk client (Tether through its CONNECT entry, like curl):
    /// 1 stream up, 1 down, 8 up, 8 down.
    pub(crate) bulk: [Option<f64>; 4],
    /// Gbit/s with iperf3 (Tether through `tether forward`): 1 stream up, 8 up.
    pub(crate) iperf: [Option<f64>; 2],
    pub(crate) latency: Option<(f64, f64)>,
    pub(crate) setup: Option<f64>,
    /// CPU seconds the path's own processes spent per GB moved, over the four bulk runs.
    pub(crate) cpu_per_gb: Option<f64>,
    pub(crate) server_peak: Option<u64>,
    pub(crate) agent_peak: Option<u64>,
    pub(crate) errors: Vec<String>,
}

pub(crate) struct Env {
    pub(crate) opts: Opts,
    pub(crate) tmp: PathBuf,
    pub(crate) logs: PathBuf,
    pub(crate) echo: SocketAddr,
    pub(crate) rt: tokio::runtime::Runtime,
    pub(crate) tools: Vec<PathBuf>,
}

pub(crate) fn measure(
    env: &Env,
    name: &str,
    setup: impl FnOnce(&mut Procs, u16) -> Res<PathUnderTest>,
) -> PathResult {
    let mut r = PathResult {
        name: name.to_owned(),
        ..PathResult::default()
    };
    eprintln!("== {name}");
    let mut procs = Procs::default();
    let started = (|| {
        let iperf_port = free_port()?;
        procs.spawn(
            &format!("{}-iperf3", slug(name)),
            Command::new("iperf3").args(["-s", "-B", "127.0.0.1", "-p", &iperf_port.to_string()]),
            &env.logs,
        )?;
        wait_listening(iperf_port, Duration::from_secs(10))?;
        setup(&mut procs, iperf_port)
    })();
    let path = match started {
        Ok(p) => p,
        Err(e) => {
            eprintln!("   not run: {e}");
            r.errors.push(e);
            return r;
        }
    };
    r.note = path.note.clone();
    let runs = [(1, false), (1, true), (8, false), (8, true)];
    let warm = Duration::from_secs(if env.opts.smoke { 0 } else { 1 });
    let secs = Duration::from_secs(u64::from(env.opts.secs));
    let own: Vec<u32> = path
        .server_pids
        .iter()
        .chain(&path.agent_pids)
        .copied()
        .collect();
    let cpu_before = cpu_secs(&own);
    for (i, (streams, down)) in runs.into_iter().enumerate() {
        let dial = path.echo.clone();
        let got = env.rt.block_on(async move {
            let cap = secs + warm + Duration::from_secs(30);
            tokio::time::timeout(cap, bulk(&dial, streams, down, warm, secs)).await
        });
        match got {
            Ok(Ok(g)) => r.bulk[i] = Some(g),
            Ok(Err(e)) => r.errors.push(format!("bulk {streams}× {}: {e}", dir(down))),
            Err(_) => r
                .errors
                .push(format!("bulk {streams}× {}: timed out", dir(down))),
        }
        eprintln!("   bulk {streams}× {}: {:?}", dir(down), r.bulk[i]);
    }
    // Bytes moved ≈ rate × (warm-up + measured time) for each run.
    let gb: f64 = r
        .bulk
        .iter()
        .flatten()
        .map(|g| g / 8.0 * (warm + secs).as_secs_f64())
        .sum();
    if !own.is_empty() && gb > 0.0 {
        r.cpu_per_gb = Some((cpu_secs(&own) - cpu_before) / gb);
    }
    for (i, streams) in [1, 8].into_iter().enumerate() {
        match iperf(path.iperf, streams, false, &env.opts) {
            Ok(g) => r.iperf[i] = Some(g),
            Err(e) => r.errors.push(format!("iperf3 -P {streams}: {e}")),
        }
        eprintln!("   iperf3 -P {streams}: {:?}", r.iperf[i]);
    }
    // Peaks now: after the 8-stream runs, before the many small latency and setup ones.
    r.server_peak = peak_kib(&path.server_pids);
    r.agent_peak = peak_kib(&path.agent_pids);
    let (n, dials, limit) = (env.opts.round_trips, env.opts.dials, env.opts.setup_time);
    let echo = path.echo.clone();
    let (lat, setup) = env.rt.block_on(async move {
        let cap = Duration::from_secs(60);
        let lat = tokio::time::timeout(cap, latency(&echo, n)).await;
        let setup = tokio::time::timeout(cap, setup_rate(&echo, dials, limit)).await;
        (lat, setup)
    });
    match lat {
        Ok(Ok(l)) => r.latency = Some(l),
        Ok(Err(e)) => r.errors.push(format!("latency: {e}")),
        Err(_) => r.errors.push("latency: timed out".into()),
    }
    match setup {
        Ok(Ok(s)) => r.setup = Some(s),
        Ok(Err(e)) => r.errors.push(format!("setup: {e}")),
        Err(_) => r.errors.push("setup: timed out".into()),
    }
    eprintln!("   latency {:?} µs, setup {:?}/s", r.latency, r.setup);
    if let Err(e) = procs.check(&env.logs) {
        r.errors.push(e);
    }
    for e in &r.errors {
        eprintln!("   error: {e}");
    }
    r
}

pub(crate) fn dir(down: bool) -> &'static str {
    if down { "down" } else { "up" }
}

pub(crate) fn slug(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

pub(crate) fn direct(env: &Env, iperf: u16) -> Res<PathUnderTest> {
    let _ = env;
    Ok(PathUnderTest {
        iperf,
        echo: Dial::Plain(env.echo),
        server_pids: vec![],
        agent_pids: vec![],
        note: "no hop".into(),
    })
}

pub(crate) fn haproxy(env: &Env, procs: &mut Procs, iperf: u16) -> Res<PathUnderTest> {
    let (h1, h2) = (free_port()?, free_port()?);
    let cfg = format!(
        "global\n  maxconn 8192\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 120s\n  \
         timeout server 120s\nlisten iperf\n  bind 127.0.0.1:{h1}\n  server s1 127.0.0.1:{iperf}\n\
         listen echo\n  bind 127.0.0.1:{h2}\n  server s1 {}\n",
        env.echo
    );
    let path = env.tmp.join("haproxy.cfg");
    fs::write(&path, cfg).map_err(|e| e.to_string())?;
    let pid = procs.spawn(
        "haproxy",
        Command::new("haproxy").arg("-db").arg("-f").arg(&path),
        &env.logs,
    )?;
    wait_port(h1, Duration::from_secs(10))?;
    wait_port(h2, Duration::from_secs(10))?;
    Ok(PathUnderTest {
        iperf: h1,
        echo: Dial::Plain(local(h2)),
        server_pids: vec![pid],
        agent_pids: vec![],
        note: "one TCP hop".into(),
    })
}

pub(crate) fn openssh(
    env: &Env,
    procs: &mut Procs,
    iperf: u16,
    cipher: Option<&str>,
) -> Res<PathUnderTest> {
    let tag = cipher.map_or("default", |_| "gcm");
    let dir = env.tmp.join(format!("ssh-{tag}"));
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let _ = fs::create_dir_all("/run/sshd");
    for key in ["host", "user"] {
        let p = dir.join(key);
        if !p.exists() {
            run(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                    .arg(&p),
                Duration::from_secs(20),
            )?;
        }
    }
    fs::copy(dir.join("user.pub"), dir.join("authorized_keys")).map_err(|e| e.to_string())?;
    let port = free_port()?;
    let config = format!(
        "ListenAddress 127.0.0.1\nHostKey {d}/host\nPidFile {d}/sshd.pid\nUsePAM no\nStrictModes no\n\
         AuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\n\
         KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n\
         AllowTcpForwarding yes\nLogLevel ERROR\nMaxStartups 100:30:200\n",
        d = dir.display()
    );
    fs::write(dir.join("sshd_config"), config).map_err(|e| e.to_string())?;
    let sshd = which("sshd", &[]).ok_or("sshd not found (apt-get install openssh-server)")?;
    let sshd_pid = procs.spawn(
        &format!("sshd-{tag}"),
        Command::new(&sshd)
            .args(["-D", "-e", "-f"])
            .arg(dir.join("sshd_config"))
            .args(["-p", &port.to_string()]),
        &env.logs,
    )?;
    wait_port(port, Duration::from_secs(10))?;
    let (r1, r2) = (free_port()?, free_port()?);
    let mut ssh = Command::new("ssh");
    ssh.args(["-F", "/dev/null", "-N", "-T"])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "LogLevel=ERROR",
        ])
        .arg("-i")
        .arg(dir.join("user"))
        .args(["-p", &port.to_string()])
        .args(["-R", &format!("127.0.0.1:{r1}:127.0.0.1:{iperf}")])
        .args(["-R", &format!("127.0.0.1:{r2}:{}", env.echo)]);
    if let Some(c) = cipher {
        ssh.args(["-c", c]);
    }
    ssh.arg("127.0.0.1");
    let ssh_pid = procs.spawn(&format!("ssh-{tag}"), &mut ssh, &env.logs)?;
    let echo = Dial::Plain(local(r2));
    ready(env, procs, &echo)?;
    let negotiated = cipher.unwrap_or("default (chacha20-poly1305@openssh.com)");
    Ok(PathUnderTest {
        iperf: r1,
        echo,
        server_pids: vec![sshd_pid],
        agent_pids: vec![ssh_pid],
        note: format!("OpenSSH {}, {negotiated}", ssh_version()),
    })
}

pub(crate) fn ssh_version() -> String {
    Command::new("ssh")
        .arg("-V")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stderr)
                .split([',', ' '])
                .next()
                .unwrap_or("")
                .replace("OpenSSH_", "")
        })
        .unwrap_or_default()
}

/// Waits until an echoed byte comes back through the path (the tunnel is up), at most 30 s.
pub(crate) fn ready(env: &Env, procs: &mut Procs, echo: &Dial) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = env.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(2), echo.open_checked()).await
        });
        match ok {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) if Instant::now() >= deadline => {
                return Err(format!("path never carried a byte: {e}"));
            }
            Err(_) if Instant::now() >= deadline => {
                return Err("path never carried a byte (timeout)".into());
            }
            _ => {}
        }
        procs.check(&env.logs)?;
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub(crate) fn rathole(env: &Env, procs: &mut Procs, iperf: u16, noise: bool) -> Res<PathUnderTest> {
    let bin = which("rathole", &env.tools).ok_or("rathole not installed")?;
    let tag = if noise { "noise" } else { "tcp" };
    let (ctrl, v1, v2) = (free_port()?, free_port()?, free_port()?);
    let (server_t, client_t) = if noise {
        let keys = run(Command::new(&bin).arg("--genkey"), Duration::from_secs(10))?;
        let lines: Vec<&str> = keys
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let after = |label: &str| {
            lines
                .iter()
                .position(|l| l.starts_with(label))
                .and_then(|i| lines.get(i + 1))
                .map(|s| s.to_string())
                .ok_or(format!("rathole --genkey printed no {label}"))
        };
        let (private, public) = (after("Private Key")?, after("Public Key")?);
        (
            format!(
                "[server.transport]\ntype = \"noise\"\n[server.transport.noise]\nlocal_private_key = \"{private}\"\n"
            ),
            format!(
                "[client.transport]\ntype = \"noise\"\n[client.transport.noise]\nremote_public_key = \"{public}\"\n"
            ),
        )
    } else {
        (
            "[server.transport]\ntype = \"tcp\"\n".to_owned(),
            "[client.transport]\ntype = \"tcp\"\n".to_owned(),
        )
    };
    let server = format!(
        "[server]\nbind_addr = \"127.0.0.1:{ctrl}\"\n{server_t}\
         [server.services.iperf]\ntoken = \"{TOKEN}\"\nbind_addr = \"127.0.0.1:{v1}\"\n\
         [server.services.echo]\ntoken = \"{TOKEN}\"\nbind_addr = \"127.0.0.1:{v2}\"\n"
    );
    let client = format!(
        "[client]\nremote_addr = \"127.0.0.1:{ctrl}\"\n{client_t}\
         [client.services.iperf]\ntoken = \"{TOKEN}\"\nlocal_addr = \"127.0.0.1:{iperf}\"\n\
         [client.services.echo]\ntoken = \"{TOKEN}\"\nlocal_addr = \"{}\"\n",
        env.echo
    );
    let (sp, cp) = (
        env.tmp.join(format!("rathole-{tag}-server.toml")),
        env.tmp.join(format!("rathole-{tag}-client.toml")),
    );
    fs::write(&sp, server).map_err(|e| e.to_string())?;
    fs::write(&cp, client).map_err(|e| e.to_string())?;
    let s = procs.spawn(
        &format!("rathole-{tag}-server"),
        Command::new(&bin).arg("-s").arg(&sp),
        &env.logs,
    )?;
    wait_port(ctrl, Duration::from_secs(10))?;
    let c = procs.spawn(
        &format!("rathole-{tag}-client"),
        Command::new(&bin).arg("-c").arg(&cp),
        &env.logs,
    )?;
    reverse_path(
        env,
        procs,
        (s, c),
        (v1, v2),
        format!("rathole 0.5, {tag} transport"),
    )
}

pub(crate) fn chisel(env: &Env, procs: &mut Procs, iperf: u16) -> Res<PathUnderTest> {
    let bin = which("chisel", &env.tools).ok_or("chisel not installed")?;
    let (ctrl, v1, v2) = (free_port()?, free_port()?, free_port()?);
    let s = procs.spawn(
        "chisel-server",
        Command::new(&bin).args([
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            &ctrl.to_string(),
            "--reverse",
        ]),
        &env.logs,
    )?;
    wait_port(ctrl, Duration::from_secs(10))?;
    let c = procs.spawn(
        "chisel-client",
        Command::new(&bin)
            .args(["client", &format!("http://127.0.0.1:{ctrl}")])
            .arg(format!("R:127.0.0.1:{v1}:127.0.0.1:{iperf}"))
            .arg(format!("R:127.0.0.1:{v2}:{}", env.echo)),
        &env.logs,
    )?;
    reverse_path(
        env,
        procs,
        (s, c),
        (v1, v2),
        "chisel (SSH over WebSocket)".into(),
    )
}

/// A peer's reverse tunnel once its server and client run: the server's ports `iperf` and
/// `echo` reach the targets through the client; ready once an echo goes through.
fn reverse_path(
    env: &Env,
    procs: &mut Procs,
    (server, client): (u32, u32),
    (iperf, echo): (u16, u16),
    note: String,
) -> Res<PathUnderTest> {
    let echo = Dial::Plain(local(echo));
    ready(env, procs, &echo)?;
    Ok(PathUnderTest {
        iperf,
        echo,
        server_pids: vec![server],
        agent_pids: vec![client],
        note,
    })
}
