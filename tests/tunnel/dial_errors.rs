//! `tether dial` tells each way a dial fails apart (issue #14): forbidden, no tunnel, refused,
//! timed out, not resolved, a certificate that is not a client's and one the proxy refuses
//! (with the reason it may disclose), through real `tether` processes; a dial forwarded by a
//! peer proxy keeps the kind its agent reported.
//!
//! Unreachable is left out: it needs a target with no route, which loopback cannot offer; its
//! code travels like the others (`protocol::dial` tests every kind's round trip) and the agent's
//! classification is tested in `egress::connect`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tether::identity::{CertificateAuthority, Identity};
use tether::protocol::ClusterName;

use crate::support::procs::free_addr;
use crate::support::procs::{Files, admin_get, fails, spawn_agent, spawn_proxy};
use crate::support::*;

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    free_addr().port()
}

/// A loopback listener that never accepts, its accept queue full: Linux drops further SYNs, so
/// a connect to it hangs until its timeout without a packet leaving the machine.
async fn silent_listener() -> (tokio::net::TcpListener, Vec<tokio::net::TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind");
    let listener = socket.listen(0).expect("listen");
    let addr = listener.local_addr().expect("local addr");
    let mut fillers = Vec::new();
    for _ in 0..16 {
        let attempt = tokio::net::TcpStream::connect(addr);
        match tokio::time::timeout(Duration::from_millis(200), attempt).await {
            Ok(Ok(stream)) => fillers.push(stream),
            Ok(Err(_)) | Err(_) => break,
        }
    }
    (listener, fillers)
}

/// `tether dial CLUSTER TARGET` through `proxy` as `identity`; its stderr (it must fail).
async fn dial_fails(
    dir: &Path,
    proxy: SocketAddr,
    identity: &str,
    cluster: &str,
    target: &str,
) -> String {
    let dir = dir.to_owned();
    let (proxy, identity) = (proxy.to_string(), identity.to_owned());
    let (cluster, target) = (cluster.to_owned(), target.to_owned());
    tokio::task::spawn_blocking(move || {
        fails(
            &dir,
            &[
                "dial",
                &cluster,
                &target,
                "--proxy",
                &proxy,
                "--root-cluster",
                "root",
                "--identity",
                &identity,
                "--root-ca",
                "root-ca.pub",
            ],
        )
    })
    .await
    .expect("dial runs")
}

fn says(stderr: &str, what: &str) {
    assert!(stderr.contains(what), "expected {what:?} in:\n{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tether_dial_names_each_way_a_dial_fails() {
    let pki = pki();
    let files = Files::write(&pki, &["p1", "p2"]);
    Identity::generate_client(&pki.root, "alice", Duration::from_secs(3600))
        .expect("client identity")
        .save(&files.path("alice"))
        .expect("save");
    let (closed, (silent, _fillers)) = (closed_port(), silent_listener().await);
    let silent = silent.local_addr().expect("addr").port();

    // p1 holds the leaf's tunnel; p2 has none and forwards to p1.
    let (p1, p1_admin, p2, p2_admin) = (free_addr(), free_addr(), free_addr(), free_addr());
    let _p1 = spawn_proxy(&files, "p1", p1, p1_admin, &[]);
    let _p2 = spawn_proxy(&files, "p2", p2, p2_admin, &[("p1".into(), p1)]);
    let allow = [
        format!("127.0.0.1/32:{closed}"),
        format!("127.0.0.1/32:{silent}"),
        "*.invalid:*".to_owned(),
    ];
    let mut args = vec!["--dial-timeout".to_owned(), "500ms".to_owned()];
    for rule in allow {
        args.extend(["--allow".to_owned(), rule]);
    }
    let _agent = spawn_agent(&files, p1, &args);
    wait_for(
        "p1 to hold the leaf's tunnel",
        Duration::from_secs(30),
        || admin_get(p1_admin, "/status").is_some_and(|s| s.contains("\"online\"")),
    )
    .await;
    let dir = files.dir.path();

    let forbidden = dial_fails(dir, p1, "alice", "leaf", "127.0.0.1:22").await;
    says(&forbidden, "is forbidden: the leaf's allow-list");
    let no_tunnel = dial_fails(dir, p1, "alice", "nowhere", "db:5432").await;
    says(&no_tunnel, "no tunnel to cluster nowhere is up");
    let refused = dial_fails(dir, p1, "alice", "leaf", &format!("127.0.0.1:{closed}")).await;
    says(
        &refused,
        &format!("was refused: nothing listens at 127.0.0.1:{closed}"),
    );
    let timed_out = dial_fails(dir, p1, "alice", "leaf", &format!("127.0.0.1:{silent}")).await;
    says(
        &timed_out,
        &format!("timed out: 127.0.0.1:{silent} did not answer"),
    );
    let unresolved = dial_fails(dir, p1, "alice", "leaf", "nonexistent.invalid:80").await;
    says(
        &unresolved,
        "could not resolve the name in nonexistent.invalid:80",
    );

    // Through a peer: p2's answer is the kind p1's agent reported, not a generic failure.
    let refused = dial_fails(dir, p2, "alice", "leaf", &format!("127.0.0.1:{closed}")).await;
    says(&refused, "was refused");
    let forbidden = dial_fails(dir, p2, "alice", "leaf", "127.0.0.1:22").await;
    says(&forbidden, "is forbidden");

    // An agent's certificate is refused before connecting, naming the flag and the cause.
    let not_client = dial_fails(dir, p1, "agent", "leaf", &format!("127.0.0.1:{closed}")).await;
    says(&not_client, "--identity agent");
    says(&not_client, "is an agent's, not a client's");

    // A client certificate from a CA the proxy does not trust: the proxy says so (and no more).
    let other_root = CertificateAuthority::generate(ClusterName::new("root").expect("name"))
        .expect("another root CA");
    Identity::generate_client(&other_root, "mallory", Duration::from_secs(3600))
        .expect("client identity")
        .save(&files.path("mallory"))
        .expect("save");
    let untrusted = dial_fails(dir, p1, "mallory", "leaf", &format!("127.0.0.1:{closed}")).await;
    says(
        &untrusted,
        "the proxy refused the client certificate: the certificate's authority is not trusted for cluster \"root\"",
    );
}
