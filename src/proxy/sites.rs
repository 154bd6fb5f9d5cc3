//! The registry of remote sites (the seed's `RemoteSite`): per leaf cluster, its live tunnels,
//! their heartbeats, and how dials choose among them.
//!
//! A new dial goes to a tunnel whose heartbeats are on time (the least loaded), to a late one
//! only if there is no other, and never to one that has missed its heartbeats or was declared
//! dead (see [`super::tunnel`] for what happens to the dials pending on a tunnel that dies).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

use super::inventory::{AgentRecord, Inventory};
use crate::admin::metrics::{Labels, label};
use crate::protocol::{ClusterName, DialError, DialErrorKind, Endpoint};

pub use super::tunnel::{
    AgentHello, AuthenticatedAgent, HeldError, MAX_HELD_PROXIES, ProxyStream, Tunnel,
    TunnelDialError, validate_held,
};

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

/// What is known of one leaf cluster.
#[derive(Default)]
struct Site {
    tunnels: Vec<Arc<Tunnel>>,
    last_connected: Option<SystemTime>,
    /// Rotates among equally loaded tunnels.
    next: usize,
    /// What the leaf's agents last reported, kept after their tunnels go (or learnt from the
    /// leaf's `RemoteCluster` by a proxy that never held them): the leaf's inventory while
    /// it is offline, and the allow-lists that refuse dials without a round trip.
    remembered: Inventory,
    /// Why this proxy last refused one of the leaf's agents (an unsupported protocol),
    /// until one is accepted.
    refused: Option<String>,
}

impl Site {
    /// The reports of the live tunnels, when every one of them has sent one.
    fn live_inventory(&self) -> Option<Inventory> {
        let reports: Option<Vec<_>> = self.tunnels.iter().map(|t| t.report()).collect();
        reports.filter(|r| !r.is_empty()).map(Inventory::of_agents)
    }

    /// Remembers what the live tunnels report, if they all have.
    fn remember_live(&mut self) {
        if let Some(inventory) = self.live_inventory() {
            self.remembered = inventory;
        }
    }

    /// The inventory dials are judged by: the live tunnels' when there are any (nothing,
    /// when one of them has not reported), the remembered one when there are none.
    fn judging_inventory(&self) -> Option<Inventory> {
        if self.tunnels.is_empty() {
            Some(self.remembered.clone())
        } else {
            self.live_inventory()
        }
    }
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
    /// The agents of the live tunnels, as they reported themselves (protocol 1.1 agents).
    pub agents: Vec<Arc<AgentRecord>>,
    /// Why this proxy last refused one of the site's agents, until it accepts one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
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
    /// The proxy's tunnels-per-site gauge (`tether_proxy_tunnels`).
    gauges: Family<Labels, Gauge>,
}

impl Sites {
    /// No site yet; tunnel counts go to `gauges`.
    pub fn new(gauges: Family<Labels, Gauge>) -> Self {
        Self {
            sites: RwLock::default(),
            changes: watch::channel(0).0,
            next_id: AtomicU64::new(1),
            gauges,
        }
    }

