//! The SSH side of one connection to the proxy: who the peer is, and what it may open.
//!
//! Agents (user certificates from a trusted leaf CA, role `agent`) may open one control channel.
//! Clients (user certificates from this cluster's own CA, role `client`) may open `direct-tcpip`
//! channels to `HOST.CLUSTER.tether` targets, as `ssh -W` does. A joining leaf (user
//! [`JOIN_USER`], no key, only when joins are enabled) may open one join channel. Everything
//! else is refused.

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
use super::peers::PEER_ORIGINATOR;
use super::server::{ProxyDialer, ProxyShared};
use crate::protocol::control::CONTROL_SUBSYSTEM;
use crate::protocol::join::{JOIN_SUBSYSTEM, JOIN_USER};
use crate::protocol::{ClusterName, DialErrorKind, Target};
use crate::stream::Splice;

/// Who authenticated on a connection.
#[derive(Debug, Clone)]
enum Peer {
    Agent(ClusterName),
    Client(String),
    /// A leaf presenting a join token; nothing is known about it yet.
    Joiner,
}

/// Per-connection SSH handler.
pub(super) struct ConnectionHandler {
    shared: Arc<ProxyShared>,
    peer_addr: SocketAddr,
    peer: Option<Peer>,
    /// Fired when the connection is fully set up (agent hello done, or client authenticated),
    /// which ends its handshake deadline.
    ready: Option<oneshot::Sender<()>>,
    /// Session channels opened but not yet turned into the control channel.
    sessions: HashMap<ChannelId, Channel<Msg>>,
    /// An agent gets one control channel, a joiner one join channel.
    control_started: bool,
}

impl ConnectionHandler {
    pub(super) fn new(
        shared: Arc<ProxyShared>,
        peer_addr: SocketAddr,
        ready: oneshot::Sender<()>,
    ) -> Self {
        Self {
            shared,
            peer_addr,
            peer: None,
            ready: Some(ready),
            sessions: HashMap::new(),
            control_started: false,
        }
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
            Ok(cluster) => Peer::Agent(cluster),
            Err(agent_error) => {
                match trust.verify_client(&self.shared.config.cluster, user, certificate, now) {
                    Ok(name) => Peer::Client(name),
                    Err(_) => {
                        warn!(peer = %self.peer_addr, user, key_id = certificate.key_id(), reason = %agent_error, "authentication refused");
                        return Ok(Auth::reject());
                    }
                }
            }
        };
        info!(peer = %self.peer_addr, ?peer, "authenticated");
        if let Peer::Client(_) = peer
            && let Some(ready) = self.ready.take()
        {
            let _ = ready.send(());
        }
        self.peer = Some(peer);
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if matches!(self.peer, Some(Peer::Agent(_) | Peer::Joiner)) && !self.control_started {
            self.sessions.insert(channel.id(), channel);
            reply.accept().await;
        } else {
            warn!(peer = %self.peer_addr, "refused a session channel");
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
        }
        Ok(())
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
        let Some(Peer::Agent(cluster)) = self.peer.clone() else {
            session.channel_failure(channel)?;
            return Ok(());
        };
        let open = self.sessions.remove(&channel);
        match open {
            Some(ch) if name == CONTROL_SUBSYSTEM && !self.control_started => {
                self.control_started = true;
                session.channel_success(channel)?;
                let Some(ready) = self.ready.take() else {
                    return Ok(());
                };
                let span = info_span!("tunnel", cluster = %cluster, peer = %self.peer_addr);
                let shared = self.shared.clone();
                let handle = session.handle();
                let peer = self.peer_addr;
                self.shared.tasks.spawn(
                    super::control::run(shared, ch, cluster, peer, handle, ready).instrument(span),
                );
            }
            _ => {
                warn!(peer = %self.peer_addr, name, "refused a subsystem request");
                session.channel_failure(channel)?;
            }
        }
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
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let from_peer = originator_address == PEER_ORIGINATOR;
        let Some(Peer::Client(name)) = self.peer.clone() else {
            warn!(peer = %self.peer_addr, "refused direct-tcpip from a non-client");
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
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
        let dialer = ProxyDialer::new(self.shared.clone());
        let client = self.peer_addr;
        let span = info_span!("client_stream", client = %name, target = %target);
        self.shared.tasks.spawn(
            async move {
                let dialled = if from_peer {
                    dialer.dial_local(&target, client).await
                } else {
                    dialer.dial(target, client).await
                };
                match dialled {
                    Ok(conn) => {
                        reply.accept().await;
                        if let Err(e) = conn.splice(channel.into_stream()).await {
                            info!(error = %e, "stream ended with an error");
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "dial failed");
                        // SSH carries only a reason code: forbidden, no tunnel, or failed.
                        let reason = match e.kind {
                            DialErrorKind::Forbidden => {
                                ChannelOpenFailure::AdministrativelyProhibited
                            }
                            DialErrorKind::NoTunnel => ChannelOpenFailure::ResourceShortage,
                            _ => ChannelOpenFailure::ConnectFailed,
                        };
                        reply.reject(reason).await;
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
        let (Some(ch), Some(authority)) = (open, self.shared.config.join.clone()) else {
            session.channel_failure(channel)?;
            return Ok(());
        };
        if name != JOIN_SUBSYSTEM || self.control_started {
            warn!(peer = %self.peer_addr, name, "refused a subsystem request from a joiner");
            session.channel_failure(channel)?;
            return Ok(());
        }
        self.control_started = true;
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
