//! The flags of the Kubernetes API through the root (#16): the proxy's endpoint
//! (`--kube-listen`), the agent's gateway to its own API server (`--kube-access`), and
//! `tether kubeconfig`, which writes what kubectl needs to use them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use tether::agent::kube::{
    AccessRule, Credential, KubeAccess, KubeGateway, KubeUpstream, certificates_from_pem,
};
use tether::protocol::ClusterName;

/// Where a pod finds its ServiceAccount's token and its cluster's CA.
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The proxy's Kubernetes endpoint.
#[derive(Args, Debug, Clone)]
pub struct ProxyKubeArgs {
    /// Serve every leaf's Kubernetes API at https://ADDR/clusters/LEAF/ (loopback unless you
    /// say otherwise). Callers authenticate with a bearer token the root's API server accepts
    /// (with --kubernetes), a token of --client-tokens, or a certificate of --kube-client-ca;
    /// the root's RBAC must let them create remoteclusters/kube on the leaf (see
    /// --dial-authorization).
    #[arg(long, requires_all = ["kube_tls_cert", "kube_tls_key"])]
    pub kube_listen: Option<SocketAddr>,
    /// The endpoint's TLS certificate chain (PEM); `tether kubeconfig` tells kubectl to trust it.
    #[arg(long, requires = "kube_listen")]
    pub kube_tls_cert: Option<PathBuf>,
    /// The endpoint's TLS private key (PEM).
    #[arg(long, requires = "kube_listen")]
    pub kube_tls_key: Option<PathBuf>,
    /// CA certificates (PEM) whose client certificates authenticate callers: CN the user, O
    /// each group, as the API server reads them (the root cluster's client CA).
    #[arg(long, requires = "kube_listen")]
    pub kube_client_ca: Option<PathBuf>,
}

impl ProxyKubeArgs {
    /// The endpoint's TLS, or why it cannot be had, naming the flag and the file.
    pub fn tls(&self) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
        let (Some(_), Some(cert), Some(key)) =
            (self.kube_listen, &self.kube_tls_cert, &self.kube_tls_key)
        else {
            return Ok(None);
        };
        let tls =
            tether::proxy::kube_entry::server_config(cert, key, self.kube_client_ca.as_deref())
                .context("--kube-tls-cert, --kube-tls-key or --kube-client-ca")?;
        Ok(Some(tls))
    }
}

/// The agent's gateway to its own API server, for the root's callers.
#[derive(Args, Debug, Clone)]
pub struct AgentKubeArgs {
    /// Serve the root's Kubernetes requests, mapping root callers by the rules of FILE (YAML: a
    /// list of {users, groups, leafGroups}); callers no rule names are refused.
    #[arg(long)]
    pub kube_access: Option<PathBuf>,
    /// This cluster's API server (default: the in-cluster address).
    #[arg(long, requires = "kube_access")]
    pub kube_api_server: Option<String>,
    /// CA certificates (PEM) of this cluster's API server (default: the ServiceAccount's).
    #[arg(long, requires = "kube_access")]
    pub kube_ca: Option<PathBuf>,
    /// The agent's bearer token file there, read again every minute (default: the
    /// ServiceAccount's); it needs `impersonate` on users and groups.
    #[arg(long, requires = "kube_access")]
    pub kube_token_file: Option<PathBuf>,
}

impl AgentKubeArgs {
    /// The gateway these flags ask for, if any.
    pub fn gateway(&self, root: &ClusterName) -> anyhow::Result<Option<Arc<KubeGateway>>> {
        let Some(rules_file) = &self.kube_access else {
            return Ok(None);
        };
        let access = KubeAccess::new(root.clone(), read_rules(rules_file)?)
            .with_context(|| format!("--kube-access {}", rules_file.display()))?;
        let url = match &self.kube_api_server {
            Some(url) => url.clone(),
            None => in_cluster_url().context(
                "--kube-api-server is needed outside a pod (KUBERNETES_SERVICE_HOST is unset)",
            )?,
        };
        let ca_path = self
            .kube_ca
            .clone()
            .unwrap_or_else(|| Path::new(SERVICE_ACCOUNT_DIR).join("ca.crt"));
        let ca = std::fs::read(&ca_path)
            .with_context(|| format!("--kube-ca {}: cannot read it", ca_path.display()))?;
        let token = self
            .kube_token_file
            .clone()
            .unwrap_or_else(|| Path::new(SERVICE_ACCOUNT_DIR).join("token"));
        std::fs::metadata(&token)
            .with_context(|| format!("--kube-token-file {}: cannot read it", token.display()))?;
        let ca = certificates_from_pem(&ca)
            .with_context(|| format!("--kube-ca {}", ca_path.display()))?;
        let upstream = KubeUpstream::new(&url, ca, Credential::TokenFile(token), None)
            .with_context(|| format!("--kube-api-server {url}"))?;
        Ok(Some(Arc::new(KubeGateway {
            access,
            upstream: Arc::new(upstream),
        })))
    }
}