    /// A fresh tunnel ID.
    pub fn next_tunnel_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Records that `cluster` now holds `tunnels` tunnels. Only that site's gauge is set: setting
    /// every site's on every change cost O(sites) per tunnel, and a proxy taking back 10,000
    /// leaves after a restart spent most of its CPU there (BENCHMARKS.md "Fleet").
    fn changed(&self, cluster: &ClusterName, tunnels: usize) {
        self.gauges
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
            let site = sites.entry(tunnel.cluster.clone()).or_default();
            site.last_connected = Some(SystemTime::now());
            site.refused = None;
            site.tunnels.push(tunnel.clone());
            site.tunnels.len()
        };
        self.changed(&tunnel.cluster, count);
    }

    /// Takes a tunnel out of its site, so no new dial goes to it; the site stays known, offline,
    /// with its last-connected time. Whether its streams end now is the caller's choice: a
    /// dead path's are ended ([`Tunnel::close`]); those of a tunnel its agent closed drain
    /// (russh ends each channel once its data is delivered).
    pub fn remove_tunnel(&self, cluster: &ClusterName, id: u64) {
        let count = {
            let mut sites = self.sites.write().unwrap_or_else(|p| p.into_inner());
            match sites.get_mut(cluster) {
                Some(site) => {
                    site.tunnels.retain(|t| t.id != id);
                    site.last_connected = Some(SystemTime::now());
                    site.remember_live();
                    site.tunnels.len()
                }
                None => 0,
            }
        };
        self.changed(cluster, count);
    }

    /// The agent of `tunnel` sent a new report (kept in the tunnel): the site remembers it.
    pub fn reported(&self, tunnel: &Tunnel) {
        let count = {
            let mut sites = self.sites.write().unwrap_or_else(|p| p.into_inner());
            let Some(site) = sites.get_mut(&tunnel.cluster) else {
                return;
            };
            site.remember_live();
            site.tunnels.len()
        };
        self.changed(&tunnel.cluster, count);
    }

    /// Remembers `inventory` for `cluster` (what its `RemoteCluster` says its agents last
    /// reported, from every replica's entries) while this proxy holds none of its tunnels:
    /// those tell it more, and sooner.
    pub fn remember(&self, cluster: &ClusterName, inventory: Inventory) {
        let mut sites = self.sites.write().unwrap_or_else(|p| p.into_inner());
        let site = sites.entry(cluster.clone()).or_default();
        if site.tunnels.is_empty() {
            site.remembered = inventory;
        }
    }

    /// Records that this proxy refused an agent of `cluster`, and why.
    pub fn refused(&self, cluster: &ClusterName, reason: String) {
        let count = {
            let mut sites = self.sites.write().unwrap_or_else(|p| p.into_inner());
            let site = sites.entry(cluster.clone()).or_default();
            if site.refused.as_ref() == Some(&reason) {
                return;
            }
            site.refused = Some(reason);
            site.tunnels.len()
        };
        self.changed(cluster, count);
    }

    /// The refusal every agent of `cluster` would give a dial of `endpoint`, as their reports
    /// tell (see [`super::inventory`]); `None` when one might permit it, or nothing is known.
    pub fn refusal(&self, cluster: &ClusterName, endpoint: &Endpoint) -> Option<DialError> {
        let inventory = {
            let sites = self.sites.read().unwrap_or_else(|p| p.into_inner());
            sites.get(cluster)?.judging_inventory()?
        };
        inventory.refusal(cluster, endpoint)
    }

    /// Forgets a site and returns its tunnels so the caller can close them.
    pub fn remove_site(&self, cluster: &ClusterName) -> Option<Vec<Arc<Tunnel>>> {
        let removed = self
            .sites
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(cluster)
            .map(|s| s.tunnels);
        if let Some(tunnels) = &removed {
            tunnels.iter().for_each(|t| t.close());
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

    /// Chooses the tunnel a new stream to `cluster` should use, skipping those in `tried`:
    /// among tunnels whose heartbeats are on time, the least loaded, rotating among ties; late
    /// tunnels only if no other, and tunnels whose agent is leaving last; offline or closed
    /// tunnels never (their dials would wait for
    /// a dead agent until the watchdog closes them).
    pub fn pick(&self, cluster: &ClusterName, tried: &[u64]) -> Result<Arc<Tunnel>, DialError> {
        let mut sites = self.sites.write().unwrap_or_else(|p| p.into_inner());
        let site = sites.get_mut(cluster).ok_or_else(|| {
            DialError::new(
                DialErrorKind::NoTunnel,
                format!("cluster {cluster} is not connected to this proxy"),
            )
        })?;
        let n = site.tunnels.len();
        let start = site.next % n.max(1);
        site.next = site.next.wrapping_add(1);
        let best = (0..n)
            .map(|i| &site.tunnels[(start + i) % n])
            .filter(|t| t.is_usable() && !tried.contains(&t.id))
            .min_by_key(|t| (t.is_leaving(), t.is_late(), t.open_streams()))
            .cloned();
        best.ok_or_else(|| {
            let why = match (n, tried.len()) {
                (0, _) => "no tunnel is connected".to_owned(),
                (n, 0) => format!("its {n} tunnel(s) missed their heartbeats"),
                (n, _) => format!("none of its {n} tunnel(s) could carry the dial"),
            };
            DialError::new(
                DialErrorKind::NoTunnel,
                format!("cluster {cluster} is offline to this proxy: {why}"),
            )
        })
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
    let mut held_by: Vec<String> = site.tunnels.iter().flat_map(|t| t.held_by()).collect();
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
        agents: site.live_inventory().unwrap_or_default().agents,
        refused: site.refused.clone(),
    }
}
