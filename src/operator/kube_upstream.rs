//! The operator's agents reach their own cluster's API server for the root's Kubernetes
//! requests (#16) the way the operator itself does: the same URL, CA and credential as its
//! kubeconfig or in-cluster ServiceAccount, so the chart grants impersonation to one identity.

use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine as _;
use rustls_pki_types::CertificateDer;
use secrecy::ExposeSecret;

use crate::agent::kube::{ClientCertificate, Credential, KubeUpstream};

/// Why the operator's own credentials cannot serve the root's Kubernetes requests.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamConfigError {
    #[error(
        "the operator's kubeconfig names no CA certificate for its API server (the root's Kubernetes requests need one to verify it)"
    )]
    NoCa,
    #[error(
        "the operator's kubeconfig has no token, token file or client certificate (an exec plugin cannot be lent to the agents)"
    )]
    NoCredential,
    #[error("the operator's kubeconfig: {0}")]
    Unreadable(String),
    #[error(transparent)]
    Upstream(#[from] crate::agent::kube::UpstreamError),
}

/// The agents' way to this cluster's API server, from the operator's own `config`.
pub fn from_config(config: &kube::Config) -> Result<Arc<KubeUpstream>, UpstreamConfigError> {
    let ca: Vec<CertificateDer<'static>> = config
        .root_cert
        .as_ref()
        .filter(|certs| !certs.is_empty())
        .ok_or(UpstreamConfigError::NoCa)?
        .iter()
        .map(|der| CertificateDer::from(der.clone()))
        .collect();
    let auth = &config.auth_info;
    let (credential, client) = if let Some(file) = &auth.token_file {
        (Credential::TokenFile(PathBuf::from(file)), None)
    } else if let Some(token) = &auth.token {
        (Credential::Token(token.expose_secret().to_owned()), None)
    } else if let Some(client) = client_certificate(auth)? {
        (Credential::ClientCertificate, Some(client))
    } else {
        return Err(UpstreamConfigError::NoCredential);
    };
    let url = config.cluster_url.to_string();
    Ok(Arc::new(KubeUpstream::new(&url, ca, credential, client)?))
}

/// The kubeconfig's client certificate and key, inline or from files.
fn client_certificate(
    auth: &kube::config::AuthInfo,
) -> Result<Option<ClientCertificate>, UpstreamConfigError> {
    let unreadable = |e: String| UpstreamConfigError::Unreadable(e);
    let certificate = match (&auth.client_certificate_data, &auth.client_certificate) {
        (Some(data), _) => base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| unreadable(format!("client-certificate-data: {e}")))?,
        (None, Some(path)) => std::fs::read(path)
            .map_err(|e| unreadable(format!("client-certificate {path}: {e}")))?,
        (None, None) => return Ok(None),
    };
    let key = match (&auth.client_key_data, &auth.client_key) {
        (Some(data), _) => base64::engine::general_purpose::STANDARD
            .decode(data.expose_secret().trim())
            .map_err(|e| unreadable(format!("client-key-data: {e}")))?,
        (None, Some(path)) => {
            std::fs::read(path).map_err(|e| unreadable(format!("client-key {path}: {e}")))?
        }
        (None, None) => return Ok(None),
    };
    Ok(Some(ClientCertificate::from_pem(&certificate, &key)?))
}
