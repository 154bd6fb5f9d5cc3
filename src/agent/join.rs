//! The leaf's side of the join (see [`crate::protocol::join`] for the exchange): present a
//! token and the leaf's CA to a root, learn and verify the root's CA.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use russh::client::{self, Handle};
use russh::keys::{Certificate, PublicKey, PublicKeyOrCertificate};

use crate::identity::{fingerprint, verify_host_certificate};
use crate::protocol::control::ControlError;
use crate::protocol::join::{
    self, JOIN_SUBSYSTEM, JOIN_USER, JoinRefusal, JoinToken, JoinerMessage, MAX_CA_KEYS,
    RootMessage,
};
use crate::protocol::{ClusterName, ssh};
use crate::stream::frames::{read_message, write_message};
use crate::transport::{self, Route, TransportError};

/// What a leaf needs to join a root.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    /// The root's proxies (their load balancer), `host:port`.
    pub root_address: String,
    /// The token the root's administrator issued.
    pub token: JoinToken,
    /// This cluster's name, as its agents' certificates carry it.
    pub leaf_cluster: ClusterName,
    /// This cluster's CA keys, which the root will trust for its agents.
    pub leaf_cas: Vec<PublicKey>,
    /// If set, the root CA's SHA256 fingerprint must equal this (learned out of band); the
    /// token's proof already authenticates the root, this pins it further.
    pub root_ca_pin: Option<String>,
    /// Bound on the whole exchange, connection included.
    pub timeout: Duration,
    /// How the root is reached: directly, or through the leaf's forward proxy.
    pub route: Route,
}

/// What the root told a leaf that joined.
#[derive(Debug, Clone)]
pub struct Joined {
    /// The root cluster's name (its proxies' certificates carry it).
    pub root_cluster: ClusterName,
    /// The root's CA keys: the leaf's agents trust proxies they sign.
    pub root_cas: Vec<PublicKey>,
}

impl Joined {
    /// The SHA256 fingerprint of the root's first CA key, to compare out of band.
    pub fn fingerprint(&self) -> String {
        self.root_cas.first().map(fingerprint).unwrap_or_default()
    }
}

/// Why a join failed. Every message says what to check.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("cannot reach the root at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    /// The forward proxy on the way did not open the way (refused, unreachable, not HTTP).
    #[error(transparent)]
    Transport(TransportError),
    #[error("the join with {0} did not finish within {1:?}")]
    Timeout(String, Duration),
    #[error("SSH with the root failed: {0}")]
    Ssh(#[from] russh::Error),
    #[error("the root does not accept joins (is --kubernetes or a join authority configured?)")]
    NotAccepted,
    #[error("the root refused the join ({reason}): {message}")]
    Refused {
        reason: JoinRefusal,
        message: String,
    },
    #[error(
        "the server at {0} could not prove it knows the token's secret: it is not the root that issued this token (wrong address, or someone in between)"
    )]
    Impostor(String),
    #[error("the root's proxy certificate does not match the CA it sent: {0}")]
    HostNotSigned(String),
    #[error("the root CA's fingerprint is {found}, but {expected} was pinned")]
    PinMismatch { expected: String, found: String },
    #[error("the root sent a malformed answer: {0}")]
    Protocol(String),
}

impl JoinError {
    /// A CamelCase reason for a condition on the `TrustedCluster`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Connect { .. } | Self::Transport(_) | Self::Timeout(..) | Self::Ssh(_) => {
                "RootUnreachable"
            }
            Self::NotAccepted => "JoinNotAccepted",
            Self::Refused { reason, .. } => reason.as_str(),
            Self::Impostor(_) | Self::HostNotSigned(_) | Self::PinMismatch { .. } => {
                "RootNotAuthenticated"
            }
            Self::Protocol(_) => "ProtocolError",
        }
    }

    /// Whether trying again later, unchanged, could succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Transport(_) | Self::Timeout(..) | Self::Ssh(_) => true,
            Self::Refused { reason, .. } => reason.is_transient(),
            _ => false,
        }
    }
}

impl From<TransportError> for JoinError {
    fn from(e: TransportError) -> Self {
        match e {
            TransportError::Direct { addr, source } => Self::Connect { addr, source },
            other => Self::Transport(other),
        }
    }
}

impl From<ControlError> for JoinError {
    fn from(e: ControlError) -> Self {
        Self::Protocol(e.to_string())
    }
}

/// Records the host key the root presented, to check once the root has named its CA.
struct SeenHostKey(Arc<Mutex<Option<Certificate>>>);

impl client::Handler for SeenHostKey {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        // Not trusted yet: the root's CA is unknown until the token proves who sent it. A bare
        // key is kept as `None` and fails that check.
        if let PublicKeyOrCertificate::Certificate(cert) = key
            && let Ok(mut seen) = self.0.lock()
        {
            *seen = Some(cert.clone());
        }
        Ok(true)
    }
}

