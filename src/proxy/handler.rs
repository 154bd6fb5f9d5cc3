//! The SSH side of one connection to the proxy: who the peer is, and what it may open.
//!
//! Agents (user certificates from a trusted leaf CA, role `agent`) may open one control channel.
//! Clients (user certificates from this cluster's own CA, role `client`) may open `direct-tcpip`
//! channels to `HOST.CLUSTER.tether` targets, as `ssh -W` does. A joining leaf (user
//! [`JOIN_USER`], no key, only when joins are enabled) may open one join channel. Everything
//! else is refused.
//!
//! What a peer may make the proxy hold before it has proved anything is bounded: a joiner gets
//! one session channel and one subsystem request, an agent [`MAX_PENDING_SESSIONS`] session
//! channels until its control channel starts. A refused channel is handed back to russh at once
//! (nothing is kept), and a peer that keeps asking ([`MAX_REFUSED_OPENS`] refusals) is
//! disconnected: 20,000 channel opens on one connection once cost the proxy 40 MB.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use russh::keys::Certificate;
use russh::server::{Auth, Handler, Msg, Session};
use russh::{Channel, ChannelId, ChannelOpenFailure};
use tokio::sync::oneshot;
use tracing::{Instrument, info, info_span, warn};

use super::Dialer;
use super::access::Who;
use super::audit::{DialAudit, Via};
use super::clients::ClientRegistration;
use super::dialer::ProxyDialer;
use super::peers::PEER_ORIGINATOR;
use super::shared::{ProxyShared, SetUp};
use super::sites::AuthenticatedAgent;
use crate::identity::{ROLE_EXTENSION, Role, groups_of};
use crate::protocol::Target;
use crate::protocol::control::CONTROL_SUBSYSTEM;
use crate::protocol::join::{JOIN_SUBSYSTEM, JOIN_USER};
use crate::stream::Splice;

/// Session channels an agent may hold open before its control channel starts. It needs one;
/// one more covers a retry after a refused subsystem request.
pub const MAX_PENDING_SESSIONS: usize = 2;

/// Channel opens and requests refused on one connection before the proxy hangs up: enough for
/// a confused but honest peer to see its errors, far too few to cost memory.
pub const MAX_REFUSED_OPENS: u32 = 16;

/// Who authenticated on a connection.
enum Peer {
    /// An agent, with the certificate it authenticated with (checked again when it starts its
    /// control channel, and on every trust change after that).
    Agent(Box<AuthenticatedAgent>),
    /// A root-side client, with its certificate, checked again on every channel it opens.
    Client {
        /// The name its certificate carries.
        name: String,
        /// What it authenticated with.
        certificate: Box<Certificate>,
    },
    /// A leaf presenting a join token; nothing is known about it yet.
    Joiner,
}

impl Peer {
    /// For logs: the role and name, never the certificate.
    fn describe(&self) -> String {
        match self {
            Peer::Agent(agent) => format!("agent of {}", agent.cluster),
            Peer::Client { name, .. } => format!("client {name}"),
            Peer::Joiner => "joiner".to_owned(),
        }
    }
}

/// Per-connection SSH handler.
pub(super) struct ConnectionHandler {
    shared: Arc<ProxyShared>,
    peer_addr: SocketAddr,
    peer: Option<Peer>,
    /// Fired when the connection is fully set up (agent hello done, or client authenticated),
    /// which ends its handshake deadline, or refused with a reason the peer may be told.
    ready: Option<oneshot::Sender<SetUp>>,
    /// Session channels opened but not yet turned into the control channel (at most
    /// [`MAX_PENDING_SESSIONS`]).
    sessions: HashMap<ChannelId, Channel<Msg>>,
    /// An agent gets one control channel, a joiner one join channel.
    control_started: bool,
    /// Channel opens and requests refused so far; at [`MAX_REFUSED_OPENS`] the peer is cut off.
    refused: u32,
    /// A client's place among the sessions a trust change re-checks, from its first stream on
    /// (dropped with the handler when the connection ends).
    registration: Option<ClientRegistration>,
}

impl ConnectionHandler {
    pub(super) fn new(
        shared: Arc<ProxyShared>,
        peer_addr: SocketAddr,
        ready: oneshot::Sender<SetUp>,
    ) -> Self {
        Self {
            shared,
            peer_addr,
            peer: None,
            ready: Some(ready),
            sessions: HashMap::new(),
            control_started: false,
            refused: 0,
            registration: None,
        }
    }

    /// Whether the peer may open one more session channel now.
    fn may_open_session(&self) -> bool {
        match self.peer {
            Some(Peer::Agent(_)) => {
                !self.control_started && self.sessions.len() < MAX_PENDING_SESSIONS
            }
            // One channel, ever: the join runs on it.
            Some(Peer::Joiner) => !self.control_started && self.sessions.is_empty(),
            _ => false,
        }
    }

