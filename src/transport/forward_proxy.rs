//! An HTTP CONNECT forward proxy between the leaf and the root: its URL, its credentials, TLS
//! to it, and the CONNECT exchange that turns a connection to it into a byte stream to the root.

pub mod answer;
#[cfg(test)]
mod tests;

use std::fmt;
use std::io::ErrorKind;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use rustls_pki_types::{CertificateDer, ServerName};
use secrecy::{ExposeSecret, SecretString};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::error::{EgressError, TransportError};
use super::no_proxy::NoProxy;
use super::{BoxIo, Opened, Prefixed};
use crate::stream::HandshakeGuard;
use answer::{Head, ReadError, Refusal};

/// The variables naming the proxy, first set (and not empty) wins: Go's order (upper case
/// first). `HTTP_PROXY` is not read: it is for plain `http://` requests, and the root's
/// connection is an opaque stream like an `https://` one. `ALL_PROXY` (curl's fallback) is not
/// read either, as Go does not: it often names a SOCKS proxy, which an agent cannot use.
pub const PROXY_VARS: [&str; 2] = ["HTTPS_PROXY", "https_proxy"];

/// The variables holding the `NO_PROXY` list, first set wins.
pub const NO_PROXY_VARS: [&str; 2] = ["NO_PROXY", "no_proxy"];

/// The CONNECT exchange's own deadline (TLS to the proxy included), inside the caller's: a
/// proxy that accepts and then says nothing must not hold a handshake slot for long.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

/// How an agent leaves the leaf: through a forward proxy or not, and which addresses skip it.
#[derive(Debug, Clone, Default)]
pub struct Egress {
    /// The forward proxy, if the leaf has one; `None` dials directly.
    pub proxy: Option<Arc<ForwardProxy>>,
    /// Addresses dialled directly although a proxy is set.
    pub no_proxy: NoProxy,
}

impl Egress {
    /// Direct: no proxy.
    pub fn direct() -> Self {
        Self::default()
    }

    /// Through `proxy`, except for what `no_proxy` lists.
    pub fn via(proxy: ForwardProxy, no_proxy: NoProxy) -> Self {
        Self {
            proxy: Some(Arc::new(proxy)),
            no_proxy,
        }
    }

    /// From the process environment ([`PROXY_VARS`], [`NO_PROXY_VARS`]): what the operator's
    /// pod and `tether agent` follow when no flag says otherwise.
    pub fn from_env() -> Result<Self, EgressError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env) reading variables through `get`.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, EgressError> {
        let no_proxy = first_set(&get, &NO_PROXY_VARS)
            .map(|(_, list)| NoProxy::parse(&list))
            .unwrap_or_default();
        match first_set(&get, &PROXY_VARS) {
            None => Ok(Self {
                proxy: None,
                no_proxy,
            }),
            Some((var, url)) => Ok(Self::via(ForwardProxy::parse(&url, var)?, no_proxy)),
        }
    }

    /// The proxy to reach `addr` through, or `None` to dial it directly.
    pub fn proxy_for(&self, addr: &str) -> Option<&ForwardProxy> {
        self.proxy
            .as_deref()
            .filter(|_| !self.no_proxy.bypasses(addr))
    }
}

/// The first of `names` set to a non-empty value (Go treats an empty one as unset), with the
/// name.
pub fn first_set(
    get: &impl Fn(&str) -> Option<String>,
    names: &[&'static str],
) -> Option<(&'static str, String)> {
    names
        .iter()
        .find_map(|n| get(n).filter(|v| !v.trim().is_empty()).map(|v| (*n, v)))
}

/// A forward proxy: where it is, how to prove who we are to it, and how to check it (TLS).
#[derive(Clone)]
pub struct ForwardProxy {
    /// Scheme, host and port; printed in every message (it holds no credentials).
    url: ProxyUrl,
    /// Basic credentials: from the URL's userinfo, or given apart (a file, a Secret).
    credentials: Option<Credentials>,
    /// The TLS settings for an `https://` proxy (its CA); `None` for `http://`.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl fmt::Debug for ForwardProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForwardProxy")
            .field("url", &self.url.to_string())
            .field("credentials", &self.credentials)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// A proxy URL without its credentials: `http://host:port` or `https://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    /// `https://`: TLS to the proxy itself, before the CONNECT.
    pub https: bool,
    /// The proxy's host name or IP address (without brackets).
    pub host: String,
    /// Its port: given, or 80 / 443 by scheme (as Go and curl).
    pub port: u16,
}

impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        match self.host.contains(':') {
            true => write!(f, "{scheme}://[{}]:{}", self.host, self.port),
            false => write!(f, "{scheme}://{}:{}", self.host, self.port),
        }
    }
}

