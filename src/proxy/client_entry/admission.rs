//! Who may start a handshake on the client entry: a connection limit per source address, and
//! penalties for sources that keep failing to authenticate (like OpenSSH's
//! `PerSourcePenalties`).
//!
//! Without them one host filled the entry's 1,024 slots with idle sockets and refused every
//! other client, and guessed tokens at ~4,380 attempts a second with one log line each (10.8 MB
//! of log in 10 s). Now one address holds at most `max_connections_per_ip` (128) connections,
//! and after `auth_failures_allowed` (5) failed attempts it is refused at accept, before a byte
//! is read, for `auth_penalty` (30 s), doubling with each repeat up to [`MAX_PENALTY`]: a
//! guesser gets ~5 tries per 30 s instead of thousands per second, and the log gets one line
//! per penalty plus at most one summary of refusals a second.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::warn;

/// The longest penalty: a source that keeps guessing is refused for 10 minutes at a time.
pub const MAX_PENALTY: Duration = Duration::from_secs(600);

/// Sources remembered at most; beyond it, expired records are pruned and new failures are not
/// recorded (the per-source and total connection limits still hold). 64 Ki records ≈ 4 MiB.
const MAX_SOURCES: usize = 65_536;

/// A failure record is forgotten this long after its last failure or penalty.
const FORGET_AFTER: Duration = Duration::from_secs(900);

/// Per-source state of the client entry's door.
pub(in crate::proxy) struct Door {
    /// The settings, copied from the entry's configuration.
    settings: DoorSettings,
    /// Everything counted per source, under one lock (never held across an await).
    state: Mutex<DoorState>,
}

/// The limits a [`Door`] enforces.
#[derive(Debug, Clone, Copy)]
pub(in crate::proxy) struct DoorSettings {
    /// Connections one address may hold at once.
    pub max_connections_per_ip: usize,
    /// Failed authentications tolerated before the source is penalised.
    pub auth_failures_allowed: u32,
    /// The first penalty; each later one doubles, up to [`MAX_PENALTY`].
    pub auth_penalty: Duration,
}

#[derive(Default)]
struct DoorState {
    /// Open connections per source.
    connections: HashMap<IpAddr, usize>,
    /// Failure records per source.
    failures: HashMap<IpAddr, FailureRecord>,
    /// Connections refused since the last summary line.
    refused_since_log: u64,
    /// When the last summary line was written.
    last_log: Option<Instant>,
}

/// What a source did wrong.
struct FailureRecord {
    /// Failures since its last penalty.
    failures: u32,
    /// Penalties it has served so far (doubles the next one).
    penalties: u32,
    /// Refused until then.
    until: Option<Instant>,
    /// Last failure or penalty, to forget the record.
    last: Instant,
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::proxy) enum Refused {
    /// The source holds its share of connections.
    PerIp,
    /// The source failed to authenticate too often and is serving a penalty.
    Penalty,
}

/// Held for as long as a connection lives; gives its source's count back on drop.
pub(in crate::proxy) struct SourcePermit {
    /// Where the count is kept.
    door: Arc<Door>,
    /// Whose count it is.
    ip: IpAddr,
}

impl Drop for SourcePermit {
    fn drop(&mut self) {
        let mut state = self.door.lock();
        if let Some(n) = state.connections.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                state.connections.remove(&self.ip);
            }
        }
    }
}

