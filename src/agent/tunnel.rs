//! One agent connection to one proxy: authenticate both ways, keep heartbeats, and leave
//! cleanly (the proxy closes a leaving agent's tunnel once its streams have ended: see
//! [`Tunnel::run`]). The dials the proxy opens are served by `super::handler`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::client::{self, Handle, Msg};
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::claims::{Claim, Claims};
use super::config::AgentConfig;
use super::error::TunnelError;
use super::handler::AgentHandler;
use super::status::{CaKeysVerdict, RootKeys};
use crate::identity::{PublicKey, keyset};
use crate::protocol::ClusterName;
use crate::protocol::ProtocolVersion;
use crate::protocol::control::{
    AgentMessage, CONTROL_SUBSYSTEM, CaKeySet, FrameReader, LeafReport, ProxyInfo, ProxyMessage,
};
use crate::protocol::{busy, ssh};
use crate::stream::frames::{next_channel_message, send_message};
use crate::transport::{self, Opened, Used};

/// How long a refused agent waits for the proxy's disconnect that says why.
const REFUSAL_REASON_WAIT: Duration = Duration::from_secs(1);

/// How long a stopping agent lets its streams in flight finish before it closes a tunnel
/// itself (within the operator's stop grace and a pod's 30 s termination grace). Normally the
/// proxy closes it first, as soon as its last stream has ended (see [`Tunnel::run`]).
pub const LEAVE_GRACE: Duration = Duration::from_secs(10);
/// How long after the root refused the leaf's CA key set it is sent again: a refusal may
/// pass (an API server that was away), and one that lasts costs the proxy one signature check
/// per tunnel this often.
const CA_KEYS_RETRY: Duration = Duration::from_secs(30);

/// What a tunnel reports while it lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelEvent {
    /// The hello completed; dials may arrive.
    Connected { proxy_id: String },
    /// The proxy announced the proxies of its cluster.
    Discovery {
        proxy_id: String,
        proxies: Vec<ProxyInfo>,
    },
    /// The proxy is draining: it will close the tunnel once its streams finish.
    Draining { proxy_id: String },
    /// The proxy answered a heartbeat.
    Heartbeat { proxy_id: String },
    /// The root answered the leaf's CA key set.
    CaKeys(CaKeysVerdict),
    /// A proxy announced the root's CA keys, and they verified.
    RootKeys(RootKeys),
}

