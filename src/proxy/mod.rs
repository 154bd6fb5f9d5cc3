//! The root side: the tunnel server, its registry of remote sites, and the client entry.

pub mod client_entry;
pub mod clients;
pub mod config;
mod control;
pub mod dialer;
mod handler;
pub mod join;
pub mod limits;
pub mod peers;
pub mod quota;
pub mod reload;
pub mod server;
pub mod sites;
pub mod trust;
pub mod tunnel;

pub use config::{HeartbeatPolicy, ProxyConfig, ProxyLimits};
pub use dialer::Dialer;
pub use join::{Admission, JoinAuthority, Refused};
pub use peers::{Peer, PeeringConfig};
pub use server::{ProxyConn, ProxyDialer, ProxyServer};
pub use sites::{SiteInfo, SiteStatus, Sites};