/// Basic credentials for the proxy. Debug prints the user and where they came from, never the
/// password.
#[derive(Clone)]
pub struct Credentials {
    /// The user name, percent-decoded when it came from a URL.
    user: String,
    /// The password, kept out of every message.
    password: SecretString,
    /// Where they came from, for the error that says the proxy refused them.
    origin: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// `user:password` (one line; a trailing newline is ignored), read from `origin` (named
    /// in errors). The password may hold `:`; the user may not.
    pub fn parse(text: &str, origin: impl Into<String>) -> Result<Self, EgressError> {
        let origin = origin.into();
        let bad = |cause: &str| EgressError::Credentials {
            origin: origin.clone(),
            cause: cause.to_owned(),
        };
        let line = text.strip_suffix('\n').unwrap_or(text);
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.contains(['\n', '\r']) {
            return Err(bad("it has more than one line"));
        }
        let (user, password) = line.split_once(':').ok_or_else(|| bad("no `:` in it"))?;
        if user.is_empty() {
            return Err(bad("the user is empty"));
        }
        if line.chars().any(char::is_control) {
            return Err(bad("it holds control characters"));
        }
        Ok(Self {
            user: user.to_owned(),
            password: SecretString::from(password.to_owned()),
            origin,
        })
    }

    /// [`parse`](Self::parse) of the file at `path`, named by flag `flag` in errors.
    pub fn read_file(path: &Path, flag: &str) -> Result<Self, EgressError> {
        let text = std::fs::read_to_string(path).map_err(|source| EgressError::Read {
            origin: flag.to_owned(),
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, format!("{flag} file {}", path.display()))
    }

    /// The user name (not secret: it is in every message that says these were refused).
    pub fn user(&self) -> &str {
        &self.user
    }

    /// `Basic base64(user:password)`.
    fn header(&self) -> String {
        let pair = format!("{}:{}", self.user, self.password.expose_secret());
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    }
}

impl ForwardProxy {
    /// Parses `url` (`http://`, `https://`, or no scheme: `http`, as Go; `user:password@` in
    /// it percent-decoded), `origin` naming the flag or variable in errors. An `https://`
    /// proxy is checked against the system's CA certificates until [`with_ca`](Self::with_ca).
    pub fn parse(url: &str, origin: &str) -> Result<Self, EgressError> {
        let (url, userinfo) = parse_url(url.trim()).map_err(|cause| EgressError::Url {
            origin: origin.to_owned(),
            cause,
        })?;
        let credentials = match userinfo {
            None => None,
            Some(info) => Some(Credentials::parse(
                &info,
                format!("the user:password in {origin}"),
            )?),
        };
        let tls = match url.https {
            true => {
                server_name(&url.host).map_err(|cause| EgressError::Url {
                    origin: origin.to_owned(),
                    cause,
                })?;
                Some(tls_config(system_roots(origin)?, origin)?)
            }
            false => None,
        };
        Ok(Self {
            url,
            credentials,
            tls,
        })
    }

    /// Uses `credentials` instead of any in the URL.
    pub fn with_credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = Some(credentials);
        self
    }

    /// Checks an `https://` proxy's certificate against the PEM certificates `pem` alone
    /// (from `origin`); refused for an `http://` proxy, which has no certificate to check.
    pub fn with_ca(mut self, pem: &[u8], origin: &str) -> Result<Self, EgressError> {
        let bad = |cause: String| EgressError::Ca {
            origin: origin.to_owned(),
            cause,
        };
        if !self.url.https {
            return Err(bad(format!(
                "{} is an http:// proxy: no TLS to check (use https://)",
                self.url
            )));
        }
        let certs: Vec<CertificateDer<'static>> =
            rustls_pki_types::pem::PemObject::pem_slice_iter(pem)
                .collect::<Result<_, _>>()
                .map_err(|e| bad(format!("not PEM certificates: {e}")))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in certs {
            roots.add(cert).map_err(|e| bad(e.to_string()))?;
        }
        self.tls = Some(tls_config(roots, origin)?);
        Ok(self)
    }