/// A tunnel whose hello completed.
pub struct Tunnel {
    /// The proxy this tunnel reached.
    pub proxy_id: String,
    /// Keeps the proxy claimed for as long as the tunnel lives.
    _claim: Option<Claim>,
    /// The proxies the agent holds, reported with every heartbeat.
    held: Option<watch::Receiver<Vec<String>>>,
    /// The agent's report of its leaf, sent when the tunnel comes up and whenever it changes
    /// (only to a proxy that speaks protocol 1.1).
    leaf_report: Option<watch::Receiver<Arc<LeafReport>>>,
    /// The leaf's CA key set to publish, sent when the tunnel comes up and whenever it
    /// changes (only to a proxy that speaks protocol 1.2).
    ca_keys: Option<watch::Receiver<Option<Arc<CaKeySet>>>>,
    /// The control protocol version agreed with the proxy.
    pub protocol: ProtocolVersion,
    /// What carries SSH to the proxy (TLS by ALPN, WebSocket, ...): the agent says which.
    pub carrier: Used,
    /// The root cluster and the CA keys the agent trusts for it: who may sign the root's key
    /// sets.
    root: Arc<(ClusterName, Vec<PublicKey>)>,
    handle: Handle<AgentHandler>,
    read: ChannelReadHalf,
    write: ChannelWriteHalf<Msg>,
    frames: FrameReader,
    interval: Duration,
    missed: u32,
    tasks: TaskTracker,
    /// Where heartbeat round trips are counted.
    heartbeat_rtt: prometheus_client::metrics::histogram::Histogram,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("proxy_id", &self.proxy_id)
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl Tunnel {
    /// Dials the proxy address, authenticates both ways and completes the control hello.
    pub async fn connect(config: Arc<AgentConfig>) -> Result<Tunnel, TunnelError> {
        Self::connect_claiming(config, None).await
    }

    /// Like [`Tunnel::connect`], but refuses, during key exchange, a proxy already in `claims`,
    /// and claims the one it reaches for the tunnel's lifetime.
    pub async fn connect_claiming(
        config: Arc<AgentConfig>,
        claims: Option<Claims>,
    ) -> Result<Tunnel, TunnelError> {
        let deadline = config.connect_timeout;
        tokio::time::timeout(deadline, Self::connect_inner(config, claims))
            .await
            .map_err(|_| TunnelError::Timeout(deadline))?
    }

    async fn connect_inner(
        config: Arc<AgentConfig>,
        claims: Option<Claims>,
    ) -> Result<Tunnel, TunnelError> {
        check_own_certificate(&config.identity.certificate)?;
        let opened = transport::open(&config.route, &config.proxy_addr).await?;
        if let Some(via) = &opened.via {
            debug!(proxy = %config.proxy_addr, via = %via, "through the forward proxy");
        }
        let (opened, first) =
            opened
                .read_ahead(BUSY_PEEK)
                .await
                .map_err(|source| TunnelError::Connect {
                    addr: config.proxy_addr.clone(),
                    source,
                })?;
        if let Some(retry) = busy::parse_busy(&first) {
            return Err(TunnelError::Busy(retry));
        }
        // russh's session task owns the socket once the version is exchanged; if the deadline
        // in `connect_claiming` drops this future mid-handshake, the guard's drop shuts the
        // socket down so that task (and the socket) ends too instead of leaking.
        let Opened {
            io: socket,
            guard,
            carrier,
            ..
        } = opened;
        let ssh_config = Arc::new(ssh::client_config());
        let verdict = Arc::new(Mutex::new(None));
        let tasks = TaskTracker::new();
        let (proxy_said, reason) = oneshot::channel();
        let handler = AgentHandler {
            config: config.clone(),
            verdict: verdict.clone(),
            claims,
            tasks: tasks.clone(),
            share: config.stream.tunnel_share(config.metrics.streams.clone()),
            proxy_said: Some(proxy_said),
        };
        let take_verdict = || verdict.lock().unwrap_or_else(|p| p.into_inner()).take();
        let mut handle = match client::connect_stream(ssh_config, socket, handler).await {
            Ok(h) => h,
            Err(e) => {
                return Err(match take_verdict() {
                    Some(Err(refusal)) => refusal,
                    _ => TunnelError::Ssh(e),
                });
            }
        };
        let (proxy_id, claim) = match take_verdict() {
            Some(Ok(v)) => v,
            Some(Err(refusal)) => return Err(refusal),
            None => {
                return Err(TunnelError::Protocol(
                    "the proxy's identity was not verified",
                ));
            }
        };
        let identity = &config.identity;
        let auth = handle
            .authenticate_openssh_cert(
                config.cluster.as_str(),
                Arc::new(identity.key.clone()),
                identity.certificate.clone(),
            )
            .await?;
        if !auth.success() {
            // The proxy follows its refusal with a disconnect that says why; an older one may
            // not, so the wait is short.
            let said = tokio::time::timeout(REFUSAL_REASON_WAIT, reason).await;
            return Err(TunnelError::AuthRefused(said.ok().and_then(Result::ok)));
        }
        let channel = handle.channel_open_session().await?;
        channel.request_subsystem(true, CONTROL_SUBSYSTEM).await?;
        let (mut read, write) = channel.split();
        let hello = AgentMessage::Hello {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            heartbeat_interval_ms: config.heartbeat_interval.as_millis() as u64,
            // None for 1.0, which named none: a pinned agent writes what protocol 1.0's releases wrote.
            protocol: (config.protocol != ProtocolVersion::V1_0).then_some(config.protocol),
        };
        send(&write, &hello).await?;
        let mut frames = FrameReader::default();
        let (interval, missed, protocol) = loop {
            match next_message(&mut read, &mut frames).await? {
                ProxyMessage::Welcome {
                    heartbeat_interval_ms,
                    missed_heartbeats,
                    protocol,
                    ..
                } => {
                    let proxy = ProtocolVersion::or_first(protocol);
                    let agreed = ProtocolVersion::agree(proxy, config.protocol)
                        .map_err(TunnelError::Version)?;
                    break (
                        Duration::from_millis(heartbeat_interval_ms.max(1)),
                        missed_heartbeats.max(1),
                        agreed,
                    );
                }
                ProxyMessage::Refused { reason } => return Err(TunnelError::ProxyRefused(reason)),
                other => debug!(?other, "ignored before welcome"),
            }
        };
        guard.release();
        info!(proxy = %proxy_id, ?interval, %protocol, %carrier, "tunnel connected");
        Ok(Tunnel {
            proxy_id,
            carrier,
            _claim: claim,
            held: None,
            leaf_report: None,
            ca_keys: Some(config.ca_keys.clone()).filter(|_| protocol.has(ProtocolVersion::V1_2)),
            protocol,
            root: Arc::new((config.root_cluster.clone(), config.root_cas.clone())),
            handle,
            read,
            write,
            frames,
            interval,
            missed,
            tasks,
            heartbeat_rtt: config.metrics.heartbeat_rtt.clone(),
        })
    }

    /// Reports the proxies in `held` with every heartbeat.
    pub fn report_held(mut self, held: watch::Receiver<Vec<String>>) -> Self {
        self.held = Some(held);
        self
    }

    /// Sends the proxy `report` now and whenever it changes, if the proxy speaks 1.1.
    pub fn report_leaf(mut self, report: watch::Receiver<Arc<LeafReport>>) -> Self {
        self.leaf_report = Some(report).filter(|_| self.protocol.has(ProtocolVersion::V1_1));
        self
    }

    /// Keeps heartbeats until the tunnel fails, the proxy drains it, or `stop` is cancelled.
    /// Discovery announcements go to `events`.
    ///
    /// # A clean stop loses no byte
    ///
    /// When `stop` is cancelled the agent tells the proxy it is leaving and keeps the tunnel
    /// (heartbeats included) until the *proxy* closes it, which the proxy does once the last
    /// stream it carries on this tunnel has ended, or until [`LEAVE_GRACE`] has passed. The
    /// proxy is the side that can tell: its end of a stream ends only after it has received
    /// the agent's end and written out everything before it, and it counts the dials it sent
    /// before it read `Leaving`.
    ///
    /// ```text
    ///  agent ── Leaving ──▶ proxy: no new dial here; open streams 2 … 1 … 0 ── DISCONNECT ──▶
    ///  agent: streams finish, heartbeats go on ───────────────────────────── session ends
    /// ```
    ///
    /// Before, the agent closed the tunnel as soon as its own streams had ended, and lost
    /// bytes (1 long stream in 12 across a rolling restart, each ending cleanly without its
    /// tail): russh's client queues the messages of channels the proxy opened apart from its
    /// own, so the `disconnect` could overtake a finished stream's last data; and a proxy
    /// stream still writing out what it had received failed on its first credit grant to the
    /// closed connection and dropped the rest (`tests/tunnel/leaving.rs`).
    pub async fn run(
        mut self,
        stop: CancellationToken,
        events: Option<mpsc::Sender<TunnelEvent>>,
    ) -> Result<(), TunnelError> {
        let result = self.heartbeat_loop(&stop, events.as_ref()).await;
        let reason = match &result {
            Ok(()) => "agent stopping".to_owned(),
            Err(e) => e.to_string(),
        };
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, &reason, "")
            .await;
        self.tasks.close();
        result
    }

