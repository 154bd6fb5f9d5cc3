//! The one operation every client entry needs: reach a target in a named cluster.

use std::future::Future;
use std::net::SocketAddr;

use crate::protocol::{DialError, Target};
use crate::stream::Splice;

/// Reaches targets in clusters: through a leaf's tunnel, or directly for the local cluster.
pub trait Dialer: Send + Sync + 'static {
    /// The connection handed back on success.
    type Conn: Splice;

    /// Dials `target` on behalf of a client at `client` (kept for logs and audit only: the
    /// agent never trusts it).
    fn dial(
        &self,
        target: Target,
        client: SocketAddr,
    ) -> impl Future<Output = Result<Self::Conn, DialError>> + Send;
}