    /// The proxy's URL, without credentials.
    pub fn url(&self) -> &ProxyUrl {
        &self.url
    }

    /// The credentials it is given, if any.
    pub fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }

    /// Connects to the proxy, TLS when `https://`, and CONNECTs to `target`: the stream is the
    /// root's from then on, any bytes that came with the proxy's 200 first.
    pub async fn open(&self, target: &str) -> Result<Opened, TransportError> {
        if target.is_empty() || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(TransportError::BadTarget(target.to_owned()));
        }
        let socket = TcpStream::connect((self.url.host.as_str(), self.url.port))
            .await
            .map_err(|source| TransportError::ProxyUnreachable {
                proxy: self.url.to_string(),
                target: target.to_owned(),
                source,
            })?;
        let _ = socket.set_nodelay(true);
        let guard = HandshakeGuard::new(&socket).map_err(|source| TransportError::ProxyIo {
            proxy: self.url.to_string(),
            target: target.to_owned(),
            source,
        })?;
        let exchange = self.tls_and_connect(socket, target);
        let io = tokio::time::timeout(CONNECT_DEADLINE, exchange)
            .await
            .map_err(|_| TransportError::ProxyTimeout {
                proxy: self.url.to_string(),
                target: target.to_owned(),
                limit: CONNECT_DEADLINE,
            })??;
        Ok(Opened {
            io,
            guard,
            via: Some(self.url.to_string()),
            carrier: super::Used::Ssh,
        })
    }

    async fn tls_and_connect(
        &self,
        socket: TcpStream,
        target: &str,
    ) -> Result<BoxIo, TransportError> {
        let io: BoxIo = match &self.tls {
            None => Box::new(socket),
            Some(config) => {
                let failed = |source| TransportError::ProxyTls {
                    proxy: self.url.to_string(),
                    target: target.to_owned(),
                    source,
                };
                // Checked in `parse`: this cannot fail, and says why if it ever does.
                let name = server_name(&self.url.host)
                    .map_err(|cause| failed(std::io::Error::new(ErrorKind::InvalidInput, cause)))?;
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                Box::new(connector.connect(name, socket).await.map_err(failed)?)
            }
        };
        self.connect(io, target).await
    }

    /// The CONNECT exchange on `io`: the stream to the root, the proxy's answer head consumed
    /// and nothing after it.
    async fn connect(&self, mut io: BoxIo, target: &str) -> Result<BoxIo, TransportError> {
        let auth = self.credentials.as_ref().map(Credentials::header);
        let request = answer::request(target, auth.as_deref());
        let io_error = |source| TransportError::ProxyIo {
            proxy: self.url.to_string(),
            target: target.to_owned(),
            source,
        };
        io.write_all(&request).await.map_err(io_error)?;
        io.flush().await.map_err(io_error)?;
        let (head, mut buf) = answer::read_answer(&mut io).await.map_err(|e| match e {
            ReadError::Closed => TransportError::ProxyClosed {
                proxy: self.url.to_string(),
                target: target.to_owned(),
            },
            ReadError::Io(source) => io_error(source),
            ReadError::Answer(cause) => TransportError::NotHttp {
                proxy: self.url.to_string(),
                target: target.to_owned(),
                cause: cause.to_string(),
            },
        })?;
        match head {
            Head::Established { len } => Ok(Box::new(Prefixed::new(buf.split_off(len), io))),
            Head::Refused(refusal) => {
                answer::read_some_body(&mut io, &refusal, &mut buf).await;
                Err(self.refused(target, &refusal, &buf[refusal.len..]))
            }
        }
    }

    /// The error for a refused CONNECT, by status.
    fn refused(&self, target: &str, refusal: &Refusal, body: &[u8]) -> TransportError {
        let (proxy, target) = (self.url.to_string(), target.to_owned());
        let excerpt = answer::excerpt(body);
        let detail = match excerpt.is_empty() {
            true => String::new(),
            false => format!(": {excerpt}"),
        };
        match refusal.code {
            407 => TransportError::ProxyAuth {
                proxy,
                target,
                status: refusal.status.clone(),
                credentials: self.credentials_refused(),
            },
            // tinyproxy answers 401 to credentials it refuses (and 407 to none at all).
            401 => TransportError::ProxyAuth {
                proxy,
                target,
                status: format!(
                    "{} (a proxy's 407 Proxy Authentication Required)",
                    refusal.status
                ),
                credentials: self.credentials_refused(),
            },
            403 => TransportError::ProxyForbidden {
                proxy,
                target,
                status: refusal.status.clone(),
                detail,
            },
            _ => TransportError::ProxyRefused {
                proxy,
                target,
                status: refusal.status.clone(),
                detail,
            },
        }
    }

    /// Which credentials the proxy refused, or that it wants some: what to fix, and where.
    fn credentials_refused(&self) -> String {
        match &self.credentials {
            Some(c) => format!(
                "it refused the credentials of user {:?} (from {}): check the user and password",
                c.user, c.origin
            ),
            None => "it wants credentials and none were given: put user:password@ in the proxy URL, or give --egress-proxy-credentials (a Secret in a spec)".to_owned(),
        }
    }
}

