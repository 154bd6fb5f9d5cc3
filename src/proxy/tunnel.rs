//! One agent connection to this proxy (a tunnel): its heartbeats, its limits, and how a dial
//! goes through it.
//!
//! # No dial waits on a dead path
//!
//! A tunnel is declared dead when its agent misses `missed` heartbeats (the control channel's
//! watchdog), when its connection ends, or when the trust stops accepting it. Each of these
//! removes it from its site, and removal *closes* it: every dial pending on it is woken at once
//! and answered as a path failure, and every stream it carries ends (the client sees its socket
//! close), whatever russh does with the dead connection's channels.
//!
//! ```text
//!   t0 agent freezes      t0+1.5i late: no new dial      t0+m·i(+i) declared dead: pending
//!   ─────┬────────────────────────┬─────────────────────────────────┬──── dials woken, retried
//!        dials still picked here  only picked if no on-time tunnel   on another tunnel
//! ```
//!
//! Before, a dial pending on a frozen agent waited the whole dial timeout (30 s) although the
//! proxy had closed the tunnel seconds earlier. A path failure (the channel would not open, the
//! tunnel died before the agent answered) is worth retrying on another tunnel of the same leaf;
//! the agent's own answer (refused, forbidden, not resolved) is not, and goes to the client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use russh::keys::{Certificate, PublicKey};
use russh::server::{Handle, Msg};
use tokio_util::sync::CancellationToken;

use super::inventory::AgentRecord;
use crate::identity::{AuthError, TrustStore, validate_proxy_id};
use crate::protocol::control::{LeafReport, ReportError};
use crate::protocol::{ClusterName, DialError, DialErrorKind, Endpoint, ProtocolVersion};
use crate::stream::{Splice, StreamLimits, TunnelShare, TunnelStream};

/// How long a dial whose channel ended unanswered waits for its tunnel to be declared dead
/// (the connection's end reaches the control channel's reader within milliseconds).
const DEATH_NOTICE: Duration = Duration::from_millis(500);

/// Most proxies an agent's heartbeat may say it holds: far more replicas than a root runs,
/// far fewer than a list that would swell `/status` (each ID is at most 253 bytes).
pub const MAX_HELD_PROXIES: usize = 64;

/// Why an agent's list of held proxies was not believed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeldError {
    #[error("the agent reports {0} proxies held; at most {MAX_HELD_PROXIES} are believed")]
    TooMany(usize),
    #[error("the agent reports holding {id:?}, which is not a proxy ID: {reason}")]
    NotAProxyId {
        /// The offending entry, cut to 64 characters for the log.
        id: String,
        /// The rule it breaks.
        reason: &'static str,
    },
}

/// Checks an agent-supplied list of held proxies before it is shown anywhere.
pub fn validate_held(held: &[String]) -> Result<(), HeldError> {
    if held.len() > MAX_HELD_PROXIES {
        return Err(HeldError::TooMany(held.len()));
    }
    for id in held {
        validate_proxy_id(id).map_err(|reason| HeldError::NotAProxyId {
            id: id.chars().take(64).collect(),
            reason,
        })?;
    }
    Ok(())
}

/// An agent as it authenticated: its cluster and the certificate that proved it.
#[derive(Debug, Clone)]
pub struct AuthenticatedAgent {
    /// The leaf cluster (its SSH user name and certificate principal).
    pub cluster: ClusterName,
    /// Kept for the tunnel's lifetime, so a change of trust can check it again.
    pub certificate: Certificate,
}

/// What an agent said of itself at hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentHello {
    /// Its Tether release, cut to a printable 64 characters.
    pub version: String,
    /// The control protocol version agreed with it.
    pub protocol: ProtocolVersion,
}

impl AgentHello {
    /// What an agent said, its version string made safe to show.
    pub fn new(version: &str, protocol: ProtocolVersion) -> Self {
        let version: String = version
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(64)
            .collect();
        Self {
            version: if version.is_empty() {
                "unknown".to_owned()
            } else {
                version
            },
            protocol,
        }
    }
}

