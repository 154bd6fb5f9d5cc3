//! Leader election, so that several operator replicas can run for availability while only one
//! holds the tunnels.
//!
//! # The HA story
//!
//! Every replica competes for one `coordination.k8s.io/v1` Lease (via `kube-lease-manager`,
//! which takes it with server-side apply, so two replicas can never both believe they hold it,
//! and renews it with a strategic-merge PATCH). The holder runs the controller and so the
//! agents; the others wait. The holder renews the Lease every `duration - grace` seconds; if it
//! dies or is partitioned from the API server, another replica takes the Lease once it expires
//! (`duration` after the last renewal) and starts agents of its own.
//!
//! On losing the Lease a replica stops its controller and every agent *before* it could be
//! taken over, as far as it can tell: renewals start `grace` seconds before expiry, and a
//! failed renewal ends leadership at once. Because agents are stateless clients that the
//! proxies accept from any replica (a tunnel is identified by the leaf's certificate, not by
//! the pod), a brief overlap during a partition only means two tunnels from the same leaf,
//! which the proxies already handle as a pool. On a clean shutdown the holder releases the
//! Lease, so the next replica takes over immediately.
//!
//! ## When the active replica dies (measured)
//!
//! `tests/operator_ha.rs` (`standby_takes_over_after_kill_9`) runs two `tether operator`
//! processes with `--lease-duration 6s --lease-grace 2s` (a renewal every 4 s), three `tether
//! proxy` processes behind haproxy and a real kube-apiserver, and kills the leader with
//! SIGKILL. What happens, with the figures of eight runs on a loaded two-core machine:
//!
//! 1. The kernel closes the dead replica's sockets, so every proxy drops the leaf's tunnels at
//!    once (all three gone 56-65 ms after the kill, at a 50 ms polling step). From then on the
//!    leaf is unreachable: dials fail until the standby's agent is connected. Nothing keeps
//!    tunnels across a failover; the gap is the whole cost.
//! 2. Nobody writes the ReverseTunnel during the gap, so `kubectl get rt` goes on showing the
//!    dead leader's last status (`Connected 3/3`) while no tunnel exists.
//! 3. The standby takes the Lease once it expires: `duration` minus the time since the last
//!    renewal, plus 0.1-1 s (kube-lease-manager waits a random moment after force-releasing an
//!    expired Lease). Measured: 4.0-6.8 s after the kill (4.0, 4.2, 4.5, 4.7 s when the Lease
//!    was renewed about 2.3 s before the kill; 6.1, 6.3, 6.5, 6.8 s when it was renewed
//!    0.03-0.4 s before).
//! 4. Its controller starts the agent at once: tunnels to all three proxies were back 50-120 ms
//!    after the Lease changed hands (4.1-6.9 s after the kill), and the status went `Pending`,
//!    `Degraded 1/3`, `Connected 3/3` within the same ~100 ms. (Before proxies sent discovery
//!    with the welcome, a brief `Connected 1/1` could appear; now a tunnel up before its proxy
//!    announced the set shows as `Connecting`, reason `AwaitingDiscovery`.)
//!
//! So the gap is `duration - (time since the last renewal) + up to 1 s + a reconnect`: at most
//! about `duration + 1 s`. With the defaults (`--lease-duration 15s --lease-grace 5s`, a renewal
//! every 10 s) that means 5-16 s without a tunnel; three runs of the same test at the defaults
//! (the test's Lease constants edited for the run) measured 13.4, 13.6 and 15.4 s from the kill
//! to three tunnels back, the Lease having been renewed 2.4, 2.3 and 0.07 s before the kill.
//! Shorter Leases shorten the gap at the price of more Lease writes: in steady state
//! the holder writes the Lease every `duration - grace` and nothing else (measured by
//! `steady_state_is_quiet`: 6 Lease PATCHes in 60 s with the defaults, no status or Event
//! writes).

use std::future::Future;
use std::time::Duration;

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Which Lease to compete for, and how.
#[derive(Debug, Clone)]
pub struct LeaderElection {
    /// Name of the Lease object.
    pub lease_name: String,
    /// Namespace of the Lease object.
    pub lease_namespace: String,
    /// This replica's identity in the Lease (usually the pod name).
    pub identity: String,
    /// How long a Lease lasts after its last renewal (seconds).
    pub duration_secs: u64,
    /// How long before expiry the holder renews (seconds).
    pub grace_secs: u64,
}

/// Runs `lead` whenever this replica holds the Lease, with a token that is cancelled when the
/// Lease is lost; returns when `shutdown` is cancelled (releasing the Lease).
pub async fn run_when_leader<F, Fut>(
    client: Client,
    election: LeaderElection,
    shutdown: CancellationToken,
    mut lead: F,
) -> anyhow::Result<()>
where
    F: FnMut(CancellationToken) -> Fut,
    Fut: Future<Output = ()>,
{
    let manager = LeaseManagerBuilder::new(client, &election.lease_name)
        .with_namespace(&election.lease_namespace)
        .with_identity(&election.identity)
        .with_duration(election.duration_secs)
        .with_grace(election.grace_secs)
        .with_field_manager(super::FIELD_MANAGER)
        .build()
        .await?;
    let (mut leading, task) = manager.watch().await;
    loop {
        // Wait to become the leader.
        while !*leading.borrow_and_update() {
            tokio::select! {
                () = shutdown.cancelled() => return release(leading, task).await,
                changed = leading.changed() => if changed.is_err() {
                    anyhow::bail!("the leader-election task ended");
                },
            }
        }
        info!(identity = %election.identity, lease = %election.lease_name, "became the leader");
        let term = shutdown.child_token();
        // Cancel the term when the Lease is lost; `lead` then stops its agents and returns.
        let watcher = tokio::spawn({
            let term = term.clone();
            let mut leading = leading.clone();
            let identity = election.identity.clone();
            async move {
                loop {
                    if leading.changed().await.is_err() || !*leading.borrow_and_update() {
                        break;
                    }
                }
                if !term.is_cancelled() {
                    warn!(%identity, "lost the leader lease; stopping");
                }
                term.cancel();
            }
        });
        lead(term.clone()).await;
        watcher.abort();
        term.cancel();
        if shutdown.is_cancelled() {
            return release(leading, task).await;
        }
        // Lost leadership or the controller ended on its own: wait for the next term.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn release(
    leading: tokio::sync::watch::Receiver<bool>,
    task: tokio::task::JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>,
) -> anyhow::Result<()> {
    // Dropping the last receiver makes the manager release the Lease and end.
    drop(leading);
    match tokio::time::timeout(Duration::from_secs(5), task).await {
        Ok(Ok(Ok(_))) => Ok(()),
        Ok(Ok(Err(e))) => {
            warn!(error = %e, "releasing the leader lease");
            Ok(())
        }
        Ok(Err(e)) => Err(e.into()),
        Err(_) => {
            warn!("releasing the leader lease timed out");
            Ok(())
        }
    }
}
