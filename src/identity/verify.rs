//! Checks on certificates presented by peers, shared by the trust store and the agent.

use std::time::{SystemTime, UNIX_EPOCH};

use russh::keys::signature::Verifier;
use russh::keys::ssh_encoding::Encode;
use russh::keys::ssh_key::certificate::CertType;
use russh::keys::ssh_key::{Certificate, HashAlg, PublicKey};

use crate::protocol::target::ClusterName;

use super::error::{AuthError, Timestamp};
use super::role::{ROLE_EXTENSION, Role};

/// Longest client name or proxy id accepted in a certificate.
const MAX_NAME_LEN: usize = 253;

/// A key's SHA-256 fingerprint as `ssh-keygen -l` prints it (`SHA256:...`): the only form in
/// which keys appear in logs and errors.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// Checks a proxy id before it goes into a host certificate principal `<proxy_id>.<cluster>`:
/// lowercase letters, digits, `-` and `.`, as a Kubernetes pod name, so the principal parses back
/// unambiguously.
pub fn validate_proxy_id(proxy_id: &str) -> Result<(), &'static str> {
    if proxy_id.is_empty() || proxy_id.len() > MAX_NAME_LEN {
        return Err("must be 1-253 characters");
    }
    if !proxy_id
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        return Err("may contain only lowercase letters, digits, '-' and '.'");
    }
    if proxy_id
        .split('.')
        .any(|l| l.is_empty() || l.starts_with('-') || l.ends_with('-'))
    {
        return Err(
            "each dot-separated part must be non-empty and start and end with a letter or digit",
        );
    }
    Ok(())
}

/// Checks a user name (an agent's cluster or a client's name) before it goes into a certificate
/// or is compared with one: letters, digits, `.`, `_`, `@` and `-`, not starting with `-`, so it
/// is safe in SSH user names, `ssh-keygen -n` lists and logs.
pub fn validate_user_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err("must be 1-253 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'))
    {
        return Err("may contain only letters, digits, '.', '_', '@' and '-'");
    }
    if name.starts_with('-') {
        return Err("must not start with '-'");
    }
    Ok(())
}

/// An agent checks the proxy's host certificate: signed by one of `trusted` (the CAs of the
/// cluster it dials), a host certificate, valid at `now`, with a principal `<id>.<cluster>`.
/// Returns the proxy id, so the agent knows which replica it reached.
pub fn verify_host_certificate(
    cert: &Certificate,
    trusted: &[PublicKey],
    cluster: &ClusterName,
    now: SystemTime,
) -> Result<String, AuthError> {
    check_common(cert, trusted, cluster, CertType::Host, now)?;
    let suffix = format!(".{cluster}");
    cert.valid_principals()
        .iter()
        .find_map(|p| {
            p.strip_suffix(&suffix)
                .filter(|id| validate_proxy_id(id).is_ok())
        })
        .map(str::to_owned)
        .ok_or_else(|| AuthError::PrincipalMismatch {
            key_id: cert.key_id().to_owned(),
            expected: format!("<proxy-id>.{cluster}"),
            principals: cert.valid_principals().to_vec(),
        })
}

/// Checks the key a proxy presented during key exchange (agents, `tether dial`, peering): it
/// must be a host certificate signed by one of `root_cas` naming a proxy of `root_cluster`.
/// Returns the proxy's ID.
pub fn verify_proxy_key(
    key: &russh::keys::PublicKeyOrCertificate,
    root_cas: &[PublicKey],
    root_cluster: &ClusterName,
) -> Result<String, AuthError> {
    match key {
        russh::keys::PublicKeyOrCertificate::Certificate(cert) => {
            verify_host_certificate(cert, root_cas, root_cluster, SystemTime::now())
        }
        russh::keys::PublicKeyOrCertificate::PublicKey { .. } => Err(AuthError::BareHostKey),
    }
}

/// A proxy checks its own host certificate at start-up, so that a wrong file fails there with
/// the reason rather than in every agent's handshake: a host certificate (not a user one),
/// valid now, naming `<proxy_id>.<cluster>`. Who signed it is the agents' check (against their
/// root CAs); here the certificate is checked against its own signer.
pub fn check_own_host_certificate(
    cert: &Certificate,
    cluster: &ClusterName,
    proxy_id: &str,
    now: SystemTime,
) -> Result<(), AuthError> {
    let signer = PublicKey::from(cert.signature_key().clone());
    verify_host_certificate(cert, &[signer], cluster, now)?;
    let expected = format!("{proxy_id}.{cluster}");
    if cert.valid_principals().contains(&expected) {
        Ok(())
    } else {
        Err(AuthError::PrincipalMismatch {
            key_id: cert.key_id().to_owned(),
            expected,
            principals: cert.valid_principals().to_vec(),
        })
    }
}

