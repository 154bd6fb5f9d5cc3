//! Tether keeps reverse tunnels between clusters.
//!
//! A *leaf* cluster's agents dial out to the *root* cluster's proxies over SSH; through those
//! tunnels, clients in the root reach the servers the leaf allows. The layers, from the wire up:
//!
//! - [`protocol`]: wire messages, target names and their limits (no I/O).
//! - [`identity`]: certificate authorities, certificates and the trust store.
//! - [`stream`]: flow-controlled byte streams over SSH channels.
//! - [`proxy`]: the tunnel server, its registry of remote sites and the client entry.
//! - [`egress`]: outbound dials under an allow-list, shared by agent and proxy.
//! - [`agent`]: the leaf side: tunnels and the pool.
//! - [`transport`]: the byte stream to the root: direct, or through an HTTP CONNECT forward proxy.
//! - [`forward`]: `tether forward`, a local port-forward through a proxy's client entry.
//!
//! Only the `operator` module talks to Kubernetes; the data plane runs without it.

pub mod admin;
pub mod agent;
pub mod client;
pub mod demo;
pub mod egress;
pub mod forward;
pub mod identity;
pub mod operator;
pub mod protocol;
pub mod proxy;
pub mod stream;
pub mod transport;
