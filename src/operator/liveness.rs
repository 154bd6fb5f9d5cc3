//! Each replica's own Lease: what vouches for its entries in every `ReverseTunnel`'s
//! `status.replicas`, at a cost that does not grow with the number of tunnels.
//!
//! Before, a replica proved it lived by stamping each of its entries every `--status-refresh`:
//! one write per tunnel per replica per minute (2,000 writes a minute for 1,000 tunnels and two
//! replicas). Now each replica renews one Lease, `<lease-name>.<replica>` in the leader Lease's
//! namespace ([`lease_name`]), every `duration - grace` (10 s with the defaults: 6 writes a
//! minute per replica, whatever the number of tunnels), and writes its entries only when they
//! change. The leader reads the Leases of the replicas named in the entries by name (a GET per
//! replica per poll, no writes) and prunes the entries of a replica whose Lease expired, is
//! gone, or names another holder ([`Liveness::Dead`]), and deletes an expired one (pods come
//! and go under new names). A replica stopping cleanly removes its entries, then deletes its
//! Lease.
//!
//! A replica whose renewal came late (the API server unreachable for longer than the Lease),
//! or whose Lease the leader deleted meanwhile (a partition, clocks more than [`CLOCK_SKEW`]
//! apart), may have had its entries pruned: the renewal loop then bumps an epoch
//! ([`ReplicaLease::run`]) and every status writer of the replica writes its entry again.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::FIELD_MANAGER;

/// How far past a Lease's expiry (by the reader's clock) it still counts: the replicas' clocks
/// may disagree by this much without a live replica's entries being pruned.
pub const CLOCK_SKEW: Duration = Duration::from_secs(2);

/// The Lease of replica `replica` next to the leader Lease `base`: `tether-operator.pod-abc`.
/// Both are DNS subdomains, so the name is one too when it fits in 253 characters; characters
/// a pod name would not hold are mapped to `-`.
pub fn lease_name(base: &str, replica: &str) -> String {
    let clean: String = replica
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '-' | '.') => c,
            _ => '-',
        })
        .collect();
    let mut name = format!("{base}.{}", clean.trim_matches(['-', '.']));
    name.truncate(253);
    name.trim_end_matches(['-', '.']).to_owned()
}

/// Where the replicas' Leases live and how long they last.
#[derive(Debug, Clone)]
pub struct LeaseSpec {
    /// Namespace of every replica's Lease (the leader Lease's).
    pub namespace: String,
    /// The leader Lease's name, the prefix of every replica's Lease.
    pub base: String,
    /// How long a Lease lasts after its last renewal.
    pub duration: Duration,
    /// How long before expiry the holder renews it.
    pub grace: Duration,
}

impl LeaseSpec {
    /// The Lease API of the namespace.
    pub fn api(&self, client: Client) -> Api<Lease> {
        Api::namespaced(client, &self.namespace)
    }
}

/// Renews this replica's Lease until stopped, then deletes it.
pub struct ReplicaLease {
    /// The namespace's Lease API.
    pub api: Api<Lease>,
    /// The Lease's name ([`lease_name`]).
    pub name: String,
    /// This replica's identity: the Lease's holder and the name of its entries.
    pub replica: String,
    /// How long the Lease lasts and when it is renewed.
    pub spec: LeaseSpec,
}

impl ReplicaLease {
    /// Renews the Lease every `duration - grace` until `stop`, bumping `epoch` whenever a
    /// renewal succeeds after the Lease may have expired (its entries may have been pruned
    /// meanwhile); then deletes the Lease (call after the entries are withdrawn).
    pub async fn run(&self, epoch: watch::Sender<u64>, stop: CancellationToken) {
        let every = self
            .spec
            .duration
            .saturating_sub(self.spec.grace)
            .max(Duration::from_secs(1));
        let mut last_ok: Option<Instant> = None;
        let mut uid: Option<String> = None;
        let mut retry = Duration::from_millis(200);
        loop {
            let wait = match self.renew().await {
                Ok(lease) => {
                    let late = last_ok.is_some_and(|t| t.elapsed() >= self.spec.duration);
                    // A new object: the leader judged this replica dead (a partition, clock
                    // skew) and deleted the Lease, and pruned its entries.
                    let recreated = uid.is_some() && uid != lease.metadata.uid;
                    if late || recreated {
                        info!(lease = %self.name, late, recreated, "the replica Lease may have lapsed; rewriting this replica's status entries");
                        epoch.send_modify(|e| *e += 1);
                    }
                    uid = lease.metadata.uid;
                    last_ok = Some(Instant::now());
                    retry = Duration::from_millis(200);
                    every
                }
                Err(e) => {
                    warn!(lease = %self.name, error = %e, ?retry, "renewing the replica Lease failed; retrying");
                    let wait = retry;
                    retry = (retry * 2).min(every);
                    wait
                }
            };
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Deletes the Lease: the replica stopped and its entries are gone.
    pub async fn release(&self) {
        let params = DeleteParams::default();
        let deleted = self.api.delete(&self.name, &params);
        match tokio::time::timeout(Duration::from_secs(5), deleted).await {
            Ok(Ok(_)) => debug!(lease = %self.name, "deleted the replica Lease"),
            Ok(Err(kube::Error::Api(e))) if e.code == 404 => {}
            Ok(Err(e)) => warn!(lease = %self.name, error = %e, "deleting the replica Lease"),
            Err(_) => warn!(lease = %self.name, "deleting the replica Lease timed out"),
        }
    }

    /// One renewal: server-side apply of holder, duration and renewal time (creating the
    /// Lease if missing).
    async fn renew(&self) -> Result<Lease, kube::Error> {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let patch = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": { "name": self.name },
            "spec": {
                "holderIdentity": self.replica,
                "leaseDurationSeconds": self.spec.duration.as_secs(),
                "renewTime": now,
            },
        });
        self.api
            .patch(
                &self.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
    }
}

/// What the leader knows of one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Its Lease is current (or it is the reader itself); the Lease expires at this time (by
    /// the writer's clock, plus [`CLOCK_SKEW`]), if known.
    Alive(Option<SystemTime>),
    /// Its Lease expired, is gone, or names another holder: its entries are a dead
    /// replica's.
    Dead,
    /// The Lease could not be read (API error, RBAC): counted as alive, never pruned on a
    /// failed read.
    Unknown,
}

