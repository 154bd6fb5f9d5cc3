//! The registry of remote sites (the seed's `RemoteSite`): per leaf cluster, its live tunnels,
//! their heartbeats, and how dials choose among them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use russh::keys::{Certificate, PublicKey};
use russh::server::{Handle, Msg};
use tokio::sync::watch;

use crate::admin::metrics::{METRICS, label};
use crate::identity::{AuthError, TrustStore, validate_proxy_id};
use crate::protocol::{ClusterName, DialError, DialErrorKind, Endpoint};
use crate::stream::{Splice, StreamLimits, TunnelStream, WindowBudget};

/// Whether a site's agents are keeping their heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SiteStatus {
    /// At least one tunnel has sent a heartbeat within the allowed misses.
    Online,
    /// No tunnel, or every tunnel has missed its heartbeats.
    Offline,
}

impl std::fmt::Display for SiteStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SiteStatus::Online => "online",
            SiteStatus::Offline => "offline",
        })
    }
}

/// Most proxies an agent's heartbeat may say it holds: far more replicas than a root runs,
/// far fewer than a list that would swell `/status` (each ID is at most 253 bytes).
pub const MAX_HELD_PROXIES: usize = 64;

/// Why an agent's list of held proxies was not believed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeldError {
    #[error("the agent reports {0} proxies held; at most {MAX_HELD_PROXIES} are believed")]
    TooMany(usize),
    #[error("the agent reports holding {id:?}, which is not a proxy ID: {reason}")]
    NotAProxyId {
        /// The offending entry, cut to 64 characters for the log.
        id: String,
        /// The rule it breaks.
        reason: &'static str,
    },
}

/// Checks an agent-supplied list of held proxies before it is shown anywhere.
pub fn validate_held(held: &[String]) -> Result<(), HeldError> {
    if held.len() > MAX_HELD_PROXIES {
        return Err(HeldError::TooMany(held.len()));
    }
    for id in held {
        validate_proxy_id(id).map_err(|reason| HeldError::NotAProxyId {
            id: id.chars().take(64).collect(),
            reason,
        })?;
    }
    Ok(())
}

/// An agent as it authenticated: its cluster and the certificate that proved it.
#[derive(Debug, Clone)]
pub struct AuthenticatedAgent {
    /// The leaf cluster (its SSH user name and certificate principal).
    pub cluster: ClusterName,
    /// Kept for the tunnel's lifetime, so a change of trust can check it again.
    pub certificate: Certificate,
}

/// One agent connection to this proxy.
pub struct Tunnel {
    /// Unique per proxy process; tells two tunnels of one site apart in logs and removal.
    pub id: u64,
    /// The leaf cluster the agent authenticated as.
    pub cluster: ClusterName,
    /// The certificate the agent authenticated with: checked again whenever the trust changes,
    /// so revoking or re-keying a leaf closes the tunnels the old trust let in.
    certificate: Certificate,
    /// The agent's address as this proxy sees it (its NAT's, usually).
    pub peer: SocketAddr,
    /// When the control channel came up.
    pub connected_at: SystemTime,
    /// Opens channels to the agent.
    handle: Handle,
    /// Milliseconds since `epoch` of the last heartbeat; an atomic so heartbeats never lock.
    last_heartbeat_ms: AtomicU64,
    /// The process-local clock origin for `last_heartbeat_ms`.
    epoch: Instant,
    /// Heartbeat interval agreed with this agent.
    pub interval: Duration,
    /// Silence after which the tunnel counts as offline (and is closed).
    pub offline_after: Duration,
    /// Streams currently open, to enforce the per-tunnel limit and spread load.
    open_streams: AtomicUsize,
    /// Woken when the last open stream ends, so a draining proxy waits without polling.
    idle: tokio::sync::Notify,
    /// The proxies the agent last reported holding tunnels to (its heartbeat says).
    held_by: std::sync::Mutex<Vec<String>>,
    /// What this tunnel's streams may grow their receive windows by, together.
    window_budget: Arc<WindowBudget>,
}

