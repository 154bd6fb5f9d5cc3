//! The agent's side of one SSH connection to a proxy, as russh calls it: check the proxy's
//! host certificate during key exchange (and refuse a proxy already held, before any more of
//! the handshake is spent on it), then serve each dial the proxy opens as a `forwarded-tcpip`
//! channel: connect to the target the allow-list permits, answer the dial, carry the bytes.
//! Every other channel type is refused. Each dial runs in a task of the tunnel's tracker.

use std::sync::{Arc, Mutex};

use russh::client::{self, Msg, Session};
use russh::{Channel, ChannelOpenFailure};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use super::claims::{Claim, Claims};
use super::config::AgentConfig;
use super::error::TunnelError;
use super::kube::KubeGateway;
use crate::admin::metrics::label;
use crate::egress::connect::connect_via;
use crate::identity::verify_proxy_key;
use crate::protocol::stream::{CONTROL_EXT, StreamControl};
use crate::protocol::{DialError, DialErrorKind, Endpoint, ssh};
use crate::stream::{Splice, TunnelShare, TunnelStream};

/// What key exchange concluded about the proxy: its ID and claim, or why it was refused.
pub(super) type Verdict = Result<(String, Option<Claim>), TunnelError>;

/// Verifies the proxy, answers dials.
pub(super) struct AgentHandler {
    /// What the agent may dial and how (allow-list, resolver, timeouts, stream limits).
    pub(super) config: Arc<AgentConfig>,
    /// What key exchange learned: the proxy's claim, or why it was refused.
    pub(super) verdict: Arc<Mutex<Option<Verdict>>>,
    /// Proxies already held; `None` when the caller does not track claims.
    pub(super) claims: Option<Claims>,
    /// The dials being served: the tunnel closes it when it ends.
    pub(super) tasks: TaskTracker,
    /// What the streams of this tunnel share: their window growth budget, the agent's stream
    /// counters.
    pub(super) share: TunnelShare,
    /// Where the proxy's reason goes when it ends the connection (a refused certificate says
    /// why in its disconnect message); taken by the first disconnect.
    pub(super) proxy_said: Option<oneshot::Sender<String>>,
}

impl client::Handler for AgentHandler {
    type Error = russh::Error;

    async fn disconnected(
        &mut self,
        reason: client::DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        ssh::keep_disconnect_message(reason, &mut self.proxy_said)
    }

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let verdict = match verify_proxy_key(key, &self.config.root_cas, &self.config.root_cluster)
        {
            Ok(id) => match &self.claims {
                None => Ok((id, None)),
                Some(claims) => match claims.try_claim(&id) {
                    Some(claim) => Ok((id, Some(claim))),
                    None => {
                        debug!(proxy = %id, "already holding a tunnel to this proxy; closing early");
                        Err(TunnelError::AlreadyClaimed(id))
                    }
                },
            },
            Err(reason) => {
                warn!(%reason, "refusing the proxy");
                Err(TunnelError::UntrustedProxy(reason))
            }
        };
        let accept = verdict.is_ok();
        *self.verdict.lock().unwrap_or_else(|p| p.into_inner()) = Some(verdict);
        Ok(accept)
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<Msg>,
        connected_address: &str,
        connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: russh::client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let endpoint = Endpoint::from_wire(connected_address, connected_port);
        let config = self.config.clone();
        let share = self.share.clone();
        let span = info_span!("dial", target = %connected_address, port = connected_port);
        self.tasks.spawn(
            async move {
                reply.accept().await;
                serve_dial(config, share, channel, endpoint).await;
            }
            .instrument(span),
        );
        Ok(())
    }

    async fn server_channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: russh::client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        refuse(reply, "session").await
    }

    async fn server_channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        _host: &str,
        _port: u32,
        _oa: &str,
        _op: u32,
        reply: russh::client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        refuse(reply, "direct-tcpip").await
    }

    async fn server_channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        _oa: &str,
        _op: u32,
        reply: russh::client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        refuse(reply, "x11").await
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        _channel: Channel<Msg>,
        reply: russh::client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        refuse(reply, "agent forwarding").await
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        _path: &str,
        reply: russh::client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        refuse(reply, "streamlocal").await
    }
}

