//! Tether's tunnels against direct TCP, haproxy, OpenSSH `ssh -R`, rathole and chisel, in one
//! run on loopback. See BENCHMARKS.md.
//!
//! ```sh
//! cargo bench --bench compare              # the full table (installs what it needs)
//! cargo bench --bench compare -- --smoke   # seconds: checks every quick path moves bytes
//! ```
//!
//! Every server binds 127.0.0.1 on a free port; every child process is killed when the run ends,
//! fails or is interrupted (they die with this process). The table goes to stdout and to
//! `target/bench/results.md`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use tether::agent::allow_list::AllowList;
use tether::agent::{Agent, AgentConfig, AgentEvent, Backoff};
use tether::forward::ForwardConfig;
use tether::identity::{Identity, parse_ca_keys};
use tether::protocol::{ClusterName, Target};
use tether::stream::StreamLimits;

type Res<T> = Result<T, String>;

/// The release binary this bench was built with; `TETHER_BIN` overrides it (A/B of variants).
fn tether_bin() -> PathBuf {
    std::env::var_os("TETHER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_tether")))
}
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
                // `cargo bench` passes --bench; filters and other harness flags are ignored.
                _ => {}
            }
        }
        o
    }

    fn wants(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| name.contains(o.as_str()))
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

/// Child processes, killed (in reverse order) when dropped.
#[derive(Default)]
struct Procs {
    children: Vec<(String, Child)>,
}

impl Procs {
    fn spawn(&mut self, name: &str, cmd: &mut Command, logs: &Path) -> Res<u32> {
        let log = fs::File::create(logs.join(format!("{name}.log"))).map_err(|e| e.to_string())?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        cmd.stdin(Stdio::null()).stdout(log).stderr(err);
        // SAFETY: prctl is async-signal-safe; the child dies with this process.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting {name} ({:?}): {e}", cmd.get_program()))?;
        let pid = child.id();
        self.children.push((name.to_owned(), child));
        Ok(pid)
    }

    /// Fails if any child has exited (with its log's tail).
    fn check(&mut self, logs: &Path) -> Res<()> {
        for (name, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "{name} exited ({status}): {}",
                    log_tail(logs, name)
                ));
            }
        }
        Ok(())
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        while let Some((_, mut child)) = self.children.pop() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn log_tail(logs: &Path, name: &str) -> String {
    let text = fs::read_to_string(logs.join(format!("{name}.log"))).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(4)..].join(" | ")
}

/// Runs a command to completion within `limit`, returning its stdout.
fn run(cmd: &mut Command, limit: Duration) -> Res<String> {
    let name = format!("{:?}", cmd.get_program());
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{name}: {e}"))?;
    let mut out = child.stdout.take().ok_or("no stdout")?;
    let mut err = child.stderr.take().ok_or("no stderr")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{name} did not finish within {limit:?}"));
            }
        }
    };
    let out = reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    if status.success() {
        Ok(out)
    } else {
        let text = if err.trim().is_empty() { &out } else { &err };
        let tail: String = text
            .chars()
            .rev()
            .take(400)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        Err(format!("{name} failed ({status}): {}", tail.trim()))
    }
}

fn free_port() -> Res<u16> {
    let l = StdListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn wait_port(port: u16, limit: Duration) -> Res<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if StdStream::connect_timeout(&local(port), Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "nothing listens on 127.0.0.1:{port} after {limit:?}"
    ))
}

/// Waits until `port` is in LISTEN state on 127.0.0.1, without connecting (a probe connection
/// would count as a client to iperf3's server).
fn wait_listening(port: u16, limit: Duration) -> Res<()> {
    let needle = format!("0100007F:{port:04X} 00000000:0000 0A");
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if fs::read_to_string("/proc/net/tcp").is_ok_and(|t| t.contains(&needle)) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "nothing listens on 127.0.0.1:{port} after {limit:?}"
    ))
}

fn which(name: &str, extra: &[PathBuf]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra.iter().cloned())
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

// ---------------------------------------------------------------------------------------------
// /proc

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `pid` and all its descendants.
fn tree(pid: u32) -> Vec<u32> {
    let mut parents: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let stat = fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            // The command name may hold spaces: the ppid is the second field after ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|s| s.parse::<u32>().ok());
            if let Some(pp) = ppid {
                parents.entry(pp).or_default().push(p);
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        if let Some(kids) = parents.get(&out[i]) {
            out.extend(kids);
        }
        i += 1;
    }
    out
}

