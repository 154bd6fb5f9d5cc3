//! The leaf at fleet scale (issue #12): one `tether operator` process on a real leaf
//! apiserver reconciling N ReverseTunnels, all pointing at one root `tether proxy` process.
//!
//! The tunnels share the example's Secrets (one agent identity for leaf `leaf-1`, one root CA)
//! and differ by name, so each is its own agent, its own tunnel and its own status writer in
//! the operator. The ReverseTunnels exist before the operator starts: start-up is the time from
//! its spawn until all N read Connected from the API server, as after an upgrade or a
//! reschedule.
//!
//! Measured: start-up to all Connected; the operator's RSS and CPU at rest; API writes at rest
//! by resource over the quiet window, after one refresh period has let the first stamps move
//! onto their slots (`status.rs`, `refresh_slot`); and how the `observedAt` stamps spread over the
//! minute (the busiest second), which without the slots is N in one second.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};

use crate::procs::status_kib;
use crate::support::kube::ControlPlane;
use crate::support::kube::api_writes::{since, total, write_counts};
use crate::support::procs::{Files, Proc, free_addr, operator_command, proxy_command};
use crate::support::tunnel_e2e::{agent_secret_named, create_secrets, example, install_crds};
use crate::{Opts, Res, Row, cpu_time, poll, verdict};
use k8s_openapi::api::core::v1::Secret;
use tether::demo::Pki;
use tether::identity::CertificateAuthority;
use tether::operator::crd::ReverseTunnel;
use tether::operator::crd::reverse_tunnel::Phase;
use tether::operator::stamps::SEEN_REFRESH;
use tether::protocol::ClusterName;

/// The operator's Lease, as the chart names it.
const LEASE: &str = "tether-operator";

/// What [`measure`] found.
pub struct LeafFigures {
    /// ReverseTunnels reconciled.
    pub tunnels: usize,
    /// From the operator's spawn until every ReverseTunnel read Connected.
    pub connected_after: Duration,
    /// The operator's RSS at rest (KiB).
    pub rss_kib: u64,
    /// The quiet window actually measured.
    pub window: Duration,
    /// API writes in the window: `resource[/sub] VERB CODE` → count.
    pub writes: BTreeMap<String, f64>,
    /// The operator's CPU time over the window.
    pub cpu: Duration,
    /// Most `observedAt` stamps falling on one second of the minute, at the window's end.
    pub busiest_second: usize,
    /// Whether a refresh period passed before the window (not in `--smoke`): before it, the
    /// first stamps after Connected are still moving onto their slots, so rates are not judged.
    pub settled: bool,
}

impl LeafFigures {
    /// ReverseTunnel status writes per tunnel per minute in the window.
    fn stamps_per_tunnel_minute(&self) -> f64 {
        total(&self.writes, "reversetunnels")
            / self.tunnels as f64
            / (self.window.as_secs_f64() / 60.0)
    }

    /// Writes that are neither Lease renewals nor ReverseTunnel status stamps.
    fn other_writes(&self) -> f64 {
        self.writes.values().sum::<f64>()
            - total(&self.writes, "leases")
            - total(&self.writes, "reversetunnels")
    }

    /// `verdict`, or why there is none: the window did not follow a refresh period.
    fn judged(&self, verdict: String) -> String {
        if self.settled {
            verdict
        } else {
            "not judged (no settling minute in --smoke)".to_owned()
        }
    }

