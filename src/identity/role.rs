//! What a user certificate allows its holder to do.

use std::fmt;
use std::str::FromStr;

/// The certificate extension that carries a user certificate's [`Role`], so that an agent's
/// certificate cannot be used as a client's and the other way round.
pub const ROLE_EXTENSION: &str = "tether-role@tether.dev";

/// The role a user certificate grants: the proxy treats agents (which register tunnels) and
/// clients (which dial through them) differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A leaf cluster's agent, dialling the root to offer its tunnels.
    Agent,
    /// A root-side client, dialling through the tunnels.
    Client,
}

impl Role {
    /// The value stored in the [`ROLE_EXTENSION`] extension.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Client => "client",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    /// Parses `agent` or `client`, as written in the certificate extension.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "agent" => Ok(Role::Agent),
            "client" => Ok(Role::Client),
            other => Err(format!(
                "unknown role {other:?}: expected \"agent\" or \"client\""
            )),
        }
    }
}
