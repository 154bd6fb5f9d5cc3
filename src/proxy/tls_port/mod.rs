//! The TLS port: everything a root serves, on one port that a cloud load balancer can put on 443.
//!
//! What a connection carries is read from its first bytes, its TLS handshake and its request
//! head, never guessed from its address:
//!
//! ```text
//!   first byte 0x16 (TLS) ──▶ ALPN tether-ssh ──────────────────▶ SSH (tunnels, joins, peers,
//!          │                    │                                     dial clients)
//!          │                    └ http/1.1 or none ──┐
//!          └ anything else (plain HTTP from an L7 ───┴▶ one request head ([`http`]): a WebSocket
//!            load balancer that terminated TLS)         upgrade (SSH in frames), CONNECT (the
//!                                                       client entry), Kubernetes (over TLS)
//! ```
//!
//! Every connection, whatever it carries, is admitted by the same [`ConnectionLimiter`] as the
//! SSH port's (per source, in total, handshakes) and has one handshake deadline from accept that
//! covers TLS, the HTTP head and the SSH handshake: a client that sends one byte and stops holds
//! a slot for `handshake_timeout` (15 s) at most, and its socket is closed then. The HTTP head is
//! read into at most [`http::MAX_HEAD`] bytes. A request passed to the client entry or the
//! Kubernetes endpoint is admitted there again, under that endpoint's own limits.
//!
//! [`ConnectionLimiter`]: super::limits::ConnectionLimiter

mod http;

pub use http::MAX_HEAD;

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpStream;
use tokio::time::timeout_at;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use super::client_entry::HandOff;
use super::kube_entry::{KubeHandOff, KubeTlsError, who_of_certificate};
use super::session::{Carried, serve_ssh};
use super::shared::ProxyShared;
use crate::transport::tls::{ALPN_HTTP1, ALPN_SSH};
use http::Over;

/// The first byte of every TLS connection (a handshake record).
const TLS_HANDSHAKE: u8 = 0x16;

/// The TLS port's settings: its certificate, and the protocols it offers.
pub struct TlsPort {
    /// The port's TLS settings: its certificate (replaced whole when the files change, see
    /// [`TlsPort::reload_files`]), offering `tether-ssh` then `http/1.1`.
    config: ArcSwap<rustls::ServerConfig>,
    /// Where HTTP CONNECT requests go: the client entry, which serves them as its own (`curl
    /// --proxy https://...`); `None`: the port has no client entry and answers 404.
    client_entry: Option<HandOff>,
    /// Where other HTTP requests over TLS go: the Kubernetes endpoint (`tether kubeconfig`
    /// naming this port); `None`: the port answers them 404.
    kube: Option<KubeHandOff>,
}

impl TlsPort {
    /// The port with `certificate` (a PEM chain) and its `key`; with `client_ca`, client
    /// certificates it signed authenticate Kubernetes requests (optional, as on
    /// `--kube-listen`).
    pub fn from_files(
        certificate: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<Self, KubeTlsError> {
        let config = super::kube_entry::server_config(certificate, key, client_ca)?;
        Ok(Self::with_config(&config))
    }

    /// The port with a self-signed certificate for `names`, issued now: for a first run with
    /// no certificate at hand. Agents need no trust in it (SSH inside authenticates the proxy,
    /// see [`crate::transport::tls`]); give a real one with [`TlsPort::from_files`] for clients
    /// that check it. `client_ca` as for [`TlsPort::from_files`].
    pub fn self_issued(names: Vec<String>, client_ca: Option<&Path>) -> Result<Self, KubeTlsError> {
        let issued = rcgen::generate_simple_self_signed(names)
            .map_err(|e| KubeTlsError::Config(format!("cannot issue a certificate: {e}")))?;
        let key = rustls_pki_types::PrivatePkcs8KeyDer::from(issued.signing_key.serialize_der());
        let chain = vec![issued.cert.der().clone()];
        let config = super::kube_entry::server_config_with(chain, key.into(), client_ca)?;
        Ok(Self::with_config(&config))
    }

    /// Presents the certificate of `certificate` and `key` from the next connection on (a
    /// renewed cert-manager Secret); `client_ca` as for [`TlsPort::from_files`]. A file that
    /// cannot be used leaves the certificate in force as it was, and says why.
    pub fn reload_files(
        &self,
        certificate: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<(), KubeTlsError> {
        let config = super::kube_entry::server_config(certificate, key, client_ca)?;
        self.config.store(Arc::new(with_alpn(&config)));
        Ok(())
    }

    /// The port with the certificate of `config`; its ALPN list is replaced by the port's.
    pub fn with_config(config: &rustls::ServerConfig) -> Self {
        Self {
            config: ArcSwap::from_pointee(with_alpn(config)),
            client_entry: None,
            kube: None,
        }
    }

    /// Passes the port's other HTTP requests over TLS to the Kubernetes endpoint (its
    /// [`hand_off`] sender). Build the port with the endpoint's client CA, so client
    /// certificates are asked for and verified here.
    ///
    /// [`hand_off`]: super::kube_entry::hand_off
    pub fn with_kube(mut self, kube: KubeHandOff) -> Self {
        self.kube = Some(kube);
        self
    }

    /// Passes the port's HTTP CONNECT requests to a client entry (its [`hand_off`] sender).
    ///
    /// [`hand_off`]: super::client_entry::hand_off
    pub fn with_client_entry(mut self, entry: HandOff) -> Self {
        self.client_entry = Some(entry);
        self
    }
}

/// `config` offering the port's protocols: `tether-ssh`, then `http/1.1`.
fn with_alpn(config: &rustls::ServerConfig) -> rustls::ServerConfig {
    let mut config = config.clone();
    config.alpn_protocols = vec![ALPN_SSH.to_vec(), ALPN_HTTP1.to_vec()];
    config
}

/// Serves one connection of the TLS port (the SSH port's is `server::serve_tcp`).
pub(super) async fn serve(
    shared: Arc<ProxyShared>,
    port: Arc<TlsPort>,
    socket: TcpStream,
    carried: Carried,
) {
    let deadline = carried.deadline;
    let mut first = [0u8; 1];
    let peeked = tokio::select! {
        r = timeout_at(deadline, socket.peek(&mut first)) => r,
        () = shared.stopped.cancelled() => return,
    };
    if !matches!(peeked, Ok(Ok(1))) {
        return debug!("the connection sent nothing before it ended or ran out of time");
    }
    if first[0] != TLS_HANDSHAKE {
        return http::serve(shared, &port, socket, carried, Over::Plain).await;
    }
    let accepted = tokio::select! {
        r = timeout_at(deadline, TlsAcceptor::from(port.config.load_full()).accept(socket)) => r,
        () = shared.stopped.cancelled() => return,
    };
    let tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return debug!(error = %e, "TLS handshake failed"),
        Err(_) => return debug!("TLS handshake timed out"),
    };
    let session = tls.get_ref().1;
    if session.alpn_protocol() == Some(ALPN_SSH) {
        debug!(carrier = "tls", "SSH inside TLS (ALPN tether-ssh)");
        return serve_ssh(shared, tls, carried).await;
    }
    let certificate = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| who_of_certificate(leaf));
    http::serve(shared, &port, tls, carried, Over::Tls { certificate }).await
}
