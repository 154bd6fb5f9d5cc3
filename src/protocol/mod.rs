//! Wire messages and names shared by the proxy and the agent, with their limits.
//!
//! The vocabulary both ends agree on, and its framing: nothing here opens a connection.

pub mod busy;
pub mod control;
pub mod dial;
pub mod join;
pub mod kube;
pub mod proxy_header;
pub mod ssh;
pub mod stream;
pub mod target;
pub mod version;

pub use dial::{DialError, DialErrorKind};
pub use target::{ClusterName, Endpoint, Target, TargetParseError};
pub use version::ProtocolVersion;
