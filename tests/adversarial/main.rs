//! The attacks of the security review (issue #11), kept as tests that fail if one works again.
//!
//! Each module holds one class of attack against real proxies and agents on loopback:
//! - [`preauth`]: unauthenticated connections that stall a handshake or hoard slots, and
//!   token guessing on the client entry;
//! - [`names`]: joins that take a trusted name, revocation that must evict, the join user;
//! - [`egress`]: allow-list rules widened through DNS, secrets and keys;
//! - [`streams`]: one client taking a tunnel's whole stream budget.

#[path = "../support/mod.rs"]
mod support;

mod egress;
mod names;
mod preauth;
mod streams;
