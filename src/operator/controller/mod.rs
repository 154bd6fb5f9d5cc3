//! The controllers the operator runs. Today one: [`reverse_tunnel`].

pub mod reverse_tunnel;