/// One agent connection to this proxy.
pub struct Tunnel {
    /// Unique per proxy process; tells two tunnels of one site apart in logs and removal.
    pub id: u64,
    /// The leaf cluster the agent authenticated as.
    pub cluster: ClusterName,
    /// The certificate the agent authenticated with: checked again whenever the trust changes,
    /// so revoking or re-keying a leaf closes the tunnels the old trust let in.
    certificate: Certificate,
    /// The agent's address as this proxy sees it (its NAT's, usually).
    pub peer: SocketAddr,
    /// Its release and the protocol spoken with it.
    pub hello: AgentHello,
    /// The agent's last report of its leaf (protocol 1.1), for the root's inventory and its
    /// early refusals; `None` until one arrives, and always from a 1.0 agent.
    report: std::sync::Mutex<Option<Arc<AgentRecord>>>,
    /// When the control channel came up.
    pub connected_at: SystemTime,
    /// Opens channels to the agent.
    handle: Handle,
    /// Milliseconds since `epoch` of the last heartbeat; an atomic so heartbeats never lock.
    last_heartbeat_ms: AtomicU64,
    /// The process-local clock origin for `last_heartbeat_ms`.
    epoch: Instant,
    /// Heartbeat interval agreed with this agent.
    pub interval: Duration,
    /// Silence after which the tunnel counts as offline (and is closed).
    pub offline_after: Duration,
    /// Streams currently open, to enforce the per-tunnel limit and spread load.
    open_streams: AtomicUsize,
    /// Woken when the last open stream ends, so a draining proxy waits without polling.
    idle: tokio::sync::Notify,
    /// The proxies the agent last reported holding tunnels to (its heartbeat says).
    held_by: std::sync::Mutex<Vec<String>>,
    /// What this tunnel's streams share: how much they may grow their receive windows by,
    /// together, and the proxy's stream counters.
    share: TunnelShare,
    /// Cancelled when the tunnel is declared dead (removed from its site): wakes the dials
    /// pending on it and ends its streams without waiting for russh to notice.
    closed: CancellationToken,
    /// The agent said it is stopping (its operator replica shuts down): new dials go to the
    /// site's other tunnels while one is left, so a rolling restart loses no dial, and the
    /// control channel closes the tunnel once its last stream has ended (the agent waits for
    /// that, so no stream loses its tail).
    leaving: std::sync::atomic::AtomicBool,
}

/// How a dial through one tunnel failed: the path, or the agent's answer.
#[derive(Debug)]
pub enum TunnelDialError {
    /// The tunnel could not carry the dial (it died, or would not open a channel): another
    /// tunnel of the same leaf may well succeed.
    Path(DialError),
    /// The agent answered (the target refused, the allow-list forbade, ...) or the time ran
    /// out: final, whatever tunnel is tried.
    Answer(DialError),
}

impl TunnelDialError {
    /// The error, whichever it is.
    pub fn into_inner(self) -> DialError {
        match self {
            TunnelDialError::Path(e) | TunnelDialError::Answer(e) => e,
        }
    }
}

impl Tunnel {
    /// A tunnel whose control channel just completed its hello.
    /// `heartbeats`: the interval agreed with the agent, and how many it may miss.
    pub fn new(
        id: u64,
        agent: AuthenticatedAgent,
        hello: AgentHello,
        peer: SocketAddr,
        handle: Handle,
        (interval, missed): (Duration, u32),
        share: TunnelShare,
    ) -> Self {
        Self {
            id,
            cluster: agent.cluster,
            certificate: agent.certificate,
            peer,
            hello,
            report: std::sync::Mutex::default(),
            connected_at: SystemTime::now(),
            handle,
            last_heartbeat_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            interval,
            offline_after: interval * missed.max(1),
            open_streams: AtomicUsize::new(0),
            idle: tokio::sync::Notify::new(),
            held_by: std::sync::Mutex::new(Vec::new()),
            share,
            closed: CancellationToken::new(),
            leaving: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The agent announced it is stopping: pick this tunnel only when no other is left, and
    /// close it once idle ([`Tunnel::until_idle`]).
    pub fn set_leaving(&self) {
        self.leaving.store(true, Ordering::Release);
    }

    /// Whether the agent announced it is stopping.
    pub fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::Acquire)
    }

