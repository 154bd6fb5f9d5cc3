//! The root side: the tunnel server, its registry of remote sites, and the client entry.

mod accept;
pub mod access;
pub mod audit;
pub mod authority;
pub mod client_entry;
pub mod clients;
pub mod config;
mod control;
pub mod dialer;
mod handler;
pub mod inventory;
pub mod join;
pub mod kube_entry;
pub mod limits;
pub mod peers;
pub mod quota;
pub mod reload;
pub mod root_keys;
mod rotation;
pub mod server;
mod session;
pub mod shared;
pub mod sites;
pub mod tls_port;
pub mod trust;
pub mod tunnel;

pub use access::{AccessDenied, BearerTokens, LeafAccess, Reach, Who};
pub use authority::{Admission, JoinAuthority, Refused};
pub use config::{Balancers, HeartbeatPolicy, ProxyConfig, ProxyLimits};
pub use dialer::{Dialer, ProxyConn, ProxyDialer};
pub use peers::{Peer, PeeringConfig};
pub use server::ProxyServer;
pub use sites::{SiteInfo, SiteStatus, Sites};
