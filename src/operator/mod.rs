//! The Kubernetes operator: `ReverseTunnel` objects reconciled into running agents.
//!
//! This is the only module that talks to Kubernetes; the data plane (`agent`, `proxy`) knows
//! nothing of it. Layout:
//!
//! - [`crd`]: the `tether.dev/v1alpha1` resources and their CRDs (`tether crd`);
//! - [`controller`]: the reconcilers;
//! - [`context`]: state shared by reconciles, including the registry of running tunnels;
//! - [`resolve`]: spec and Secrets to an agent configuration;
//! - [`status`]: status composition and each replica's one writer per tunnel;
//! - [`replicas`]: the replicas' entries and the leader's summary of them;
//! - [`summarizer`]: the leader's loop writing that summary and the `observedAt` stamp;
//! - [`liveness`]: each replica's own Lease, which vouches for its entries;
//! - [`leader`]: Lease-based leader election (and the HA story);
//! - [`events`]: Events whose message stays current;
//! - [`error`]: the reconcile error type.

pub mod api_client;
pub mod context;
pub mod controller;
pub mod crd;
pub mod egress_proxy;
pub mod endpoints;
pub mod error;
pub mod events;
pub mod kube_upstream;
pub mod leader;
pub mod liveness;
pub mod replicas;
pub mod resolve;
pub mod root;
pub mod root_keys;
pub mod secret_read;
pub mod server_version;
pub mod stamps;
pub mod status;
pub mod summarizer;

use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use tokio_util::sync::CancellationToken;

pub use leader::LeaderElection;

/// The field manager of every write the operator makes (status, finalizers, Lease), so
/// `kubectl get -o yaml --show-managed-fields` shows who owns what.
pub const FIELD_MANAGER: &str = "tether-operator";

/// How the operator runs: what it watches and whether it competes for leadership.
#[derive(Debug, Clone, Default)]
pub struct OperatorConfig {
    /// Watch only this namespace; `None` watches all (needs cluster-wide RBAC).
    pub namespace: Option<String>,
    /// Compete for a Lease for what needs one writer (joins, finalizers, the status
    /// summary); `None` always leads (one replica, or tests). Agents run either way.
    pub leader_election: Option<LeaderElection>,
    /// This replica's name in Events and in the status entries it writes (usually the pod
    /// name); default: the Lease identity, else the host name.
    pub instance: Option<String>,
    /// Where the controllers and the agents count; the caller exports it.
    pub metrics: crate::admin::metrics::OperatorMetrics,
    /// How agents reach this cluster's API server for the root's Kubernetes requests (the
    /// operator's own credentials, [`kube_upstream::from_config`]); `None` refuses tunnels
    /// whose `kubeAccess` asks for it.
    pub kube_upstream: Option<std::sync::Arc<crate::agent::kube::KubeUpstream>>,
    /// How every agent and join this operator runs reaches its root: directly, or through
    /// the leaf's forward proxy (the operator's own `HTTPS_PROXY`/`NO_PROXY` or flags).
    pub route: crate::transport::Route,
}

impl OperatorConfig {
    /// Where this replica's own Lease lives and how long it lasts: next to the leader Lease
    /// and as long, or (no election) in the watched namespace, else `default`, with the CLI's
    /// default times.
    fn replica_lease(&self) -> liveness::LeaseSpec {
        match &self.leader_election {
            Some(e) => liveness::LeaseSpec {
                namespace: e.lease_namespace.clone(),
                base: e.lease_name.clone(),
                duration: Duration::from_secs(e.duration_secs),
                grace: Duration::from_secs(e.grace_secs),
            },
            None => liveness::LeaseSpec {
                namespace: self
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".to_owned()),
                base: FIELD_MANAGER.to_owned(),
                duration: Duration::from_secs(15),
                grace: Duration::from_secs(5),
            },
        }
    }

    /// The name this replica writes its status entries under.
    fn replica(&self) -> String {
        self.instance
            .clone()
            .or_else(|| self.leader_election.as_ref().map(|e| e.identity.clone()))
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| format!("tether-operator-{}", std::process::id()))
    }
}

