//! The agent's report of its leaf to the root (protocol 1.1): who runs it, since when, the
//! leaf's Kubernetes version, and what the root may reach. Built once per agent run and again
//! whenever the allow-list is replaced or the Kubernetes version learnt; every tunnel sends
//! the newest to its proxy (`super::tunnel`), which keeps it in the leaf's `RemoteCluster` and
//! refuses at the root the dials no agent would permit.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use super::config::AgentConfig;
use crate::egress::allow_list::AllowList;
use crate::identity::fingerprint;
use crate::protocol::control::LeafReport;

/// The report of an agent of `config` started at `started_at`, enforcing `allow`, on a leaf
/// whose API server is `kubernetes_version`.
fn report(
    config: &AgentConfig,
    started_at: u64,
    allow: &AllowList,
    kubernetes_version: Option<String>,
) -> LeafReport {
    LeafReport {
        replica: config.replica.clone(),
        started_at,
        kubernetes_version,
        allow: allow.rules().iter().map(ToString::to_string).collect(),
        api_server: config.api_server.is_some(),
        kube_api: config.kube.is_some(),
        root_keys: config.root_cas.iter().map(fingerprint).collect(),
    }
}

/// The agent's report now, and a task that keeps it current until its sources close (both
/// the allow-list and the version watch outlive the agent, so the caller aborts it).
pub fn follow(
    config: Arc<AgentConfig>,
) -> (
    watch::Receiver<Arc<LeafReport>>,
    impl std::future::Future<Output = ()> + Send,
) {
    let started_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut allow = config.allow.subscribe();
    let mut version = config.kubernetes_version.clone();
    let first = report(
        &config,
        started_at,
        &allow.borrow_and_update(),
        version.borrow_and_update().clone(),
    );
    let (tx, rx) = watch::channel(Arc::new(first));
    let keep = async move {
        loop {
            tokio::select! {
                Ok(()) = allow.changed() => {}
                Ok(()) = version.changed() => {}
                else => return,
            }
            let next = report(
                &config,
                started_at,
                &allow.borrow_and_update(),
                version.borrow_and_update().clone(),
            );
            tx.send_if_modified(|current| {
                let changed = **current != next;
                if changed {
                    *current = Arc::new(next);
                }
                changed
            });
        }
    };
    (rx, keep)
}
