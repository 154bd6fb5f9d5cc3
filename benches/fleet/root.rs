//! The root at fleet scale (issue #12): N leaves × 3 `tether proxy --kubernetes` replicas
//! against the real root apiserver.
//!
//! Three replicas run with the chart's arguments (`--ca`, `--kubernetes`, `--peers-service`,
//! `--peers-port-name tunnel`, the chart's default heartbeat) behind a real haproxy; their pods
//! are EndpointSlices the bench writes (TEST-NET-1 addresses; agents reach every replica
//! through haproxy and learn the IDs from discovery). Each leaf is declared as a
//! `RemoteCluster` with its own CA, and its agent, with an identity that CA signed, runs in
//! this process (one `tether::agent::Agent` per leaf, as the idle-memory benchmark does),
//! except one that runs as a `tether agent` process so that it can be frozen (SIGSTOP).
//!
//! Measured: time from the agents' start until every leaf shows Online with one tunnel on each
//! replica; API writes at rest over the quiet window, by resource (the API server's
//! `apiserver_request_total`), at N and at 100 leaves to show they do not grow with N; time
//! until the frozen leaf shows Offline; each replica's RSS before and with the fleet.
//!
//! One bench-only argument: `--max-connections-per-ip 4096`. Every tunnel reaches the proxies
//! from haproxy's one address here (3,000 of them at N = 1,000), where a real load balancer
//! would pass the leaves' own addresses; the default (1,024) would refuse the bench, not a
//! fleet.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use crate::procs::status_kib;
use crate::support::haproxy::Haproxy;
use crate::support::kube::ControlPlane;
use crate::support::kube::api_writes::{since, total, write_counts};
use crate::support::procs::{KubeProxy, Proc, agent_command};
use crate::support::tunnel_e2e::{create_proxy_slices, install_crds};
use crate::{Opts, Res, Row, cpu_time, poll, verdict};
use tether::agent::{Agent, AgentConfig};
use tether::egress::allow_list::AllowList;
use tether::identity::{CertificateAuthority, Identity};
use tether::operator::crd::remote_cluster::Connection;
use tether::operator::crd::{RemoteCluster, RemoteClusterSpec};
use tether::protocol::ClusterName;

/// The Service whose EndpointSlices name the replicas.
const SERVICE: &str = "tether-proxy-peers";
/// The replicas (pod names).
const IDS: [&str; 3] = ["proxy-a", "proxy-b", "proxy-c"];
/// The chart's heartbeat (the proxy's and the agents' default).
const HEARTBEAT: Duration = Duration::from_secs(15);
/// The smoke run's frozen agent beats faster, so Offline comes within seconds.
const SMOKE_HEARTBEAT: Duration = Duration::from_secs(1);
/// A replica looks at its sites this often without a change notice (`holdings::RECHECK`).
const RECHECK: Duration = Duration::from_secs(10);
/// The smaller fleet the full run compares against.
const SMALL_FLEET: usize = 100;

/// One fleet size's figures.
pub struct FleetRun {
    /// Leaves declared (one of them a `tether agent` process).
    pub leaves: usize,
    /// From the agents' start until every leaf shows Online on all three replicas.
    pub online_after: Duration,
    /// The quiet window actually measured.
    pub window: Duration,
    /// API writes in the window: `resource[/sub] VERB CODE` → count.
    pub writes: BTreeMap<String, f64>,
    /// Each replica's RSS (KiB) before any leaf, then with the fleet at rest.
    pub rss_kib: Vec<(u64, u64)>,
    /// Each replica's CPU time over the quiet window.
    pub cpu_at_rest: Vec<Duration>,
}

/// What [`measure`] found.
pub struct RootFigures {
    /// One run per fleet size, smallest first.
    pub runs: Vec<FleetRun>,
    /// From SIGSTOP of one leaf's agent until its RemoteCluster showed Offline.
    pub offline_after: Duration,
    /// The frozen agent's heartbeat, which bounds `offline_after` (3 missed + a recheck).
    pub heartbeat: Duration,
}

impl FleetRun {
    fn writes_per_second(&self) -> f64 {
        self.writes.values().sum::<f64>() / self.window.as_secs_f64()
    }

    /// Writes that are not the API server's own Lease renewals.
    fn root_writes(&self) -> f64 {
        self.writes.values().sum::<f64>() - total(&self.writes, "leases")
    }
}

