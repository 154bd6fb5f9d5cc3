//! Which proxies already hold a tunnel from this agent.
//!
//! A connection that lands on a proxy already claimed is refused during key exchange, before
//! authentication or any channel, which is the cheapest point to learn the proxy's identity
//! (Teleport's PR #27683 moved its check there for the same reason). A claim is released when
//! its guard drops, whatever path the tunnel took to its end, so an error can never leave a
//! proxy claimed forever (Teleport's issue #10368).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// The set of claimed proxy IDs, shared by the pool and its connection handlers.
#[derive(Clone, Default, Debug)]
pub struct Claims(Arc<Mutex<HashSet<String>>>);

impl Claims {
    /// Claims `proxy_id`, or returns `None` if it is already claimed.
    pub fn try_claim(&self, proxy_id: &str) -> Option<Claim> {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        set.insert(proxy_id.to_owned()).then(|| Claim {
            claims: self.clone(),
            proxy_id: proxy_id.to_owned(),
        })
    }

    /// Whether `proxy_id` is claimed now.
    pub fn is_claimed(&self, proxy_id: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(proxy_id)
    }
}

/// Holds one proxy's claim until dropped.
#[derive(Debug)]
pub struct Claim {
    claims: Claims,
    proxy_id: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.claims
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.proxy_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_exclusive_until_dropped() {
        let claims = Claims::default();
        let first = claims.try_claim("p1").expect("free");
        assert!(claims.try_claim("p1").is_none());
        assert!(claims.try_claim("p2").is_some());
        drop(first);
        assert!(!claims.is_claimed("p1"));
        assert!(claims.try_claim("p1").is_some());
    }
}