    /// The report's rows.
    pub fn rows(&self) -> Vec<Row> {
        let n = self.tunnels;
        let breakdown: Vec<String> = self
            .writes
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        let rate = self.stamps_per_tunnel_minute();
        vec![
            Row::new(
                format!("operator start-up to {n} ReverseTunnels Connected"),
                format!("{:.1} s", self.connected_after.as_secs_f64()),
                "",
            ),
            Row::new(
                format!("operator RSS at rest, {n} tunnels"),
                format!("{:.1} MiB", self.rss_kib as f64 / 1024.0),
                "",
            ),
            Row::new(
                format!("operator CPU at rest, {n} tunnels"),
                format!(
                    "{:.2} % of a core",
                    100.0 * self.cpu.as_secs_f64() / self.window.as_secs_f64()
                ),
                "",
            ),
            Row::new(
                format!("API writes at rest over {:.0} s", self.window.as_secs_f64()),
                format!(
                    "{:.2}/s; {rate:.2} stamps per tunnel per minute; by resource: {}",
                    self.writes.values().sum::<f64>() / self.window.as_secs_f64(),
                    breakdown.join(", ")
                ),
                self.judged(verdict(
                    "Leases + ≤ 1 per ReverseTunnel per minute",
                    self.other_writes() == 0.0 && rate <= 1.05,
                )),
            ),
            Row::new(
                "observedAt stamps in the busiest second of the minute",
                format!("{} of {n}", self.busiest_second),
                self.judged(verdict(
                    &format!("spread (lock-step: {n})"),
                    n < 60 || self.busiest_second * 10 <= n,
                )),
            ),
        ]
    }
}

/// `tether proxy` for the root, trusting leaf `leaf-1`, retried on fresh ports.
fn spawn_root_proxy(files: &Files) -> Res<(Proc, SocketAddr)> {
    for _ in 0..5 {
        let (listen, admin) = (free_addr(), free_addr());
        let mut cmd = proxy_command(files, "root-proxy", listen, admin, &[]);
        // Every tunnel comes from 127.0.0.1 here.
        cmd.args(["--max-connections-per-ip", "4096"]);
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let mut proc = Proc::start("tether proxy", &mut cmd)?;
        // If it lost a port race it exits: then try others.
        if proc.accepts(&[listen], Duration::from_secs(20)) {
            return Ok((proc, listen));
        }
    }
    Err("tether proxy did not start".into())
}

/// `tether operator` as the chart runs it (one replica, electing itself through its Lease).
fn spawn_operator(cp: &ControlPlane, ns: &str, log: &std::path::Path) -> Res<Proc> {
    let mut cmd = operator_command(cp.kubeconfig_path(), ns, "fleet-operator");
    cmd.args(["--lease-name", LEASE, "--lease-namespace", ns])
        .env("RUST_LOG", "info");
    Proc::logged("tether operator", &mut cmd, log.to_owned())
}

/// The leaf cluster of tunnel `i`.
fn leaf_name(i: usize) -> String {
    format!("leaf-{i:04}")
}

/// Creates `n` ReverseTunnels `rt-0000`… from the example, each for leaf `leaf-0000`… with
/// its own identity Secret, pointed at `proxy` (16 in flight).
async fn create_tunnels(api: &Api<ReverseTunnel>, proxy: SocketAddr, n: usize) -> Res<()> {
    let template = example(&proxy.to_string(), &["127.0.0.1/32:9".to_owned()]);
    futures::stream::iter(0..n)
        .map(|i| {
            let mut value = template.clone();
            value["metadata"]["name"] = format!("rt-{i:04}").into();
            value["spec"]["leafCluster"] = leaf_name(i).into();
            value["spec"]["identitySecretRef"]["name"] = format!("{}-agent", leaf_name(i)).into();
            async move {
                let rt: ReverseTunnel =
                    serde_json::from_value(value).map_err(|e| format!("the example: {e}"))?;
                api.create(&PostParams::default(), &rt)
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("creating ReverseTunnel rt-{i:04}: {e}"))
            }
        })
        .buffer_unordered(16)
        .try_collect()
        .await
}