    /// Declares the tunnel dead: pending dials fail over, streams end. Idempotent.
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// Whether the tunnel has been declared dead.
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Whether a new dial may be handed to this tunnel: not closed, heartbeats not missed.
    pub fn is_usable(&self) -> bool {
        !self.is_closed() && !self.is_offline()
    }

    /// Records which proxies the agent holds tunnels to, if the list is believable; an
    /// unbelievable one is dropped and the last good one kept.
    pub fn set_held_by(&self, proxies: Vec<String>) -> Result<(), HeldError> {
        validate_held(&proxies)?;
        *self.held_by.lock().unwrap_or_else(|p| p.into_inner()) = proxies;
        Ok(())
    }

    /// Keeps the agent's report of its leaf, checked; `Err` (and nothing kept) when it is out
    /// of bounds.
    pub fn set_report(&self, report: LeafReport) -> Result<(), ReportError> {
        report.validate()?;
        let record = AgentRecord::new(self.hello.version.clone(), self.hello.protocol, report);
        *self.report.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(record));
        Ok(())
    }

    /// The agent's last report, if it sent one.
    pub fn report(&self) -> Option<Arc<AgentRecord>> {
        self.report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The proxies the agent last reported holding tunnels to.
    pub fn held_by(&self) -> Vec<String> {
        self.held_by
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Checks the agent's certificate against `trust` again: `Err` once the trust no longer
    /// accepts it (its CA revoked or rotated out, the leaf forgotten, the certificate expired).
    pub fn verify(&self, trust: &TrustStore, now: SystemTime) -> Result<(), AuthError> {
        trust
            .verify_agent(self.cluster.as_str(), &self.certificate, now)
            .map(|_| ())
    }

    /// Whether the agent's certificate was signed by one of `cas`.
    pub fn signed_by(&self, cas: &[PublicKey]) -> bool {
        let signer = self.certificate.signature_key();
        cas.iter().any(|ca| ca.key_data() == signer)
    }

    /// Records a heartbeat now.
    pub fn heartbeat(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_heartbeat_ms.store(ms, Ordering::Release);
    }

    /// Time since the last heartbeat (or since connecting).
    pub fn since_heartbeat(&self) -> Duration {
        let last = Duration::from_millis(self.last_heartbeat_ms.load(Ordering::Acquire));
        self.epoch.elapsed().saturating_sub(last)
    }

    /// When the last heartbeat arrived, in wall-clock time.
    pub fn last_heartbeat(&self) -> SystemTime {
        SystemTime::now() - self.since_heartbeat()
    }

    /// A heartbeat is late when more than one interval and a half have passed.
    pub fn is_late(&self) -> bool {
        self.since_heartbeat() > self.interval + self.interval / 2
    }

    /// Offline: silent for `offline_after`.
    pub fn is_offline(&self) -> bool {
        self.since_heartbeat() > self.offline_after
    }

    /// Streams open now.
    pub fn open_streams(&self) -> usize {
        self.open_streams.load(Ordering::Acquire)
    }

    /// Resolves once no stream is open on this tunnel.
    pub async fn until_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Registered before the check, so an end between the two is not missed.
            notified.as_mut().enable();
            if self.open_streams() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Closes the agent's connection.
    pub async fn disconnect(&self, reason: &str) {
        let _ = self
            .handle
            .disconnect(
                russh::Disconnect::ByApplication,
                reason.to_owned(),
                String::new(),
            )
            .await;
    }

    /// Opens a stream to `endpoint` through this tunnel, within `timeout`. Returns early, as a
    /// path failure, if the tunnel is declared dead meanwhile.
    pub async fn dial(
        self: &Arc<Self>,
        endpoint: &Endpoint,
        client: SocketAddr,
        max_streams: usize,
        limits: StreamLimits,
        timeout: Duration,
    ) -> Result<ProxyStream, TunnelDialError> {
        let guard = StreamGuard::acquire(self, max_streams).map_err(TunnelDialError::Answer)?;
        let attempt = tokio::time::timeout(timeout, self.open_and_await(endpoint, client, limits));
        let stream = tokio::select! {
            r = attempt => match r {
                Ok(r) => r?,
                Err(_) => {
                    return Err(TunnelDialError::Answer(DialError::new(
                        DialErrorKind::TimedOut,
                        format!("the agent of {} did not answer the dial within {timeout:?}", self.cluster),
                    )));
                }
            },
            () = self.closed.cancelled() => return Err(self.died_pending()),
        };
        Ok(ProxyStream {
            stream,
            closed: self.closed.clone(),
            _guard: guard,
        })
    }

    /// Opens the channel and waits for the agent's answer (no deadline of its own).
    async fn open_and_await(
        &self,
        endpoint: &Endpoint,
        client: SocketAddr,
        limits: StreamLimits,
    ) -> Result<TunnelStream<Msg>, TunnelDialError> {
        let (address, port) = endpoint.to_wire();
        let open = self.handle.channel_open_forwarded_tcpip(
            address,
            port,
            client.ip().to_string(),
            u32::from(client.port()),
        );
        let channel = open.await.map_err(|e| {
            TunnelDialError::Path(DialError::new(
                DialErrorKind::NoTunnel,
                format!(
                    "tunnel {} to {} would not open a stream: {e}",
                    self.id, self.cluster
                ),
            ))
        })?;
        let (read, write) = channel.split();
        let share = self.share.clone();
        // The agent answers within its own dial timeout; the caller's deadline bounds the rest.
        match TunnelStream::await_dial(read, write, limits, share, Duration::MAX).await {
            Ok(stream) => Ok(stream),
            // A channel that ends without the agent's answer (kind `Other`) usually ended with
            // its connection, a moment before the control channel's reader declares the
            // tunnel dead: give that a moment, and call it a path failure if it happens.
            Err(e) if e.kind == DialErrorKind::Other => {
                match tokio::time::timeout(DEATH_NOTICE, self.closed.cancelled()).await {
                    Ok(()) => Err(self.died_pending()),
                    Err(_) => Err(TunnelDialError::Answer(e)),
                }
            }
            Err(e) => Err(TunnelDialError::Answer(e)),
        }
    }

    /// The path failure of a dial pending when the tunnel died.
    fn died_pending(&self) -> TunnelDialError {
        TunnelDialError::Path(DialError::new(
            DialErrorKind::NoTunnel,
            format!(
                "tunnel {} to {} was declared dead while the dial was pending",
                self.id, self.cluster
            ),
        ))
    }
}

/// Counts one open stream against its tunnel's limit for as long as it lives.
struct StreamGuard(Arc<Tunnel>);

impl StreamGuard {
    fn acquire(tunnel: &Arc<Tunnel>, max: usize) -> Result<Self, DialError> {
        let previous = tunnel.open_streams.fetch_add(1, Ordering::AcqRel);
        let guard = StreamGuard(tunnel.clone());
        if previous >= max {
            return Err(DialError::new(
                DialErrorKind::Other,
                format!(
                    "the tunnel to {} already carries {max} streams, its limit",
                    tunnel.cluster
                ),
            ));
        }
        Ok(guard)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.open_streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A stream through a tunnel, counted against the tunnel's limit until it ends.
pub struct ProxyStream {
    /// The channel, its dial answered.
    stream: TunnelStream<Msg>,
    /// The tunnel's: the stream ends (its local side dropped) when the tunnel is declared dead.
    closed: CancellationToken,
    /// Counts the stream against its tunnel.
    _guard: StreamGuard,
}

impl Splice for ProxyStream {
    async fn splice<L>(self, local: L) -> std::io::Result<()>
    where
        L: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let ProxyStream {
            stream,
            closed,
            _guard,
        } = self;
        tokio::select! {
            r = stream.splice(local) => r,
            // Dropping the splice drops the client's side: it sees the stream end now, not
            // when (if ever) the dead connection's channels are torn down.
            () = closed.cancelled() => Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the tunnel carrying the stream was declared dead",
            )),
        }
    }
}
