//! The tunnel core, end to end on loopback: a real proxy and agent speaking SSH.

#[path = "../support/mod.rs"]
mod support;

mod audit;
mod auth;
mod data;
mod dial_errors;
mod entry;
mod join;
mod leaving;
mod liveness;
mod logs;
mod metrics;
mod policy;
mod proxy_protocol;
mod skew;
mod startup;
mod tls_port;

use tether::protocol::DialError;

/// The error a dial of `name` through `rig` ends in, panicking with `unexpected` if it connects
/// instead: the refusals these tests check each say why in their kind and message.
pub(crate) async fn dial_error(rig: &support::Rig, name: &str, unexpected: &str) -> DialError {
    rig.dial_name(name).await.err().expect(unexpected)
}
