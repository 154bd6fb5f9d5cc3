//! The proxy's client entry (`--client-listen`): its tokens, followed on disk, and the TLS
//! port's HTTP CONNECT requests passed to it.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use tether::proxy::client_entry::{self, ClientEntryConfig, ClientTokens};
use tether::proxy::tls_port::TlsPort;
use tether::proxy::{BearerTokens, ProxyServer};

use super::{Hangup, ProxyArgs};

/// The token file's clients, swapped whole when the file changes (the Kubernetes endpoint
/// takes them too).
pub(super) type FileTokens = Option<Arc<ArcSwap<ClientTokens>>>;

/// Starts the client entry if `--client-listen` asks for one, taking the TLS port's CONNECT
/// requests too; the token file's clients, and the TLS port (now passing CONNECT on).
pub(super) async fn start(
    args: &ProxyArgs,
    proxy: &ProxyServer,
    bearer: Option<Arc<dyn BearerTokens>>,
    tls_port: Option<(SocketAddr, TlsPort)>,
    tasks: &TaskTracker,
    hangup: &Hangup,
    serving: &CancellationToken,
) -> anyhow::Result<(FileTokens, Option<(SocketAddr, TlsPort)>)> {
    let Some(listen) = &args.client_listen else {
        return Ok((None, tls_port));
    };
    let loaded = match &args.client_tokens {
        Some(tokens) => ClientTokens::load(tokens)
            .with_context(|| format!("--client-tokens {}", tokens.display()))?,
        None => ClientTokens::default(),
    };
    let config = ClientEntryConfig {
        listen: *listen,
        max_connections: args.client_max_connections,
        max_connections_per_ip: args.client_max_connections_per_ip,
        bearer,
        ..ClientEntryConfig::new(loaded)
    };
    let mut file_tokens = None;
    if let Some(tokens) = &args.client_tokens {
        let swap = config.tokens.clone();
        file_tokens = Some(swap.clone());
        tasks.spawn(tether::proxy::reload::follow_file(
            "client token file",
            tokens.clone(),
            tether::proxy::reload::POLL,
            hangup.tokens.clone(),
            serving.clone(),
            move |path: &std::path::Path| ClientTokens::load(path).map(|t| swap.store(Arc::new(t))),
        ));
    }
    let listener = config
        .bind()
        .await
        .with_context(|| format!("--client-listen {listen}: cannot listen"))?;
    println!(
        "client entry (HTTP CONNECT, SOCKS5) on {}",
        listener.local_addr()?
    );
    let (hand, handed) = client_entry::hand_off();
    let tls_port = tls_port.map(|(addr, port)| (addr, port.with_client_entry(hand)));
    let stopped = serving.clone();
    tasks.spawn(client_entry::serve_with(
        listener,
        Some(handed),
        Arc::new(config),
        Arc::new(proxy.dialer()),
        async move { stopped.cancelled().await },
    ));
    Ok((file_tokens, tls_port))
}
