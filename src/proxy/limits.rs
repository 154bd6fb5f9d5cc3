//! Admission control for incoming connections (the seed's `Limiter`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::config::ProxyLimits;

/// Counts connections per source IP and in total, and bounds handshakes in flight.
pub struct ConnectionLimiter {
    limits: ProxyLimits,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    handshakes: Arc<Semaphore>,
}

/// Why a connection was refused at the door.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("{ip} already has {limit} connections, its limit")]
    PerIp { ip: IpAddr, limit: usize },
    #[error("the proxy already holds {limit} connections, its limit")]
    Total { limit: usize },
    #[error("{limit} handshakes are already in progress, the limit")]
    Handshakes { limit: usize },
}

impl Refusal {
    /// A fixed label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::PerIp { .. } => "per_ip",
            Refusal::Total { .. } => "total",
            Refusal::Handshakes { .. } => "handshakes",
        }
    }
}

/// Held for as long as a connection lives; releases its count on drop.
pub struct ConnectionPermit {
    limiter: Arc<ConnectionLimiter>,
    ip: IpAddr,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut map = self
            .limiter
            .per_ip
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

impl ConnectionLimiter {
    /// A limiter enforcing `limits`.
    pub fn new(limits: ProxyLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            per_ip: Mutex::new(HashMap::new()),
            handshakes: Arc::new(Semaphore::new(limits.max_handshakes)),
        })
    }

    /// Admits a connection from `ip`, or says why not. The handshake permit is released when the
    /// handshake ends; the connection permit when the connection does.
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
    ) -> Result<(ConnectionPermit, OwnedSemaphorePermit), Refusal> {
        let handshake =
            self.handshakes
                .clone()
                .try_acquire_owned()
                .map_err(|_| Refusal::Handshakes {
                    limit: self.limits.max_handshakes,
                })?;
        let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = map.values().sum();
        if total >= self.limits.max_connections {
            return Err(Refusal::Total {
                limit: self.limits.max_connections,
            });
        }
        let count = map.entry(ip).or_insert(0);
        if *count >= self.limits.max_connections_per_ip {
            return Err(Refusal::PerIp {
                ip,
                limit: self.limits.max_connections_per_ip,
            });
        }
        *count += 1;
        drop(map);
        Ok((
            ConnectionPermit {
                limiter: self.clone(),
                ip,
            },
            handshake,
        ))
    }

    /// Connections held now, for metrics and tests.
    pub fn connections(&self) -> usize {
        self.per_ip
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enforces_per_ip_total_and_handshakes() {
        let limiter = ConnectionLimiter::new(ProxyLimits {
            max_connections_per_ip: 2,
            max_connections: 3,
            max_handshakes: 10,
            ..ProxyLimits::default()
        });
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let p1 = limiter.admit(a).unwrap();
        let _p2 = limiter.admit(a).unwrap();
        assert!(matches!(limiter.admit(a), Err(Refusal::PerIp { .. })));
        let _p3 = limiter.admit(b).unwrap();
        assert!(matches!(limiter.admit(b), Err(Refusal::Total { .. })));
        drop(p1);
        assert_eq!(limiter.connections(), 2);
        assert!(limiter.admit(a).is_ok());

        let limiter = ConnectionLimiter::new(ProxyLimits {
            max_handshakes: 1,
            ..ProxyLimits::default()
        });
        let (_conn, handshake) = limiter.admit(a).unwrap();
        assert!(matches!(limiter.admit(a), Err(Refusal::Handshakes { .. })));
        drop(handshake);
        assert!(limiter.admit(a).is_ok());
    }
}
