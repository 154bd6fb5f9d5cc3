//! `tether proxy`'s TLS port flags: one port for everything, for a load balancer's 443.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use tether::proxy::ProxyServer;
use tether::proxy::tls_port::TlsPort;

#[derive(Args)]
pub struct TlsPortArgs {
    /// Also serve everything on one TLS port (what a load balancer's 443 forwards to): SSH
    /// by ALPN `tether-ssh` (tunnels, joins, peers, `tether dial`), and WebSocket upgrades at
    /// /tether/v1/tunnel, in TLS or in plain HTTP from an L7 load balancer that terminated
    /// TLS. Loopback unless you say otherwise.
    #[arg(long, value_name = "ADDR")]
    tls_listen: Option<SocketAddr>,
    /// The TLS port's certificate chain (PEM; a cert-manager Secret's `tls.crt`). Without it
    /// the proxy issues itself a self-signed one at start: agents need no trust in it, as SSH
    /// inside authenticates the proxy.
    #[arg(long, requires_all = ["tls_key", "tls_listen"], value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The private key of `--tls-cert` (PEM).
    #[arg(long, requires = "tls_cert", value_name = "FILE")]
    tls_key: Option<PathBuf>,
}

impl TlsPortArgs {
    /// The port's TLS settings, read at start-up so a bad file stops the proxy before it
    /// serves; `None` without `--tls-listen`. With `kube_client_ca` (the Kubernetes endpoint's
    /// `--kube-client-ca`), client certificates are verified on this port too.
    pub fn load(
        &self,
        proxy_id: &str,
        kube_client_ca: Option<&Path>,
    ) -> anyhow::Result<Option<(SocketAddr, TlsPort)>> {
        let Some(listen) = self.tls_listen else {
            return Ok(None);
        };
        let port = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => TlsPort::from_files(cert, key, kube_client_ca)
                .with_context(|| format!("--tls-cert {}: cannot use it", cert.display()))?,
            _ => {
                let names = vec![proxy_id.to_owned(), "localhost".to_owned()];
                TlsPort::self_issued(names, kube_client_ca)
                    .context("--tls-listen: cannot issue the port's certificate")?
            }
        };
        Ok(Some((listen, port)))
    }

    /// Binds the port and serves it on `proxy`. A certificate from files is followed: when
    /// `--tls-cert` changes (a renewed Secret), the port presents the new one from the next
    /// connection on, until `stop`.
    pub async fn serve(
        &self,
        port: Option<(SocketAddr, TlsPort)>,
        proxy: &ProxyServer,
        kube_client_ca: Option<PathBuf>,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> anyhow::Result<()> {
        let Some((listen, port)) = port else {
            return Ok(());
        };
        let listener = super::bind("--tls-listen", listen).await?;
        println!("TLS port on {}", listener.local_addr()?);
        let port = Arc::new(port);
        proxy.serve_tls_port(listener, port.clone());
        if let (Some(cert), Some(key)) = (self.tls_cert.clone(), self.tls_key.clone()) {
            tasks.spawn(tether::proxy::reload::follow_file(
                "TLS port certificate",
                cert,
                tether::proxy::reload::POLL,
                Arc::default(),
                stop,
                move |cert: &Path| port.reload_files(cert, &key, kube_client_ca.as_deref()),
            ));
        }
        Ok(())
    }
}