impl Tunnel {
    /// A tunnel whose control channel just completed its hello.
    pub fn new(
        id: u64,
        agent: AuthenticatedAgent,
        peer: SocketAddr,
        handle: Handle,
        interval: Duration,
        missed: u32,
        window_budget: Arc<WindowBudget>,
    ) -> Self {
        Self {
            id,
            cluster: agent.cluster,
            certificate: agent.certificate,
            peer,
            connected_at: SystemTime::now(),
            handle,
            last_heartbeat_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            interval,
            offline_after: interval * missed.max(1),
            open_streams: AtomicUsize::new(0),
            idle: tokio::sync::Notify::new(),
            held_by: std::sync::Mutex::new(Vec::new()),
            window_budget,
        }
    }

    /// Records which proxies the agent holds tunnels to, if the list is believable; an
    /// unbelievable one is dropped and the last good one kept.
    pub fn set_held_by(&self, proxies: Vec<String>) -> Result<(), HeldError> {
        validate_held(&proxies)?;
        *self.held_by.lock().unwrap_or_else(|p| p.into_inner()) = proxies;
        Ok(())
    }

    /// Checks the agent's certificate against `trust` again: `Err` once the trust no longer
    /// accepts it (its CA revoked or rotated out, the leaf forgotten, the certificate expired).
    pub fn verify(&self, trust: &TrustStore, now: SystemTime) -> Result<(), AuthError> {
        trust
            .verify_agent(self.cluster.as_str(), &self.certificate, now)
            .map(|_| ())
    }

    /// Whether the agent's certificate was signed by one of `cas`.
    pub fn signed_by(&self, cas: &[PublicKey]) -> bool {
        let signer = self.certificate.signature_key();
        cas.iter().any(|ca| ca.key_data() == signer)
    }

    /// Records a heartbeat now.
    pub fn heartbeat(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_heartbeat_ms.store(ms, Ordering::Release);
    }

    /// Time since the last heartbeat (or since connecting).
    pub fn since_heartbeat(&self) -> Duration {
        let last = Duration::from_millis(self.last_heartbeat_ms.load(Ordering::Acquire));
        self.epoch.elapsed().saturating_sub(last)
    }

    /// When the last heartbeat arrived, in wall-clock time.
    pub fn last_heartbeat(&self) -> SystemTime {
        SystemTime::now() - self.since_heartbeat()
    }

    /// A heartbeat is late when more than one interval and a half have passed.
    pub fn is_late(&self) -> bool {
        self.since_heartbeat() > self.interval + self.interval / 2
    }

    /// Offline: silent for `offline_after`.
    pub fn is_offline(&self) -> bool {
        self.since_heartbeat() > self.offline_after
    }

    /// Streams open now.
    pub fn open_streams(&self) -> usize {
        self.open_streams.load(Ordering::Acquire)
    }

    /// Resolves once no stream is open on this tunnel.
    pub async fn until_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Registered before the check, so an end between the two is not missed.
            notified.as_mut().enable();
            if self.open_streams() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Closes the agent's connection.
    pub async fn disconnect(&self, reason: &str) {
        let _ = self
            .handle
            .disconnect(
                russh::Disconnect::ByApplication,
                reason.to_owned(),
                String::new(),
            )
            .await;
    }

    /// Opens a stream to `endpoint` through this tunnel.
    pub async fn dial(
        self: &Arc<Self>,
        endpoint: &Endpoint,
        client: SocketAddr,
        max_streams: usize,
        limits: StreamLimits,
        timeout: Duration,
    ) -> Result<ProxyStream, DialError> {
        let guard = StreamGuard::acquire(self, max_streams)?;
        let (address, port) = endpoint.to_wire();
        let open = self.handle.channel_open_forwarded_tcpip(
            address,
            port,
            client.ip().to_string(),
            u32::from(client.port()),
        );
        let started = Instant::now();
        let channel = match tokio::time::timeout(timeout, open).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => {
                return Err(DialError::new(
                    DialErrorKind::NoTunnel,
                    format!("the tunnel to {} refused a stream: {e}", self.cluster),
                ));
            }
            Err(_) => {
                return Err(DialError::new(
                    DialErrorKind::TimedOut,
                    format!("the agent of {} did not accept a stream", self.cluster),
                ));
            }
        };
        let (read, write) = channel.split();
        let remaining = timeout.saturating_sub(started.elapsed());
        let stream =
            TunnelStream::await_dial(read, write, limits, self.window_budget.clone(), remaining)
                .await?;
        Ok(ProxyStream {
            stream,
            _guard: guard,
        })
    }
}

