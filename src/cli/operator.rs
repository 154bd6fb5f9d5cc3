//! `tether operator`: its flags, and the process around [`tether::operator::run_with_refresh`]
//! (kubeconfig, signals, the admin endpoint). The operator itself is the library's.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tether::admin::metrics::{MetricsRegistry, OperatorMetrics};
use tether::operator::{
    FIELD_MANAGER, LeaderElection, OperatorConfig, api_client, run_with_refresh,
};
use tokio_util::sync::CancellationToken;

use super::shutdown_signal;

/// `tether operator`'s flags.
#[derive(Debug, clap::Args)]
pub struct OperatorArgs {
    /// Kubeconfig to use; default: in-cluster, else $KUBECONFIG or ~/.kube/config.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "TETHER_NAMESPACE")]
    pub namespace: Option<String>,
    /// Compete for leadership through this Lease (in --lease-namespace); unset: always lead.
    #[arg(long, env = "TETHER_LEASE_NAME")]
    pub lease_name: Option<String>,
    /// Namespace of the leader Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// This replica's identity (Lease holder, Event reporter); default: the host name.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Serve /healthz, /readyz (the controller or leader-election loop is running) and
    /// /metrics here (the chart passes the pod IP, bare IPv6 included).
    #[arg(long, value_parser = tether::admin::parse_listen)]
    pub admin_listen: Option<std::net::SocketAddr>,
    /// How long the Lease lasts after its last renewal: the longest joins, finalizers and the
    /// status summary wait for a new leader when the leader dies (whole seconds; tunnels do
    /// not wait: every replica carries them).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// How long before the Lease expires its holder renews it (whole seconds, less than
    /// --lease-duration): the holder writes the Lease every duration - grace.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub lease_grace: Duration,
    /// How often the leader stamps each unchanged ReverseTunnel's `observedAt` (SEEN), each on
    /// its own second of the period: the cost at rest is one write per tunnel per refresh,
    /// whatever the number of replicas, and SEEN older than the refresh (and a twentieth, and
    /// 2 s) means no replica runs. A replica's own liveness is its Lease
    /// (`<lease-name>.<identity>`, renewed like the leader Lease).
    #[arg(long, env = "TETHER_STATUS_REFRESH", default_value = "60s", value_parser = humantime::parse_duration)]
    pub status_refresh: Duration,
    /// How its agents and joins leave the leaf (a forward proxy, or direct).
    #[command(flatten)]
    pub egress: super::egress::EgressArgs,
}

/// `tether operator`: builds a client from the flags and runs until Ctrl-C or SIGTERM.
pub async fn run(args: OperatorArgs) -> anyhow::Result<()> {
    // Checked first: a wrong proxy URL or credentials file stops the start-up, not every agent.
    let route = args.egress.route()?;
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    // The agents answer the root's Kubernetes requests with the operator's own credentials.
    let kube_upstream = match tether::operator::kube_upstream::from_config(&config) {
        Ok(upstream) => Some(upstream),
        Err(e) => {
            tracing::warn!(error = %e, "the root's Kubernetes requests will be refused: tunnels with kubeAccess fail");
            None
        }
    };
    let client = api_client::named_client(config, FIELD_MANAGER)?;
    let identity = args
        .identity
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("tether-operator-{}", std::process::id()));
    let leader_election = args.lease_name.map(|lease_name| LeaderElection {
        lease_name,
        lease_namespace: args.lease_namespace.clone(),
        identity: identity.clone(),
        duration_secs: args.lease_duration.as_secs(),
        grace_secs: args.lease_grace.as_secs(),
    });
    if let Some(e) = &leader_election {
        anyhow::ensure!(
            e.grace_secs >= 1 && e.grace_secs < e.duration_secs,
            "--lease-grace must be at least 1s and less than --lease-duration (whole seconds)"
        );
    }
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            shutdown_signal().await;
            shutdown.cancel();
        }
    });
    /// Ready while the operator's loop (controller or leader election) runs; exports the
    /// operator's metrics (its controllers' and its agents').
    struct Running {
        running: std::sync::atomic::AtomicBool,
        exported: MetricsRegistry,
    }
    impl tether::admin::Component for Running {
        fn ready(&self) -> bool {
            self.running.load(std::sync::atomic::Ordering::Relaxed)
        }
        fn status(&self) -> serde_json::Value {
            serde_json::json!({ "running": self.ready() })
        }
        fn metrics(&self) -> String {
            self.exported.encode()
        }
    }
    let metrics = OperatorMetrics::default();
    let running = Arc::new(Running {
        running: true.into(),
        exported: MetricsRegistry::default().operator(&metrics),
    });
    if let Some(addr) = args.admin_listen {
        let listener = super::bind("--admin-listen", addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "admin endpoint");
        let stopped = shutdown.clone();
        tokio::spawn(tether::admin::serve(
            listener,
            running.clone(),
            async move { stopped.cancelled().await },
        ));
    }
    anyhow::ensure!(
        args.status_refresh >= Duration::from_secs(1),
        "--status-refresh must be at least 1s"
    );
    let result = run_with_refresh(
        client,
        OperatorConfig {
            namespace: args.namespace,
            leader_election,
            instance: Some(identity),
            metrics,
            kube_upstream,
            route,
        },
        args.status_refresh,
        shutdown,
    )
    .await;
    running
        .running
        .store(false, std::sync::atomic::Ordering::Relaxed);
    result
}