/// Checks a user certificate: signed by one of `cas` (those of `cluster`), valid at `now`, naming
/// `principal` and carrying `role`.
pub(super) fn check_user(
    cert: &Certificate,
    cas: &[PublicKey],
    cluster: &ClusterName,
    principal: &str,
    role: Role,
    now: SystemTime,
) -> Result<(), AuthError> {
    check_common(cert, cas, cluster, CertType::User, now)?;
    let key_id = || cert.key_id().to_owned();
    // An empty principal list means "anyone" to OpenSSH; Tether never issues or accepts that.
    if !cert.valid_principals().iter().any(|p| p == principal) {
        return Err(AuthError::PrincipalMismatch {
            key_id: key_id(),
            expected: principal.to_owned(),
            principals: cert.valid_principals().to_vec(),
        });
    }
    let found = cert.extensions().get(ROLE_EXTENSION);
    if found.map(String::as_str) != Some(role.as_str()) {
        return Err(AuthError::WrongRole {
            key_id: key_id(),
            expected: role,
            found: found.cloned(),
        });
    }
    Ok(())
}

/// The checks every certificate gets: trusted signer, genuine signature, type, no unknown
/// critical options, validity window. The signature is checked before anything the certificate
/// says is believed.
fn check_common(
    cert: &Certificate,
    cas: &[PublicKey],
    cluster: &ClusterName,
    cert_type: CertType,
    now: SystemTime,
) -> Result<(), AuthError> {
    let key_id = || cert.key_id().to_owned();
    let signer = cert.signature_key();
    let Some(ca) = cas.iter().find(|ca| ca.key_data() == signer) else {
        return Err(AuthError::UntrustedCa {
            cluster: cluster.clone(),
            key_id: key_id(),
            fingerprint: signer.fingerprint(HashAlg::Sha256).to_string(),
        });
    };
    verify_signature(cert, ca, cluster)?;

    if cert.cert_type() != cert_type {
        return Err(AuthError::WrongCertType {
            key_id: key_id(),
            expected: type_name(cert_type),
            found: type_name(cert.cert_type()),
        });
    }
    if let Some(option) = cert.critical_options().keys().next() {
        return Err(AuthError::UnsupportedCriticalOption {
            key_id: key_id(),
            option: option.clone(),
        });
    }
    let now = unix_seconds(now);
    // PROTOCOL.certkeys: valid if valid_after <= now < valid_before.
    if now < cert.valid_after() {
        return Err(AuthError::NotYetValid {
            key_id: key_id(),
            valid_after: Timestamp(cert.valid_after()),
            now: Timestamp(now),
        });
    }
    if now >= cert.valid_before() {
        return Err(AuthError::Expired {
            key_id: key_id(),
            valid_before: Timestamp(cert.valid_before()),
            now: Timestamp(now),
        });
    }
    Ok(())
}

/// Verifies the certificate's signature over its to-be-signed part with the trusted CA key
/// itself (not with the key the certificate names, nor trusting the SSH library to have done so).
fn verify_signature(
    cert: &Certificate,
    ca: &PublicKey,
    cluster: &ClusterName,
) -> Result<(), AuthError> {
    let malformed = |e: &dyn std::fmt::Display| AuthError::Malformed {
        key_id: cert.key_id().to_owned(),
        message: e.to_string(),
    };
    // The encoding is the signed fields followed by the length-prefixed signature.
    let encoded = cert.to_bytes().map_err(|e| malformed(&e))?;
    let sig_len = cert
        .signature()
        .encoded_len_prefixed()
        .map_err(|e| malformed(&e))?;
    let tbs_len = encoded
        .len()
        .checked_sub(sig_len)
        .ok_or_else(|| malformed(&"signature longer than certificate"))?;
    ca.key_data()
        .verify(&encoded[..tbs_len], cert.signature())
        .map_err(|_| AuthError::BadSignature {
            cluster: cluster.clone(),
            key_id: cert.key_id().to_owned(),
            fingerprint: fingerprint(ca),
        })
}

fn type_name(t: CertType) -> &'static str {
    match t {
        CertType::User => "user",
        CertType::Host => "host",
    }
}

/// Seconds since the epoch; times before 1970 count as 0 (and so fail any real validity window).
pub(super) fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