/// CPU time (user + system) of the processes and their descendants, seconds.
fn cpu_secs(pids: &[u32]) -> f64 {
    let ticks: u64 = pids
        .iter()
        .flat_map(|p| tree(*p))
        .filter_map(|p| {
            let stat = fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            // After the name: state is field 3, utime 14 and stime 15 (1-based, whole line).
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / hz as f64
}

/// Sum of the peak RSS (VmHWM) of the processes and their descendants, KiB.
fn peak_kib(pids: &[u32]) -> Option<u64> {
    let all: Vec<u32> = pids.iter().flat_map(|p| tree(*p)).collect();
    let sum: u64 = all.iter().filter_map(|p| status_kib(*p, "VmHWM:")).sum();
    (sum > 0).then_some(sum)
}

// ---------------------------------------------------------------------------------------------
// Workloads

/// How a client reaches the echo server through a path.
#[derive(Clone)]
enum Dial {
    Plain(SocketAddr),
    /// Tether's client entry: HTTP CONNECT with a token.
    Entry(Arc<ForwardConfig>),
}

impl Dial {
    async fn open(&self) -> io::Result<TcpStream> {
        let s = match self {
            Dial::Plain(a) => TcpStream::connect(a).await?,
            Dial::Entry(c) => tether::forward::connect(c)
                .await
                .map_err(io::Error::other)?,
        };
        s.set_nodelay(true)?;
        Ok(s)
    }

    /// Opens an echo stream and checks one echoed byte: the stream works end to end.
    async fn open_checked(&self) -> io::Result<TcpStream> {
        let mut s = self.open().await?;
        s.write_all(b"ex").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        Ok(s)
    }
}

/// Bytes the bench server's sinks have read, all streams together.
static SUNK: AtomicU64 = AtomicU64::new(0);

/// Size of the buffers bulk transfers write and read.
const BULK_BUF: usize = 128 * 1024;

/// The server every path leads to. A stream's first byte says what it wants: `e` echo, `u`
/// upload (read and count into [`SUNK`]), `d` download (send until the client goes away).
async fn bench_server() -> io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let Ok(mode) = s.read_u8().await else { return };
                match mode {
                    b'u' => {
                        let mut buf = vec![0u8; BULK_BUF];
                        while let Ok(n) = s.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            SUNK.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                    b'd' => {
                        let buf = vec![0x5a; BULK_BUF];
                        while s.write_all(&buf).await.is_ok() {}
                    }
                    _ => {
                        let (mut r, mut w) = s.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                        let _ = w.shutdown().await;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// Bulk transfer on `streams` parallel streams, up (client → server) or down: Gbit/s over
/// `secs` after `warm` (counted where the bytes arrive).
async fn bulk(
    dial: &Dial,
    streams: usize,
    down: bool,
    warm: Duration,
    secs: Duration,
) -> io::Result<f64> {
    let received = Arc::new(AtomicU64::new(0));
    let mut conns = Vec::with_capacity(streams);
    for _ in 0..streams {
        let mut s = dial.open().await?;
        s.write_all(if down { b"d" } else { b"u" }).await?;
        conns.push(s);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for mut s in conns {
        let received = received.clone();
        tasks.spawn(async move {
            let mut buf = vec![0x33u8; BULK_BUF];
            loop {
                if down {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => received.fetch_add(n as u64, Ordering::Relaxed),
                    };
                } else if s.write_all(&buf).await.is_err() {
                    break;
                }
            }
        });
    }
    let count = || {
        if down {
            received.load(Ordering::Relaxed)
        } else {
            SUNK.load(Ordering::Relaxed)
        }
    };
    tokio::time::sleep(warm).await;
    let (c0, t0) = (count(), Instant::now());
    tokio::time::sleep(secs).await;
    let (c1, elapsed) = (count(), t0.elapsed());
    let finished_early = tasks.try_join_next().is_some();
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    if finished_early || c1 <= c0 {
        return Err(io::Error::other(
            "a stream ended during the transfer or moved nothing",
        ));
    }
    Ok((c1 - c0) as f64 * 8.0 / elapsed.as_secs_f64() / 1e9)
}

/// 64-byte round trips on one stream: (p50, p99) in µs.
async fn latency(dial: &Dial, n: usize) -> io::Result<(f64, f64)> {
    let mut s = dial.open_checked().await?;
    let msg = [7u8; 64];
    let mut buf = [0u8; 64];
    for _ in 0..n.min(200) {
        s.write_all(&msg).await?;
        s.read_exact(&mut buf).await?;
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&msg).await?;
        s.read_exact(&mut buf).await?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    Ok((at(0.50), at(0.99)))
}

/// New streams per second (each checked end to end with one echoed byte), 4 dialling at once,
/// until `n` streams or `limit` time.
async fn setup_rate(dial: &Dial, n: usize, limit: Duration) -> io::Result<f64> {
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..4 {
        let dial = dial.clone();
        let done = done.clone();
        workers.push(tokio::spawn(async move {
            while started.elapsed() < limit && done.load(Ordering::Relaxed) < n {
                let s = dial.open_checked().await?;
                drop(s);
                done.fetch_add(1, Ordering::Relaxed);
            }
            io::Result::Ok(())
        }));
    }
    for w in workers {
        w.await.map_err(io::Error::other)??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// One iperf3 run, tried up to 3 times (iperf3's server refuses a test while it is still
/// tearing down the previous one): Gbit/s received, or why not.
fn iperf(port: u16, streams: u32, reverse: bool, opts: &Opts) -> Res<f64> {
    let mut last = String::new();
    for attempt in 0..3 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        match iperf_once(port, streams, reverse, opts) {
            Ok(g) => return Ok(g),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn iperf_once(port: u16, streams: u32, reverse: bool, opts: &Opts) -> Res<f64> {
    let omit = if opts.smoke { 0 } else { 1 };
    let mut cmd = Command::new("iperf3");
    cmd.args(["-c", "127.0.0.1", "-J", "-p"])
        .arg(port.to_string())
        .args(["-t", &opts.secs.to_string(), "-O", &omit.to_string()])
        .args(["-P", &streams.to_string()]);
    if reverse {
        cmd.arg("-R");
    }
    let limit = Duration::from_secs(u64::from(opts.secs + omit) + 20);
    let out = run(&mut cmd, limit).map_err(|e| {
        // iperf3 -J reports its error in the JSON on stdout.
        e.split("\"error\":")
            .nth(1)
            .map(|s| s.trim().to_owned())
            .unwrap_or(e)
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| format!("iperf3 JSON: {e}"))?;
    if let Some(e) = v.get("error") {
        return Err(format!("iperf3: {e}"));
    }
    let sum = &v["end"]["sum_received"];
    let bytes = sum["bytes"].as_f64().unwrap_or(0.0);
    if bytes <= 0.0 {
        return Err("iperf3 moved no bytes".into());
    }
    sum["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .ok_or_else(|| "iperf3 JSON without bits_per_second".into())
}

// ---------------------------------------------------------------------------------------------
// Paths

/// A path under test, set up and running.
struct PathUnderTest {
    /// Plain TCP address that reaches the iperf3 server through the path.
    iperf: u16,
    /// How the Rust clients reach the echo server.
    echo: Dial,
    /// The root-side process (proxy, sshd, haproxy, rathole/chisel server).
    server_pids: Vec<u32>,
    /// The leaf-side process (agent, ssh client, rathole/chisel client).
    agent_pids: Vec<u32>,
    note: String,
}

#[derive(Default)]
struct PathResult {
    name: String,
    note: String,
    /// Gbit/s with the Rust bulk client (Tether through its CONNECT entry, like curl):
    /// 1 stream up, 1 down, 8 up, 8 down.
    bulk: [Option<f64>; 4],
    /// Gbit/s with iperf3 (Tether through `tether forward`): 1 stream up, 8 up.
    iperf: [Option<f64>; 2],
    latency: Option<(f64, f64)>,
    setup: Option<f64>,
    /// CPU seconds the path's own processes spent per GB moved, over the four bulk runs.
    cpu_per_gb: Option<f64>,
    server_peak: Option<u64>,
    agent_peak: Option<u64>,
    errors: Vec<String>,
}

struct Env {
    opts: Opts,
    tmp: PathBuf,
    logs: PathBuf,
    echo: SocketAddr,
    rt: tokio::runtime::Runtime,
    tools: Vec<PathBuf>,
}

fn measure(
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

fn dir(down: bool) -> &'static str {
    if down { "down" } else { "up" }
}

fn slug(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

fn direct(env: &Env, iperf: u16) -> Res<PathUnderTest> {
    let _ = env;
    Ok(PathUnderTest {
        iperf,
        echo: Dial::Plain(env.echo),
        server_pids: vec![],
        agent_pids: vec![],
        note: "no hop".into(),
    })
}

fn haproxy(env: &Env, procs: &mut Procs, iperf: u16) -> Res<PathUnderTest> {
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

fn openssh(env: &Env, procs: &mut Procs, iperf: u16, cipher: Option<&str>) -> Res<PathUnderTest> {
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

fn ssh_version() -> String {
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
fn ready(env: &Env, procs: &mut Procs, echo: &Dial) -> Res<()> {
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

/// CAs, certificates and the token file for Tether, made with the release binary's CLI.
struct TetherFiles {
    dir: PathBuf,
}

impl TetherFiles {
    fn create(env: &Env) -> Res<Self> {
        let dir = env.tmp.join("tether");
        fs::create_dir_all(dir.join("trust")).map_err(|e| e.to_string())?;
        let t = |args: &[&str]| {
            run(
                Command::new(tether_bin()).current_dir(&dir).args(args),
                Duration::from_secs(30),
            )
        };
        t(&["ca", "init", "--cluster", "root", "--out", "root-ca"])?;
        t(&["ca", "init", "--cluster", "leaf", "--out", "leaf-ca"])?;
        t(&[
            "cert",
            "host",
            "--ca",
            "root-ca",
            "--cluster",
            "root",
            "--proxy-id",
            "proxy-1",
            "--out",
            "proxy-1",
        ])?;
        t(&[
            "cert",
            "agent",
            "--ca",
            "leaf-ca",
            "--cluster",
            "leaf",
            "--out",
            "agent",
        ])?;
        fs::copy(dir.join("root-ca.pub"), dir.join("trust/root.pub")).map_err(|e| e.to_string())?;
        fs::copy(dir.join("leaf-ca.pub"), dir.join("trust/leaf.pub")).map_err(|e| e.to_string())?;
        fs::write(dir.join("tokens.txt"), format!("bench:{TOKEN}\n")).map_err(|e| e.to_string())?;
        Ok(Self { dir })
    }

    /// Starts a proxy with a client entry: (pid, tunnel port, entry port).
    fn proxy(&self, env: &Env, procs: &mut Procs, name: &str) -> Res<(u32, u16, u16)> {
        let (port, entry) = (free_port()?, free_port()?);
        let pid = procs.spawn(
            name,
            Command::new(tether_bin())
                .current_dir(&self.dir)
                .args([
                    "proxy",
                    "--cluster",
                    "root",
                    "--proxy-id",
                    "proxy-1",
                    "--identity",
                    "proxy-1",
                ])
                .args(["--trust-dir", "trust", "--client-tokens", "tokens.txt"])
                .args([
                    "--listen",
                    &local(port).to_string(),
                    "--client-listen",
                    &local(entry).to_string(),
                ])
                .args(["--max-connections-per-ip", "4096", "--shutdown-grace", "1s"]),
            &env.logs,
        )?;
        wait_port(port, Duration::from_secs(10))?;
        wait_port(entry, Duration::from_secs(10))?;
        Ok((pid, port, entry))
    }

    fn entry(&self, entry: u16, target_port: u16) -> Res<ForwardConfig> {
        Ok(ForwardConfig {
            entry: local(entry).to_string(),
            user: "bench".into(),
            token: TOKEN.into(),
            target: Target::parse(&format!("127.0.0.1.leaf.tether:{target_port}"))
                .map_err(|e| e.to_string())?,
            connect_timeout: Duration::from_secs(30),
        })
    }
}

fn tether_path(
    env: &Env,
    files: &TetherFiles,
    procs: &mut Procs,
    iperf: u16,
) -> Res<PathUnderTest> {
    let (proxy, port, entry) = files.proxy(env, procs, "tether-proxy")?;
    let agent = procs.spawn(
        "tether-agent",
        Command::new(tether_bin())
            .current_dir(&files.dir)
            .args([
                "agent",
                "--cluster",
                "leaf",
                "--root-cluster",
                "root",
                "--identity",
                "agent",
            ])
            .args([
                "--root-ca",
                "root-ca.pub",
                "--proxy",
                &local(port).to_string(),
            ])
            .args([
                "--allow",
                &format!("127.0.0.1/32:{iperf},{}", env.echo.port()),
            ]),
        &env.logs,
    )?;
    let echo = Dial::Entry(Arc::new(files.entry(entry, env.echo.port())?));
    ready(env, procs, &echo)?;
    let fwd = free_port()?;
    procs.spawn(
        "tether-forward",
        Command::new(tether_bin())
            .args([
                "forward",
                "--listen",
                &local(fwd).to_string(),
                "--entry",
                &local(entry).to_string(),
            ])
            .args([
                "--to",
                &format!("127.0.0.1.leaf.tether:{iperf}"),
                "--user",
                "bench",
            ])
            .env("TETHER_TOKEN", TOKEN),
        &env.logs,
    )?;
    wait_port(fwd, Duration::from_secs(10))?;
    Ok(PathUnderTest {
        iperf: fwd,
        echo,
        server_pids: vec![proxy],
        agent_pids: vec![agent],
        note: "iperf3 via `tether forward` → HTTP CONNECT entry; echo clients speak CONNECT".into(),
    })
}

fn rathole(env: &Env, procs: &mut Procs, iperf: u16, noise: bool) -> Res<PathUnderTest> {
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
    let echo = Dial::Plain(local(v2));
    ready(env, procs, &echo)?;
    Ok(PathUnderTest {
        iperf: v1,
        echo,
        server_pids: vec![s],
        agent_pids: vec![c],
        note: format!("rathole 0.5, {tag} transport"),
    })
}

fn chisel(env: &Env, procs: &mut Procs, iperf: u16) -> Res<PathUnderTest> {
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
    let echo = Dial::Plain(local(v2));
    ready(env, procs, &echo)?;
    Ok(PathUnderTest {
        iperf: v1,
        echo,
        server_pids: vec![s],
        agent_pids: vec![c],
        note: "chisel (SSH over WebSocket)".into(),
    })
}

// ---------------------------------------------------------------------------------------------
// Tether's memory per idle tunnel and per idle stream

struct IdleMemory {
    agents: usize,
    streams: usize,
    base_kib: u64,
    per_tunnel_kib: f64,
    per_stream_kib: f64,
    agent_side_per_tunnel_kib: f64,
}

/// One agent reaching all of 5 proxies behind haproxy (`balance random`), repeated.
struct Convergence {
    runs: usize,
    median_ms: f64,
    max_ms: f64,
    median_attempts: u64,
    max_attempts: u64,
}

/// GET `path` from an admin endpoint (blocking, short timeouts).
fn admin_get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}

/// Starts 5 proxies (peers of each other) behind haproxy, then, `runs` times, a fresh agent
/// process: the time from its start until its `/status` shows 5/5 tunnels, and its dials
/// (`tether_agent_dials_total`) to get there.
fn convergence(env: &Env, files: &TetherFiles, runs: usize) -> Res<Convergence> {
    eprintln!("== tether: 1 agent → 5 proxies behind haproxy ({runs} runs)");
    let ids = ["proxy-1", "proxy-2", "proxy-3", "proxy-4", "proxy-5"];
    for id in &ids[1..] {
        if !files.dir.join(id).exists() {
            run(
                Command::new(tether_bin()).current_dir(&files.dir).args([
                    "cert",
                    "host",
                    "--ca",
                    "root-ca",
                    "--cluster",
                    "root",
                    "--proxy-id",
                    id,
                    "--out",
                    id,
                ]),
                Duration::from_secs(30),
            )?;
        }
    }
    let mut procs = Procs::default();
    let ports = (0..ids.len())
        .map(|_| free_port())
        .collect::<Res<Vec<u16>>>()?;
    for (id, port) in ids.iter().zip(&ports) {
        let mut cmd = Command::new(tether_bin());
        cmd.current_dir(&files.dir)
            .args([
                "proxy",
                "--cluster",
                "root",
                "--proxy-id",
                id,
                "--identity",
                id,
            ])
            .args([
                "--trust-dir",
                "trust",
                "--listen",
                &local(*port).to_string(),
            ]);
        for (peer, peer_port) in ids.iter().zip(&ports) {
            cmd.arg("--peer")
                .arg(format!("{peer}={}", local(*peer_port)));
        }
        procs.spawn(&format!("converge-{id}"), &mut cmd, &env.logs)?;
    }
    for port in &ports {
        wait_port(*port, Duration::from_secs(10))?;
    }
    let lb = free_port()?;
    let mut cfg = format!(
        "global\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 1s\n  timeout client 120s\n  \
         timeout server 120s\nlisten tunnels\n  bind 127.0.0.1:{lb}\n  balance random\n"
    );
    for (i, port) in ports.iter().enumerate() {
        cfg.push_str(&format!("  server s{i} 127.0.0.1:{port}\n"));
    }
    let path = env.tmp.join("haproxy-converge.cfg");
    fs::write(&path, cfg).map_err(|e| e.to_string())?;
    procs.spawn(
        "haproxy-converge",
        Command::new("haproxy").arg("-db").arg("-f").arg(&path),
        &env.logs,
    )?;
    wait_port(lb, Duration::from_secs(10))?;

    let mut times = Vec::new();
    let mut attempts = Vec::new();
    for i in 0..runs {
        let admin = local(free_port()?);
        let mut agent = Procs::default();
        let started = Instant::now();
        agent.spawn(
            &format!("converge-agent-{i}"),
            Command::new(tether_bin())
                .current_dir(&files.dir)
                .args(["agent", "--cluster", "leaf", "--root-cluster", "root"])
                .args(["--identity", "agent", "--root-ca", "root-ca.pub"])
                .args(["--proxy", &local(lb).to_string()])
                .args(["--admin-listen", &admin.to_string()]),
            &env.logs,
        )?;
        loop {
            if started.elapsed() > Duration::from_secs(30) {
                return Err(format!("run {i}: no 5/5 within 30 s"));
            }
            let done = admin_get(admin, "/status")
                .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
                .is_some_and(|v| {
                    let connected = v["proxies"].as_array().map_or(0, |ps| {
                        ps.iter().filter(|p| p["state"] == "Connected").count()
                    });
                    connected == 5 && v["expected"] == 5
                });
            if done {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        let dials: u64 = admin_get(admin, "/metrics")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("tether_agent_dials_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum();
        attempts.push(dials);
    }
    times.sort_by(f64::total_cmp);
    attempts.sort_unstable();
    Ok(Convergence {
        runs,
        median_ms: times[times.len() / 2],
        max_ms: times[times.len() - 1],
        median_attempts: attempts[attempts.len() / 2],
        max_attempts: attempts[attempts.len() - 1],
    })
}

fn idle_memory(env: &Env, files: &TetherFiles) -> Res<IdleMemory> {
    eprintln!(
        "== tether idle memory ({} agents, {} streams)",
        env.opts.idle_agents, env.opts.idle_streams
    );
    let mut procs = Procs::default();
    let (proxy, port, entry) = files.proxy(env, &mut procs, "tether-proxy-idle")?;
    std::thread::sleep(Duration::from_millis(500));
    let rss = |pid| status_kib(pid, "VmRSS:").ok_or_else(|| "proxy gone".to_string());
    let base = rss(proxy)?;
    let me = std::process::id();
    let my_base = status_kib(me, "VmRSS:").unwrap_or(0);
    let identity = Arc::new(Identity::load(&files.dir.join("agent")).map_err(|e| e.to_string())?);
    let root_ca = files.dir.join("root-ca.pub");
    let text = fs::read_to_string(&root_ca).map_err(|e| e.to_string())?;
    let root_cas = parse_ca_keys(&text, &root_ca).map_err(|e| e.to_string())?;
    let allow = AllowList::parse([format!("127.0.0.1/32:{}", env.echo.port())])
        .map_err(|e| e.to_string())?;
    let config = AgentConfig {
        cluster: ClusterName::new("leaf").map_err(|e| e.to_string())?,
        root_cluster: ClusterName::new("root").map_err(|e| e.to_string())?,
        proxy_addr: local(port).to_string(),
        identity,
        root_cas,
        allow: Arc::new(ArcSwap::from_pointee(allow)),
        api_server: None,
        heartbeat_interval: Duration::from_secs(15),
        connect_timeout: Duration::from_secs(30),
        dial_timeout: Duration::from_secs(10),
        backoff: Backoff::default(),
        stream: StreamLimits::default(),
    };
    let stop = CancellationToken::new();
    let n = env.opts.idle_agents;
    let connected = env.rt.block_on(async {
        let up = Arc::new(AtomicUsize::new(0));
        for _ in 0..n {
            let agent = Arc::new(Agent::new(config.clone()));
            let mut events = agent.events();
            let up = up.clone();
            tokio::spawn(async move {
                while let Ok(e) = events.recv().await {
                    if matches!(e, AgentEvent::Connected { .. }) {
                        up.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            });
            let stop = stop.clone();
            tokio::spawn(async move { agent.run(stop).await });
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while up.load(Ordering::Relaxed) < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        up.load(Ordering::Relaxed)
    });
    if connected < n {
        stop.cancel();
        return Err(format!("only {connected} of {n} agents connected"));
    }
    std::thread::sleep(Duration::from_secs(2));
    let with_tunnels = rss(proxy)?;
    let my_with_tunnels = status_kib(me, "VmRSS:").unwrap_or(0);
    // Idle streams: CONNECT through the entry to the echo server, one byte each way, then hold.
    let dial = Dial::Entry(Arc::new(files.entry(entry, env.echo.port())?));
    let m = env.opts.idle_streams;
    let streams = env.rt.block_on(async {
        let mut held = Vec::with_capacity(m);
        for chunk in 0..m.div_ceil(16) {
            let mut batch = Vec::new();
            for _ in 0..16.min(m - chunk * 16) {
                let d = dial.clone();
                batch.push(tokio::spawn(async move { d.open_checked().await }));
            }
            for b in batch {
                held.push(
                    b.await
                        .map_err(|e| e.to_string())?
                        .map_err(|e| e.to_string())?,
                );
            }
        }
        Res::Ok(held)
    });
    let streams = match streams {
        Ok(s) => s,
        Err(e) => {
            stop.cancel();
            return Err(format!("opening idle streams: {e}"));
        }
    };
    std::thread::sleep(Duration::from_secs(2));
    let with_streams = rss(proxy)?;
    drop(streams);
    stop.cancel();
    env.rt
        .block_on(async { tokio::time::sleep(Duration::from_millis(500)).await });
    Ok(IdleMemory {
        agents: n,
        streams: m,
        base_kib: base,
        per_tunnel_kib: with_tunnels.saturating_sub(base) as f64 / n as f64,
        per_stream_kib: with_streams.saturating_sub(with_tunnels) as f64 / m as f64,
        agent_side_per_tunnel_kib: my_with_tunnels.saturating_sub(my_base) as f64 / n as f64,
    })
}

// ---------------------------------------------------------------------------------------------
// Setup: packages and optional tools

fn ensure_packages() {
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
fn install_others(tools: &Path) -> Vec<String> {
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

fn machine() -> String {
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

fn status_kib_file(path: &str, field: &str) -> Option<u64> {
    fs::read_to_string(path)
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------------------------
// Report

fn g(v: Option<f64>) -> String {
    v.map_or("—".into(), |v| format!("{v:.2}"))
}

fn mb(v: Option<u64>) -> String {
    v.map_or("—".into(), |k| format!("{:.1}", k as f64 / 1024.0))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn report(
    opts: &Opts,
    results: &[PathResult],
    idle: &Res<IdleMemory>,
    converge: &Res<Convergence>,
    notes: &[String],
    elapsed: Duration,
) -> (String, bool) {
    let mut s = String::new();
    let mode = if opts.smoke {
        "smoke (tiny sizes; figures mean nothing)"
    } else {
        "full"
    };
    let _ = writeln!(s, "## Results ({mode})\n");
    let _ = writeln!(
        s,
        "Machine: {}. Run took {:.0} s; iperf3 {} s per run{}, {} × 64-byte round trips, setup ≤ {} dials or {:?}.\n",
        machine(),
        elapsed.as_secs_f64(),
        opts.secs,
        if opts.smoke { "" } else { " (+1 s omitted)" },
        opts.round_trips,
        opts.dials,
        opts.setup_time
    );
    let _ = writeln!(
        s,
        "| path | 1 stream up | 1 stream down | 8 streams up | 8 streams down | iperf3 1 up | iperf3 8 up | p50 µs | p99 µs | added p50 µs | setup /s | CPU s/GB | root side peak MiB | leaf side peak MiB |"
    );
    let _ = writeln!(
        s,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let direct_p50 = results
        .iter()
        .find(|r| r.name == "direct TCP")
        .and_then(|r| r.latency.map(|l| l.0));
    for r in results {
        let added = r.latency.and_then(|l| direct_p50.map(|d| l.0 - d));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            g(r.bulk[0]),
            g(r.bulk[1]),
            g(r.bulk[2]),
            g(r.bulk[3]),
            g(r.iperf[0]),
            g(r.iperf[1]),
            r.latency.map_or("—".into(), |l| format!("{:.0}", l.0)),
            r.latency.map_or("—".into(), |l| format!("{:.0}", l.1)),
            added.map_or("—".into(), |a| format!("{a:.0}")),
            r.setup.map_or("—".into(), |v| format!("{v:.0}")),
            r.cpu_per_gb.map_or("—".into(), |v| format!("{v:.2}")),
            mb(r.server_peak),
            mb(r.agent_peak),
        );
    }
    match converge {
        Ok(c) => {
            let _ = writeln!(
                s,
                "\nOne agent → all 5 proxies behind haproxy (`balance random`), {} fresh agent processes: \
                 5/5 tunnels after {:.0} ms median, {:.0} ms at most; {} dials median, {} at most.",
                c.runs, c.median_ms, c.max_ms, c.median_attempts, c.max_attempts
            );
        }
        Err(e) => {
            let _ = writeln!(s, "\nOne agent → 5 proxies behind haproxy: {e}");
        }
    }
    let _ = writeln!(
        s,
        "\nThroughput in Gbit/s, counted where the bytes arrive. The first four columns use the benchmark's own client and server (128 KiB writes; Tether's client speaks HTTP CONNECT to the proxy's entry, as curl does); the iperf3 columns reach Tether through `tether forward`, one more local TCP hop. \"Up\" is root-side client → leaf-side server. CPU s/GB: CPU time (user + system) of the path's own processes (proxy and agent, sshd and ssh, ...) per GB moved in the four bulk runs, the cost that matters when cores are shared. Peaks are VmHWM summed over each side's processes (sshd: master and session processes), read after the 8-stream runs. Direct TCP and haproxy have no leaf side.\n"
    );
    for r in results {
        if !r.note.is_empty() {
            let _ = writeln!(s, "- {}: {}", r.name, r.note);
        }
        for e in &r.errors {
            let _ = writeln!(
                s,
                "- {}: **not measured**: {}",
                r.name,
                e.replace('\n', " ")
            );
        }
    }
    for n in notes {
        let _ = writeln!(s, "- {n}");
    }
    let _ = writeln!(s, "\n### Idle memory on the proxy\n");
    match idle {
        Ok(m) => {
            let _ = writeln!(
                s,
                "| what | count | per item on the proxy (KiB) |\n| --- | ---: | ---: |"
            );
            let _ = writeln!(
                s,
                "| idle agent tunnels (one process, one identity) | {} | {:.1} |",
                m.agents, m.per_tunnel_kib
            );
            let _ = writeln!(
                s,
                "| idle open streams (HTTP CONNECT → echo server) | {} | {:.1} |",
                m.streams, m.per_stream_kib
            );
            let _ = writeln!(
                s,
                "\nProxy VmRSS before any agent: {:.1} MiB. Agent side (all agents in the benchmark process): {:.1} KiB per tunnel.",
                m.base_kib as f64 / 1024.0,
                m.agent_side_per_tunnel_kib
            );
        }
        Err(e) => {
            let _ = writeln!(s, "not measured: {e}");
        }
    }
    // Targets.
    let find = |name: &str| results.iter().find(|r| r.name == name);
    let tether = find("tether");
    let gcm = find("ssh -R aes128-gcm");
    let mut moved = true;
    if !opts.smoke {
        let _ = writeln!(s, "\n### Targets (ratios from this run)\n");
        let _ = writeln!(s, "| target | measured | met |\n| --- | --- | --- |");
        let mut row = |what: &str, measured: String, ok: Option<bool>| {
            let _ = writeln!(
                s,
                "| {what} | {measured} | {} |",
                match ok {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "—",
                }
            );
        };
        for (label, idx) in [
            ("one stream ≥ 1.5× OpenSSH aes128-gcm", [0usize, 1]),
            ("8 streams ≥ 1.5× OpenSSH aes128-gcm", [2, 3]),
        ] {
            let rs: Vec<Option<f64>> = idx
                .iter()
                .map(|&i| ratio(tether.and_then(|t| t.bulk[i]), gcm.and_then(|o| o.bulk[i])))
                .collect();
            let ok = rs
                .iter()
                .all(Option::is_some)
                .then(|| rs.iter().flatten().all(|r| *r >= 1.5));
            row(label, format!("up {}×, down {}×", g(rs[0]), g(rs[1])), ok);
        }
        let added = |r: Option<&PathResult>| {
            r.and_then(|r| r.latency)
                .and_then(|l| direct_p50.map(|d| l.0 - d))
        };
        let (ta, oa) = (added(tether), added(gcm));
        row(
            "added p50 latency ≤ OpenSSH's",
            format!(
                "{} µs vs {} µs",
                ta.map_or("—".into(), |v| format!("{v:.0}")),
                oa.map_or("—".into(), |v| format!("{v:.0}"))
            ),
            ta.zip(oa).map(|(t, o)| t <= o),
        );
        let peak = tether.and_then(|t| t.server_peak);
        row(
            "proxy peak RSS under 8 streams ≤ 20 MB",
            format!("{} MiB", mb(peak)),
            peak.map(|k| (k as f64) * 1024.0 <= 20e6),
        );
        if let Ok(m) = idle {
            row(
                "≤ 64 KiB per idle agent tunnel",
                format!("{:.1} KiB", m.per_tunnel_kib),
                Some(m.per_tunnel_kib <= 64.0),
            );
            row(
                "≤ 16 KiB per idle open stream",
                format!("{:.1} KiB", m.per_stream_kib),
                Some(m.per_stream_kib <= 16.0),
            );
        }
        match converge {
            Ok(c) => row(
                "1 agent holds tunnels to 5 proxies behind haproxy within 2 s",
                format!(
                    "{:.0} ms median, {:.0} ms max ({} dials max)",
                    c.median_ms, c.max_ms, c.max_attempts
                ),
                Some(c.max_ms <= 2000.0),
            ),
            Err(e) => row(
                "1 agent holds tunnels to 5 proxies behind haproxy within 2 s",
                e.clone(),
                None,
            ),
        }
    } else {
        // Smoke: every path that ran must have moved bytes; Tether must have run.
        for r in results {
            let ok = r.bulk.iter().chain(&r.iperf).all(Option::is_some)
                && r.latency.is_some()
                && r.setup.is_some();
            if !ok {
                moved = false;
                let _ = writeln!(
                    s,
                    "\nSMOKE FAILURE: {} did not move bytes on every workload",
                    r.name
                );
            }
        }
        if tether.is_none() || idle.is_err() {
            moved = false;
            let _ = writeln!(s, "\nSMOKE FAILURE: Tether's rows or idle memory missing");
        }
    }
    (s, moved)
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
        (
            "tether",
            Box::new(|e, pr, p| match &files {
                Ok(f) => tether_path(e, f, pr, p),
                Err(err) => Err(format!("certificates: {err}")),
            }),
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
    let (table, ok) = report(&opts, &results, &idle, &converge, &notes, started.elapsed());
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
