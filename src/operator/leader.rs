//! Leader election, so that several operator replicas can run for availability while one of
//! them does what needs a single writer.
//!
//! # The HA story
//!
//! Every replica runs the `ReverseTunnel` controller and so an agent for every tunnel, whatever
//! the Lease says (see [`super::run_with_refresh`]): each proxy holds one tunnel per replica
//! from the leaf, and losing a replica loses only its own tunnels. The Lease holder also runs
//! what must have one writer: the `TrustedCluster` controller (joins, owned objects), the
//! `ReverseTunnel` finalizer, and the status summary folded from every replica's own entry
//! ([`super::replicas`]).
//!
//! Every replica competes for one `coordination.k8s.io/v1` Lease (via `kube-lease-manager`,
//! which takes it with server-side apply, so two replicas can never both believe they hold it,
//! and renews it with a strategic-merge PATCH). The holder renews the Lease every
//! `duration - grace` seconds; if it dies or is partitioned from the API server, another
//! replica takes the Lease once it expires (`duration` after the last renewal, plus 0.1-1 s of
//! kube-lease-manager's random back-off). On losing the Lease a replica stops its leader-only
//! tasks (renewals start `grace` seconds before expiry, and a failed renewal ends leadership
//! at once); its agents keep running. On a clean shutdown the holder releases the Lease, so
//! the next replica takes over immediately.
//!
//! ## When a replica dies (measured)
//!
//! `tests/operator_ha/failover.rs` runs two `tether operator` processes (`--lease-duration 6s
//! --lease-grace 2s`), three `tether proxy` processes behind haproxy, a real kube-apiserver and
//! `tether dial` back to back through haproxy, and kills a replica with SIGKILL:
//!
//! 1. The kernel closes the dead replica's sockets, so every proxy drops its tunnels at once
//!    (108-151 ms after the kill, at a 50 ms polling step). The survivor's tunnels stay, and
//!    dials go to them: in 18 runs no dial started after the kill failed (125-648 dials
//!    after killing the leader, 71-728 after killing the other replica); a dial in flight on
//!    the dead replica's tunnel can fail (5 in 36 kills).
//! 2. Leader-only work waits for the Lease to expire (4-7 s with a 6 s Lease; 5-16 s with the
//!    defaults): a join, a deletion's finalizer or a change of the summary in that window is
//!    late by that much. No dial waits on it. Before every replica carried tunnels, this wait
//!    was the leaf's dark time: 13.4-15.4 s with the defaults.
//! 3. The dead replica's status entries stop counting once its own Lease
//!    ([`super::liveness`]) expires, and the leader removes them and the Lease
//!    (`tests/operator_ha/status.rs`: 6.1-7.8 s after the kill with a 6 s Lease; at most the
//!    Lease, 2 s of clock skew and a 7.5 s poll with the defaults).
//!
//! A graceful stop (SIGTERM) makes each agent tell its proxies it is leaving and wait for its
//! streams in flight before closing: a rolling restart of both replicas under the dial load
//! failed no dial (3 runs, 223-247 dials each). In steady state the holder writes the Lease every `duration - grace`,
//! each replica renews its own Lease as often, and the leader stamps each tunnel's
//! `observedAt` once a refresh; no replica rewrites an unchanged entry.

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
