//! The controllers the operator runs: [`reverse_tunnel`] (tunnels into running agents) and
//! [`trusted_cluster`] (joins into tunnels).

pub mod reverse_tunnel;
pub mod trusted_cluster;
pub mod tunnel_finalizer;

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

use crate::admin::metrics::{OperatorMetrics, label};
use crate::agent::Backoff;

/// Runs one reconcile of `controller`, counting it by result and timing it.
pub(crate) async fn measured<T, E>(
    metrics: OperatorMetrics,
    controller: &'static str,
    reconcile: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let start = std::time::Instant::now();
    let result = reconcile.await;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    metrics
        .reconciles
        .get_or_create(&vec![
            ("controller", controller.to_owned()),
            ("result", outcome.to_owned()),
        ])
        .inc();
    metrics
        .reconcile_duration
        .get_or_create(&label("controller", controller))
        .observe(start.elapsed().as_secs_f64());
    result
}

/// The longest a failing object waits between reconciles (also the controllers' resync).
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);

/// How a failing object's retries space out: 2 s doubling with each failure, up to
/// [`MAX_RETRY_DELAY`] (the agent's [`Backoff`], without its jitter).
const RETRY: Backoff = Backoff {
    initial: Duration::from_secs(2),
    max: MAX_RETRY_DELAY,
};

/// Consecutive failed reconciles per object, and the retry delay they call for ([`RETRY`]).
/// A success forgets the object's count.
pub struct Backoffs<K> {
    failures: Mutex<HashMap<K, u32>>,
}

impl<K> Default for Backoffs<K> {
    fn default() -> Self {
        Self {
            failures: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone> Backoffs<K> {
    /// Counts a failure of `key` and returns how long to wait before retrying it.
    pub fn failed(&self, key: &K) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(key.clone()).or_insert(0);
        *n = n.saturating_add(1);
        RETRY.ceiling(*n - 1)
    }

    /// Forgets the failures of `key`.
    pub fn succeeded(&self, key: &K) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets_on_success() {
        let backoffs = Backoffs::default();
        let delays: Vec<u64> = (0..9).map(|_| backoffs.failed(&"a").as_secs()).collect();
        assert_eq!(delays, [2, 4, 8, 16, 32, 64, 128, 256, 300]);
        assert_eq!(backoffs.failed(&"b").as_secs(), 2, "counted per object");
        backoffs.succeeded(&"a");
        assert_eq!(backoffs.failed(&"a").as_secs(), 2);
    }
}
