//! The proxy's side of a tunnel's control channel: hello, heartbeats, discovery and drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use russh::server::{Handle, Msg};
use russh::{Channel, ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

use super::peers::Peer;
use super::shared::ProxyShared;
use super::sites::{AgentHello, AuthenticatedAgent, Tunnel};
use crate::protocol::ProtocolVersion;
use crate::protocol::control::{AgentMessage, CaKeySet, ControlError, FrameReader, ProxyMessage};
use crate::stream::frames::{ChannelReadError, next_channel_message, send_message};
use futures::future::BoxFuture;

/// How often the full proxy list is re-sent even when nothing changed, so an agent that missed
/// one recovers.
pub const DISCOVERY_REFRESH: Duration = Duration::from_secs(120);

/// At most one warning per tunnel this often about an unbelievable `held` list: an agent that
/// sends one with every heartbeat must not flood the log.
const HELD_WARNING_EVERY: Duration = Duration::from_secs(300);

/// How long a refused agent has to read why and close before the proxy closes on it.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// Why a control channel ended.
#[derive(Debug, thiserror::Error)]
pub enum ControlEnd {
    #[error("the agent closed the control channel")]
    Closed,
    #[error("the agent left and its last stream has ended")]
    Left,
    #[error("no heartbeat for {0:?}")]
    MissedHeartbeats(Duration),
    /// A control message that could not be encoded or read.
    #[error("protocol error: {0}")]
    Frame(#[from] ControlError),
    /// The agent broke the protocol (what it did).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("the agent did not say hello within {0:?}")]
    NoHello(Duration),
    #[error("sending failed: {0}")]
    Send(#[from] russh::Error),
    #[error("the trust changed while the tunnel came up and no longer accepts it: {0}")]
    Untrusted(#[source] crate::identity::AuthError),
}

/// Runs one agent's control channel until it ends; the tunnel is registered for dials while it
/// runs.
pub(super) async fn run(
    shared: Arc<ProxyShared>,
    channel: Channel<Msg>,
    agent: AuthenticatedAgent,
    peer: SocketAddr,
    handle: Handle,
    ready: oneshot::Sender<super::shared::SetUp>,
) {
    let (mut read, write) = channel.split();
    let mut frames = FrameReader::default();
    let Some((hello, interval)) = greet(&shared, &agent, &mut read, &write, &mut frames).await
    else {
        return;
    };
    let policy = shared.config.heartbeat;
    let cluster = agent.cluster.clone();
    let protocol = hello.protocol;
    let tunnel = Arc::new(Tunnel::new(
        shared.sites.next_tunnel_id(),
        agent,
        hello,
        peer,
        handle,
        (interval, policy.missed),
        shared.config.stream.tunnel_share(shared.streams.clone()),
    ));
    let welcome = ProxyMessage::Welcome {
        proxy_id: shared.config.proxy_id.clone(),
        heartbeat_interval_ms: interval.as_millis() as u64,
        missed_heartbeats: policy.missed,
        protocol: spoken(protocol),
    };
    if let Err(e) = send(&write, &welcome).await {
        warn!(error = %e, "could not welcome the agent");
        return;
    }
    // Discovery right away: the agent learns how many proxies to hold with its first tunnel.
    // Subscribed first, and the set read through the subscription, so a change made while
    // the welcome goes out is announced too.
    let mut peers = shared.peers.subscribe();
    if let Err(e) = send_discovery(&mut peers, &write).await {
        warn!(error = %e, "could not send discovery");
        return;
    }
    tunnel.heartbeat();
    shared.sites.add(tunnel.clone());
    // Checked again once registered: a trust change from now on sees this tunnel, and one
    // made since the agent authenticated is seen here.
    let end = match tunnel.verify(&shared.config.trust.load(), SystemTime::now()) {
        Ok(()) => {
            let _ = ready.send(Ok(()));
            info!(tunnel = tunnel.id, ?interval, "tunnel online");
            serve(&shared, &tunnel, &mut read, &write, &mut frames, peers).await
        }
        Err(e) => ControlEnd::Untrusted(e),
    };
    shared.sites.remove_tunnel(&cluster, tunnel.id);
    // A tunnel its agent closed (killed, or given up waiting: the connection is gone either
    // way) lets russh deliver what its channels already hold: ending them here cut the last
    // bytes of streams a stopping replica had just finished. A tunnel whose agent left has no
    // stream left to end; closing it fails over a dial that picked it a moment ago. Any other
    // end is a dead path: nothing more will come on its streams.
    if !matches!(end, ControlEnd::Closed) {
        tunnel.close();
    }
    match &end {
        ControlEnd::Closed => info!(tunnel = tunnel.id, "tunnel closed by the agent"),
        ControlEnd::Left => info!(tunnel = tunnel.id, "the agent left; its streams have ended"),
        other => warn!(tunnel = tunnel.id, reason = %other, "tunnel closed"),
    }
    tunnel.disconnect(&end.to_string()).await;
}

/// Waits for the agent's hello and agrees on a protocol version and a heartbeat interval;
/// `None` (logged, and the agent told why when it is its version) when the agent cannot be
/// served.
async fn greet(
    shared: &ProxyShared,
    agent: &AuthenticatedAgent,
    read: &mut ChannelReadHalf,
    write: &ChannelWriteHalf<Msg>,
    frames: &mut FrameReader,
) -> Option<(AgentHello, Duration)> {
    let timeout = shared.config.limits.handshake_timeout;
    let (version, heartbeat_interval_ms, protocol) =
        match tokio::time::timeout(timeout, next_message(read, frames)).await {
            Ok(Ok(AgentMessage::Hello {
                version,
                heartbeat_interval_ms,
                protocol,
            })) => (
                version,
                heartbeat_interval_ms,
                ProtocolVersion::or_first(protocol),
            ),
            Ok(Ok(other)) => {
                warn!(?other, "agent did not start with hello; closing");
                return None;
            }
            Ok(Err(e)) => {
                warn!(error = %e, "control channel failed before hello");
                return None;
            }
            Err(_) => {
                warn!(error = %ControlEnd::NoHello(timeout), "closing");
                return None;
            }
        };
    debug!(%version, %protocol, heartbeat_interval_ms, "agent hello");
    match ProtocolVersion::agree(shared.config.protocol, protocol) {
        Ok(agreed) => {
            let interval = shared
                .config
                .heartbeat
                .negotiate(Duration::from_millis(heartbeat_interval_ms));
            Some((AgentHello::new(&version, agreed), interval))
        }
        Err(mismatch) => {
            let reason = format!("the proxy refused the agent (Tether {version}): {mismatch}");
            warn!(leaf = %agent.cluster, %reason, "closing");
            shared.sites.refused(&agent.cluster, reason.clone());
            if send(write, &ProxyMessage::Refused { reason }).await.is_ok() {
                // Closing at once could overtake the refusal (russh sends a channel's data
                // apart from the connection's own messages): the agent, once it has read
                // why, closes; one that does not is cut off after REFUSAL_LINGER.
                let closed = async { while read.wait().await.is_some() {} };
                let _ = tokio::time::timeout(REFUSAL_LINGER, closed).await;
            }
            None
        }
    }
}

/// The version a `Welcome` names: none for 1.0, which named none (so a proxy pinned to 1.0
/// writes exactly what protocol 1.0's releases wrote).
fn spoken(version: ProtocolVersion) -> Option<ProtocolVersion> {
    (version != ProtocolVersion::V1_0).then_some(version)
}

/// Serves the control channel until the tunnel ends.
///
/// An agent that says it is leaving (its replica stops) gets no new dial while the site has
/// another tunnel, and this proxy closes its tunnel once the last stream on it has ended: only
/// this side knows when every byte of those streams has arrived here (a stream ends here after
/// the agent's end of it, and counts from before its channel opened), so the agent waits for
/// this close rather than closing on its own count, which lost the tail of a stream that had
/// just ended (the agent's `Tunnel::run` tells how).
async fn serve(
    shared: &ProxyShared,
    tunnel: &Tunnel,
    read: &mut ChannelReadHalf,
    write: &ChannelWriteHalf<Msg>,
    frames: &mut FrameReader,
    mut peers: watch::Receiver<Vec<Peer>>,
) -> ControlEnd {
    let mut refresh = tokio::time::interval(DISCOVERY_REFRESH);
    refresh.reset();
    let mut draining = false;
    let mut held_warning = RateLimited::new(HELD_WARNING_EVERY);
    // A leaf's CA key set is checked and applied beside the heartbeats, never in their way
    // (applying it writes to the API server, for up to 10 s): one at a time per tunnel, and
    // a set arriving meanwhile replaces the one waiting, so an agent cannot queue work.
    let mut keys_waiting: Option<CaKeySet> = None;
    let mut keys_answer: Option<BoxFuture<'_, ProxyMessage>> = None;
    // The root's own keys, to an agent that can read them: now, and whenever they change.
    let mut root_keys = tunnel
        .hello
        .protocol
        .has(ProtocolVersion::V1_3)
        .then(|| shared.root_keys.subscribe());
    if let Some(set) = root_keys
        .as_mut()
        .and_then(|k| k.borrow_and_update().clone())
        && let Err(end) = send(write, &ProxyMessage::RootKeys((*set).clone())).await
    {
        return end;
    }
    loop {
        if keys_answer.is_none()
            && let Some(set) = keys_waiting.take()
        {
            keys_answer = Some(Box::pin(super::rotation::answer(
                shared,
                &tunnel.cluster,
                set,
            )));
        }
        let result: Result<(), ControlEnd> = tokio::select! {
            msg = read.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    let mut received = Received { held_warning: &mut held_warning, keys: &mut keys_waiting };
                    handle_data(&data, frames, shared, tunnel, write, &mut received).await
                }
                Some(ChannelMsg::Eof | ChannelMsg::Close) | None => Err(ControlEnd::Closed),
                Some(_) => Ok(()),
            },
            // Wakes exactly when the tunnel would go offline (re-armed on every message), so a
            // dead tunnel is declared dead after `offline_after`, not up to an interval later:
            // the dials pending on it wait that much less.
            () = tokio::time::sleep(until_offline(tunnel)) => {
                if tunnel.is_offline() {
                    Err(ControlEnd::MissedHeartbeats(tunnel.since_heartbeat()))
                } else {
                    Ok(())
                }
            }
            () = tunnel.until_idle(), if tunnel.is_leaving() => Err(ControlEnd::Left),
            Ok(()) = peers.changed() => send_discovery(&mut peers, write).await,
            _ = refresh.tick() => send_discovery(&mut peers, write).await,
            Some(set) = announced(&mut root_keys) => {
                send(write, &ProxyMessage::RootKeys((*set).clone())).await
            }
            answer = settled(&mut keys_answer) => {
                keys_answer = None;
                send(write, &answer).await
            }
            () = shared.draining.cancelled(), if !draining => {
                draining = true;
                let reason = "proxy is shutting down".to_owned();
                send(write, &ProxyMessage::Reconnect { reason }).await
            }
        };
        if let Err(end) = result {
            return end;
        }
    }
}

/// Time left until `tunnel` counts as offline, and a millisecond more so it then does.
fn until_offline(tunnel: &Tunnel) -> Duration {
    tunnel
        .offline_after
        .saturating_sub(tunnel.since_heartbeat())
        + Duration::from_millis(1)
}

/// The output of `pending`, once there is one; never while there is none.
async fn settled<T>(pending: &mut Option<BoxFuture<'_, T>>) -> T {
    match pending {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

/// The root's key set once it changes to one (`None` when it was withdrawn); never when
/// there is nothing to follow.
async fn announced(
    keys: &mut Option<watch::Receiver<Option<Arc<CaKeySet>>>>,
) -> Option<Arc<CaKeySet>> {
    let Some(watched) = keys.as_mut() else {
        return std::future::pending().await;
    };
    if watched.changed().await.is_err() {
        *keys = None;
        return None;
    }
    watched.borrow_and_update().clone()
}

/// What the agent's messages leave for the control loop.
struct Received<'a> {
    /// Paces the warning about a bad list of held proxies.
    held_warning: &'a mut RateLimited,
    /// The latest CA key set received and not yet being answered.
    keys: &'a mut Option<CaKeySet>,
}

async fn handle_data(
    data: &[u8],
    frames: &mut FrameReader,
    shared: &ProxyShared,
    tunnel: &Tunnel,
    write: &ChannelWriteHalf<Msg>,
    received: &mut Received<'_>,
) -> Result<(), ControlEnd> {
    frames.push(data)?;
    while let Some(msg) = frames.next_message::<AgentMessage>()? {
        match msg {
            AgentMessage::Ping { seq, held } => {
                tunnel.heartbeat();
                shared.metrics.heartbeats.inc();
                if let Err(e) = tunnel.set_held_by(held)
                    && received.held_warning.allow()
                {
                    warn!(tunnel = tunnel.id, cluster = %tunnel.cluster, error = %e, "ignored the agent's list of held proxies");
                }
                send(write, &ProxyMessage::Pong { seq }).await?;
            }
            AgentMessage::ReconnectAck => debug!(tunnel = tunnel.id, "agent acknowledged drain"),
            AgentMessage::Leaving => {
                info!(
                    tunnel = tunnel.id,
                    "the agent is leaving; no new dials on its tunnel"
                );
                tunnel.set_leaving();
            }
            AgentMessage::Hello { .. } => {
                return Err(ControlEnd::Protocol("a second hello"));
            }
            AgentMessage::Report(_) if !tunnel.hello.protocol.has(ProtocolVersion::V1_1) => {
                return Err(ControlEnd::Protocol(
                    "a report before protocol 1.1 was agreed",
                ));
            }
            AgentMessage::CaKeys(_) if !tunnel.hello.protocol.has(ProtocolVersion::V1_2) => {
                return Err(ControlEnd::Protocol(
                    "CA keys before protocol 1.2 was agreed",
                ));
            }
            AgentMessage::CaKeys(set) => *received.keys = Some(set),
            AgentMessage::Report(report) => match tunnel.set_report(report) {
                Ok(()) => shared.sites.reported(tunnel),
                Err(e) => {
                    warn!(tunnel = tunnel.id, cluster = %tunnel.cluster, error = %e, "ignored the agent's report")
                }
            },
        }
    }
    Ok(())
}

async fn send_discovery(
    peers: &mut watch::Receiver<Vec<Peer>>,
    write: &ChannelWriteHalf<Msg>,
) -> Result<(), ControlEnd> {
    let proxies = peers.borrow_and_update().iter().map(|p| p.info()).collect();
    send(write, &ProxyMessage::Discovery { proxies }).await
}

async fn send(write: &ChannelWriteHalf<Msg>, msg: &ProxyMessage) -> Result<(), ControlEnd> {
    send_message(write, msg).await
}

/// Reads until one whole agent message has arrived.
async fn next_message(
    read: &mut ChannelReadHalf,
    frames: &mut FrameReader,
) -> Result<AgentMessage, ControlEnd> {
    Ok(next_channel_message(read, frames).await?)
}

impl From<ChannelReadError> for ControlEnd {
    fn from(e: ChannelReadError) -> Self {
        match e {
            ChannelReadError::Closed => ControlEnd::Closed,
            ChannelReadError::Refused => {
                ControlEnd::Protocol("the agent refused a channel request")
            }
            ChannelReadError::Frame(e) => ControlEnd::Frame(e),
        }
    }
}

/// Lets something happen at most once per period (the first time at once).
struct RateLimited {
    /// The shortest time between two occurrences.
    every: Duration,
    /// When it last happened; `None` until the first time.
    last: Option<Instant>,
}

impl RateLimited {
    fn new(every: Duration) -> Self {
        Self { every, last: None }
    }

    /// Whether it may happen now; if so, the period starts again.
    fn allow(&mut self) -> bool {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < self.every)
        {
            return false;
        }
        self.last = Some(now);
        true
    }
}
