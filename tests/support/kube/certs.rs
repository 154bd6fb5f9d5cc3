//! Certificates, keys and kubeconfigs for the test control plane.
//!
//! One throw-away CA signs the apiserver's serving certificate and the client
//! certificates (admin in `system:masters`, kube-controller-manager). A separate
//! key signs ServiceAccount tokens. Everything is ECDSA P-256, made with rcgen.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// Paths of the PKI files written by [`generate`].
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca_cert: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    pub sa_key: PathBuf,
    pub sa_pub: PathBuf,
    pub admin_kubeconfig: PathBuf,
    pub kcm_kubeconfig: PathBuf,
}

fn err(what: &str) -> impl FnOnce(rcgen::Error) -> String + '_ {
    move |e| format!("generating {what}: {e}")
}

fn write(path: &Path, contents: &str) -> Result<(), String> {
    fs::write(path, contents).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// A client certificate and its key, PEM-encoded.
struct ClientCert {
    cert: String,
    key: String,
}

fn client_cert(
    ca: &CertifiedIssuer<'_, KeyPair>,
    user: &str,
    groups: &[&str],
) -> Result<ClientCert, String> {
    let key = KeyPair::generate().map_err(err("client key"))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err("client cert"))?;
    params.distinguished_name.push(DnType::CommonName, user);
    for group in groups {
        params
            .distinguished_name
            .push(DnType::OrganizationName, *group);
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, ca).map_err(err("client cert"))?;
    Ok(ClientCert {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A kubeconfig with inline certificates, usable by kube-rs, kubectl, helm and
/// the Kubernetes components alike.
fn kubeconfig(server: &str, ca_pem: &str, user: &str, client: &ClientCert) -> String {
    fn b64(s: &str) -> String {
        base64(s.as_bytes())
    }
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: tether-test
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: {user}
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: tether-test
  context:
    cluster: tether-test
    user: {user}
    namespace: default
current-context: tether-test
",
        ca = b64(ca_pem),
        cert = b64(&client.cert),
        key = b64(&client.key),
    )
}

/// Generates the whole PKI into `dir` for an apiserver reachable at `server`.
pub fn generate(dir: &Path, server: &str) -> Result<Pki, String> {
    fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;

    let ca_key = KeyPair::generate().map_err(err("CA key"))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err("CA"))?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "tether-test-ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(err("CA"))?;
    let ca_pem = ca.pem();

    let serving_key = KeyPair::generate().map_err(err("serving key"))?;
    let mut serving = CertificateParams::new(vec![
        "127.0.0.1".to_string(),
        "localhost".to_string(),
        "kubernetes".to_string(),
        "kubernetes.default".to_string(),
        "kubernetes.default.svc".to_string(),
        "kubernetes.default.svc.cluster.local".to_string(),
    ])
    .map_err(err("serving cert"))?;
    serving
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    serving.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_cert = serving
        .signed_by(&serving_key, &ca)
        .map_err(err("serving cert"))?;

    let sa_key = KeyPair::generate().map_err(err("service-account key"))?;

    let admin = client_cert(&ca, "tether-test-admin", &["system:masters"])?;
    // kube-controller-manager runs with --use-service-account-credentials=false,
    // so every controller acts as this user; the bootstrap role for
    // system:kube-controller-manager alone does not let controllers write, hence
    // system:masters.
    let kcm = client_cert(&ca, "system:kube-controller-manager", &["system:masters"])?;

    let pki = Pki {
        ca_cert: dir.join("ca.crt"),
        serving_cert: dir.join("apiserver.crt"),
        serving_key: dir.join("apiserver.key"),
        sa_key: dir.join("service-account.key"),
        sa_pub: dir.join("service-account.pub"),
        admin_kubeconfig: dir.join("admin.kubeconfig"),
        kcm_kubeconfig: dir.join("kube-controller-manager.kubeconfig"),
    };
    write(&pki.ca_cert, &ca_pem)?;
    write(&pki.serving_cert, &serving_cert.pem())?;
    write(&pki.serving_key, &serving_key.serialize_pem())?;
    write(&pki.sa_key, &sa_key.serialize_pem())?;
    write(&pki.sa_pub, &sa_key.public_key_pem())?;
    write(
        &pki.admin_kubeconfig,
        &kubeconfig(server, &ca_pem, "tether-test-admin", &admin),
    )?;
    write(
        &pki.kcm_kubeconfig,
        &kubeconfig(server, &ca_pem, "system:kube-controller-manager", &kcm),
    )?;
    Ok(pki)
}

/// Standard base64 with padding (kubeconfig `*-data` fields).
fn base64(input: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(input)
}