/// Refuses a channel the agent never serves: only dials (`forwarded-tcpip`) are.
async fn refuse(reply: russh::client::ChannelOpenHandle, kind: &str) -> Result<(), russh::Error> {
    warn!(kind, "refused a channel opened by the proxy");
    reply
        .reject(ChannelOpenFailure::AdministrativelyProhibited)
        .await;
    Ok(())
}

/// Connects to the target the proxy asked for, answers the dial, then carries the bytes.
async fn serve_dial(
    config: Arc<AgentConfig>,
    share: TunnelShare,
    channel: Channel<Msg>,
    endpoint: Result<Endpoint, crate::protocol::TargetParseError>,
) {
    let (read, write) = channel.split();
    let connected = match endpoint {
        Err(e) => Err(DialError::new(DialErrorKind::Other, e.to_string())),
        Ok(Endpoint::ApiServer) => dial_api_server(&config).await.map(Local::Tcp),
        Ok(Endpoint::KubeApi) => kube_gateway(&config).map(Local::Kube),
        Ok(Endpoint::Host { host, port }) => {
            let allow = config.allow.current();
            connect_via(&config.resolver, &allow, &host, port, config.dial_timeout)
                .await
                .map(|(s, _)| Local::Tcp(s))
        }
    };
    let outcome = match &connected {
        Ok(_) => "ok",
        Err(e) => e.kind.as_str(),
    };
    config
        .metrics
        .served
        .get_or_create(&label("outcome", outcome))
        .inc();
    match connected {
        Ok(local) => {
            let ok = StreamControl::DialOk.encode();
            if write.extended_data_bytes(CONTROL_EXT, ok).await.is_err() {
                return;
            }
            let stream = TunnelStream::new(read, write, config.stream, share);
            let spliced = match local {
                Local::Tcp(target) => stream.splice(target).await,
                Local::Kube(gateway) => {
                    let (ours, theirs) = tokio::io::duplex(KUBE_PIPE_BYTES);
                    tokio::spawn(crate::agent::kube::serve(gateway, theirs));
                    stream.splice(ours).await
                }
            };
            if let Err(e) = spliced {
                debug!(error = %e, "stream ended with an error");
            }
        }
        Err(e) => {
            info!(error = %e, "dial refused");
            let frame = StreamControl::DialFailed(e).encode();
            let _ = write.extended_data_bytes(CONTROL_EXT, frame).await;
            let _ = write.close().await;
        }
    }
}

/// What a dial reaches on the leaf's side.
enum Local {
    /// A TCP connection (a target of the allow-list, or the API server's raw port).
    Tcp(TcpStream),
    /// The agent's Kubernetes gateway, which speaks HTTP on the stream.
    Kube(Arc<KubeGateway>),
}

/// The pipe between a Kubernetes stream and the gateway serving it: one stream window's worth.
const KUBE_PIPE_BYTES: usize = 64 * 1024;

fn kube_gateway(config: &AgentConfig) -> Result<Arc<KubeGateway>, DialError> {
    config
        .kube
        .clone()
        .ok_or_else(|| DialError::no_kube_api(&config.cluster))
}

async fn dial_api_server(config: &AgentConfig) -> Result<TcpStream, DialError> {
    let Some(addr) = &config.api_server else {
        return Err(DialError::no_api_server());
    };
    match tokio::time::timeout(config.dial_timeout, TcpStream::connect(addr.as_str())).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Err(DialError::new(
            DialErrorKind::Refused,
            format!("the API server at {addr} refused the connection"),
        )),
        Ok(Err(e)) => Err(DialError::new(
            DialErrorKind::Other,
            format!("the API server at {addr}: {e}"),
        )),
        Err(_) => Err(DialError::new(
            DialErrorKind::TimedOut,
            format!("the API server at {addr} did not answer"),
        )),
    }
}