/// Counts one open stream against its tunnel's limit for as long as it lives.
struct StreamGuard(Arc<Tunnel>);

impl StreamGuard {
    fn acquire(tunnel: &Arc<Tunnel>, max: usize) -> Result<Self, DialError> {
        let previous = tunnel.open_streams.fetch_add(1, Ordering::AcqRel);
        let guard = StreamGuard(tunnel.clone());
        if previous >= max {
            return Err(DialError::new(
                DialErrorKind::Other,
                format!(
                    "the tunnel to {} already carries {max} streams, its limit",
                    tunnel.cluster
                ),
            ));
        }
        Ok(guard)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.open_streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A stream through a tunnel, counted against the tunnel's limit until it ends.
pub struct ProxyStream {
    stream: TunnelStream<Msg>,
    _guard: StreamGuard,
}

impl Splice for ProxyStream {
    async fn splice<L>(self, local: L) -> std::io::Result<()>
    where
        L: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let ProxyStream { stream, _guard } = self;
        stream.splice(local).await
    }
}

/// What is known of one leaf cluster.
struct Site {
    tunnels: Vec<Arc<Tunnel>>,
    last_connected: Option<SystemTime>,
    /// Rotates among equally loaded tunnels.
    next: usize,
}

/// A snapshot of one tunnel, for status views.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TunnelInfo {
    pub id: u64,
    pub peer: SocketAddr,
    pub connected_at: SystemTime,
    pub last_heartbeat: SystemTime,
    pub open_streams: usize,
    pub late: bool,
    pub offline: bool,
}

/// A snapshot of one site, for status views (the seed's `GetStatus`, `GetLastConnected`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SiteInfo {
    pub name: ClusterName,
    pub status: SiteStatus,
    pub last_connected: Option<SystemTime>,
    pub tunnels: Vec<TunnelInfo>,
    /// Every proxy of the cluster that holds a tunnel from this site, as its agents report.
    pub held_by: Vec<String>,
}

/// All remote sites known to this proxy.
///
/// Locks are std locks held only for map operations, never across an await.
pub struct Sites {
    sites: RwLock<HashMap<ClusterName, Site>>,
    /// Bumped on every change, so watchers (status writers, tests) can wait for one.
    changes: watch::Sender<u64>,
    /// Hands out tunnel IDs.
    next_id: AtomicU64,
}

impl Default for Sites {
    fn default() -> Self {
        Self {
            sites: RwLock::default(),
            changes: watch::channel(0).0,
            next_id: AtomicU64::new(1),
        }
    }
}

impl Sites {
    /// A fresh tunnel ID.
    pub fn next_tunnel_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Records that `cluster` now holds `tunnels` tunnels. Only that site's gauge is set: setting
    /// every site's on every change cost O(sites) per tunnel, and a proxy taking back 10,000
    /// leaves after a restart spent most of its CPU there (BENCHMARKS.md "Fleet").
    fn changed(&self, cluster: &ClusterName, tunnels: usize) {
        METRICS
            .proxy_tunnels
            .get_or_create(&label("site", cluster.as_str()))
            .set(tunnels as i64);
        self.changes.send_modify(|n| *n += 1);
    }

    /// A receiver that sees a new value after every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Adds a tunnel whose hello has completed.
    pub fn add(&self, tunnel: Arc<Tunnel>) {
        let count = {
            let mut sites = self.sites.write().unwrap_or_else(|p| p.into_inner());
            let site = sites.entry(tunnel.cluster.clone()).or_insert(Site {
                tunnels: Vec::new(),
                last_connected: None,
                next: 0,
            });
            site.last_connected = Some(SystemTime::now());
            site.tunnels.push(tunnel.clone());
            site.tunnels.len()
        };
        self.changed(&tunnel.cluster, count);
    }

