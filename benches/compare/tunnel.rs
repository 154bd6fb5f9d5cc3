//! Tether's path, its certificates, its memory per idle tunnel and stream, and convergence
//! of one agent onto 5 proxies.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use tether::agent::{Agent, AgentConfig, AgentEvent};
use tether::egress::allow_list::AllowList;
use tether::forward::ForwardConfig;
use tether::identity::{Identity, parse_ca_keys};
use tether::protocol::{ClusterName, Target};

use crate::paths::{Env, PathUnderTest, ready};
use crate::procs::{Procs, local, run, status_kib, wait_port};
use crate::support::procs::{admin_get, free_port, tether_bin};
use crate::workloads::Dial;
use crate::{Res, TOKEN};

/// CAs, certificates and the token file for Tether, made with the release binary's CLI.
pub(crate) struct TetherFiles {
    pub(crate) dir: PathBuf,
}

impl TetherFiles {
    pub(crate) fn create(env: &Env) -> Res<Self> {
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
        host_cert(&dir, "proxy-1")?;
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
        // The proxy refuses a token file others may read.
        fs::set_permissions(
            dir.join("tokens.txt"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .map_err(|e| e.to_string())?;
        Ok(Self { dir })
    }

    /// Starts a proxy with a client entry: (pid, tunnel port, entry port).
    pub(crate) fn proxy(&self, env: &Env, procs: &mut Procs, name: &str) -> Res<(u32, u16, u16)> {
        self.proxy_with(env, procs, name, &[])
    }

    /// [`proxy`](Self::proxy) with more arguments (a TLS port).
    fn proxy_with(
        &self,
        env: &Env,
        procs: &mut Procs,
        name: &str,
        extra: &[String],
    ) -> Res<(u32, u16, u16)> {
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
                .args(["--max-connections-per-ip", "4096", "--shutdown-grace", "1s"])
                // The idle-memory run holds 1,000 streams from 127.0.0.1.
                .args(["--client-max-connections", "4096"])
                .args(["--client-max-connections-per-ip", "4096"])
                .args(extra),
            &env.logs,
        )?;
        wait_port(port, Duration::from_secs(10))?;
        wait_port(entry, Duration::from_secs(10))?;
        Ok((pid, port, entry))
    }

    pub(crate) fn entry(&self, entry: u16, target_port: u16) -> Res<ForwardConfig> {
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

/// What carries the agent's tunnel in a Tether path (#17: the TLS port's overhead).
#[derive(Clone, Copy)]
pub(crate) enum Carrier {
    /// SSH on the tunnel port.
    Ssh,
    /// TLS to the proxy's TLS port, SSH inside by ALPN.
    TlsAlpn,
    /// A WebSocket upgrade in plain HTTP straight to the proxy's TLS port: the framing's own
    /// cost, without a load balancer.
    WebSocket,
    /// TLS to a haproxy in `mode http` that terminates it, then SSH in WebSocket frames over
    /// plain HTTP to the proxy's TLS port.
    L7WebSocket,
}

/// Tether's path with the agent's tunnel over `carrier`; the clients' side is the same.
pub(crate) fn tether_path_over(
    env: &Env,
    files: &TetherFiles,
    procs: &mut Procs,
    iperf: u16,
    carrier: Carrier,
) -> Res<PathUnderTest> {
    let tls = free_port()?;
    let extra = match carrier {
        Carrier::Ssh => vec![],
        _ => vec!["--tls-listen".to_owned(), local(tls).to_string()],
    };
    let (proxy, port, entry) = files.proxy_with(env, procs, "tether-proxy", &extra)?;
    let mut server_pids = vec![proxy];
    let address = match carrier {
        Carrier::Ssh => local(port).to_string(),
        Carrier::TlsAlpn => {
            wait_port(tls, Duration::from_secs(10))?;
            format!("tls://{}", local(tls))
        }
        Carrier::WebSocket => {
            wait_port(tls, Duration::from_secs(10))?;
            format!("ws://{}", local(tls))
        }
        Carrier::L7WebSocket => {
            wait_port(tls, Duration::from_secs(10))?;
            let (pid, lb) = l7_haproxy(env, files, procs, tls)?;
            server_pids.push(pid);
            format!("tls://{}", local(lb))
        }
    };
    let agent = spawn_agent_to(env, files, procs, "tether-agent", &address, &[iperf])?;
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
        server_pids,
        agent_pids: vec![agent],
        note: "iperf3 via `tether forward` → HTTP CONNECT entry; echo clients speak CONNECT".into(),
    })
}

/// haproxy in `mode http` terminating TLS (a self-signed certificate, no ALPN) in front of the
/// proxy's TLS port, in plain HTTP: an L7 load balancer. (pid, its port).
fn l7_haproxy(env: &Env, files: &TetherFiles, procs: &mut Procs, backend: u16) -> Res<(u32, u16)> {
    let issued =
        rcgen::generate_simple_self_signed(vec!["localhost".into()]).map_err(|e| e.to_string())?;
    let pem = files.dir.join("l7.pem");
    let key = issued.signing_key.serialize_pem();
    fs::write(&pem, format!("{}{key}", issued.cert.pem())).map_err(|e| e.to_string())?;
    let lb = free_port()?;
    let cfg = format!(
        "global\n  maxconn 8192\ndefaults\n  mode http\n  timeout connect 5s\n  \
         timeout client 120s\n  timeout server 120s\n  timeout tunnel 1h\n\
         frontend https\n  bind {} ssl crt {}\n  default_backend proxy\n\
         backend proxy\n  server s1 {}\n",
        local(lb),
        pem.display(),
        local(backend)
    );
    let path = env.tmp.join("haproxy-l7.cfg");
    fs::write(&path, cfg).map_err(|e| e.to_string())?;
    let pid = procs.spawn(
        "haproxy-l7",
        Command::new("haproxy").arg("-db").arg("-f").arg(&path),
        &env.logs,
    )?;
    wait_port(lb, Duration::from_secs(10))?;
    Ok((pid, lb))
}

/// Starts an agent of the proxy on `port`, allowed to dial the echo server and `ports`.
pub(crate) fn spawn_agent(
    env: &Env,
    files: &TetherFiles,
    procs: &mut Procs,
    name: &str,
    port: u16,
    ports: &[u16],
) -> Res<u32> {
    spawn_agent_to(env, files, procs, name, &local(port).to_string(), ports)
}

/// Starts an agent dialling `address` (any carrier), allowed to dial the echo server and
/// `ports`.
pub(crate) fn spawn_agent_to(
    env: &Env,
    files: &TetherFiles,
    procs: &mut Procs,
    name: &str,
    address: &str,
    ports: &[u16],
) -> Res<u32> {
    let allowed: Vec<String> = ports
        .iter()
        .chain([&env.echo.port()])
        .map(u16::to_string)
        .collect();
    procs.spawn(
        name,
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
            .args(["--root-ca", "root-ca.pub", "--proxy", address])
            .args(["--allow", &format!("127.0.0.1/32:{}", allowed.join(","))]),
        &env.logs,
    )
}

// ---------------------------------------------------------------------------------------------
// Tether's memory per idle tunnel and per idle stream

pub(crate) struct IdleMemory {
    pub(crate) agents: usize,
    pub(crate) streams: usize,
    pub(crate) base_kib: u64,
    pub(crate) per_tunnel_kib: f64,
    pub(crate) per_stream_kib: f64,
    pub(crate) agent_side_per_tunnel_kib: f64,
}

/// One agent reaching all of 5 proxies behind haproxy (`balance random`), repeated.
pub(crate) struct Convergence {
    pub(crate) runs: usize,
    pub(crate) median_ms: f64,
    pub(crate) max_ms: f64,
    pub(crate) median_attempts: u64,
    pub(crate) max_attempts: u64,
}

/// `tether cert host` for proxy `id` of the root, from `root-ca` in `dir`, to `dir/<id>`.
fn host_cert(dir: &std::path::Path, id: &str) -> Res<String> {
    let args = ["cert", "host", "--ca", "root-ca", "--cluster", "root"];
    run(
        Command::new(tether_bin())
            .current_dir(dir)
            .args(args)
            .args(["--proxy-id", id, "--out", id]),
        Duration::from_secs(30),
    )
}

/// Starts 5 proxies (peers of each other) behind haproxy, then, `runs` times, a fresh agent
/// process: the time from its start until its `/status` shows 5/5 tunnels, and its dials
/// (`tether_agent_dials_total`) to get there.
pub(crate) fn convergence(env: &Env, files: &TetherFiles, runs: usize) -> Res<Convergence> {
    eprintln!("== tether: 1 agent → 5 proxies behind haproxy ({runs} runs)");
    let ids = ["proxy-1", "proxy-2", "proxy-3", "proxy-4", "proxy-5"];
    for id in &ids[1..] {
        if !files.dir.join(id).exists() {
            host_cert(&files.dir, id)?;
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

pub(crate) fn idle_memory(env: &Env, files: &TetherFiles) -> Res<IdleMemory> {
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
        connect_timeout: Duration::from_secs(30),
        ..AgentConfig::new(
            ClusterName::new("leaf").map_err(|e| e.to_string())?,
            ClusterName::new("root").map_err(|e| e.to_string())?,
            local(port).to_string(),
            identity,
            root_cas,
            allow,
        )
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