/// Splits a proxy URL into its parts and its raw userinfo (percent-decoded).
fn parse_url(url: &str) -> Result<(ProxyUrl, Option<String>), String> {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (scheme.to_ascii_lowercase(), rest),
        None => ("http".to_owned(), url),
    };
    let https = match scheme.as_str() {
        "http" => false,
        "https" => true,
        other => {
            return Err(format!(
                "scheme {other:?} is not supported (http:// or https://, a CONNECT proxy)"
            ));
        }
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#']) {
        return Err("a proxy URL has no path, query or fragment".into());
    }
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((info, hostport)) => (Some(percent_decode(info)?), hostport),
        None => (None, authority),
    };
    let (host, port) = split_host_port(hostport)?;
    let port = match port {
        Some(p) => p,
        None if https => 443,
        None => 80,
    };
    Ok((ProxyUrl { https, host, port }, userinfo))
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(s: &str) -> Result<(String, Option<u16>), String> {
    let (host, port) = match s.strip_prefix('[') {
        Some(rest) => {
            let (host, tail) = rest.split_once(']').ok_or("an unclosed [ in the host")?;
            host.parse::<std::net::Ipv6Addr>()
                .map_err(|_| "not an IPv6 address between [ ]")?;
            (host, tail.strip_prefix(':'))
        }
        None => match s.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (s, None),
        },
    };
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':');
    if host.is_empty() || !host.chars().all(valid) {
        return Err("the host is empty or not a host name".into());
    }
    let port = match port {
        None => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or("the port is not a number from 1 to 65535")?,
        ),
    };
    Ok((host.to_owned(), port))
}

/// Decodes `%XX` escapes (a password with `@` or `:` is written `%40`, `%3A` in a URL).
fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            let byte = hex
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("a % in the credentials is not followed by two hex digits")?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the credentials are not UTF-8 once decoded".into())
}

/// The system's CA certificates, for an `https://` proxy given no CA of its own.
fn system_roots(origin: &str) -> Result<rustls::RootCertStore, EgressError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err(EgressError::Ca {
            origin: origin.to_owned(),
            cause: "no system CA certificate found to check the https:// proxy: give its CA with --egress-proxy-ca".into(),
        });
    }
    Ok(roots)
}

/// rustls with ring (the crate's one provider), checking the proxy against `roots`.
fn tls_config(
    roots: rustls::RootCertStore,
    origin: &str,
) -> Result<Arc<rustls::ClientConfig>, EgressError> {
    if roots.is_empty() {
        return Err(EgressError::Ca {
            origin: origin.to_owned(),
            cause: "no certificate in it".into(),
        });
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| EgressError::Ca {
            origin: origin.to_owned(),
            cause: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The name the proxy's certificate must carry: its IP address or host name.
fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    match host.parse::<IpAddr>() {
        Ok(ip) => Ok(ServerName::IpAddress(ip.into())),
        Err(_) => ServerName::try_from(host.to_owned())
            .map_err(|_| format!("{host:?} is not a name a TLS certificate can carry")),
    }
}