impl Door {
    pub(in crate::proxy) fn new(settings: DoorSettings) -> Arc<Self> {
        Arc::new(Self {
            settings,
            state: Mutex::new(DoorState::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DoorState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets a connection from `ip` in, or says why not (and logs a summary of refusals at most
    /// once a second).
    pub(in crate::proxy) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<SourcePermit, Refused> {
        self.admit_at(ip, Instant::now())
    }

    fn admit_at(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<SourcePermit, Refused> {
        let mut state = self.lock();
        let refused = if state
            .failures
            .get(&ip)
            .and_then(|r| r.until)
            .is_some_and(|until| now < until)
        {
            Some(Refused::Penalty)
        } else if state.connections.get(&ip).copied().unwrap_or(0)
            >= self.settings.max_connections_per_ip
        {
            Some(Refused::PerIp)
        } else {
            None
        };
        if let Some(why) = refused {
            state.refused_since_log += 1;
            if state
                .last_log
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
            {
                warn!(source = %ip, reason = ?why, refused = state.refused_since_log,
                    max_connections_per_ip = self.settings.max_connections_per_ip,
                    "refusing client connections (count since the last such line)");
                state.refused_since_log = 0;
                state.last_log = Some(now);
            }
            return Err(why);
        }
        *state.connections.entry(ip).or_insert(0) += 1;
        Ok(SourcePermit {
            door: self.clone(),
            ip,
        })
    }

    /// Records a failed authentication from `ip`; starts a penalty (and logs one line) when the
    /// source has failed too often.
    pub(in crate::proxy) fn auth_failed(&self, ip: IpAddr) {
        self.auth_failed_at(ip, Instant::now());
    }

    fn auth_failed_at(&self, ip: IpAddr, now: Instant) {
        let mut state = self.lock();
        if !state.failures.contains_key(&ip) && state.failures.len() >= MAX_SOURCES {
            state
                .failures
                .retain(|_, r| now.duration_since(r.last) < FORGET_AFTER);
            if state.failures.len() >= MAX_SOURCES {
                return;
            }
        }
        let record = state.failures.entry(ip).or_insert(FailureRecord {
            failures: 0,
            penalties: 0,
            until: None,
            last: now,
        });
        if now.duration_since(record.last) >= FORGET_AFTER {
            record.penalties = 0;
            record.failures = 0;
        }
        record.failures += 1;
        record.last = now;
        if record.failures <= self.settings.auth_failures_allowed {
            return;
        }
        let penalty = self
            .settings
            .auth_penalty
            .saturating_mul(1 << record.penalties.min(16))
            .min(MAX_PENALTY);
        record.penalties += 1;
        record.failures = 0;
        record.until = Some(now + penalty);
        warn!(source = %ip, failures = self.settings.auth_failures_allowed + 1, ?penalty,
            "too many failed client authentications; refusing this source for the penalty");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn door(max: usize, failures: u32, penalty: Duration) -> Arc<Door> {
        Door::new(DoorSettings {
            max_connections_per_ip: max,
            auth_failures_allowed: failures,
            auth_penalty: penalty,
        })
    }

    #[test]
    fn one_source_holds_at_most_its_share() {
        let door = door(2, 5, Duration::from_secs(1));
        let (a, b) = ("127.0.0.2".parse().unwrap(), "127.0.0.1".parse().unwrap());
        let p1 = door.admit(a).unwrap();
        let _p2 = door.admit(a).unwrap();
        assert_eq!(door.admit(a).err(), Some(Refused::PerIp));
        assert!(door.admit(b).is_ok());
        drop(p1);
        assert!(door.admit(a).is_ok());
    }

    #[test]
    fn repeated_failures_refuse_the_source_for_a_penalty_then_let_it_back() {
        let penalty = Duration::from_secs(30);
        let door = door(8, 2, penalty);
        let (a, b) = ("127.0.0.2".parse().unwrap(), "127.0.0.1".parse().unwrap());
        let t0 = Instant::now();
        door.auth_failed_at(a, t0);
        door.auth_failed_at(a, t0);
        assert!(door.admit_at(a, t0).is_ok(), "within the allowance");
        door.auth_failed_at(a, t0);
        assert_eq!(door.admit_at(a, t0).err(), Some(Refused::Penalty));
        assert!(
            door.admit_at(b, t0).is_ok(),
            "other sources are not penalised"
        );
        let after = t0 + penalty;
        assert!(door.admit_at(a, after).is_ok(), "the penalty ends");
        // A repeat offender serves twice as long.
        for _ in 0..3 {
            door.auth_failed_at(a, after);
        }
        assert_eq!(
            door.admit_at(a, after + penalty).err(),
            Some(Refused::Penalty)
        );
        assert!(door.admit_at(a, after + 2 * penalty).is_ok());
    }
}
