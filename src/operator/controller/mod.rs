//! The controllers the operator runs: [`reverse_tunnel`] (tunnels into running agents) and
//! [`trusted_cluster`] (joins into tunnels).

pub mod reverse_tunnel;
pub mod trusted_cluster;

use std::future::Future;
use std::time::Duration;

use crate::admin::metrics::{METRICS, label};

/// Runs one reconcile of `controller`, counting it by result and timing it.
pub(crate) async fn measured<T, E>(
    controller: &'static str,
    reconcile: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let start = std::time::Instant::now();
    let result = reconcile.await;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    METRICS
        .operator_reconciles
        .get_or_create(&vec![
            ("controller", controller.to_owned()),
            ("result", outcome.to_owned()),
        ])
        .inc();
    METRICS
        .operator_reconcile_duration
        .get_or_create(&label("controller", controller))
        .observe(start.elapsed().as_secs_f64());
    result
}

/// The retry delay after `failures` consecutive failed reconciles of one object: 2 s doubling
/// to at most `cap`.
pub(crate) fn backoff(failures: u32, cap: Duration) -> Duration {
    Duration::from_secs(2)
        .saturating_mul(1u32 << failures.clamp(1, 8).saturating_sub(1))
        .min(cap)
}
