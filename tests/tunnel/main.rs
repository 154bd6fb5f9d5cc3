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
mod startup;
