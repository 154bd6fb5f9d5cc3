//! `tether forward`: a local port-forward through a proxy's client entry, like `ssh -L`.
//!
//! Every connection accepted on the local listener is carried to one target
//! (`HOST.CLUSTER.tether:PORT`) through the proxy's HTTP CONNECT entry, authenticated with a
//! named token. Tools that speak plain TCP only (iperf3, databases' CLIs) can then use a tunnel
//! without knowing about proxies.

use base64::Engine as _;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::protocol::Target;

/// Largest response head accepted from the entry.
const MAX_RESPONSE_HEAD: usize = 8 * 1024;

/// Where to forward to, and as whom.
#[derive(Clone)]
pub struct ForwardConfig {
    /// The proxy's client entry (HTTP CONNECT), `HOST:PORT`.
    pub entry: String,
    /// The client's name in the entry's token file.
    pub user: String,
    /// The client's token.
    pub token: String,
    /// Where every accepted connection goes.
    pub target: Target,
    /// Time allowed to reach the entry and get its answer.
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for ForwardConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardConfig")
            .field("entry", &self.entry)
            .field("user", &self.user)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// Why a connection could not be carried through the entry.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The entry could not be reached, or the connection failed.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    /// The entry did not answer in time.
    #[error("the client entry did not answer within {0:?}")]
    Timeout(Duration),
    /// The entry answered with something other than `200`.
    #[error("the client entry refused the tunnel: {0}")]
    Refused(String),
}

/// Opens a tunnel to `config.target` through the entry: connects, sends `CONNECT` and reads the
/// answer. Returns the connection ready to carry the target's bytes.
pub async fn connect(config: &ForwardConfig) -> Result<TcpStream, ForwardError> {
    tokio::time::timeout(config.connect_timeout, connect_inner(config))
        .await
        .map_err(|_| ForwardError::Timeout(config.connect_timeout))?
}

async fn connect_inner(config: &ForwardConfig) -> Result<TcpStream, ForwardError> {
    let mut stream = TcpStream::connect(config.entry.as_str()).await?;
    stream.set_nodelay(true)?;
    let (name, port) = config.target.to_name();
    let credentials = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{}", config.user, config.token));
    let request = format!(
        "CONNECT {name}:{port} HTTP/1.1\r\nHost: {name}:{port}\r\n\
         Proxy-Authorization: Basic {credentials}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    // Read the head byte by byte: nothing past it may be consumed, it belongs to the target.
    let mut head = Vec::with_capacity(64);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_RESPONSE_HEAD {
            return Err(ForwardError::Refused("response head too large".into()));
        }
        let byte = stream.read_u8().await?;
        head.push(byte);
    }
    let status_line = head
        .split(|&b| b == b'\r')
        .next()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .unwrap_or_default();
    let ok = status_line
        .split_whitespace()
        .nth(1)
        .is_some_and(|code| code == "200");
    if ok {
        Ok(stream)
    } else {
        Err(ForwardError::Refused(status_line))
    }
}

/// Serves `listener` until the task is dropped: each connection is carried to the target.
pub async fn serve(listener: TcpListener, config: Arc<ForwardConfig>) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, target = %config.target, "forwarding");
    }
    loop {
        match listener.accept().await {
            Ok((local, peer)) => {
                let config = config.clone();
                tokio::spawn(async move {
                    if let Err(e) = carry(local, &config).await {
                        debug!(%peer, error = %e, "forwarded connection ended");
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "accepting a local connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn carry(mut local: TcpStream, config: &ForwardConfig) -> Result<(), ForwardError> {
    let _ = local.set_nodelay(true);
    let mut remote = match connect(config).await {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "could not open the tunnel");
            return Err(e);
        }
    };
    tokio::io::copy_bidirectional_with_sizes(&mut local, &mut remote, 64 * 1024, 64 * 1024).await?;
    Ok(())
}

/// Binds `listen` and reports the address actually bound (for port 0).
pub async fn bind(listen: SocketAddr) -> io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}
