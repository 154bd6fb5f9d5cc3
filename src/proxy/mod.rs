//! The root side: the tunnel server, its registry of remote sites, and the client entry.

pub mod client_entry;
pub mod dialer;

pub use dialer::Dialer;
