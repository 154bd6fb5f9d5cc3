//! TLS to the root's TLS port, with ALPN saying what runs inside.
//!
//! The root may serve everything on one TLS port (443 behind a cloud load balancer). The agent
//! offers two protocols, and what the other end picks says how to go on, on the same
//! connection:
//!
//! | picked by the other end | who picked | then |
//! | --- | --- | --- |
//! | `tether-ssh` | the proxy itself (a TCP load balancer passed TLS through) | SSH inside TLS |
//! | `http/1.1` or none | an L7 load balancer that terminated TLS (ALPN is gone behind it) | a WebSocket upgrade, then SSH in frames |
//!
//! So the fallback costs no second connection and no second TLS handshake.
//!
//! The outer TLS is a carrier: SSH inside authenticates both ends with certificates (the
//! proxy's host certificate against the root CA, the agent's against the leaf's), as on the SSH
//! port, which has no TLS at all. So by default the agent does not check the TLS certificate
//! (a load balancer's public certificate, or the proxy's self-issued one, says nothing SSH
//! doesn't); with a CA file it does, for networks where a TLS interception box must be
//! refused before SSH is even tried.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The ALPN name of SSH inside TLS: a tunnel, a join, a peer or a `tether dial` client.
pub const ALPN_SSH: &[u8] = b"tether-ssh";
/// The ALPN name of HTTP/1.1: WebSocket upgrades, CONNECT, the Kubernetes API.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// What the TLS handshake left to run inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inside {
    /// The proxy picked `tether-ssh`: SSH now.
    Ssh,
    /// HTTP (an L7 load balancer answered): upgrade to WebSocket first.
    Http,
}

/// Why TLS to the root could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {cause}")]
    CaFile { path: String, cause: String },
    #[error("TLS settings: {0}")]
    Settings(String),
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
    #[error("TLS handshake with {server}: {source}")]
    Handshake {
        server: String,
        #[source]
        source: std::io::Error,
    },
}

/// The agent's TLS settings: ALPN `tether-ssh` then `http/1.1`; the certificate checked against
/// `ca` (PEM file) if given, else not at all (see the module docs for why that is safe).
pub fn client_config(ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Settings(e.to_string()))?;
    let mut config = match ca {
        Some(path) => builder
            .with_root_certificates(roots(path)?)
            .with_no_client_auth(),
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(CarrierOnly(provider)))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_SSH.to_vec(), ALPN_HTTP1.to_vec()];
    Ok(Arc::new(config))
}

fn roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let error = |cause: String| TlsError::CaFile {
        path: path.display().to_string(),
        cause,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| error(e.to_string()))? {
        roots
            .add(cert.map_err(|e| error(e.to_string()))?)
            .map_err(|e| error(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(error("no PEM certificate in it".into()));
    }
    Ok(roots)
}

/// Starts TLS on `io` to `server` (its SNI, and the name checked with a CA); what runs inside.
pub async fn connect<S>(
    io: S,
    server: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<(TlsStream<S>, Inside), TlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::try_from(server.to_owned())
        .map_err(|_| TlsError::ServerName(server.to_owned()))?;
    let stream = TlsConnector::from(config)
        .connect(name, io)
        .await
        .map_err(|source| TlsError::Handshake {
            server: server.to_owned(),
            source,
        })?;
    let inside = match stream.get_ref().1.alpn_protocol() {
        Some(ALPN_SSH) => Inside::Ssh,
        _ => Inside::Http,
    };
    Ok((stream, inside))
}

/// Accepts any certificate, but still checks the handshake's signatures with it: SSH inside
/// authenticates the proxy (module docs).
#[derive(Debug)]
struct CarrierOnly(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for CarrierOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
