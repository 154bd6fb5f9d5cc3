//! Outbound dials under an allow-list: what both sides of a tunnel do when they reach a
//! server on someone's behalf. The agent dials its leaf's servers for the root's clients; a
//! proxy dials its own cluster's servers directly (`--direct-allow`). Both must refuse the same
//! way, so both use this module:
//!
//! - [`allow_list`]: `CIDR:PORTS` and `HOST:PORTS` rules, default deny, and the addresses no
//!   rule may reach by name (loopback, link-local) or at all;
//! - [`connect`]: resolve a name once, judge every answer, dial only the checked addresses.
//!
//! It sits below `agent` and `proxy`, above `protocol` (its refusals are [`DialError`]s).
//!
//! [`DialError`]: crate::protocol::DialError

pub mod allow_list;
pub mod connect;
