//! The agent's client of its own cluster's API server: TLS verified against the cluster's CA,
//! the agent's own credential (a ServiceAccount token, re-read as the kubelet rotates it, or a
//! client certificate), connections pooled across the requests of every root caller.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Uri;
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// How long a token read from its file is used before the file is read again, as client-go
/// does: not a file read for every request, and a rotated token is picked up within it.
pub const TOKEN_REREAD: Duration = Duration::from_secs(60);

/// How the agent proves itself to its API server.
pub enum Credential {
    /// A bearer token file, re-read once [`TOKEN_REREAD`] has passed (a projected
    /// ServiceAccount token rotates under the agent, hours before it expires).
    TokenFile(PathBuf),
    /// A bearer token held in memory (from a kubeconfig).
    Token(String),
    /// The TLS client certificate given to [`KubeUpstream::new`] says who the agent is.
    ClientCertificate,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::TokenFile(path) => write!(f, "TokenFile({})", path.display()),
            Credential::Token(_) => f.write_str("Token(..)"),
            Credential::ClientCertificate => f.write_str("ClientCertificate"),
        }
    }
}

/// Why the upstream cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the API server URL {0:?} is not an https:// URL with a host")]
    Url(String),
    #[error("the API server's CA: {0}")]
    Ca(String),
    #[error("the client certificate or key: {0}")]
    ClientCertificate(String),
}

/// A TLS client certificate (its chain) and its key.
pub struct ClientCertificate {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl ClientCertificate {
    /// Reads a certificate chain and a key, both PEM.
    pub fn from_pem(certificate: &[u8], key: &[u8]) -> Result<Self, UpstreamError> {
        let bad = |e: rustls_pki_types::pem::Error| UpstreamError::ClientCertificate(e.to_string());
        Ok(Self {
            chain: CertificateDer::pem_slice_iter(certificate)
                .collect::<Result<Vec<_>, _>>()
                .map_err(bad)?,
            key: PrivateKeyDer::from_pem_slice(key).map_err(bad)?,
        })
    }
}

/// The certificates of a PEM file (a CA bundle).
pub fn certificates_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, UpstreamError> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| UpstreamError::Ca(e.to_string()))?;
    if certificates.is_empty() {
        return Err(UpstreamError::Ca("no PEM certificate in it".into()));
    }
    Ok(certificates)
}

/// The agent's way to its API server.
pub struct KubeUpstream {
    /// `https://HOST:PORT` of the API server; a request's path and query are put after it.
    base: Uri,
    /// Pooled TLS connections to it.
    client: Client<HttpsConnector<HttpConnector>, Incoming>,
    /// Who the agent is there.
    credential: Credential,
    /// The token last read from a [`Credential::TokenFile`], and when (never locked across an
    /// await).
    token_read: Mutex<Option<(Instant, Arc<str>)>>,
}

impl fmt::Debug for KubeUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeUpstream")
            .field("base", &self.base)
            .field("credential", &self.credential)
            .finish()
    }
}

impl KubeUpstream {
    /// A client of the API server at `url`, trusting the CA certificates `ca` alone.
    pub fn new(
        url: &str,
        ca: Vec<CertificateDer<'static>>,
        credential: Credential,
        client_certificate: Option<ClientCertificate>,
    ) -> Result<Self, UpstreamError> {
        let base: Uri = url
            .trim_end_matches('/')
            .parse()
            .map_err(|_| UpstreamError::Url(url.to_owned()))?;
        if base.scheme_str() != Some("https") || base.authority().is_none() {
            return Err(UpstreamError::Url(url.to_owned()));
        }
        let mut roots = rustls::RootCertStore::empty();
        for cert in ca {
            roots
                .add(cert)
                .map_err(|e| UpstreamError::Ca(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(UpstreamError::Ca("no certificate in it".into()));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| UpstreamError::Ca(e.to_string()))?
            .with_root_certificates(roots);
        let tls = match client_certificate {
            None => builder.with_no_client_auth(),
            Some(client) => builder
                .with_client_auth_cert(client.chain, client.key)
                .map_err(|e| UpstreamError::ClientCertificate(e.to_string()))?,
        };
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            base,
            client,
            credential,
            token_read: Mutex::new(None),
        })
    }

    /// The URI of `path_and_query` on the API server.
    pub(super) fn uri(&self, path_and_query: &str) -> Result<Uri, http::Error> {
        let mut parts = self.base.clone().into_parts();
        parts.path_and_query = Some(path_and_query.parse()?);
        Ok(Uri::from_parts(parts)?)
    }

    /// The `Authorization` value for the next request, if the credential is a token.
    pub(super) async fn authorization(&self) -> Result<Option<String>, String> {
        let token = match &self.credential {
            Credential::ClientCertificate => return Ok(None),
            Credential::Token(token) => return Ok(Some(format!("Bearer {}", token.trim()))),
            Credential::TokenFile(path) => self.token_from(path).await?,
        };
        Ok(Some(format!("Bearer {}", token.trim())))
    }

    /// The token of `path`, read again only once [`TOKEN_REREAD`] has passed.
    async fn token_from(&self, path: &Path) -> Result<Arc<str>, String> {
        let cached = self.lock_token().clone();
        if let Some((read_at, token)) = cached
            && read_at.elapsed() < TOKEN_REREAD
        {
            return Ok(token);
        }
        let token: Arc<str> = tokio::fs::read_to_string(path)
            .await
            .map_err(|e| format!("the agent's token file {}: {e}", path.display()))?
            .into();
        *self.lock_token() = Some((Instant::now(), token.clone()));
        Ok(token)
    }

    fn lock_token(&self) -> std::sync::MutexGuard<'_, Option<(Instant, Arc<str>)>> {
        self.token_read.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pooled client.
    pub(super) fn client(&self) -> &Client<HttpsConnector<HttpConnector>, Incoming> {
        &self.client
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The token file is not read for every request: within [`TOKEN_REREAD`] a rewritten file
    /// still gives the token read first.
    #[tokio::test]
    async fn a_token_file_is_read_once_per_reread_period() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").expect("write");
        let ca =
            rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
        let upstream = KubeUpstream::new(
            "https://127.0.0.1:6443",
            vec![ca.cert.der().clone()],
            Credential::TokenFile(path.clone()),
            None,
        )
        .expect("upstream");
        let bearer = |s: &str| Ok(Some(format!("Bearer {s}")));
        assert_eq!(upstream.authorization().await, bearer("first"));
        std::fs::write(&path, "second\n").expect("rewrite");
        assert_eq!(upstream.authorization().await, bearer("first"));
        std::fs::remove_file(&path).expect("remove");
        assert_eq!(upstream.authorization().await, bearer("first"));
    }
}
