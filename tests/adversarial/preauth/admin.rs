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
    fn metrics(&self) -> String {
        String::new()
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

/// The review's case: idle sockets on the admin port of a proxy limited to 128 descriptors
/// starved its tunnel listener. Now the admin endpoint holds at most its cap, so the tunnel
/// port still serves a client while 200 idle sockets knock, and /healthz answers afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_admin_sockets_do_not_starve_a_proxy_of_descriptors() {
    use std::os::unix::process::CommandExt as _;

    let served = super::tunnel::ServingProcess::start(|cmd| {
        // SAFETY: only setrlimit runs between fork and exec; it is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: 128,
                    rlim_max: 128,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    })
    .await;
    let admin = served.admin;

    let mut idle = Vec::new();
    for _ in 0..200 {
        if let Ok(s) = connect_from(ATTACKER, admin).await {
            idle.push(s);
        }
    }
    assert!(
        served.serves().await,
        "the tunnel listener is starved while the admin port is flooded"
    );
    drop(idle);
    let answer = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match admin_get(admin, "/healthz") {
                Some(body) => return Some(body),
                None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                None => return None,
            }
        }
    })
    .await
    .expect("join");
    assert_eq!(answer.as_deref(), Some("ok\n"));
}
