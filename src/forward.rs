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
    /// The entry does not take this client's token (HTTP 407).
    #[error(
        "the client entry refused the token of {user:?} (HTTP 407): check --user and the token \
         (TETHER_TOKEN or --token-file) against the proxy's token file"
    )]
    BadToken {
        /// The client's name as given.
        user: String,
    },
}

/// Opens a tunnel to `config.target` through the entry: connects, sends `CONNECT` and reads the
/// answer. Returns the connection ready to carry the target's bytes.
pub async fn connect(config: &ForwardConfig) -> Result<TcpStream, ForwardError> {
    let (name, port) = config.target.to_name();
    let (stream, answer) = within(config, ask(config, &name, port)).await?;
    if answer.code == 200 {
        Ok(stream)
    } else {
        Err(ForwardError::Refused(answer.status_line))
    }
}

/// The target a start-up check asks for: not a `HOST.CLUSTER.tether` name, so the entry answers
/// `400` once it has accepted the token, and nothing is dialled anywhere.
const CHECK_TARGET: &str = "tether-start-up-check.invalid";

/// Checks at start-up that the entry is reachable and takes the token, so that a wrong one
/// fails `tether forward` with a reason instead of resetting every client it later accepts.
/// The entry checks credentials before the target, and the target asked for is one it refuses
/// without dialling.
pub async fn check_entry(config: &ForwardConfig) -> Result<(), ForwardError> {
    let (_, answer) = within(config, ask(config, CHECK_TARGET, 1)).await?;
    match answer.code {
        400 => Ok(()),
        407 => Err(ForwardError::BadToken {
            user: config.user.clone(),
        }),
        _ => Err(ForwardError::Refused(answer.status_line)),
    }
}

async fn within<T>(
    config: &ForwardConfig,
    exchange: impl std::future::Future<Output = Result<T, ForwardError>>,
) -> Result<T, ForwardError> {
    tokio::time::timeout(config.connect_timeout, exchange)
        .await
        .map_err(|_| ForwardError::Timeout(config.connect_timeout))?
}

/// The entry's answer to a `CONNECT`.
struct Answer {
    /// The HTTP status code.
    code: u16,
    /// The status line as the entry wrote it, for an error message.
    status_line: String,
}

/// Sends `CONNECT name:port` with the client's credentials; the connection and the entry's
/// answer. Nothing past the answer's head is read: it belongs to the target.
async fn ask(
    config: &ForwardConfig,
    name: &str,
    port: u16,
) -> Result<(TcpStream, Answer), ForwardError> {
    let mut stream = TcpStream::connect(config.entry.as_str()).await?;
    stream.set_nodelay(true)?;
    let credentials = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{}", config.user, config.token));
    let request = format!(
        "CONNECT {name}:{port} HTTP/1.1\r\nHost: {name}:{port}\r\n\
         Proxy-Authorization: Basic {credentials}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    // Byte by byte: a buffered read could take the target's first bytes.
    let mut head = Vec::with_capacity(64);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_RESPONSE_HEAD {
            return Err(ForwardError::Refused("response head too large".into()));
        }
        let byte = stream.read_u8().await?;
        head.push(byte);
    }
    let answer = parse_answer(&head)?;
    Ok((stream, answer))
}

/// Reads a complete response head.
fn parse_answer(head: &[u8]) -> Result<Answer, ForwardError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let not_http = |why: String| ForwardError::Refused(format!("not an HTTP answer: {why}"));
    match response.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(not_http("incomplete head".into())),
        Err(e) => return Err(not_http(e.to_string())),
    }
    let code = response
        .code
        .ok_or_else(|| not_http("no status code".into()))?;
    let status_line = format!(
        "HTTP/1.{} {code} {}",
        response.version.unwrap_or(1),
        response.reason.unwrap_or("")
    );
    Ok(Answer {
        code,
        status_line: status_line.trim_end().to_owned(),
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_by_their_status_code() {
        let ok = parse_answer(b"HTTP/1.1 200 Connection established\r\n\r\n").expect("200");
        assert_eq!(ok.code, 200);
        assert_eq!(ok.status_line, "HTTP/1.1 200 Connection established");
        let refused = parse_answer(
            b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n",
        )
        .expect("407");
        assert_eq!(refused.code, 407);
        for garbage in [&b"SSH-2.0-OpenSSH_9.2\r\n\r\n"[..], b"HTTP/1.1 abc\r\n\r\n"] {
            let err = parse_answer(garbage).err().expect("not HTTP");
            assert!(err.to_string().contains("not an HTTP answer"), "{err}");
        }
    }
}