    /// Refuses a channel open (russh drops the channel) and counts it; disconnects a peer that
    /// has been refused too often.
    async fn refuse_open(
        &mut self,
        what: &str,
        reply: russh::server::ChannelOpenHandle,
        reason: ChannelOpenFailure,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        reply.reject(reason).await;
        self.count_refusal(what, session)
    }

    /// Counts a refused open or request; past [`MAX_REFUSED_OPENS`], hangs up.
    fn count_refusal(&mut self, what: &str, session: &mut Session) -> Result<(), russh::Error> {
        self.refused += 1;
        let peer = self
            .peer
            .as_ref()
            .map_or_else(|| "unauthenticated".into(), Peer::describe);
        if self.refused < MAX_REFUSED_OPENS {
            if self.refused == 1 {
                warn!(peer = %self.peer_addr, who = %peer, what, "refused");
            }
            return Ok(());
        }
        warn!(peer = %self.peer_addr, who = %peer, what, refused = self.refused, "disconnecting a peer that keeps asking for what it may not have");
        session.disconnect(
            russh::Disconnect::ByApplication,
            "too many refused channel requests",
            "",
        )
    }
}

impl Handler for ConnectionHandler {
    type Error = russh::Error;

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        if user == JOIN_USER && self.shared.config.join.is_some() {
            self.peer = Some(Peer::Joiner);
            return Ok(Auth::Accept);
        }
        Ok(Auth::reject())
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        _key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        warn!(peer = %self.peer_addr, user, "refused a bare public key: certificates only");
        Ok(Auth::reject())
    }

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        certificate: &Certificate,
    ) -> Result<Auth, Self::Error> {
        let now = SystemTime::now();
        let trust = self.shared.config.trust.load();
        let agent = trust.verify_agent(user, certificate, now);
        let peer = match agent {
            Ok(cluster) => Peer::Agent(Box::new(AuthenticatedAgent {
                cluster,
                certificate: certificate.clone(),
            })),
            Err(agent_error) => {
                match trust.verify_client(&self.shared.config.cluster, user, certificate, now) {
                    Ok(name) => Peer::Client {
                        name,
                        certificate: Box::new(certificate.clone()),
                    },
                    Err(client_error) => {
                        // Tell the peer about the role its certificate claims.
                        let role = certificate.extensions().get(ROLE_EXTENSION);
                        let error = if role.map(String::as_str) == Some(Role::Client.as_str()) {
                            client_error
                        } else {
                            agent_error
                        };
                        warn!(peer = %self.peer_addr, user, key_id = certificate.key_id(), reason = %error, "authentication refused");
                        if let Some(ready) = self.ready.take() {
                            let _ = ready.send(Err(error.disclosed()));
                        }
                        return Ok(Auth::reject());
                    }
                }
            }
        };
        info!(peer = %self.peer_addr, who = %peer.describe(), "authenticated");
        if let Peer::Client { .. } = peer
            && let Some(ready) = self.ready.take()
        {
            let _ = ready.send(Ok(()));
        }
        self.peer = Some(peer);
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.may_open_session() {
            self.sessions.insert(channel.id(), channel);
            reply.accept().await;
            return Ok(());
        }
        drop(channel);
        self.refuse_open(
            "a session channel",
            reply,
            ChannelOpenFailure::AdministrativelyProhibited,
            session,
        )
        .await
    }

    async fn channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: russh::server::ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let refused = ChannelOpenFailure::AdministrativelyProhibited;
        self.refuse_open("an x11 channel", reply, refused, session)
            .await
    }

    async fn channel_open_forwarded_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        _host_to_connect: &str,
        _port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: russh::server::ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let refused = ChannelOpenFailure::AdministrativelyProhibited;
        self.refuse_open("a forwarded-tcpip channel", reply, refused, session)
            .await
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        _socket_path: &str,
        reply: russh::server::ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let refused = ChannelOpenFailure::AdministrativelyProhibited;
        self.refuse_open("a direct-streamlocal channel", reply, refused, session)
            .await
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if matches!(self.peer, Some(Peer::Joiner)) {
            return self.start_join(channel, name, session);
        }
        let open = self.sessions.remove(&channel);
        let agent = match (&self.peer, open) {
            (Some(Peer::Agent(agent)), Some(ch))
                if name == CONTROL_SUBSYSTEM && !self.control_started =>
            {
                Some((agent.as_ref().clone(), ch))
            }
            _ => None,
        };
        let Some((agent, ch)) = agent else {
            session.channel_failure(channel)?;
            return self.count_refusal("a subsystem request", session);
        };
        self.control_started = true;
        // The other pending session channel, if any, has no use any more.
        self.sessions.clear();
        session.channel_success(channel)?;
        let Some(ready) = self.ready.take() else {
            return Ok(());
        };
        let span = info_span!("tunnel", cluster = %agent.cluster, peer = %self.peer_addr);
        let shared = self.shared.clone();
        let handle = session.handle();
        let peer = self.peer_addr;
        self.shared
            .tasks
            .spawn(super::control::run(shared, ch, agent, peer, handle, ready).instrument(span));
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        originator_address: &str,
        _originator_port: u32,
        reply: russh::server::ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let from_peer = originator_address == PEER_ORIGINATOR;
        let Some(Peer::Client { name, certificate }) = &self.peer else {
            return self
                .refuse_open(
                    "direct-tcpip from a non-client",
                    reply,
                    ChannelOpenFailure::AdministrativelyProhibited,
                    session,
                )
                .await;
        };
        // The trust may have changed since the client authenticated (its CA rotated out).
        let trust = self.shared.config.trust.load();
        let cluster = &self.shared.config.cluster;
        if let Err(e) = trust.verify_client(cluster, name, certificate, SystemTime::now()) {
            warn!(peer = %self.peer_addr, client = %name, reason = %e, "the client's certificate is no longer trusted; disconnecting");
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return session.disconnect(
                russh::Disconnect::ByApplication,
                "certificate no longer trusted",
                "",
            );
        }
        if self.registration.is_none() {
            let sessions = &self.shared.client_sessions;
            self.registration = Some(sessions.register(name, certificate, session.handle()));
        }
        // Who the root's access rules judge: the certificate's name and groups.
        let who = Who {
            user: name.clone(),
            groups: groups_of(certificate),
        };
        let name = name.clone();
        let target = u16::try_from(port_to_connect)
            .map_err(|_| format!("port {port_to_connect} is out of range"))
            .and_then(|port| Target::from_name(host_to_connect, port).map_err(|e| e.to_string()));
        let target = match target {
            Ok(t) => t,
            Err(e) => {
                warn!(client = %name, error = %e, "bad target");
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
                return Ok(());
            }
        };
        let client = self.peer_addr;
        let via = if from_peer { Via::Peer } else { Via::Ssh };
        let audit = DialAudit::start(&name, via, client, &target);
        let quota = match self.shared.client_streams.acquire(&name) {
            Ok(permit) => permit,
            Err(e) => {
                warn!(peer = %self.peer_addr, error = %e, "stream refused");
                audit.denied("quota", &e.to_string());
                reply.reject(ChannelOpenFailure::ResourceShortage).await;
                return Ok(());
            }
        };
        let dialer = ProxyDialer::new(self.shared.clone());
        let span = info_span!("client_stream", client = %name, target = %target);
        self.shared.tasks.spawn(
            async move {
                let _quota = quota;
                // A peer forwards a dial its own entry has already permitted.
                let dialled = if from_peer {
                    dialer.dial_local(&target, client).await
                } else {
                    match dialer.permit(&who, &target).await {
                        Ok(()) => dialer.dial(target, client).await,
                        Err(refused) => Err(refused),
                    }
                };
                match dialled {
                    Ok(conn) => {
                        reply.accept().await;
                        let ended = conn.splice(audit.count(channel.into_stream())).await;
                        if let Err(e) = &ended {
                            info!(error = %e, "stream ended with an error");
                        }
                        audit.ended(&ended);
                    }
                    Err(e) => {
                        warn!(error = %e, "dial failed");
                        audit.refused(&e);
                        // The kind only (but for a refusal by access rules, which names only
                        // the client, the leaf and the permission): the message may name
                        // addresses the client need not see.
                        reply.reject(e.open_failure()).await;
                    }
                }
            }
            .instrument(span),
        );
        Ok(())
    }
}

