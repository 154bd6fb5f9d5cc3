//! The controllers the operator runs: [`reverse_tunnel`] (tunnels into running agents) and
//! [`trusted_cluster`] (joins into tunnels).

pub mod reverse_tunnel;
pub mod trusted_cluster;