impl RootFigures {
    /// The report's rows.
    pub fn rows(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        for run in &self.runs {
            let n = run.leaves;
            rows.push(Row::new(
                format!("{n} leaves × 3 proxies: all Online 3/3 after"),
                format!("{:.1} s", run.online_after.as_secs_f64()),
                "",
            ));
            let breakdown: Vec<String> = run
                .writes
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            rows.push(Row::new(
                format!(
                    "{n} leaves: API writes at rest over {:.0} s",
                    run.window.as_secs_f64()
                ),
                format!(
                    "{:.2}/s ({}); RemoteCluster {}; by resource: {}",
                    run.writes_per_second(),
                    run.writes.values().sum::<f64>(),
                    // (An empty float sum is -0.)
                    total(&run.writes, "remoteclusters") + 0.0,
                    if breakdown.is_empty() {
                        "none".to_owned()
                    } else {
                        breakdown.join(", ")
                    }
                ),
                verdict("≤ 1 write/s", run.writes_per_second() <= 1.0),
            ));
            let rss: Vec<String> = run
                .rss_kib
                .iter()
                .map(|(before, with)| format!("{:.1} → {:.1}", mib(*before), mib(*with)))
                .collect();
            rows.push(Row::new(
                format!("{n} leaves: each proxy's RSS, empty → with the fleet"),
                format!("{} MiB", rss.join(", ")),
                "",
            ));
            let cpu: Vec<String> = run
                .cpu_at_rest
                .iter()
                .map(|c| {
                    format!(
                        "{:.2} %",
                        100.0 * c.as_secs_f64() / run.window.as_secs_f64()
                    )
                })
                .collect();
            rows.push(Row::new(
                format!("{n} leaves: each proxy's CPU at rest"),
                cpu.join(", "),
                "",
            ));
        }
        if let [small, large] = &self.runs[..] {
            let same = (small.root_writes() - large.root_writes()).abs() < 0.5;
            rows.push(Row::new(
                format!(
                    "root writes at rest (besides Leases), {} vs {} leaves",
                    small.leaves, large.leaves
                ),
                format!("{} vs {}", small.root_writes(), large.root_writes()),
                verdict("independent of N", same),
            ));
        }
        let bound = self.heartbeat * 3 + RECHECK;
        rows.push(Row::new(
            format!(
                "frozen leaf (SIGSTOP, {:?} heartbeat) Offline after",
                self.heartbeat
            ),
            format!("{:.1} s", self.offline_after.as_secs_f64()),
            verdict(
                &format!("≤ 3 heartbeats + a recheck ({bound:?})"),
                self.offline_after <= bound + Duration::from_secs(2),
            ),
        ));
        rows
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Runs the root part: the smaller fleet first (full runs of more than 100 leaves), then N.
pub async fn measure(opts: &Opts) -> Res<RootFigures> {
    let cp = crate::support::kube::control_plane().await;
    let client = cp.kube_client();
    install_crds(&client).await;
    let mut sizes = vec![opts.leaves];
    if !opts.smoke && opts.leaves > SMALL_FLEET {
        sizes.insert(0, SMALL_FLEET);
    }
    let heartbeat = if opts.smoke {
        SMOKE_HEARTBEAT
    } else {
        HEARTBEAT
    };
    let mut runs = Vec::new();
    let mut offline_after = Duration::ZERO;
    for (i, n) in sizes.iter().enumerate() {
        let last = i + 1 == sizes.len();
        let (run, offline) = fleet(cp, &client, opts, *n, last.then_some(heartbeat)).await?;
        if opts.smoke {
            let rc_writes = total(&run.writes, "remoteclusters");
            if rc_writes > 0.0 {
                return Err(format!(
                    "{rc_writes} RemoteCluster writes in the quiet window: {:?}",
                    run.writes
                ));
            }
        }
        runs.push(run);
        offline_after = offline.unwrap_or(offline_after);
    }
    Ok(RootFigures {
        runs,
        offline_after,
        heartbeat,
    })
}

/// The chart's `tether proxy`, in `ns`, retried on fresh ports if it loses a port race.
fn spawn_proxy(cp: &ControlPlane, id: &str, ns: &str, dir: &Path) -> Res<(Proc, SocketAddr)> {
    KubeProxy {
        id,
        ns,
        service: SERVICE,
        ca: &dir.join("root-ca"),
        kubeconfig: cp.kubeconfig_path(),
        log: dir.join(format!("{id}.log")),
        // Every tunnel comes from 127.0.0.1 here.
        extra: &["--max-connections-per-ip", "4096"],
    }
    .spawn()
}

/// One leaf: its name, its CA, and the agent identity that CA signed.
struct Leaf {
    name: ClusterName,
    ca: CertificateAuthority,
    identity: Identity,
}

fn leaf(i: usize) -> Res<Leaf> {
    let name = ClusterName::new(format!("leaf-{i:04}")).map_err(|e| e.to_string())?;
    let ca = CertificateAuthority::generate(name.clone()).map_err(|e| e.to_string())?;
    let identity =
        Identity::generate_agent(&ca, Duration::from_secs(24 * 3600)).map_err(|e| e.to_string())?;
    Ok(Leaf { name, ca, identity })
}

/// Declares every leaf as a `RemoteCluster` with its CA (16 requests in flight).
async fn declare(remotes: &Api<RemoteCluster>, leaves: &[Leaf]) -> Res<()> {
    futures::stream::iter(leaves)
        .map(|l| async move {
            let key = l.ca.public_key().to_openssh().map_err(|e| e.to_string())?;
            let rc = RemoteCluster::new(
                l.name.as_str(),
                RemoteClusterSpec {
                    ca_keys: vec![key],
                    join_token: None,
                },
            );
            remotes
                .create(&PostParams::default(), &rc)
                .await
                .map(|_| ())
                .map_err(|e| format!("creating RemoteCluster {}: {e}", l.name))
        })
        .buffer_unordered(16)
        .try_collect()
        .await
}

/// How many leaves show Online with one tunnel on each of the three replicas.
async fn online(remotes: &Api<RemoteCluster>) -> Option<usize> {
    let list = remotes.list(&ListParams::default()).await.ok()?;
    Some(
        list.items
            .iter()
            .filter(|rc| {
                rc.status.as_ref().is_some_and(|s| {
                    s.connection == Some(Connection::Online)
                        && s.proxies.len() == IDS.len()
                        && s.proxies
                            .iter()
                            .all(|p| p.tunnels == 1 && p.connection == Connection::Online)
                })
            })
            .count(),
    )
}

/// `tether agent` for `leaf` through `lb`, as its own process (so it can be frozen).
fn spawn_agent(dir: &Path, leaf: &Leaf, lb: SocketAddr, heartbeat: Duration) -> Res<Proc> {
    let key = dir.join(format!("{}-agent", leaf.name));
    leaf.identity.save(&key).map_err(|e| e.to_string())?;
    let log = dir.join(format!("{}.log", leaf.name));
    let mut cmd = agent_command(
        leaf.name.as_str(),
        &lb.to_string(),
        &key,
        &dir.join("root-ca.pub"),
    );
    cmd.arg("--heartbeat-interval")
        .arg(humantime::format_duration(heartbeat).to_string())
        .env("RUST_LOG", "info");
    Proc::logged("tether agent", &mut cmd, log)
}

/// An in-process agent for `leaf`, as a leaf's `tether agent` would run with the defaults.
fn agent_config(leaf: Leaf, lb: SocketAddr, root_ca: &CertificateAuthority) -> Res<AgentConfig> {
    Ok(AgentConfig {
        heartbeat_interval: HEARTBEAT,
        connect_timeout: Duration::from_secs(30),
        ..AgentConfig::new(
            leaf.name,
            ClusterName::new("root").map_err(|e| e.to_string())?,
            lb.to_string(),
            Arc::new(leaf.identity),
            vec![root_ca.public_key().clone()],
            AllowList::default(),
        )
    })
}

/// One fleet of `n` leaves: up, at rest, and (with `freeze`, the frozen agent's heartbeat) one
/// leaf frozen.
async fn fleet(
    cp: &'static ControlPlane,
    client: &Client,
    opts: &Opts,
    n: usize,
    freeze: Option<Duration>,
) -> Res<(FleetRun, Option<Duration>)> {
    let ns = cp.new_namespace(&format!("fleet-root-{n}")).await;
    let dir: PathBuf = cp.dir().join(&ns);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    eprintln!(
        "== root: {n} leaves × 3 proxies in {ns} (logs in {})",
        dir.display()
    );
    let root = ClusterName::new("root").map_err(|e| e.to_string())?;
    let root_ca = CertificateAuthority::generate(root).map_err(|e| e.to_string())?;
    root_ca
        .save(&dir.join("root-ca"))
        .map_err(|e| e.to_string())?;
    let root_pub = root_ca
        .public_key()
        .to_openssh()
        .map_err(|e| e.to_string())?;
    std::fs::write(dir.join("root-ca.pub"), root_pub).map_err(|e| e.to_string())?;

    create_proxy_slices(client, &ns, SERVICE, &IDS).await;
    let mut proxies = Vec::new();
    let mut addrs = Vec::new();
    for id in IDS {
        let (proc, addr) = spawn_proxy(cp, id, &ns, &dir)?;
        proxies.push(proc);
        addrs.push(addr);
    }
    let lb = Haproxy::start("random", &addrs);
    let pids: Vec<u32> = proxies.iter().map(|p| p.pid()).collect();
    let rss = |pid: u32| status_kib(pid, "VmRSS:").ok_or_else(|| format!("proxy {pid} is gone"));
    let empty: Vec<u64> = pids.iter().map(|p| rss(*p)).collect::<Res<_>>()?;

    let leaves: Vec<Leaf> = (0..n).map(leaf).collect::<Res<_>>()?;
    let remotes: Api<RemoteCluster> = Api::namespaced(client.clone(), &ns);
    declare(&remotes, &leaves).await?;

    // Leaf 0 runs as a process when it is to be frozen; the others in this process.
    let stop = CancellationToken::new();
    let started = Instant::now();
    let mut leaves = leaves.into_iter();
    let frozen = match freeze {
        Some(heartbeat) => {
            let first = leaves.next().ok_or("no leaf")?;
            Some(spawn_agent(&dir, &first, lb.addr, heartbeat)?)
        }
        None => None,
    };
    for leaf in leaves {
        let agent = Arc::new(Agent::new(agent_config(leaf, lb.addr, &root_ca)?));
        let stop = stop.clone();
        tokio::spawn(async move { agent.run(stop).await });
    }
    let deadline = Duration::from_secs(60) + Duration::from_millis(600) * n as u32;
    let last_count = std::cell::Cell::new(0);
    let (last_count, api) = (&last_count, &remotes);
    let result = poll(
        "every leaf Online 3/3",
        deadline,
        Duration::from_secs(2),
        || async move {
            let count = online(api).await?;
            if count != last_count.get() {
                eprintln!("   {count}/{n} Online 3/3 after {:.0?}", started.elapsed());
                last_count.set(count);
            }
            (count == n).then_some(())
        },
    )
    .await;
    let online_after = started.elapsed();
    let run = match result {
        Ok(()) => at_rest(client, opts, &pids, n, online_after, empty).await,
        Err(e) => Err(e),
    };
    let offline = match (run.is_ok(), &frozen) {
        (true, Some(proc)) => Some(offline_after_freeze(&remotes, proc, freeze).await?),
        _ => None,
    };
    stop.cancel();
    drop(frozen);
    drop(proxies);
    drop(lb);
    run.map(|r| (r, offline))
}

/// The fleet at rest: one recheck for the last summaries to land, then the quiet window.
async fn at_rest(
    client: &Client,
    opts: &Opts,
    pids: &[u32],
    n: usize,
    online_after: Duration,
    empty: Vec<u64>,
) -> Res<FleetRun> {
    tokio::time::sleep(RECHECK).await;
    let before = write_counts(client).await;
    let cpu_before: Vec<Duration> = pids
        .iter()
        .map(|p| cpu_time(*p).unwrap_or_default())
        .collect();
    let started = Instant::now();
    tokio::time::sleep(opts.quiet).await;
    let after = write_counts(client).await;
    let window = started.elapsed();
    let cpu_at_rest = pids
        .iter()
        .zip(cpu_before)
        .map(|(p, b)| cpu_time(*p).unwrap_or_default().saturating_sub(b))
        .collect();
    let mut rss_kib = Vec::new();
    for (pid, before) in pids.iter().zip(empty) {
        let with = status_kib(*pid, "VmRSS:").ok_or_else(|| format!("proxy {pid} died at rest"))?;
        rss_kib.push((before, with));
    }
    let writes = since(&before, &after);
    eprintln!("   at rest over {window:.0?}: {writes:?}");
    Ok(FleetRun {
        leaves: n,
        online_after,
        window,
        writes,
        rss_kib,
        cpu_at_rest,
    })
}

/// Freezes the leaf whose agent is `proc` and times its RemoteCluster's turn to Offline.
async fn offline_after_freeze(
    remotes: &Api<RemoteCluster>,
    proc: &Proc,
    heartbeat: Option<Duration>,
) -> Res<Duration> {
    let name = "leaf-0000";
    proc.signal(libc::SIGSTOP)?;
    let frozen = Instant::now();
    let bound = heartbeat.unwrap_or(HEARTBEAT) * 3 + RECHECK + Duration::from_secs(30);
    let result = poll(
        &format!("{name} Offline"),
        bound,
        Duration::from_millis(250),
        || async move {
            let rc = remotes.get_opt(name).await.ok()??;
            let status = rc.status?;
            (status.connection == Some(Connection::Offline)).then_some(())
        },
    )
    .await;
    let took = frozen.elapsed();
    proc.signal(libc::SIGCONT)?;
    result.map(|()| {
        eprintln!("   {name} (frozen) Offline after {took:.1?}");
        took
    })
}