impl ConnectionHandler {
    /// Runs the join exchange on a joiner's session channel. The connection's handshake
    /// deadline stays armed until the exchange ends, so a stalled joiner is dropped in time.
    fn start_join(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let open = self.sessions.remove(&channel);
        // One request, whatever it asks: a refused one leaves the joiner nothing to do here.
        let first = !std::mem::replace(&mut self.control_started, true);
        let authority = self.shared.config.join.clone();
        let (Some(ch), Some(authority), true, JOIN_SUBSYSTEM) = (open, authority, first, name)
        else {
            warn!(peer = %self.peer_addr, name, "refused a subsystem request from a joiner");
            session.channel_failure(channel)?;
            return self.count_refusal("a subsystem request from a joiner", session);
        };
        session.channel_success(channel)?;
        let shared = self.shared.clone();
        let peer = self.peer_addr;
        let handle = session.handle();
        let span = info_span!("join", peer = %peer);
        self.shared.tasks.spawn(
            async move {
                super::join::serve(shared, authority, ch.into_stream(), peer).await;
                // The exchange is over: the joiner has nothing more to do here.
                let _ = handle
                    .disconnect(
                        russh::Disconnect::ByApplication,
                        "join done".into(),
                        "".into(),
                    )
                    .await;
            }
            .instrument(span),
        );
        Ok(())
    }
}
