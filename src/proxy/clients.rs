//! The root clients' SSH sessions that carry streams, so that revoking trust ends them.
//!
//! A client's certificate is checked when it authenticates and again on every channel it
//! opens; but a stream already open would outlive a revocation for as long as the client keeps
//! it (an ssh session through `tether dial` lasts hours). Every session that has opened a
//! stream is therefore registered here with the certificate it authenticated with, and each
//! trust change ([`super::trust::revalidate`]) disconnects the sessions the new trust refuses,
//! their streams with them. A session that never opened a stream holds nothing worth ending,
//! and its next open is checked anyway.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use russh::keys::Certificate;
use russh::server::Handle;

use crate::identity::TrustStore;
use crate::protocol::ClusterName;

/// Registered client sessions, by a process-local ID.
#[derive(Default)]
pub struct ClientSessions {
    /// The next registration's ID.
    next_id: AtomicU64,
    /// Sessions that opened at least one stream and have not ended.
    open: Mutex<HashMap<u64, ClientSession>>,
}

/// One registered session.
struct ClientSession {
    /// The name its certificate carries (for logs, and the check).
    name: String,
    /// What it authenticated with: the trust is asked again about exactly this.
    certificate: Certificate,
    /// Ends the session.
    handle: Handle,
}

/// A session's place in [`ClientSessions`]; removes it when dropped (with the connection's
/// handler, so an ended session never lingers).
pub struct ClientRegistration {
    /// Where the session is registered.
    sessions: Arc<ClientSessions>,
    /// Its ID there.
    id: u64,
}

/// A session the trust no longer accepts, to be disconnected.
pub struct RefusedSession {
    /// The client's name, for the log.
    pub name: String,
    /// Why the trust refuses it.
    pub reason: String,
    /// Ends the session.
    pub handle: Handle,
}

impl ClientSessions {
    /// Registers a session authenticated with `certificate` as `name`.
    pub fn register(
        self: &Arc<Self>,
        name: &str,
        certificate: &Certificate,
        handle: Handle,
    ) -> ClientRegistration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let session = ClientSession {
            name: name.to_owned(),
            certificate: certificate.clone(),
            handle,
        };
        self.lock().insert(id, session);
        ClientRegistration {
            sessions: self.clone(),
            id,
        }
    }

    /// Removes and returns the sessions whose certificates `trust` no longer accepts as clients
    /// of `cluster`.
    pub fn take_refused(&self, trust: &TrustStore, cluster: &ClusterName) -> Vec<RefusedSession> {
        let now = SystemTime::now();
        let mut open = self.lock();
        let refused: Vec<(u64, String)> = open
            .iter()
            .filter_map(|(id, s)| {
                let verdict = trust.verify_client(cluster, &s.name, &s.certificate, now);
                verdict.err().map(|e| (*id, e.to_string()))
            })
            .collect();
        refused
            .into_iter()
            .filter_map(|(id, reason)| {
                open.remove(&id).map(|s| RefusedSession {
                    name: s.name,
                    reason,
                    handle: s.handle,
                })
            })
            .collect()
    }

    /// Sessions registered now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no session is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, ClientSession>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for ClientRegistration {
    fn drop(&mut self) {
        self.sessions.lock().remove(&self.id);
    }
}
