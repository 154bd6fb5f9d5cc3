//! Root-side clients through standard tools: curl via HTTP CONNECT and SOCKS5, `tether dial`,
//! the API-server alias, and direct dials into the local cluster.

use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tether::client::ClientError;
use tether::egress::allow_list::AllowList;
use tether::identity::Identity;
use tether::protocol::DialErrorKind;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use crate::dial_error;
use crate::support::procs::tether_with_input;
use crate::support::*;

const TOKEN: &str = "s3cret-token-for-tests-only";

/// A one-line HTTP server standing in for a service in the leaf.
pub(crate) async fn http_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = tokio::io::AsyncReadExt::read(&mut socket, &mut buf).await;
                let _ = socket
                    .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 15\r\n\r\nhello from leaf")
                    .await;
                let _ = socket.shutdown().await;
            });
        }
    });
    addr
}

/// The stdout of the client `what`, which must have succeeded (else its stderr says why).
fn stdout_of_success<'a>(out: &'a Output, what: &str) -> &'a [u8] {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    &out.stdout
}

/// The error of a client's dial that must fail with `kind`: how the client tells a refusal by
/// policy, a missing tunnel and a target that refused apart.
fn dial_failure<T>(result: Result<T, ClientError>, kind: DialErrorKind) -> ClientError {
    match result {
        Err(e) if matches!(&e, ClientError::Dial { kind: k, .. } if *k == kind) => e,
        other => panic!("expected a {kind:?} dial error, got {:?}", other.err()),
    }
}