    /// `report` as this proxy may read it: without the root keys before protocol 1.3.
    fn report_message(&self, report: &LeafReport) -> AgentMessage {
        let mut report = report.clone();
        if !self.protocol.has(ProtocolVersion::V1_3) {
            report.root_keys.clear();
        }
        AgentMessage::Report(report)
    }

    /// Sends the key set `ca_keys` holds now, if any, and marks it seen.
    async fn publish_ca_keys(
        &self,
        ca_keys: &mut Option<watch::Receiver<Option<Arc<CaKeySet>>>>,
    ) -> Result<(), TunnelError> {
        if let Some(keys) = ca_keys.as_mut() {
            keys.mark_unchanged();
        }
        self.send_ca_keys(ca_keys).await
    }

    /// Sends the key set `ca_keys` holds, if any.
    async fn send_ca_keys(
        &self,
        ca_keys: &Option<watch::Receiver<Option<Arc<CaKeySet>>>>,
    ) -> Result<(), TunnelError> {
        let Some(set) = ca_keys.as_ref().and_then(|k| k.borrow().clone()) else {
            return Ok(());
        };
        send(&self.write, &AgentMessage::CaKeys((*set).clone())).await
    }

    /// Passes the root's key set on, if one of the root CA keys the agent trusts signed it.
    async fn root_keys_announced(
        &self,
        set: &CaKeySet,
        events: Option<&mpsc::Sender<TunnelEvent>>,
    ) {
        let (cluster, trusted) = &*self.root;
        match keyset::verify(set, cluster, trusted, 0) {
            Ok(verified) => {
                let keys = verified
                    .keys
                    .iter()
                    .filter_map(|k| k.to_openssh().ok())
                    .collect();
                let root_keys = RootKeys {
                    issued_at: verified.issued_at,
                    keys,
                };
                if let Some(tx) = events {
                    let _ = tx.send(TunnelEvent::RootKeys(root_keys)).await;
                }
            }
            Err(e) => {
                warn!(proxy = %self.proxy_id, error = %e, "ignored the root's CA key set")
            }
        }
    }

