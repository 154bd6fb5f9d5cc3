//! The leaf side: agents that dial out to the root's proxies and serve dials through them.
//!
//! An [`Agent`] keeps one tunnel to a proxy address alive: it connects, verifies the proxy's
//! host certificate, authenticates with its own, keeps heartbeats, and reconnects with jittered
//! exponential backoff whenever the tunnel fails (the seed's `Agent`).

pub mod allow_list;
pub mod config;
pub mod connect;
pub mod status;
pub mod tunnel;

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::{AgentConfig, Backoff};
pub use tunnel::{Tunnel, TunnelError, TunnelEvent};

/// An agent's state changes, for logs, status and tests (the seed's `ConnectedEvent`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// Dialling the proxy address.
    Connecting,
    /// A tunnel to this proxy is up.
    Connected { proxy_id: String },
    /// The tunnel failed or closed; a reconnect follows unless the agent is closing.
    Disconnected { reason: String },
    /// The agent has stopped for good.
    Closed,
}

/// Keeps one tunnel alive until cancelled.
pub struct Agent {
    config: Arc<AgentConfig>,
    events: broadcast::Sender<AgentEvent>,
}

impl Agent {
    /// An agent with `config`; nothing runs until [`Agent::run`].
    pub fn new(config: AgentConfig) -> Self {
        Self {
            config: Arc::new(config),
            events: broadcast::channel(64).0,
        }
    }

    /// Subscribes to state changes.
    pub fn events(&self) -> broadcast::Receiver<AgentEvent> {
        self.events.subscribe()
    }

    /// Runs until `stop` is cancelled.
    pub async fn run(&self, stop: CancellationToken) {
        let mut attempt = 0u32;
        loop {
            if stop.is_cancelled() {
                break;
            }
            let _ = self.events.send(AgentEvent::Connecting);
            let started = Instant::now();
            let result = tokio::select! {
                () = stop.cancelled() => break,
                r = Tunnel::connect(self.config.clone()) => r,
            };
            let reason = match result {
                Ok(tunnel) => {
                    attempt = 0;
                    let proxy_id = tunnel.proxy_id.clone();
                    let _ = self.events.send(AgentEvent::Connected {
                        proxy_id: proxy_id.clone(),
                    });
                    let (tx, mut rx) = mpsc::channel(8);
                    let run = tunnel.run(stop.clone(), Some(tx));
                    tokio::pin!(run);
                    let end = loop {
                        tokio::select! {
                            end = &mut run => break end,
                            Some(_event) = rx.recv() => {}
                        }
                    };
                    match end {
                        Ok(()) => "stopped".to_owned(),
                        Err(e) => {
                            warn!(proxy = %proxy_id, error = %e, "tunnel lost");
                            e.to_string()
                        }
                    }
                }
                Err(e) => {
                    warn!(proxy = %self.config.proxy_addr, error = %e, "could not open a tunnel");
                    e.to_string()
                }
            };
            let _ = self.events.send(AgentEvent::Disconnected { reason });
            if stop.is_cancelled() {
                break;
            }
            if started.elapsed() >= self.config.backoff.reset_after {
                attempt = 0;
            }
            let delay = self.config.backoff.delay(attempt);
            attempt = attempt.saturating_add(1);
            info!(?delay, "reconnecting after a pause");
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        let _ = self.events.send(AgentEvent::Closed);
    }
}
