//! Open streams per client identity, so one client cannot take a tunnel's whole stream budget.
//!
//! A tunnel carries at most `max_streams_per_tunnel` streams (4,096 by default). Without a
//! share per client, one holder of a root client certificate could open 4,096 channels to a
//! leaf and every other client's dial would be refused until it hung up. Each identity (the
//! certificate's name; peer proxies have their own, `proxy-<id>`) may hold
//! `max_streams_per_client` streams at once across the proxy (1,024 by default: four busy
//! clients can still fill a tunnel, one cannot). The client entry needs no share of its own:
//! its connection caps (1,024 in total) already keep it under a tunnel's budget.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Counts each client's open streams against one limit.
pub struct StreamQuota {
    /// Streams one client may hold at once.
    limit: usize,
    /// Client name → streams it holds; a name leaves the map with its last stream, so the map
    /// is as large as the set of clients with open streams.
    open: Mutex<HashMap<String, usize>>,
}

/// A client already holds its share of streams.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("client {client} already holds {limit} open streams, its limit")]
pub struct QuotaExceeded {
    /// Who asked.
    pub client: String,
    /// The share it reached.
    pub limit: usize,
}

/// One open stream of a client; gives its place back when dropped.
pub struct QuotaPermit {
    /// Where the count lives.
    quota: Arc<StreamQuota>,
    /// Whose count to lower.
    client: String,
}

impl StreamQuota {
    /// A quota allowing each client `limit` open streams.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// Takes one of `client`'s streams, or says it has none left.
    pub fn acquire(self: &Arc<Self>, client: &str) -> Result<QuotaPermit, QuotaExceeded> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let held = open.entry(client.to_owned()).or_insert(0);
        if *held >= self.limit {
            return Err(QuotaExceeded {
                client: client.to_owned(),
                limit: self.limit,
            });
        }
        *held += 1;
        Ok(QuotaPermit {
            quota: self.clone(),
            client: client.to_owned(),
        })
    }

    /// Streams `client` holds now.
    pub fn held(&self, client: &str) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(client).copied().unwrap_or(0)
    }
}

impl Drop for QuotaPermit {
    fn drop(&mut self) {
        let mut open = self.quota.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = open.get_mut(&self.client) {
            *held -= 1;
            if *held == 0 {
                open.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_has_its_own_share_given_back_when_streams_end() {
        let quota = StreamQuota::new(2);
        let a1 = quota.acquire("alice").expect("first");
        let _a2 = quota.acquire("alice").expect("second");
        assert_eq!(
            quota.acquire("alice").err(),
            Some(QuotaExceeded {
                client: "alice".into(),
                limit: 2
            })
        );
        let _b = quota.acquire("bob").expect("bob has his own share");
        drop(a1);
        assert_eq!(quota.held("alice"), 1);
        assert!(quota.acquire("alice").is_ok());
    }

    #[test]
    fn a_client_with_no_streams_leaves_no_entry() {
        let quota = StreamQuota::new(1);
        drop(quota.acquire("alice").expect("stream"));
        assert!(quota.open.lock().expect("lock").is_empty());
    }
}
