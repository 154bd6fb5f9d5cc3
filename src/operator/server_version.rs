//! The leaf's Kubernetes version, for the root's inventory: every agent of this operator
//! reports it (`agent::report`), and it is read here once for all of them.

use std::time::Duration;

use kube::Client;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// How often the version is read again: a control-plane upgrade shows in the root's inventory
/// within this, for one small GET per operator replica.
pub const VERSION_REFRESH: Duration = Duration::from_secs(600);
/// How soon a failed read is tried again.
const RETRY: Duration = Duration::from_secs(30);

/// Publishes the API server's `gitVersion` to `version` until `shutdown`; only changes wake
/// the agents.
pub async fn follow(
    client: Client,
    version: watch::Sender<Option<String>>,
    shutdown: CancellationToken,
) {
    loop {
        let wait = match client.apiserver_version().await {
            Ok(info) => {
                version.send_if_modified(|known| {
                    let changed = known.as_deref() != Some(info.git_version.as_str());
                    if changed {
                        *known = Some(info.git_version.clone());
                    }
                    changed
                });
                VERSION_REFRESH
            }
            Err(e) => {
                debug!(error = %e, "reading the API server's version");
                RETRY
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}
