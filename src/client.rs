//! `tether dial`: a root-side client that reaches a target through the proxy over SSH, with a
//! client certificate from the root's CA. It copies stdin/stdout, so it works as an ssh
//! `ProxyCommand`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use russh::ChannelOpenFailure;
use russh::client::{self, Handle};
use russh::keys::PublicKey;
use russh::keys::ssh_key::certificate::CertType;
use tokio::sync::oneshot;
use tracing::warn;

use crate::identity::{Identity, ROLE_EXTENSION, Role, verify_proxy_key};
use crate::protocol::{ClusterName, DialErrorKind, Target, ssh};
use crate::transport::{self, Route, TransportError};

/// Where and as whom to dial.
pub struct DialClientConfig {
    /// The proxy's address.
    pub proxy_addr: String,
    /// The root cluster; the proxy's host certificate must name it.
    pub root_cluster: ClusterName,
    /// CA keys trusted to sign proxy host certificates.
    pub root_cas: Vec<PublicKey>,
    /// The client's key and certificate (role `client`).
    pub identity: Arc<Identity>,
    /// Connect and handshake timeout.
    pub timeout: Duration,
    /// How the proxy is reached: directly, or through a forward proxy.
    pub route: Route,
}

/// Why a client dial failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("could not reach the proxy at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    /// The forward proxy on the way did not open the way (refused, unreachable, not HTTP).
    #[error(transparent)]
    Transport(TransportError),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("SSH: {0}")]
    Ssh(#[from] russh::Error),
    #[error("the client certificate has no principal to log in as")]
    NoPrincipal,
    /// With the proxy's reason when it gave one.
    #[error("the proxy refused the client certificate{}", .0.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    AuthRefused(Option<String>),
    /// An agent's or a proxy's certificate: the proxy would refuse it without a reason.
    #[error(
        "certificate {key_id:?} is {found}, not a client's: dials need one from `tether cert client`"
    )]
    NotAClient {
        /// The certificate's key id.
        key_id: String,
        /// What it is instead ("an agent's", "a proxy host's", ...).
        found: String,
    },
    /// Past its validity: the proxy would refuse it without a reason.
    #[error(
        "certificate {key_id:?} expired at {expired}: issue a new one with `tether cert client`"
    )]
    Expired {
        /// The certificate's key id.
        key_id: String,
        /// When it expired (RFC 3339, UTC).
        expired: String,
    },
    /// The leaf's agent (or the proxy, for the root's own targets) tried the dial and it failed;
    /// the kind says how, so a person or a script can tell a typo from an outage.
    #[error("{}", dial_failure(.target, *.kind))]
    Dial {
        /// What was dialled.
        target: Target,
        /// How it failed.
        kind: DialErrorKind,
    },
    /// The root's access rules (RBAC on the leaf's `RemoteCluster`) do not let this client
    /// dial the leaf; the proxy says which permission is missing.
    #[error("the root does not let you dial {target}: {said}")]
    NotPermitted {
        /// What was dialled.
        target: Target,
        /// The proxy's words: the client, the leaf and the missing permission.
        said: String,
    },
    /// The proxy refused to open the stream for a reason of its own, before any dial.
    #[error("the proxy refused a stream to {target}: {}", stream_refusal(.reason))]
    StreamRefused {
        /// What was dialled.
        target: Target,
        /// The SSH reason the proxy gave.
        reason: ChannelOpenFailure,
    },
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Checks, before connecting, what the proxy would refuse without saying why: a certificate
/// that is not a client's (an agent's, a proxy's) or one past its validity.
pub fn check_client_identity(identity: &Identity, now: SystemTime) -> Result<(), ClientError> {
    let cert = &identity.certificate;
    let key_id = cert.key_id().to_owned();
    let role = cert.extensions().get(ROLE_EXTENSION).map(String::as_str);
    let found = match (cert.cert_type(), role) {
        (CertType::User, Some(role)) if role == Role::Client.as_str() => None,
        (CertType::Host, _) => Some("a proxy host's".to_owned()),
        (CertType::User, Some(role)) => Some(format!("an {role}'s")),
        (CertType::User, None) => Some("a user certificate without a Tether role".to_owned()),
    };
    if let Some(found) = found {
        return Err(ClientError::NotAClient { key_id, found });
    }
    let expired = UNIX_EPOCH + Duration::from_secs(cert.valid_before());
    if expired <= now {
        let expired = humantime::format_rfc3339_seconds(expired).to_string();
        return Err(ClientError::Expired { key_id, expired });
    }
    Ok(())
}

/// What a failed dial means for the person who ran it.
fn dial_failure(target: &Target, kind: DialErrorKind) -> String {
    let host = target.endpoint.to_string();
    match kind {
        DialErrorKind::Forbidden => format!(
            "the dial to {target} is forbidden: the leaf's allow-list (or the proxy's direct allow-list) does not permit it"
        ),
        DialErrorKind::NoTunnel => format!(
            "no tunnel to cluster {} is up: the leaf is offline, or unknown to the root",
            target.cluster
        ),
        DialErrorKind::Refused => format!(
            "the dial to {target} was refused: nothing listens at {host} (the leaf's agent was answered with a reset)"
        ),
        DialErrorKind::TimedOut => {
            format!("the dial to {target} timed out: {host} did not answer the leaf's agent")
        }
        DialErrorKind::NameNotResolved => format!(
            "the dial to {target} failed: the leaf's agent could not resolve the name in {host}"
        ),
        DialErrorKind::Unreachable => {
            format!("the dial to {target} failed: {host} is unreachable from the leaf (no route)")
        }
        DialErrorKind::NotPermitted => format!(
            "the root's access rules do not let you dial {target} (the proxy's log says which rule)"
        ),
        DialErrorKind::Other => {
            format!("the dial to {target} failed (the proxy's and the agent's logs say why)")
        }
    }
}