fn read_rules(path: &Path) -> anyhow::Result<Vec<AccessRule>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--kube-access {}: cannot read it", path.display()))?;
    serde_yaml::from_str(&text).with_context(|| {
        format!(
            "--kube-access {}: expected a YAML list of {{users, groups, leafGroups}}",
            path.display()
        )
    })
}

/// `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`, as a pod reaches its API server.
fn in_cluster_url() -> Option<String> {
    let host = std::env::var("KUBERNETES_SERVICE_HOST").ok()?;
    let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    Some(format!("https://{host}:{port}"))
}

/// `tether kubeconfig`.
#[derive(Args, Debug)]
pub struct KubeconfigArgs {
    /// The leaf whose Kubernetes API the kubeconfig reaches.
    #[arg(long)]
    pub cluster: ClusterName,
    /// The proxies' Kubernetes endpoint, `https://HOST:PORT` (the load balancer's address).
    #[arg(long)]
    pub server: String,
    /// The CA (PEM) that signed the endpoint's certificate (or the certificate itself).
    #[arg(long)]
    pub certificate_authority: PathBuf,
    /// The name the endpoint's certificate carries, when --server is an address it does not
    /// name (a load balancer's IP): the chart's certificate always names the proxy Service,
    /// `RELEASE-proxy.NAMESPACE.svc`.
    #[arg(long)]
    pub tls_server_name: Option<String>,
    /// Authenticate with the bearer token in FILE (a root ServiceAccount's token, an OIDC ID
    /// token); kubectl reads the file itself, again as it changes: the kubeconfig holds its
    /// path only.
    #[arg(long, conflicts_with_all = ["client_certificate", "client_key"], required_unless_present = "client_certificate")]
    pub token_file: Option<PathBuf>,
    /// Authenticate with this client certificate (PEM) of the root's client CA.
    #[arg(long, requires = "client_key")]
    pub client_certificate: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, requires = "client_certificate")]
    pub client_key: Option<PathBuf>,
    /// The context's name (default: the leaf's name).
    #[arg(long)]
    pub context: Option<String>,
    /// Write here instead of standard output; an existing file is refused without --force.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace --out if it exists.
    #[arg(long, requires = "out")]
    pub force: bool,
}

/// Writes the kubeconfig `args` ask for.
pub fn run_kubeconfig(args: KubeconfigArgs) -> anyhow::Result<()> {
    let text = kubeconfig(&args)?;
    match &args.out {
        None => print!("{text}"),
        Some(path) => {
            if path.exists() && !args.force {
                anyhow::bail!(
                    "--out {}: the file exists; pass --force to replace it",
                    path.display()
                );
            }
            std::fs::write(path, text)
                .with_context(|| format!("--out {}: cannot write it", path.display()))?;
        }
    }
    Ok(())
}

fn kubeconfig(args: &KubeconfigArgs) -> anyhow::Result<String> {
    let server = args.server.trim_end_matches('/');
    if !server.starts_with("https://") {
        anyhow::bail!("--server {server}: expected https://HOST:PORT");
    }
    let ca = std::fs::read(&args.certificate_authority).with_context(|| {
        format!(
            "--certificate-authority {}: cannot read it",
            args.certificate_authority.display()
        )
    })?;
    let name = args
        .context
        .clone()
        .unwrap_or_else(|| args.cluster.to_string());
    let absolute = |p: &Path, flag: &str| {
        std::path::absolute(p)
            .map(|p| p.display().to_string())
            .with_context(|| format!("{flag} {}", p.display()))
    };
    let user = match (&args.token_file, &args.client_certificate, &args.client_key) {
        (Some(token), _, _) => serde_json::json!({ "tokenFile": absolute(token, "--token-file")? }),
        (None, Some(cert), Some(key)) => serde_json::json!({
            "client-certificate": absolute(cert, "--client-certificate")?,
            "client-key": absolute(key, "--client-key")?,
        }),
        _ => anyhow::bail!("give --token-file, or --client-certificate with --client-key"),
    };
    use base64::Engine as _;
    let mut cluster = serde_json::json!({
        "server": format!("{server}/clusters/{}", args.cluster),
        "certificate-authority-data": base64::engine::general_purpose::STANDARD.encode(ca),
    });
    if let Some(name) = &args.tls_server_name {
        cluster["tls-server-name"] = name.clone().into();
    }
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": name, "cluster": cluster }],
        "users": [{ "name": name, "user": user }],
        "contexts": [{ "name": name, "context": { "cluster": name, "user": name } }],
        "current-context": name,
    });
    Ok(serde_yaml::to_string(&config)?)
}