fn curl_available() -> bool {
    Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reaches_a_leaf_service_through_http_connect_and_socks5() {
    if !curl_available() {
        eprintln!("curl is not installed; skipping");
        return;
    }
    let web = http_server().await;
    let rig = Rig::start(&[format!("127.0.0.1/32:{}", web.port())], |_| {}, |_| {}).await;
    let entry = start_client_entry(&rig.proxy, &format!("alice:{TOKEN}\n"), |_| {}).await;
    let url = format!("http://127.0.0.1.leaf.tether:{}/", web.port());
    for proxy in [
        format!("http://alice:{TOKEN}@{entry}"),
        format!("socks5h://alice:{TOKEN}@{entry}"),
    ] {
        let out = tokio::task::spawn_blocking({
            let (url, proxy) = (url.clone(), proxy.clone());
            move || {
                Command::new("curl")
                    .args([
                        "-sS",
                        "--max-time",
                        "20",
                        "--proxytunnel",
                        "-x",
                        &proxy,
                        &url,
                    ])
                    .output()
                    .expect("curl runs")
            }
        })
        .await
        .expect("join");
        let body = stdout_of_success(&out, &format!("curl via {proxy}"));
        assert_eq!(String::from_utf8_lossy(body), "hello from leaf");
    }
    // A wrong token gets 407 and no tunnel.
    let out = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["-sS", "--max-time", "20", "--proxytunnel", "-x"])
            .arg(format!("http://alice:wrong-token-wrong-token@{entry}"))
            .arg(&url)
            .output()
            .expect("curl runs")
    })
    .await
    .expect("join");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("407"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tether_dial_carries_stdin_and_stdout_with_a_client_certificate() {
    let echo = echo_server().await.expect("echo");
    let rig = Rig::start(&[format!("127.0.0.1/32:{}", echo.port())], |_| {}, |_| {}).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("alice");
    Identity::generate_client(&rig.pki.root, "alice", Duration::from_secs(600))
        .expect("client identity")
        .save(&key)
        .expect("save");
    let root_ca = dir.path().join("root-ca.pub");
    std::fs::write(
        &root_ca,
        rig.pki.root.public_key().to_openssh().expect("ca"),
    )
    .expect("write");
    let proxy = rig.proxy.local_addr().to_string();
    let target = format!("127.0.0.1:{}", echo.port());
    let out = tokio::task::spawn_blocking(move || {
        let (key, root_ca) = (key.to_string_lossy(), root_ca.to_string_lossy());
        let args = [
            "dial",
            "leaf",
            &target,
            "--proxy",
            &proxy,
            "--root-cluster",
            "root",
        ];
        let files = ["--identity", &key, "--root-ca", &root_ca];
        tether_with_input(
            dir.path(),
            &[&args[..], &files[..]].concat(),
            b"through the tunnel\n",
        )
    })
    .await
    .expect("join");
    assert_eq!(
        stdout_of_success(&out, "tether dial"),
        b"through the tunnel\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_alias_reaches_the_agents_configured_address() {
    let api = echo_server().await.expect("stand-in API server");
    let rig = Rig::start(&[], |_| {}, |a| a.api_server = Some(api.to_string())).await;
    let conn = rig
        .dial_name("_apiserver.leaf.tether:443")
        .await
        .expect("the API server is reachable whatever the allow-list says");
    let (mut stream, _t) = attach(conn, 4096);
    assert_eq!(
        echo_round_trip(&mut stream, b"GET /version").await,
        b"GET /version"
    );

    let rig = Rig::start(&[], |_| {}, |_| {}).await;
    let err = dial_error(
        &rig,
        "_apiserver.leaf.tether:443",
        "no API server configured",
    )
    .await;
    assert_eq!(err.kind, DialErrorKind::Forbidden);
}

#[tokio::test]
async fn the_local_cluster_is_dialled_directly_when_allowed() {
    let echo = echo_server().await.expect("echo");
    let rig = Rig::start(
        &[],
        |p| {
            p.direct = Some(Arc::new(
                AllowList::parse([format!("127.0.0.1/32:{}", echo.port())]).expect("rules"),
            ))
        },
        |_| {},
    )
    .await;
    let conn = rig
        .dial_name(&format!("127.0.0.1.root.tether:{}", echo.port()))
        .await
        .expect("direct dial");
    let (mut stream, _t) = attach(conn, 4096);
    assert_eq!(echo_round_trip(&mut stream, b"local").await, b"local");
    let err = dial_error(
        &rig,
        "10.0.0.1.root.tether:80",
        "outside the direct allow-list",
    )
    .await;
    assert_eq!(err.kind, DialErrorKind::Forbidden);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_dial_says_whether_it_was_forbidden_offline_or_failed() {
    use tether::client::DialClient;
    let echo = echo_server().await.expect("echo");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let closed_port = closed.local_addr().expect("addr").port();
    drop(closed);
    let rig = Rig::start(
        &[
            format!("127.0.0.1/32:{}", echo.port()),
            format!("127.0.0.1/32:{closed_port}"),
        ],
        |_| {},
        |_| {},
    )
    .await;
    let config = client_config(&rig, &rig.pki.root, "alice");
    let client = DialClient::connect(&config).await.expect("connects");
    let target = |name: &str| tether::protocol::Target::parse(name).expect("target");
    let forbidden = client
        .open(
            &target(&format!("127.0.0.2.leaf.tether:{}", echo.port())),
            "127.0.0.1",
        )
        .await;
    dial_failure(forbidden, DialErrorKind::Forbidden);
    let offline = client
        .open(&target("db.elsewhere.tether:5432"), "127.0.0.1")
        .await;
    dial_failure(offline, DialErrorKind::NoTunnel);
    // Nothing listens there.
    let failed = client
        .open(
            &target(&format!("127.0.0.1.leaf.tether:{closed_port}")),
            "127.0.0.1",
        )
        .await;
    let failed = dial_failure(failed, DialErrorKind::Refused);
    assert!(failed.to_string().contains("was refused"), "{failed}");
    assert!(
        client
            .open(
                &target(&format!("127.0.0.1.leaf.tether:{}", echo.port())),
                "127.0.0.1"
            )
            .await
            .is_ok()
    );
}
