//! `tether dial`: a root-side client that reaches a target through the proxy over SSH, with a
//! client certificate from the root's CA. It copies stdin/stdout, so it works as an ssh
//! `ProxyCommand`.

use std::sync::Arc;
use std::time::Duration;

use russh::ChannelOpenFailure;
use russh::client::{self, Handle};
use russh::keys::PublicKey;
use tokio::net::TcpStream;
use tracing::warn;

use crate::identity::Identity;
use crate::protocol::{ClusterName, Target, ssh};
use crate::stream::HandshakeGuard;

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
}

/// Why a client dial failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("could not reach the proxy at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("SSH: {0}")]
    Ssh(#[from] russh::Error),
    #[error("the client certificate has no principal to log in as")]
    NoPrincipal,
    #[error("the proxy refused the client certificate")]
    AuthRefused,
    #[error(
        "the dial to {0} is forbidden: the leaf's allow-list (or the proxy's direct allow-list) does not permit it"
    )]
    Forbidden(Target),
    #[error(
        "no tunnel to {} is up (the leaf is offline or unknown to the root), or you hold your share of open streams (the proxy's log says which)",
        .0.cluster
    )]
    NoTunnel(Target),
    #[error(
        "the dial to {0} failed: refused, timed out, not resolved or unreachable from the leaf (the proxy's log says which)"
    )]
    Refused(Target),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

struct ProxyCheck {
    root_cas: Vec<PublicKey>,
    root_cluster: ClusterName,
}

impl client::Handler for ProxyCheck {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        match ssh::verify_proxy_key(key, &self.root_cas, &self.root_cluster) {
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
        let socket = TcpStream::connect(config.proxy_addr.as_str())
            .await
            .map_err(|source| ClientError::Connect {
                addr: config.proxy_addr.clone(),
                source,
            })?;
        let _ = socket.set_nodelay(true);
        // Shuts the socket down if the deadline in `connect` drops this future mid-handshake:
        // russh's session task would otherwise keep it (see `HandshakeGuard`).
        let guard = HandshakeGuard::new(&socket).map_err(|source| ClientError::Connect {
            addr: config.proxy_addr.clone(),
            source,
        })?;
        let ssh_config = Arc::new(ssh_config);
        let check = ProxyCheck {
            root_cas: config.root_cas.clone(),
            root_cluster: config.root_cluster.clone(),
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
            return Err(ClientError::AuthRefused);
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
                russh::Error::ChannelOpenFailure(
                    ChannelOpenFailure::AdministrativelyProhibited,
                ) => ClientError::Forbidden(target.clone()),
                russh::Error::ChannelOpenFailure(ChannelOpenFailure::ResourceShortage) => {
                    ClientError::NoTunnel(target.clone())
                }
                _ => ClientError::Refused(target.clone()),
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