    /// Removes a tunnel that has closed. The site stays known, offline, with its last-connected
    /// time.
    pub fn remove_tunnel(&self, cluster: &ClusterName, id: u64) {
        let count = {
            let mut sites = self.sites.write().unwrap_or_else(|p| p.into_inner());
            match sites.get_mut(cluster) {
                Some(site) => {
                    site.tunnels.retain(|t| t.id != id);
                    site.last_connected = Some(SystemTime::now());
                    site.tunnels.len()
                }
                None => 0,
            }
        };
        self.changed(cluster, count);
    }

    /// Forgets a site and returns its tunnels so the caller can close them.
    pub fn remove_site(&self, cluster: &ClusterName) -> Option<Vec<Arc<Tunnel>>> {
        let removed = self
            .sites
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(cluster)
            .map(|s| s.tunnels);
        if removed.is_some() {
            self.changed(cluster, 0);
        }
        removed
    }

    /// The status of one site.
    pub fn get(&self, cluster: &ClusterName) -> Option<SiteInfo> {
        let sites = self.sites.read().unwrap_or_else(|p| p.into_inner());
        sites.get(cluster).map(|s| info(cluster, s))
    }

    /// Every tunnel of every site.
    pub fn tunnels(&self) -> Vec<Arc<Tunnel>> {
        let sites = self.sites.read().unwrap_or_else(|p| p.into_inner());
        sites
            .values()
            .flat_map(|s| s.tunnels.iter().cloned())
            .collect()
    }

    /// The tunnels of one site.
    pub fn tunnels_of(&self, cluster: &ClusterName) -> Vec<Arc<Tunnel>> {
        let sites = self.sites.read().unwrap_or_else(|p| p.into_inner());
        sites
            .get(cluster)
            .map(|s| s.tunnels.clone())
            .unwrap_or_default()
    }

    /// The names of every known site.
    pub fn names(&self) -> Vec<ClusterName> {
        let sites = self.sites.read().unwrap_or_else(|p| p.into_inner());
        sites.keys().cloned().collect()
    }

    /// The status of every known site, sorted by name.
    pub fn list(&self) -> Vec<SiteInfo> {
        let sites = self.sites.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<SiteInfo> = sites.iter().map(|(n, s)| info(n, s)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Chooses the tunnel a new stream to `cluster` should use: among tunnels whose heartbeats
    /// are on time, the least loaded, rotating among ties; late tunnels only if no other.
    pub fn pick(&self, cluster: &ClusterName) -> Result<Arc<Tunnel>, DialError> {
        let mut sites = self.sites.write().unwrap_or_else(|p| p.into_inner());
        let site = sites.get_mut(cluster).ok_or_else(|| {
            DialError::new(
                DialErrorKind::NoTunnel,
                format!("cluster {cluster} is not connected to this proxy"),
            )
        })?;
        let n = site.tunnels.len();
        if n == 0 {
            return Err(DialError::new(
                DialErrorKind::NoTunnel,
                format!("cluster {cluster} is offline: no tunnel is connected"),
            ));
        }
        let start = site.next % n;
        site.next = site.next.wrapping_add(1);
        let best = (0..n)
            .map(|i| &site.tunnels[(start + i) % n])
            .min_by_key(|t| (t.is_late(), t.open_streams()))
            .cloned();
        best.ok_or_else(|| DialError::new(DialErrorKind::NoTunnel, "no tunnel"))
    }
}

fn info(name: &ClusterName, site: &Site) -> SiteInfo {
    let tunnels: Vec<TunnelInfo> = site
        .tunnels
        .iter()
        .map(|t| TunnelInfo {
            id: t.id,
            peer: t.peer,
            connected_at: t.connected_at,
            last_heartbeat: t.last_heartbeat(),
            open_streams: t.open_streams(),
            late: t.is_late(),
            offline: t.is_offline(),
        })
        .collect();
    let online = tunnels.iter().any(|t| !t.offline);
    let mut held_by: Vec<String> = site
        .tunnels
        .iter()
        .flat_map(|t| t.held_by.lock().unwrap_or_else(|p| p.into_inner()).clone())
        .collect();
    held_by.sort();
    held_by.dedup();
    SiteInfo {
        name: name.clone(),
        status: if online {
            SiteStatus::Online
        } else {
            SiteStatus::Offline
        },
        last_connected: site.last_connected,
        tunnels,
        held_by,
    }
}