/// What a proxy's refusal to open a stream means.
fn stream_refusal(reason: &ChannelOpenFailure) -> &'static str {
    match reason {
        ChannelOpenFailure::ResourceShortage => {
            "you hold your share of open streams, or the proxy holds all it may (close some, or retry)"
        }
        ChannelOpenFailure::UnknownChannelType => "this proxy does not serve such streams",
        _ => "the proxy is stopping, or refused the target (its log says which)",
    }
}

struct ProxyCheck {
    /// CA keys trusted to sign the proxy's host certificate.
    root_cas: Vec<PublicKey>,
    /// The cluster the proxy's host certificate must name.
    root_cluster: ClusterName,
    /// Where the proxy's reason goes when it ends the connection (a refused certificate says
    /// why in its disconnect message).
    proxy_said: Option<oneshot::Sender<String>>,
}

impl client::Handler for ProxyCheck {
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
        match verify_proxy_key(key, &self.root_cas, &self.root_cluster) {
            Ok(_) => Ok(true),
            Err(reason) => {
                warn!(%reason, "refusing the proxy");
                Ok(false)
            }
        }
    }
}

/// An authenticated SSH connection to a proxy, ready to open streams.
pub struct DialClient {
    handle: Handle<ProxyCheck>,
}

impl DialClient {
    /// Connects and authenticates.
    pub async fn connect(config: &DialClientConfig) -> Result<Self, ClientError> {
        Self::connect_with(config, ssh::client_config()).await
    }

    /// [`connect`](Self::connect) with SSH settings of the caller's (peering sets keepalives,
    /// so a connection shared by many streams notices a frozen peer).
    pub async fn connect_with(
        config: &DialClientConfig,
        ssh_config: client::Config,
    ) -> Result<Self, ClientError> {
        tokio::time::timeout(config.timeout, Self::connect_inner(config, ssh_config))
            .await
            .map_err(|_| ClientError::Timeout(config.timeout))?
    }

    /// Whether the connection has ended (its session task is gone).
    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    async fn connect_inner(
        config: &DialClientConfig,
        ssh_config: client::Config,
    ) -> Result<Self, ClientError> {
        let opened = transport::open(&config.route, &config.proxy_addr)
            .await
            .map_err(|e| match e {
                TransportError::Direct { addr, source } => ClientError::Connect { addr, source },
                other => ClientError::Transport(other),
            })?;
        // Shuts the socket down if the deadline in `connect` drops this future mid-handshake:
        // russh's session task would otherwise keep it (see `HandshakeGuard`).
        let (socket, guard) = (opened.io, opened.guard);
        let ssh_config = Arc::new(ssh_config);
        let (proxy_said, reason) = oneshot::channel();
        let check = ProxyCheck {
            root_cas: config.root_cas.clone(),
            root_cluster: config.root_cluster.clone(),
            proxy_said: Some(proxy_said),
        };
        let mut handle = client::connect_stream(ssh_config, socket, check).await?;
        let cert = &config.identity.certificate;
        let user = cert
            .valid_principals()
            .first()
            .ok_or(ClientError::NoPrincipal)?
            .clone();
        let auth = handle
            .authenticate_openssh_cert(user, Arc::new(config.identity.key.clone()), cert.clone())
            .await?;
        if !auth.success() {
            // The proxy follows its refusal with a disconnect that says why.
            let said = tokio::time::timeout(Duration::from_secs(1), reason).await;
            return Err(ClientError::AuthRefused(said.ok().and_then(Result::ok)));
        }
        guard.release();
        Ok(Self { handle })
    }

    /// Opens a stream to `target`; `originator` is the address the proxy is told the stream
    /// comes from.
    pub async fn open(
        &self,
        target: &Target,
        originator: &str,
    ) -> Result<russh::ChannelStream<client::Msg>, ClientError> {
        let (name, port) = target.to_name();
        let channel = self
            .handle
            .channel_open_direct_tcpip(name, u32::from(port), originator, 0)
            .await
            .map_err(|e| match e {
                russh::Error::ChannelOpenFailure(reason) => {
                    let target = target.clone();
                    match DialErrorKind::from_open_failure(&reason) {
                        Some(DialErrorKind::NotPermitted) => ClientError::NotPermitted {
                            target,
                            said: reason.description().to_owned(),
                        },
                        Some(kind) => ClientError::Dial { target, kind },
                        None => ClientError::StreamRefused { target, reason },
                    }
                }
                other => ClientError::Ssh(other),
            })?;
        Ok(channel.into_stream())
    }

    /// Opens a stream to `target` and copies it to and from `local` until both sides end.
    pub async fn splice<L>(&self, target: &Target, mut local: L) -> Result<(), ClientError>
    where
        L: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut stream = self.open(target, "127.0.0.1").await?;
        tokio::io::copy_bidirectional(&mut stream, &mut local).await?;
        Ok(())
    }
}