/// Joins the root: proves the token, checks the root's proof and certificate, sends this
/// cluster's CA, and returns what the root is.
pub async fn join(request: &JoinRequest) -> Result<Joined, JoinError> {
    tokio::time::timeout(request.timeout, join_inner(request))
        .await
        .map_err(|_| JoinError::Timeout(request.root_address.clone(), request.timeout))?
}

async fn join_inner(request: &JoinRequest) -> Result<Joined, JoinError> {
    let addr = &request.root_address;
    let opened = transport::open(&request.route, addr).await?;
    // Shuts the socket down when this future ends or is dropped at the deadline: russh's
    // session task would otherwise keep it (see `HandshakeGuard`).
    let _guard = opened.guard;
    let socket = opened.io;
    let seen = Arc::new(Mutex::new(None));
    let mut handle: Handle<SeenHostKey> = client::connect_stream(
        Arc::new(ssh::client_config()),
        socket,
        SeenHostKey(seen.clone()),
    )
    .await?;
    if !handle.authenticate_none(JOIN_USER).await?.success() {
        return Err(JoinError::NotAccepted);
    }
    let channel = handle.channel_open_session().await?;
    channel.request_subsystem(true, JOIN_SUBSYSTEM).await?;
    let mut stream = channel.into_stream();

    let leaf_nonce = join::nonce();
    let hello = JoinerMessage::Hello {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        token_id: request.token.id().to_owned(),
        nonce: leaf_nonce.clone(),
    };
    write_message(&mut stream, &hello).await?;
    let (root_cluster, root_ca_texts, root_nonce) = match read_answer(&mut stream).await? {
        RootMessage::Challenge {
            root_cluster,
            ca_keys,
            nonce,
            proof,
        } => {
            if !request
                .token
                .verify_root_proof(&proof, &leaf_nonce, &root_cluster, &ca_keys)
            {
                return Err(JoinError::Impostor(addr.clone()));
            }
            (root_cluster, ca_keys, nonce)
        }
        other => return Err(unexpected(other)),
    };
    let joined = verify_root(request, &root_cluster, &root_ca_texts, &seen)?;

    let leaf_cluster = request.leaf_cluster.to_string();
    let leaf_cas = request
        .leaf_cas
        .iter()
        .map(|k| k.to_openssh())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| JoinError::Protocol(format!("encoding this cluster's CA: {e}")))?;
    let join_message = JoinerMessage::Join {
        proof: request
            .token
            .leaf_proof(&root_nonce, &leaf_cluster, &leaf_cas),
        leaf_cluster,
        ca_keys: leaf_cas,
    };
    write_message(&mut stream, &join_message).await?;
    match read_answer(&mut stream).await? {
        RootMessage::Joined => Ok(joined),
        other => Err(unexpected(other)),
    }
}

async fn read_answer<S>(stream: &mut S) -> Result<RootMessage, JoinError>
where
    S: tokio::io::AsyncRead + Unpin,
{
    match read_message(stream).await? {
        RootMessage::Refused { reason, message } => Err(JoinError::Refused { reason, message }),
        answer => Ok(answer),
    }
}

fn unexpected(message: RootMessage) -> JoinError {
    JoinError::Protocol(format!("unexpected message {message:?}"))
}

/// The root proved it knows the token; now its CA must have signed the host certificate this
/// very session presented, and match the pin if one is set.
fn verify_root(
    request: &JoinRequest,
    root_cluster: &str,
    ca_texts: &[String],
    seen: &Mutex<Option<Certificate>>,
) -> Result<Joined, JoinError> {
    let root_cluster = ClusterName::new(root_cluster)
        .map_err(|e| JoinError::Protocol(format!("root cluster name: {e}")))?;
    if ca_texts.is_empty() || ca_texts.len() > MAX_CA_KEYS {
        return Err(JoinError::Protocol(format!(
            "the root sent {} CA keys",
            ca_texts.len()
        )));
    }
    let root_cas = ca_texts
        .iter()
        .map(|t| PublicKey::from_openssh(t))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| JoinError::Protocol(format!("root CA key: {e}")))?;
    let certificate = seen.lock().ok().and_then(|c| c.clone()).ok_or_else(|| {
        JoinError::HostNotSigned("the proxy presented a bare host key".to_owned())
    })?;
    verify_host_certificate(&certificate, &root_cas, &root_cluster, SystemTime::now())
        .map_err(|e| JoinError::HostNotSigned(e.to_string()))?;
    let joined = Joined {
        root_cluster,
        root_cas,
    };
    if let Some(expected) = &request.root_ca_pin {
        let matches = joined
            .root_cas
            .iter()
            .any(|k| fingerprint(k) == expected.trim());
        if !matches {
            return Err(JoinError::PinMismatch {
                expected: expected.clone(),
                found: joined.fingerprint(),
            });
        }
    }
    Ok(joined)
}
