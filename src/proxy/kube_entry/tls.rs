//! The Kubernetes endpoint's TLS: its own certificate (which `tether kubeconfig` tells kubectl
//! to trust), and, optionally, client certificates of a CA the root names (in a cluster, the
//! root API server's client CA), read the way the API server reads them: the subject's CN is
//! the user, each O a group.

use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::proxy::access::Who;

/// Why the endpoint's TLS cannot be set up; names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum KubeTlsError {
    #[error("{path}: {cause}")]
    File { path: String, cause: String },
    #[error("the certificate and key do not go together: {0}")]
    Config(String),
}

fn file_error(path: &Path, cause: impl ToString) -> KubeTlsError {
    KubeTlsError::File {
        path: path.display().to_string(),
        cause: cause.to_string(),
    }
}

/// The endpoint's TLS settings: `certificate` (PEM chain) and `key` are its own; with
/// `client_ca`, client certificates it signed authenticate their holder (and are optional:
/// bearer tokens remain).
pub fn server_config(
    certificate: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, KubeTlsError> {
    let chain = read_certificates(certificate)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_error(key, e))?;
    server_config_with(chain, key, client_ca)
}

/// [`server_config`] with the certificate chain and key in hand (the TLS port's self-issued
/// ones, or read from files).
pub fn server_config_with(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, KubeTlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| KubeTlsError::Config(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certificates(path)? {
                roots.add(cert).map_err(|e| file_error(path, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| file_error(path, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| KubeTlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, KubeTlsError> {
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if chain.is_empty() {
        return Err(file_error(path, "no PEM certificate in it"));
    }
    Ok(chain)
}

/// Who a verified client certificate names: CN the user, each O a group. `None` without a CN.
pub fn who_of_certificate(der: &[u8]) -> Option<Who> {
    let (_, certificate) = X509Certificate::from_der(der).ok()?;
    let subject = certificate.subject();
    let user = subject.iter_common_name().next()?.as_str().ok()?.to_owned();
    if user.is_empty() {
        return None;
    }
    let groups = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok())
        .map(str::to_owned)
        .collect();
    Some(Who { user, groups })
}
