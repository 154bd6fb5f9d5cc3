//! What `status` records about time, for both this replica's view ([`super::status`]) and the
//! leader's summary ([`super::replicas`]): RFC 3339 stamps, each tunnel's second within the
//! refresh period, when a stamp is too old to mean anything, and conditions that keep their
//! transition time while their status holds.

use std::time::{Duration, SystemTime};

use super::crd::{Condition, ConditionStatus};

/// `t` as `status` writes times: RFC 3339, whole seconds, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// How often the leader stamps an unchanged tunnel's `observedAt` by default (`tether operator
/// --status-refresh`), so that an `observedAt` older than [`stale_after`] of it means no
/// replica carries the tunnel.
pub const SEEN_REFRESH: Duration = Duration::from_secs(60);

/// Where within each refresh period a tunnel is stamped: a fixed offset from a hash (FNV-1a) of
/// the tunnel's namespace and name, stable across restarts and leader changes. Tunnels started together then stamp at different seconds instead of in one burst
/// a period later: of 1,000 tunnels started together, 23 stamped in the busiest second against
/// 151 with a random 3 s jitter (`cargo bench --bench fleet`, BENCHMARKS.md).
pub fn refresh_slot(namespace: &str, name: &str, refresh: Duration) -> Duration {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in namespace.bytes().chain([b'/']).chain(name.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    Duration::from_secs(hash % refresh.as_secs().max(1))
}

/// How long after a stamp at `stamped` (whole seconds, as `observedAt` records it) the next one
/// is due: the first second on `slot` (an offset within the `refresh` period) more than a
/// second later, so within (1 s, `refresh` + 1 s], and exactly `refresh` apart at rest.
pub fn until_slot(slot: Duration, refresh: Duration, stamped: SystemTime) -> Duration {
    let period = refresh.as_secs().max(1);
    let stamped = stamped
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let base = stamped + 1;
    let wait = match (slot.as_secs() + period - base % period) % period {
        0 => period,
        w => w,
    };
    Duration::from_secs(base + wait - stamped)
}

/// The age past which a stamp written every `refresh` (on its slot) says no replica runs: the
/// refresh, the second a stamp may wait for its slot, the second the stamp drops and a margin
/// for lateness in writing. (While the leader itself changes hands, the stamp may also wait
/// for the leader Lease to expire: 15 s more at most with the defaults.)
pub fn stale_after(refresh: Duration) -> Duration {
    refresh + refresh / 20 + Duration::from_secs(2)
}

/// A condition of `type_`, keeping its `lastTransitionTime` from `previous` while its status
/// holds (so an unchanged condition is byte-identical and causes no write).
pub fn condition(
    previous: &[Condition],
    type_: &str,
    holds: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: SystemTime,
) -> Condition {
    let status = if holds {
        ConditionStatus::True
    } else {
        ConditionStatus::False
    };
    let since = previous
        .iter()
        .find(|c| c.type_ == type_)
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| rfc3339(now));
    Condition {
        type_: type_.to_owned(),
        status,
        reason: reason.to_owned(),
        message,
        last_transition_time: since,
        observed_generation: generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stamps_of_many_tunnels_spread_over_the_period() {
        let refresh = SEEN_REFRESH;
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut per_second = std::collections::HashMap::<u64, usize>::new();
        for i in 0..1000 {
            let slot = refresh_slot("default", &format!("tunnel-{i}"), refresh);
            let next = until_slot(slot, refresh, t0);
            assert!(next > Duration::from_secs(1) && next <= refresh + Duration::from_secs(1));
            *per_second.entry(next.as_secs()).or_default() += 1;
            // At rest, one period apart exactly.
            assert_eq!(until_slot(slot, refresh, t0 + next), refresh);
        }
        // 1,000 over 60 s is 17 a second on average; a shared jitter of a few seconds put
        // hundreds into one.
        let busiest = per_second.values().max().copied().unwrap_or_default();
        assert!(busiest <= 40, "{busiest} stamps in one second");
    }
}