impl Liveness {
    /// Whether the replica's entries count.
    pub fn counts(self) -> bool {
        self != Liveness::Dead
    }
}

/// Whether `lease` vouches for `replica` at `now`.
pub fn judge(lease: &Lease, replica: &str, now: SystemTime) -> Liveness {
    let Some(spec) = &lease.spec else {
        return Liveness::Dead;
    };
    if spec.holder_identity.as_deref() != Some(replica) {
        return Liveness::Dead;
    }
    let (Some(renewed), Some(secs)) = (&spec.renew_time, spec.lease_duration_seconds) else {
        return Liveness::Dead;
    };
    let renewed = SystemTime::UNIX_EPOCH
        + Duration::from_micros(u64::try_from(renewed.0.as_microsecond()).unwrap_or(0));
    let expires = renewed + Duration::from_secs(u64::try_from(secs).unwrap_or(0)) + CLOCK_SKEW;
    if now <= expires {
        Liveness::Alive(Some(expires))
    } else {
        Liveness::Dead
    }
}

/// Reads the replicas' Leases by name (a GET each: the chart grants Leases by name in one
/// namespace, not a list of them), and deletes those that expired: pods come and go under new
/// names, and a killed one's Lease would otherwise stay forever.
#[derive(Clone)]
pub struct LeaseReader {
    /// The namespace's Lease API.
    pub api: Api<Lease>,
    /// The leader Lease's name, the prefix of every replica's.
    pub base: String,
    /// The reader's own identity: always alive while it reads.
    pub own: String,
}

impl LeaseReader {
    /// The liveness of each of `replicas` at `now`.
    pub async fn read(
        &self,
        replicas: &BTreeSet<String>,
        now: SystemTime,
    ) -> BTreeMap<String, Liveness> {
        let mut out = BTreeMap::new();
        for replica in replicas {
            let liveness = if *replica == self.own {
                Liveness::Alive(None)
            } else {
                match self.api.get_opt(&lease_name(&self.base, replica)).await {
                    Ok(Some(lease)) => {
                        let liveness = judge(&lease, replica, now);
                        if liveness == Liveness::Dead {
                            self.remove_expired(&lease, replica).await;
                        }
                        liveness
                    }
                    Ok(None) => Liveness::Dead,
                    Err(e) => {
                        debug!(%replica, error = %e, "reading a replica Lease");
                        Liveness::Unknown
                    }
                }
            };
            out.insert(replica.clone(), liveness);
        }
        out
    }

    /// Deletes `lease`, the expired Lease of `replica`, unless it changed since it was read (it
    /// was renewed) or names another holder (not this replica's to delete).
    async fn remove_expired(&self, lease: &Lease, replica: &str) {
        let holder = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref());
        let (Some(name), Some(version)) = (&lease.metadata.name, &lease.metadata.resource_version)
        else {
            return;
        };
        if holder != Some(replica) {
            return;
        }
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: Some(version.clone()),
                uid: None,
            }),
            ..DeleteParams::default()
        };
        match self.api.delete(name, &params).await {
            Ok(_) => info!(%replica, lease = %name, "deleted a dead replica's expired Lease"),
            Err(e) => debug!(%replica, error = %e, "deleting a dead replica's Lease"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec as K8sLeaseSpec;

    fn lease(holder: &str, renewed: SystemTime, secs: i32) -> Lease {
        let micros = renewed
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after the epoch")
            .as_micros();
        let ts = k8s_openapi::jiff::Timestamp::from_microsecond(micros as i64).expect("timestamp");
        Lease {
            spec: Some(K8sLeaseSpec {
                holder_identity: Some(holder.to_owned()),
                renew_time: Some(MicroTime(ts)),
                lease_duration_seconds: Some(secs),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_lease_vouches_for_its_holder_until_it_expires() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let l = lease("a", t0, 15);
        let expires = t0 + Duration::from_secs(15) + CLOCK_SKEW;
        assert_eq!(judge(&l, "a", t0), Liveness::Alive(Some(expires)));
        assert_eq!(judge(&l, "a", expires), Liveness::Alive(Some(expires)));
        assert_eq!(
            judge(&l, "a", expires + Duration::from_millis(1)),
            Liveness::Dead
        );
        assert_eq!(judge(&l, "b", t0), Liveness::Dead, "another holder");
        assert_eq!(judge(&Lease::default(), "a", t0), Liveness::Dead);
        assert!(Liveness::Unknown.counts());
    }

    #[test]
    fn lease_names_are_dns_subdomains() {
        assert_eq!(
            lease_name("tether-operator", "tether-operator-5d8f9-x2x7q"),
            "tether-operator.tether-operator-5d8f9-x2x7q"
        );
        assert_eq!(lease_name("op", "Host_Name!"), "op.host-name");
        let long = lease_name("op", &"a".repeat(400));
        assert_eq!(long.len(), 253);
    }
}
