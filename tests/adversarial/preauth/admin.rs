//! The admin endpoint.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tether::admin::{AdminLimits, Component};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use super::{ATTACKER, connect_from, until_closed};
use crate::support::procs::admin_get;
use crate::support::*;

/// A component that is always up.
struct Up;

impl Component for Up {
    fn ready(&self) -> bool {
        true
    }
    fn status(&self) -> serde_json::Value {
        serde_json::json!({})
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_are_closed_and_the_endpoint_answers_after_a_flood_above_its_cap() {
    let limits = AdminLimits {
        max_connections: 8,
        header_read_timeout: Duration::from_secs(1),
        max_connection_time: Duration::from_secs(10),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(tether::admin::serve_with(
        listener,
        Arc::new(Up),
        limits,
        std::future::pending::<()>(),
    ));
    // Above the cap: 40 sockets that never send a request, and one that stops half-way.
    let started = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(connect_from(ATTACKER, addr).await.expect("connect"));
    }
    idle[0]
        .write_all(b"GET /healthz HTTP/1.1\r\nHo")
        .await
        .expect("write");
    let close_all = async {
        for s in &mut idle {
            until_closed(s).await;
        }
    };
    within(
        "every idle socket to be closed at the header read timeout",
        limits.header_read_timeout + Duration::from_secs(1),
        close_all,
    )
    .await;
    eprintln!(
        "40 idle admin sockets closed within {:?}",
        started.elapsed()
    );
    drop(idle);
    let answer = tokio::task::spawn_blocking(move || admin_get(addr, "/healthz"))
        .await
        .expect("join");
    assert_eq!(answer.as_deref(), Some("ok\n"));
}
