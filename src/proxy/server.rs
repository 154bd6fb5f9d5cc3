//! The proxy's listener and lifecycle (the seed's `Server`: start, close, wait). The state its
//! connections share is [`super::shared`]'s; the dialer every client entry uses is
//! [`super::dialer`]'s.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use russh::server::Config as SshConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span};

use super::accept::{Port, accept_loop};
use super::config::ProxyConfig;
use super::dialer::ProxyDialer;
use super::limits::ConnectionLimiter;
use super::peers::{Peer, PeerLiveness, PeerPool};
use super::quota::StreamQuota;
use super::shared::ProxyShared;
use super::sites::{SiteInfo, Sites};
use super::tls_port::TlsPort;
use crate::admin::metrics::{MetricsRegistry, ProxyMetrics, StreamMetrics};
use crate::identity::Identity;
use crate::protocol::control::CaKeySet;
use crate::protocol::{ClusterName, ssh};

/// A running proxy.
pub struct ProxyServer {
    shared: Arc<ProxyShared>,
    local_addr: SocketAddr,
}

impl ProxyServer {
    /// Binds the tunnel listener and starts accepting agents and clients.
    pub async fn start(config: ProxyConfig) -> io::Result<Self> {
        let listener = TcpListener::bind(config.listen).await?;
        Self::start_on(config, listener).await
    }