/// Runs the operator with `client` until `shutdown` is cancelled, then stops every agent.
/// The in-process entry point of `tether operator`, used directly by tests; the leader stamps
/// each tunnel's `observedAt` every [`stamps::SEEN_REFRESH`].
pub async fn run(
    client: Client,
    config: OperatorConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_with_refresh(client, config, stamps::SEEN_REFRESH, shutdown).await
}

/// [`run`], with the leader stamping each unchanged tunnel's `observedAt` every `refresh`
/// (so `SEEN` older than [`stamps::stale_after`] of it means no replica runs).
///
/// Every replica runs the `ReverseTunnel` controller, and so an agent for every tunnel, from
/// the start and whatever the Lease says: losing a replica loses only its own tunnels, while
/// the others' keep carrying the leaf. Every replica also renews its own Lease
/// ([`liveness`]), which vouches for its status entries; on a clean stop it removes its
/// entries, then that Lease. The leader Lease's holder also runs what needs one writer: the
/// `TrustedCluster` controller (joins and owned objects), the `ReverseTunnel` finalizer, and
/// the status summary with its stamp.
pub async fn run_with_refresh(
    client: Client,
    config: OperatorConfig,
    refresh: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let namespace = config.namespace.clone();
    let replica = config.replica();
    let lease_spec = config.replica_lease();
    let own_lease = liveness::ReplicaLease {
        api: lease_spec.api(client.clone()),
        name: liveness::lease_name(&lease_spec.base, &replica),
        replica: replica.clone(),
        spec: lease_spec.clone(),
    };
    let leases = liveness::LeaseReader {
        api: lease_spec.api(client.clone()),
        base: lease_spec.base.clone(),
        own: replica.clone(),
    };
    let (epoch_tx, epoch_rx) = tokio::sync::watch::channel(0u64);
    let (version_tx, version_rx) = tokio::sync::watch::channel(None);
    let ctx = Arc::new(context::Context::new(
        client.clone(),
        replica.clone(),
        epoch_rx,
        config.metrics.clone(),
        config.kube_upstream.clone(),
        version_rx,
        config.route.clone(),
    ));
    let lease_stop = CancellationToken::new();
    // The entries go first (the controller withdraws them as it stops), then the Lease.
    let carry = async {
        tokio::join!(
            controller::reverse_tunnel::run(
                client.clone(),
                namespace.as_deref(),
                ctx.clone(),
                shutdown.clone(),
            ),
            server_version::follow(client.clone(), version_tx, shutdown.clone()),
        );
        lease_stop.cancel();
    };
    let renew = own_lease.run(epoch_tx, lease_stop.clone());
    let lead = |term: CancellationToken| {
        let client = client.clone();
        let namespace = namespace.clone();
        let ctx = ctx.clone();
        let leases = leases.clone();
        let summarizer = summarizer::Summarizer {
            client: client.clone(),
            recorder: ctx.recorder.clone(),
            leases: leases.clone(),
            poll: summarizer::poll_for(lease_spec.duration),
            refresh,
        };
        async move {
            let (recorder, metrics) = (ctx.recorder.clone(), ctx.metrics.clone());
            tokio::join!(
                controller::trusted_cluster::run(
                    client.clone(),
                    namespace.as_deref(),
                    ctx,
                    term.clone()
                ),
                controller::tunnel_finalizer::run(
                    client.clone(),
                    namespace.as_deref(),
                    recorder,
                    leases,
                    metrics,
                    term.clone()
                ),
                summarizer.run(namespace.as_deref(), term),
            );
        }
    };
    let led = async {
        match config.leader_election {
            None => {
                lead(shutdown.clone()).await;
                Ok(())
            }
            Some(election) => {
                leader::run_when_leader(client.clone(), election, shutdown.clone(), lead).await
            }
        }
    };
    let ((), (), result) = tokio::join!(carry, renew, led);
    own_lease.release().await;
    result
}

/// `tether crd`: every CRD as one multi-document YAML stream, exactly the concatenation of
/// `crds/*.yaml` in file-name order.
pub fn crds_yaml() -> anyhow::Result<String> {
    Ok(crd::yaml_documents()?.concat())
}
