//! The CONNECT exchange's bytes: the request an agent writes, and the proxy's answer head it
//! reads, bounded in size, without consuming a byte past the head (those belong to the root).

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::transport::http_head::{HeadError, read_head};

/// The largest answer head accepted. Real proxies answer a CONNECT in a few hundred bytes
/// (tinyproxy: 76 for a 200, ~400 for a 407); a peer that sends more is not one.
pub const MAX_HEAD: usize = 16 * 1024;

/// How much of a refusal's body is kept to explain it: the first sentence of an HTML error
/// page, not the page.
pub const EXCERPT: usize = 160;

/// The most body bytes read after a refusal's head to quote it.
const BODY_READ: usize = 2048;

/// The headers parsed; real answers carry fewer than ten.
const MAX_HEADERS: usize = 32;

/// What the proxy answered, once its head is complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Head {
    /// A 2xx: the tunnel is open; the bytes after `len` are the root's.
    Established {
        /// The head's length in the buffer.
        len: usize,
    },
    /// Anything else.
    Refused(Refusal),
}

/// A CONNECT the proxy did not open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The status code (407, 403, 502, ...).
    pub code: u16,
    /// `HTTP/1.1 CODE REASON`, sanitised.
    pub status: String,
    /// The head's length in the buffer (the body, if any, follows).
    pub len: usize,
    /// The body's announced length, to read a little of it; `None` when not announced.
    pub body_len: Option<usize>,
}

/// Why an answer is not one of an HTTP proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnswerError {
    /// It does not start like an HTTP answer (sanitised excerpt of what it sent).
    NotHttp(String),
    /// The head passed [`MAX_HEAD`] without ending.
    TooLong,
    /// It starts like HTTP but does not parse (httparse's reason).
    Malformed(String),
}

impl std::fmt::Display for AnswerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotHttp(sent) if sent.starts_with("SSH-") => write!(
                f,
                "it sent {sent:?}, an SSH server's greeting: the proxy URL names the root itself"
            ),
            Self::NotHttp(sent) => write!(f, "it sent {sent:?}"),
            Self::TooLong => write!(f, "its answer head passed {MAX_HEAD} bytes"),
            Self::Malformed(why) => write!(f, "its answer head is malformed ({why})"),
        }
    }
}

/// Parses the answer head at the start of `buf`: `Ok(None)` while it is incomplete.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, AnswerError> {
    let prefix = &b"HTTP/"[..buf.len().min(5)];
    if !buf.starts_with(prefix) {
        return Err(AnswerError::NotHttp(sanitise(&buf[..buf.len().min(40)])));
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut answer = httparse::Response::new(&mut headers);
    let len = match answer.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Err(AnswerError::TooLong);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(AnswerError::Malformed(e.to_string())),
    };
    if len > MAX_HEAD {
        return Err(AnswerError::TooLong);
    }
    let code = answer.code.unwrap_or(0);
    if (200..300).contains(&code) {
        return Ok(Some(Head::Established { len }));
    }
    let body_len = answer
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok());
    let status = format!(
        "HTTP/1.{} {code} {}",
        answer.version.unwrap_or(1),
        sanitise(answer.reason.unwrap_or("").as_bytes())
    );
    Ok(Some(Head::Refused(Refusal {
        code,
        status: status.trim_end().to_owned(),
        len,
        body_len,
    })))
}

/// Why reading an answer stopped.
#[derive(Debug)]
pub enum ReadError {
    /// The proxy closed before its head was complete.
    Closed,
    /// The read failed.
    Io(std::io::Error),
    /// What it sent is not an HTTP proxy's answer.
    Answer(AnswerError),
}

/// Reads until the answer head is complete: the head and everything read with it (the
/// root's first bytes may follow a 200 in the same segment; they are the caller's).
pub async fn read_answer<S: AsyncRead + Unpin>(io: &mut S) -> Result<(Head, Vec<u8>), ReadError> {
    let mut buf = Vec::with_capacity(512);
    match read_head(io, &mut buf, MAX_HEAD, parse_head).await {
        Ok(head) => Ok((head, buf)),
        Err(HeadError::TooLarge) => Err(ReadError::Answer(AnswerError::TooLong)),
        Err(HeadError::Closed) => Err(ReadError::Closed),
        Err(HeadError::Io(e)) => Err(ReadError::Io(e)),
        Err(HeadError::Parse(e)) => Err(ReadError::Answer(e)),
    }
}

/// How long a refusal's body is waited for: its page comes right after its head, and a
/// proxy that announced none and keeps the connection must not turn the refusal into a
/// timeout.
const BODY_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Reads a little more of a refusal's body when its head came alone, to quote it: up to its
/// announced length, or (none announced: tinyproxy's pages) until the proxy closes, at most
/// [`BODY_READ`] bytes and [`BODY_WAIT`]. A read that fails or ends just leaves less to quote.
pub async fn read_some_body<S: AsyncRead + Unpin>(
    io: &mut S,
    refusal: &Refusal,
    buf: &mut Vec<u8>,
) {
    let wanted = refusal.body_len.unwrap_or(BODY_READ).min(BODY_READ);
    let read = async {
        let mut chunk = [0u8; 512];
        while buf.len() - refusal.len < wanted {
            match io.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(BODY_WAIT, read).await;
}

/// A short, printable excerpt of a refusal's body: tags dropped (proxies answer with HTML
/// pages), control characters and runs of space folded, cut at [`EXCERPT`] characters.
pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(BODY_READ)]);
    let mut plain = String::new();
    let mut in_tag = false;
    for c in text.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                plain.push(' ');
            }
            _ if in_tag => {}
            c => plain.push(c),
        }
    }
    let folded = sanitise(plain.as_bytes());
    match folded.char_indices().nth(EXCERPT) {
        Some((cut, _)) => format!("{}…", &folded[..cut]),
        None => folded,
    }
}

/// Printable text only: control characters become spaces, runs of space one.
fn sanitise(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let cleaned: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    cleaned.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The CONNECT request for `target` (`host:port`), with Basic credentials when given (the
/// header value is built by the caller, which alone holds the password).
pub fn request(target: &str, authorization: Option<&str>) -> Vec<u8> {
    let mut req = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: tether/{}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(value) = authorization {
        req.push_str("Proxy-Authorization: ");
        req.push_str(value);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.into_bytes()
}
