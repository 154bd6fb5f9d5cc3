//! The agent against a proxy that stalls its handshake.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tether::agent::{Tunnel, TunnelError};
use tether::egress::allow_list::AllowList;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use super::until_closed;
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_connects_to_a_stalling_proxy_leave_no_socket_open() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (accepted, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    // Accepts; every other connection gets a version line, then nothing more ever comes.
    tokio::spawn({
        let (accepted, closed) = (accepted.clone(), closed.clone());
        async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let n = accepted.fetch_add(1, Ordering::SeqCst);
                let closed = closed.clone();
                tokio::spawn(async move {
                    if n % 2 == 0 {
                        let _ = socket.write_all(b"SSH-2.0-stalling\r\n").await;
                    }
                    until_closed(&mut socket).await;
                    closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        }
    });
    let pki = pki();
    let mut config = pki
        .agent_config(
            &addr.to_string(),
            AllowList::parse(&[] as &[String]).expect("allow"),
        )
        .expect("agent config");
    config.connect_timeout = Duration::from_millis(300);
    let config = Arc::new(config);
    let attempts = 6;
    for _ in 0..attempts {
        let err = Tunnel::connect(config.clone())
            .await
            .expect_err("a stalling proxy never completes a handshake");
        assert!(matches!(err, TunnelError::Timeout(_)), "{err}");
    }
    wait_for(
        "every socket the agent opened to the stalling proxy to be closed",
        Duration::from_secs(5),
        || closed.load(Ordering::SeqCst) == attempts,
    )
    .await;
    assert_eq!(accepted.load(Ordering::SeqCst), attempts);
}