/// How many ReverseTunnels read Connected, and the busiest second of the minute among their
/// `observedAt` stamps.
async fn connected(api: &Api<ReverseTunnel>) -> Option<(usize, usize)> {
    let list = api.list(&ListParams::default()).await.ok()?;
    let mut per_second: BTreeMap<u64, usize> = BTreeMap::new();
    let mut count = 0;
    for rt in &list.items {
        let Some(status) = &rt.status else { continue };
        count += usize::from(status.phase == Some(Phase::Connected));
        if let Some(stamp) = status
            .observed_at
            .as_deref()
            .and_then(|s| humantime::parse_rfc3339(s).ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        {
            *per_second.entry(stamp.as_secs() % 60).or_default() += 1;
        }
    }
    Some((count, per_second.values().copied().max().unwrap_or(0)))
}

/// Runs the leaf part.
pub async fn measure(opts: &Opts) -> Res<LeafFigures> {
    let n = opts.reverse_tunnels;
    let cp = crate::support::kube::control_plane().await;
    let client: Client = cp.kube_client();
    install_crds(&client).await;
    let ns = cp.new_namespace("fleet-leaf").await;
    let dir = cp.dir().join(&ns);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    eprintln!(
        "== leaf: one operator, {n} ReverseTunnels in {ns} (logs in {})",
        dir.display()
    );
    let name = |s: &str| ClusterName::new(s).map_err(|e| e.to_string());
    let pki = Pki::generate(name("root")?, name("leaf-1")?).map_err(|e| e.to_string())?;
    let files = Files::write(&pki, &["root-proxy"]);
    // Each tunnel is a leaf of its own (two tunnels of one leaf are refused as duplicates):
    // its CA in the proxy's trust directory, its agent's identity in a Secret.
    let leaves = (0..n)
        .map(|i| CertificateAuthority::generate(name(&leaf_name(i))?).map_err(|e| e.to_string()))
        .collect::<Res<Vec<_>>>()?;
    for ca in &leaves {
        let key = ca.public_key().to_openssh().map_err(|e| e.to_string())?;
        std::fs::write(
            files.path("trust").join(format!("{}.pub", ca.cluster())),
            key,
        )
        .map_err(|e| e.to_string())?;
    }
    let (proxy, proxy_addr) = spawn_root_proxy(&files)?;
    create_secrets(&client, &ns, &pki).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    futures::stream::iter(&leaves)
        .map(|ca| {
            let secret = agent_secret_named(&format!("{}-agent", ca.cluster()), ca);
            let secrets = secrets.clone();
            async move {
                secrets
                    .create(&PostParams::default(), &secret)
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("creating an identity Secret: {e}"))
            }
        })
        .buffer_unordered(16)
        .try_collect::<()>()
        .await?;
    let rts: Api<ReverseTunnel> = Api::namespaced(client.clone(), &ns);
    create_tunnels(&rts, proxy_addr, n).await?;

    let operator = spawn_operator(cp, &ns, &dir.join("operator.log"))?;
    let pid = operator.pid();
    let started = Instant::now();
    let deadline = Duration::from_secs(60) + Duration::from_millis(300) * n as u32;
    let last_count = std::cell::Cell::new(0);
    let (last_count, api) = (&last_count, &rts);
    poll(
        "every ReverseTunnel Connected",
        deadline,
        Duration::from_secs(2),
        || async move {
            let (count, _) = connected(api).await?;
            if count != last_count.get() {
                eprintln!("   {count}/{n} Connected after {:.0?}", started.elapsed());
                last_count.set(count);
            }
            (count == n).then_some(())
        },
    )
    .await
    .map_err(|e| format!("{e}; operator log {}", dir.join("operator.log").display()))?;
    let connected_after = started.elapsed();

    // At rest: the first stamps after Connected move onto their slots within a refresh.
    if !opts.smoke {
        tokio::time::sleep(SEEN_REFRESH + Duration::from_secs(2)).await;
    }
    let before = write_counts(&client).await;
    let cpu_before = cpu_time(pid).ok_or("the operator died")?;
    let window_start = Instant::now();
    tokio::time::sleep(opts.quiet).await;
    let after = write_counts(&client).await;
    let window = window_start.elapsed();
    let cpu = cpu_time(pid)
        .ok_or("the operator died at rest")?
        .saturating_sub(cpu_before);
    let rss_kib = status_kib(pid, "VmRSS:").ok_or("the operator died at rest")?;
    let (still, busiest_second) = connected(&rts).await.ok_or("listing ReverseTunnels")?;
    if still != n {
        return Err(format!(
            "{still} of {n} ReverseTunnels Connected at the window's end"
        ));
    }
    let writes = since(&before, &after);
    eprintln!("   at rest over {window:.0?}: {writes:?}");
    drop(operator);
    drop(proxy);
    Ok(LeafFigures {
        tunnels: n,
        connected_after,
        rss_kib,
        window,
        writes,
        cpu,
        busiest_second,
        settled: !opts.smoke,
    })
}