    /// Tells the proxy the agent is leaving; returns when to stop waiting for the proxy to
    /// close the tunnel.
    async fn start_leaving(&self) -> Result<tokio::time::Instant, TunnelError> {
        send(&self.write, &AgentMessage::Leaving).await?;
        info!(proxy = %self.proxy_id, open = self.tasks.len(), "leaving: the proxy closes the tunnel once its streams have ended");
        Ok(tokio::time::Instant::now() + LEAVE_GRACE)
    }

    async fn heartbeat_loop(
        &mut self,
        stop: &CancellationToken,
        events: Option<&mpsc::Sender<TunnelEvent>>,
    ) -> Result<(), TunnelError> {
        let mut ticker = tokio::time::interval(self.interval);
        let mut seq = 0u64;
        let mut last_pong = Instant::now();
        // The last ping sent, to time its pong.
        let mut in_flight: Option<(u64, Instant)> = None;
        let stale_after = self.interval * self.missed;
        // Set when the proxy asked us to leave: keep serving the streams in flight until it
        // closes the tunnel, but take no new ones (the proxy sends none).
        let mut draining: Option<String> = None;
        let mut held = self.held.take();
        let mut leaf_report = self.leaf_report.take();
        if let Some(report) = leaf_report.as_mut() {
            let first = report.borrow_and_update().clone();
            send(&self.write, &self.report_message(&first)).await?;
        }
        let mut ca_keys = self.ca_keys.take();
        self.publish_ca_keys(&mut ca_keys).await?;
        // Set when the root refused the key set: when to send it again (the refusal may pass:
        // an API server that was away, a record that kept changing).
        let mut resend_keys: Option<tokio::time::Instant> = None;
        if let Some(tx) = events {
            let _ = tx
                .send(TunnelEvent::Connected {
                    proxy_id: self.proxy_id.clone(),
                })
                .await;
        }
        // Set once the agent said it leaves: when it stops waiting for the proxy to close.
        let mut leaving: Option<tokio::time::Instant> = None;
        loop {
            let give_up = leaving.unwrap_or_else(far_future);
            tokio::select! {
                () = stop.cancelled(), if leaving.is_none() => {
                    leaving = Some(self.start_leaving().await?);
                }
                () = tokio::time::sleep_until(give_up), if leaving.is_some() => {
                    warn!(proxy = %self.proxy_id, open = self.tasks.len(), "the proxy did not close the tunnel within the leave grace; closing it");
                    return Ok(());
                }
                _ = ticker.tick() => {
                    if last_pong.elapsed() > stale_after {
                        return Err(TunnelError::Stale(last_pong.elapsed()));
                    }
                    seq += 1;
                    let report = held.as_mut().map(|h| h.borrow_and_update().clone()).unwrap_or_default();
                    in_flight = Some((seq, Instant::now()));
                    send(&self.write, &AgentMessage::Ping { seq, held: report }).await.map_err(|e| drained_or(e, &draining))?;
                }
                // The set of held proxies changed: tell this proxy now rather than at the next
                // heartbeat, so status views are current.
                changed = changed(&held) => {
                    if !changed {
                        held = None;
                        continue;
                    }
                    seq += 1;
                    let report = held.as_mut().map(|h| h.borrow_and_update().clone()).unwrap_or_default();
                    send(&self.write, &AgentMessage::Ping { seq, held: report }).await.map_err(|e| drained_or(e, &draining))?;
                }
                // The leaf changed (its allow-list, its Kubernetes version): tell the proxy at
                // once, so it never refuses from an old list what the leaf now permits for
                // longer than the message takes.
                changed = changed(&leaf_report) => {
                    let Some(report) = leaf_report.as_mut().filter(|_| changed) else {
                        leaf_report = None;
                        continue;
                    };
                    let next = report.borrow_and_update().clone();
                    send(&self.write, &self.report_message(&next)).await.map_err(|e| drained_or(e, &draining))?;
                }
                // A rotation's new key set: to the root at once.
                changed = changed(&ca_keys) => {
                    if !changed {
                        ca_keys = None;
                        continue;
                    }
                    resend_keys = None;
                    self.publish_ca_keys(&mut ca_keys).await.map_err(|e| drained_or(e, &draining))?;
                }
                () = tokio::time::sleep_until(resend_keys.unwrap_or_else(far_future)), if resend_keys.is_some() => {
                    resend_keys = None;
                    self.send_ca_keys(&ca_keys).await.map_err(|e| drained_or(e, &draining))?;
                }
                msg = self.read.wait() => {
                    let data = match msg {
                        Some(ChannelMsg::Data { data }) => data,
                        Some(ChannelMsg::Eof | ChannelMsg::Close) | None if leaving.is_some() => {
                            info!(proxy = %self.proxy_id, "the proxy closed the tunnel: its streams on it have ended (or it went away)");
                            return Ok(());
                        }
                        Some(ChannelMsg::Eof | ChannelMsg::Close) | None => {
                            return Err(match draining.take() {
                                Some(reason) => TunnelError::Drained(reason),
                                None => TunnelError::Closed,
                            });
                        }
                        Some(_) => continue,
                    };
                    self.frames.push(&data)?;
                    while let Some(msg) = self.frames.next_message::<ProxyMessage>()? {
                        match msg {
                            ProxyMessage::Pong { seq: answered } => {
                                last_pong = Instant::now();
                                if let Some(tx) = events {
                                    // Lossy on purpose: a full queue must never delay heartbeats.
                                    let _ = tx.try_send(TunnelEvent::Heartbeat { proxy_id: self.proxy_id.clone() });
                                }
                                if let Some((_, sent_at)) = in_flight.take_if(|(s, _)| *s == answered) {
                                    self.heartbeat_rtt.observe(sent_at.elapsed().as_secs_f64());
                                }
                            }
                            ProxyMessage::Discovery { proxies } => {
                                if let Some(tx) = events {
                                    let event = TunnelEvent::Discovery { proxy_id: self.proxy_id.clone(), proxies };
                                    let _ = tx.send(event).await;
                                }
                            }
                            ProxyMessage::Reconnect { reason } => {
                                info!(proxy = %self.proxy_id, %reason, "proxy is draining; finishing its streams");
                                draining = Some(reason);
                                send(&self.write, &AgentMessage::ReconnectAck).await.map_err(|e| drained_or(e, &draining))?;
                                if let Some(tx) = events {
                                    let _ = tx.send(TunnelEvent::Draining { proxy_id: self.proxy_id.clone() }).await;
                                }
                            }
                            ProxyMessage::Welcome { .. } => {
                                return Err(TunnelError::Protocol("a second welcome"));
                            }
                            ProxyMessage::Refused { reason } => {
                                return Err(TunnelError::ProxyRefused(reason));
                            }
                            ProxyMessage::RootKeys(set) => self.root_keys_announced(&set, events).await,
                            ProxyMessage::CaKeysAnswer { issued_at, refused } => {
                                match &refused {
                                    None => info!(proxy = %self.proxy_id, issued_at, "the root trusts the leaf's CA key set"),
                                    Some(why) => warn!(proxy = %self.proxy_id, issued_at, reason = %why, "the root refused the leaf's CA key set"),
                                }
                                resend_keys = refused.as_ref().map(|_| tokio::time::Instant::now() + CA_KEYS_RETRY);
                                if let Some(tx) = events {
                                    let _ = tx.send(TunnelEvent::CaKeys(CaKeysVerdict { issued_at, refused })).await;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `error`, unless the proxy asked the agent to leave: then a failed send is the drain
/// completing (the proxy closed the tunnel as it went), not a lost tunnel.
fn drained_or(error: TunnelError, draining: &Option<String>) -> TunnelError {
    match draining {
        Some(reason) => TunnelError::Drained(reason.clone()),
        None => error,
    }
}

/// Waits for `watched` to change: `true` when it did, `false` once its sender is gone (then
/// the caller stops watching), never when there is nothing to watch.
async fn changed<T>(watched: &Option<watch::Receiver<T>>) -> bool {
    match watched.clone().as_mut() {
        Some(w) => w.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// A deadline that never comes, for a `sleep_until` arm that is disabled.
fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400 * 365)
}

/// How many of the proxy's first bytes are read to see whether they are its busy line (see
/// [`busy`]): read ahead and put back (`transport::Opened::read_ahead`), so russh still reads
/// the version string of a proxy that is not busy, on a direct route and through a forward
/// proxy alike. The end of the stream is left for russh to report.
const BUSY_PEEK: usize = 64;

/// The proxy will refuse a certificate outside its validity window; say so on the agent's side
/// too, where the operator who must renew it is looking.
/// Refuses to dial with a certificate outside its validity: every proxy would refuse it (russh
/// checks the dates before any handler sees the certificate, so the proxy could not say why),
/// and the agent knows why without asking.
fn check_own_certificate(cert: &russh::keys::Certificate) -> Result<(), TunnelError> {
    let now = std::time::SystemTime::now();
    let at = |t: std::time::SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    let problem = match (cert.valid_after_time(), cert.valid_before_time()) {
        (_, Some(until)) if now > until => format!("expired at {}: issue a new one", at(until)),
        (Some(from), _) if now < from => {
            format!("is not valid before {}: check the clock", at(from))
        }
        _ => return Ok(()),
    };
    warn!(key_id = cert.key_id(), %problem, "the agent's certificate cannot be used");
    Err(TunnelError::OwnCertificate(format!(
        "the agent's certificate {:?} {problem}",
        cert.key_id()
    )))
}

async fn send(write: &ChannelWriteHalf<Msg>, msg: &AgentMessage) -> Result<(), TunnelError> {
    send_message(write, msg).await
}

async fn next_message(
    read: &mut ChannelReadHalf,
    frames: &mut FrameReader,
) -> Result<ProxyMessage, TunnelError> {
    Ok(next_channel_message(read, frames).await?)
}
