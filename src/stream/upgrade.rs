//! An HTTP upgrade carried through (exec, attach, port-forward, a WebSocket watch): once both
//! sides of a proxy have switched protocols, their two connections are spliced as bytes.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::debug;

/// Waits for both upgrades, then copies between them until both directions end. Returns the
/// bytes carried (from `client` to `server`, and back); an upgrade that never completes, or a
/// connection that fails, ends it with what was carried so far (zero).
pub async fn splice_upgrades(client: OnUpgrade, server: OnUpgrade) -> (u64, u64) {
    let (client, server) = match tokio::try_join!(client, server) {
        Ok(both) => both,
        Err(e) => {
            debug!(error = %e, "an upgrade did not complete");
            return (0, 0);
        }
    };
    let (mut client, mut server) = (TokioIo::new(client), TokioIo::new(server));
    match tokio::io::copy_bidirectional(&mut client, &mut server).await {
        Ok(carried) => carried,
        Err(e) => {
            debug!(error = %e, "an upgraded connection ended with an error");
            (0, 0)
        }
    }
}