    /// Starts on a listener bound beforehand (by a supervisor holding the port across
    /// restarts, or a test that must never lose its port); `config.listen` is ignored.
    pub async fn start_on_std(
        config: ProxyConfig,
        listener: std::net::TcpListener,
    ) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        Self::start_on(config, TcpListener::from_std(listener)?).await
    }

    async fn start_on(config: ProxyConfig, listener: TcpListener) -> io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let ssh = ssh_config(&config, &config.host_identity);
        let me = Peer {
            id: config.proxy_id.clone(),
            addr: Some(local_addr),
            generation: 0,
        };
        let (metrics, streams) = (ProxyMetrics::default(), StreamMetrics::default());
        let shared = Arc::new(ProxyShared {
            limiter: ConnectionLimiter::with_metrics(config.limits, metrics.clone()),
            header_reads: Arc::new(tokio::sync::Semaphore::new(config.limits.max_handshakes)),
            client_streams: StreamQuota::new(config.limits.max_streams_per_client),
            client_sessions: Arc::default(),
            peer_pool: PeerPool::new(PeerLiveness::from_heartbeat(&config.heartbeat)),
            root_keys: watch::channel(None).0,
            config,
            sites: Sites::new(metrics.tunnels.clone()),
            peers: watch::channel(vec![me]).0,
            peers_known: std::sync::atomic::AtomicBool::new(true),
            draining: CancellationToken::new(),
            stopped: CancellationToken::new(),
            tasks: TaskTracker::new(),
            ssh: ArcSwap::from_pointee(ssh),
            exported: MetricsRegistry::default().proxy(&metrics, &streams),
            metrics,
            streams,
        });
        let span = info_span!("proxy", id = %shared.config.proxy_id, listen = %local_addr);
        shared
            .tasks
            .spawn(accept_loop(shared.clone(), listener, Port::Ssh).instrument(span));
        info!(proxy = %shared.config.proxy_id, %local_addr, "proxy listening");
        Ok(Self { shared, local_addr })
    }

    /// Where agents connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The registry of remote sites.
    pub fn sites(&self) -> &Sites {
        &self.shared.sites
    }

    /// The status of one site (the seed's `GetSite`).
    pub fn site(&self, cluster: &ClusterName) -> Option<SiteInfo> {
        self.shared.sites.get(cluster)
    }

    /// Forgets a site and closes its tunnels (the seed's `RemoveSite`).
    pub async fn remove_site(&self, cluster: &ClusterName) -> bool {
        match self.shared.sites.remove_site(cluster) {
            Some(tunnels) => {
                for t in tunnels {
                    t.disconnect("site removed").await;
                }
                true
            }
            None => false,
        }
    }

    /// Presents `host` from the next connection on, and forwards dials to peers as
    /// `peering` (when peering is on): how a proxy renews certificates it issued itself.
    /// Connections already up keep the certificates they were set up with.
    pub fn renew_identities(&self, host: &Identity, peering: Option<Identity>) {
        self.shared
            .ssh
            .store(Arc::new(ssh_config(&self.shared.config, host)));
        if let (Some(config), Some(identity)) = (&self.shared.config.peering, peering) {
            config.identity.store(Arc::new(identity));
        }
    }

    /// Changes what this proxy trusts and closes the tunnels the new trust refuses (see
    /// [`super::trust`]); every change of trust after start goes through here.
    pub async fn update_trust(
        &self,
        change: impl Fn(&mut crate::identity::TrustStore),
    ) -> super::trust::TrustChange {
        super::trust::update(&self.shared, change).await
    }

    /// Serves the TLS port on `listener` ([`super::tls_port`]), with this proxy's limits,
    /// lifecycle and SSH settings, until the proxy drains.
    pub fn serve_tls_port(&self, listener: TcpListener, port: impl Into<Arc<TlsPort>>) {
        let local_addr = listener.local_addr().ok();
        let span = info_span!("tls_port", id = %self.shared.config.proxy_id, listen = ?local_addr);
        let accepting = accept_loop(self.shared.clone(), listener, Port::Tls(port.into()));
        self.shared.tasks.spawn(accepting.instrument(span));
    }

    /// A dialer for client entries.
    pub fn dialer(&self) -> ProxyDialer {
        ProxyDialer::new(self.shared.clone())
    }

    /// Marks the peer set unknown until the next [`set_peers`](Self::set_peers): for peers
    /// discovered at run time (EndpointSlices), so `/readyz` waits for the first discovery.
    pub fn expect_peer_discovery(&self) {
        self.shared
            .peers_known
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// Replaces the proxy list that discovery announces and peering uses.
    pub fn set_peers(&self, peers: Vec<Peer>) {
        self.shared
            .peers_known
            .store(true, std::sync::atomic::Ordering::Release);
        let me = &self.shared.config.proxy_id;
        let sources = peers.iter().filter(|p| &p.id != me).filter_map(|p| p.addr);
        self.shared
            .limiter
            .set_peer_sources(sources.map(|a| a.ip()).collect());
        self.shared.peers.send_if_modified(|current| {
            let changed = *current != peers;
            *current = peers;
            changed
        });
    }

    /// Announces `set`, this root's CA keys signed by one of them, to every agent that speaks
    /// protocol 1.3: those connected now and those that connect later (`None`: no more).
    pub fn announce_root_keys(&self, set: Option<CaKeySet>) {
        let set = set.map(Arc::new);
        self.shared.root_keys.send_if_modified(|current| {
            let changed = *current != set;
            *current = set;
            changed
        });
    }

    /// The shared state, for admin views and tests.
    pub fn shared(&self) -> &Arc<ProxyShared> {
        &self.shared
    }

    /// Graceful shutdown: stops accepting, tells agents to reconnect elsewhere, lets streams
    /// finish for up to `grace`, then closes everything.
    pub async fn shutdown(&self, grace: Duration) {
        self.shared.draining.cancel();
        self.shared.tasks.close();
        // Wait on each busy tunnel in turn, and look again: a stream may have started on one
        // already waited for.
        let drained = async {
            loop {
                let busy: Vec<_> = self
                    .shared
                    .sites
                    .tunnels()
                    .into_iter()
                    .filter(|t| t.open_streams() > 0)
                    .collect();
                if busy.is_empty() {
                    break;
                }
                for tunnel in busy {
                    tunnel.until_idle().await;
                }
            }
        };
        let _ = tokio::time::timeout(grace, drained).await;
        self.close();
        self.wait().await;
    }

    /// Closes every connection now (the seed's `Close`).
    pub fn close(&self) {
        self.shared.draining.cancel();
        self.shared.stopped.cancel();
        self.shared.tasks.close();
    }

    /// Waits until every task has finished (the seed's `Wait`).
    pub async fn wait(&self) {
        self.shared.tasks.wait().await;
    }
}

/// The SSH server settings for `config`, presenting `host`.
fn ssh_config(config: &ProxyConfig, host: &Identity) -> SshConfig {
    SshConfig {
        keys: vec![host.key.clone()],
        certificates: vec![host.certificate.clone()],
        // "none" is offered only to joining leaves, and only when joins are enabled; the
        // handler accepts it for the join user alone.
        methods: if config.join.is_some() {
            russh::MethodSet::from(&[russh::MethodKind::PublicKey, russh::MethodKind::None][..])
        } else {
            russh::MethodSet::from(&[russh::MethodKind::PublicKey][..])
        },
        preferred: ssh::preferred(),
        window_size: ssh::SSH_WINDOW,
        maximum_packet_size: ssh::MAX_PACKET_SIZE,
        channel_buffer_size: ssh::CHANNEL_BUFFER,
        auth_rejection_time: Duration::from_millis(250),
        auth_rejection_time_initial: Some(Duration::ZERO),
        max_auth_attempts: 3,
        inactivity_timeout: None,
        nodelay: true,
        ..SshConfig::default()
    }
}
