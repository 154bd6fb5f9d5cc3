//! Answers of the API server kept for a short while, so that a stream of dials or connections
//! costs one review per key and period, not one each: [`super::access`] keeps RBAC decisions by
//! (client, leaf), [`super::bearer`] token reviews by the token's digest.
//!
//! Each question may take [`ASK_TIMEOUT`] at most: an API server that does not answer refuses
//! the request it would decide instead of holding it (and its client) indefinitely.
//!
//! Bounded: past `max` entries the expired ones go first, and if none has, a new answer is
//! simply not kept (its next request asks again), so a flood of distinct keys costs the API
//! server, not this process's memory.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long the API server may take to answer a review before the request waiting on it is
/// refused.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// `question` within [`ASK_TIMEOUT`]; `Err` with `timed out` when it takes longer.
pub async fn ask<T>(
    question: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(ASK_TIMEOUT, question).await {
        Ok(answer) => answer.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {ASK_TIMEOUT:?}")),
    }
}

/// Answers by key, each standing `ttl` from when it was given.
pub struct Kept<K, V> {
    /// How long an answer stands.
    ttl: Duration,
    /// Most answers kept.
    max: usize,
    /// The answers and when each was given.
    answers: Mutex<HashMap<K, (V, Instant)>>,
}

impl<K: Eq + Hash, V: Clone> Kept<K, V> {
    pub fn new(ttl: Duration, max: usize) -> Self {
        Self {
            ttl,
            max,
            answers: Mutex::new(HashMap::new()),
        }
    }

    /// The answer for `key`, if one was given less than the TTL ago.
    pub fn get(&self, key: &K) -> Option<V> {
        let answers = self.answers.lock().ok()?;
        let (answer, at) = answers.get(key)?;
        (at.elapsed() < self.ttl).then(|| answer.clone())
    }

    /// Keeps `answer` for `key`, if there is room (see the module's doc).
    pub fn keep(&self, key: K, answer: V) {
        let Ok(mut answers) = self.answers.lock() else {
            return;
        };
        if answers.len() >= self.max {
            let ttl = self.ttl;
            answers.retain(|_, (_, at)| at.elapsed() < ttl);
        }
        if answers.len() < self.max || answers.contains_key(&key) {
            answers.insert(key, (answer, Instant::now()));
        }
    }

    /// How many answers are kept, expired or not (tests of the bound).
    #[cfg(test)]
    fn count(&self) -> usize {
        self.answers.lock().map(|a| a.len()).unwrap_or(0)
    }

    /// Ages every answer by `by` (tests of expiry, without waiting).
    #[cfg(test)]
    pub fn age(&self, by: Duration) {
        if let Ok(mut answers) = self.answers.lock() {
            for (_, at) in answers.values_mut() {
                *at = at.checked_sub(by).unwrap_or(*at);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_stands_for_its_ttl() {
        let kept = Kept::new(Duration::from_secs(5), 10);
        kept.keep("alice", true);
        kept.keep("bob", false);
        assert_eq!(kept.get(&"alice"), Some(true));
        assert_eq!(kept.get(&"bob"), Some(false), "a refusal is kept too");
        assert_eq!(kept.get(&"carol"), None);
        kept.age(Duration::from_secs(5));
        assert_eq!(kept.get(&"alice"), None, "expired");
    }

    #[test]
    fn answers_are_bounded_and_expired_ones_go_first() {
        let kept = Kept::new(Duration::from_secs(5), 100);
        for i in 0..100 {
            kept.keep(i, ());
        }
        // Full of live answers: a new one is not kept (its next request asks again).
        kept.keep(1000, ());
        assert_eq!(kept.get(&1000), None);
        assert_eq!(kept.count(), 100);
        // A live key is still refreshed.
        kept.keep(7, ());
        assert_eq!(kept.get(&7), Some(()));
        // Once they have expired, a new one makes room.
        kept.age(Duration::from_secs(6));
        kept.keep(1000, ());
        assert_eq!(kept.get(&1000), Some(()));
        assert_eq!(kept.count(), 1);
    }
}
