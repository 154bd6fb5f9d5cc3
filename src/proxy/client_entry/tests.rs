//! End-to-end tests of the entry over loopback, with a fake dialer in front of an echo server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use super::{ClientEntryConfig, ClientTokens, serve};
use crate::protocol::{DialError, DialErrorKind, Endpoint, Target};
use crate::proxy::Dialer;
use crate::proxy::access::Who;

const ALICE: &str = "alice-token-0123456789abcdef";
const BOB: &str = "bob-token-abcdefghijklmnop";
/// base64("bob:bob-token-abcdefghijklmnop")
const BOB_BASIC: &str = "Ym9iOmJvYi10b2tlbi1hYmNkZWZnaGlqa2xtbm9w";
/// base64("bob:wrong-token-abcdefghijklmnop")
const BOB_WRONG_BASIC: &str = "Ym9iOndyb25nLXRva2VuLWFiY2RlZmdoaWprbG1ub3A=";
const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";
/// Bound on every test's waiting, so a bug fails the test instead of hanging it.
const DEADLINE: Duration = Duration::from_secs(10);

/// Dials the echo server, or fails by host name: `forbidden`, `refused`, `slow`, `nxdomain`,
/// `unreach`, `other`; any host in cluster `gone` has no tunnel; `hello` is a tiny HTTP server.
/// Only `alice` may dial cluster `private` (the root's access rules, as `permit` asks them).
struct FakeDialer {
    echo: SocketAddr,
    hello: SocketAddr,
    /// Every target dialled, with the client permitted to: what the tests check the
    /// handshake made of a request.
    dialled: std::sync::Mutex<Vec<(String, Target)>>,
}

impl Dialer for FakeDialer {
    type Conn = TcpStream;

    async fn permit(&self, who: &Who, target: &Target) -> Result<(), DialError> {
        if target.cluster.as_str() == "private" && who.user != "alice" {
            let says = format!("{} may not dial leaf {}", who.user, target.cluster);
            return Err(DialError::new(DialErrorKind::NotPermitted, says));
        }
        let seen = (who.user.clone(), target.clone());
        self.dialled.lock().unwrap().push(seen);
        Ok(())
    }

    async fn dial(&self, target: Target, _client: SocketAddr) -> Result<TcpStream, DialError> {
        let fail = |kind| Err(DialError::new(kind, format!("test says no to {target}")));
        if target.cluster.as_str() == "gone" {
            return fail(DialErrorKind::NoTunnel);
        }
        let host = match &target.endpoint {
            Endpoint::Host { host, .. } => host.as_str(),
            Endpoint::ApiServer => "_apiserver",
            Endpoint::KubeApi => "_kube",
        };
        let addr = match host {
            "forbidden" => return fail(DialErrorKind::Forbidden),
            "refused" => return fail(DialErrorKind::Refused),
            "slow" => return fail(DialErrorKind::TimedOut),
            "nxdomain" => return fail(DialErrorKind::NameNotResolved),
            "unreach" => return fail(DialErrorKind::Unreachable),
            "other" => return fail(DialErrorKind::Other),
            "hello" => self.hello,
            _ => self.echo,
        };
        TcpStream::connect(addr)
            .await
            .map_err(|e| DialError::new(DialErrorKind::Refused, e.to_string()))
    }
}

async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Answers every request with `hello`, for the curl tests.
async fn hello_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let reply =
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
                let _ = s.write_all(reply).await;
            });
        }
    });
    addr
}

struct Entry {
    addr: SocketAddr,
    dialer: Arc<FakeDialer>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

fn config() -> ClientEntryConfig {
    let tokens = ClientTokens::parse(&format!("alice:{ALICE}\nbob:{BOB}\n")).unwrap();
    ClientEntryConfig::new(tokens)
}

async fn start(config: ClientEntryConfig) -> Entry {
    let dialer = Arc::new(FakeDialer {
        echo: echo_server().await,
        hello: hello_server().await,
        dialled: Default::default(),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, Arc::new(config), dialer.clone(), stopped));
    Entry {
        addr,
        dialer,
        stop: Some(stop),
        task,
    }
}

async fn connect_request(entry: &Entry, target: &str, auth: Option<&str>) -> TcpStream {
    let mut s = TcpStream::connect(entry.addr).await.unwrap();
    let auth = auth
        .map(|a| format!("Proxy-Authorization: {a}\r\n"))
        .unwrap_or_default();
    let head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

/// Reads until the server closes; the whole response as text.
async fn read_all(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    timeout(DEADLINE, s.read_to_end(&mut out))
        .await
        .expect("server did not close")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

async fn read_exact_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    timeout(DEADLINE, s.read_exact(&mut buf))
        .await
        .expect("no reply in time")
        .unwrap();
    buf
}

async fn assert_echoes(s: &mut TcpStream, data: &[u8]) {
    s.write_all(data).await.unwrap();
    assert_eq!(read_exact_n(s, data.len()).await, data);
}

/// Asserts the server closes the connection (EOF or reset) within the deadline.
async fn assert_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 64];
    loop {
        match timeout(DEADLINE, s.read(&mut buf)).await {
            Err(_) => panic!("connection still open"),
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn http_bearer_and_basic_tunnel_bytes() {
    let entry = start(config()).await;
    for auth in [format!("Bearer {ALICE}"), format!("Basic {BOB_BASIC}")] {
        let mut s = connect_request(&entry, "web.leaf-1.tether:80", Some(&auth)).await;
        assert_eq!(read_exact_n(&mut s, ESTABLISHED.len()).await, ESTABLISHED);
        assert_echoes(&mut s, b"ping through the tunnel").await;
    }
}

#[tokio::test]
async fn http_without_valid_credentials_gets_407() {
    let entry = start(config()).await;
    let wrong_bearer = format!("Bearer {BOB}x");
    let wrong_basic = format!("Basic {BOB_WRONG_BASIC}");
    for auth in [
        None,
        Some(wrong_bearer.as_str()),
        Some(wrong_basic.as_str()),
        Some("Digest x"),
    ] {
        let mut s = connect_request(&entry, "web.leaf-1.tether:80", auth).await;
        let response = read_all(&mut s).await;
        assert!(response.starts_with("HTTP/1.1 407 "), "{response}");
        assert!(response.contains("Proxy-Authenticate: Basic realm=\"tether\"\r\n"));
    }
}

#[tokio::test]
async fn http_rejects_bad_targets_and_other_methods() {
    let entry = start(config()).await;
    let auth = format!("Bearer {ALICE}");
    for target in [
        "example.com:80",
        "web.leaf-1.tether",
        "web.Leaf_1.tether:80",
        "web.leaf.tether:0",
    ] {
        let mut s = connect_request(&entry, target, Some(&auth)).await;
        let response = read_all(&mut s).await;
        assert!(
            response.starts_with("HTTP/1.1 400 "),
            "{target}: {response}"
        );
    }
    let mut s = TcpStream::connect(entry.addr).await.unwrap();
    s.write_all(b"GET http://web.leaf-1.tether/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let response = read_all(&mut s).await;
    assert!(response.starts_with("HTTP/1.1 405 "), "{response}");
    assert!(response.contains("CONNECT"));
}

#[tokio::test]
async fn http_maps_dial_errors_to_statuses() {
    let entry = start(config()).await;
    let auth = format!("Bearer {ALICE}");
    for (target, status) in [
        ("forbidden.leaf.tether:22", 403),
        ("refused.leaf.tether:22", 502),
        ("slow.leaf.tether:22", 504),
        ("nxdomain.leaf.tether:22", 502),
        ("unreach.leaf.tether:22", 502),
        ("other.leaf.tether:22", 502),
        ("web.gone.tether:22", 503),
    ] {
        let mut s = connect_request(&entry, target, Some(&auth)).await;
        let response = read_all(&mut s).await;
        assert!(
            response.starts_with(&format!("HTTP/1.1 {status} ")),
            "{target}: {response}"
        );
        assert!(response.contains("test says no to"), "{response}");
    }
}

#[tokio::test]
async fn http_pipelined_bytes_reach_the_target() {
    let entry = start(config()).await;
    let mut s = TcpStream::connect(entry.addr).await.unwrap();
    let request = format!(
        "CONNECT web.leaf-1.tether:80 HTTP/1.1\r\nProxy-Authorization: Bearer {ALICE}\r\n\r\nSSH-2.0-early"
    );
    s.write_all(request.as_bytes()).await.unwrap();
    assert_eq!(read_exact_n(&mut s, ESTABLISHED.len()).await, ESTABLISHED);
    assert_eq!(read_exact_n(&mut s, 13).await, b"SSH-2.0-early");
    assert_echoes(&mut s, b"and more").await;
}

#[tokio::test]
async fn http_oversized_head_gets_431() {
    let entry = start(config()).await;
    let mut s = TcpStream::connect(entry.addr).await.unwrap();
    let padding = "x".repeat(10_000);
    let request = format!("CONNECT web.leaf.tether:80 HTTP/1.1\r\nX-Pad: {padding}\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let response = read_all(&mut s).await;
    assert!(response.starts_with("HTTP/1.1 431 "), "{response}");
}

/// Negotiates username/password and sends a SOCKS5 request; returns the 10-byte reply.
async fn socks_request(
    entry: &Entry,
    password: &str,
    address: &[u8],
    command: u8,
) -> (TcpStream, Vec<u8>) {
    socks_request_as(entry, "alice", password, address, command).await
}

/// [`socks_request`] as SOCKS5 user `user`.
async fn socks_request_as(
    entry: &Entry,
    user: &str,
    password: &str,
    address: &[u8],
    command: u8,
) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(entry.addr).await.unwrap();
    s.write_all(&[5, 2, 0, 2]).await.unwrap();
    assert_eq!(read_exact_n(&mut s, 2).await, [5, 2]);
    let mut auth = vec![1, user.len() as u8];
    auth.extend_from_slice(user.as_bytes());
    auth.push(password.len() as u8);
    auth.extend_from_slice(password.as_bytes());
    s.write_all(&auth).await.unwrap();
    assert_eq!(read_exact_n(&mut s, 2).await, [1, 0]);
    let mut request = vec![5, command, 0];
    request.extend_from_slice(address);
    request.extend_from_slice(&22u16.to_be_bytes());
    s.write_all(&request).await.unwrap();
    let reply = read_exact_n(&mut s, 10).await;
    (s, reply)
}

fn domain(name: &str) -> Vec<u8> {
    let mut a = vec![3, name.len() as u8];
    a.extend_from_slice(name.as_bytes());
    a
}

#[tokio::test]
async fn socks_tunnels_bytes() {
    let entry = start(config()).await;
    let (mut s, reply) = socks_request(&entry, ALICE, &domain("web.leaf-1.tether"), 1).await;
    assert_eq!(reply, [5, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    assert_echoes(&mut s, b"ping").await;
}

#[tokio::test]
async fn socks_rejects_bad_auth_and_no_auth() {
    let entry = start(config()).await;
    let mut s = TcpStream::connect(entry.addr).await.unwrap();
    s.write_all(&[5, 1, 2, 1, 5]).await.unwrap();
    s.write_all(b"alice").await.unwrap();
    s.write_all(&[BOB.len() as u8]).await.unwrap();
    s.write_all(BOB.as_bytes()).await.unwrap();
    assert_eq!(read_exact_n(&mut s, 4).await, [5, 2, 1, 1]);
    assert_closed(&mut s).await;

    let mut s = TcpStream::connect(entry.addr).await.unwrap();
    s.write_all(&[5, 1, 0]).await.unwrap();
    assert_eq!(read_exact_n(&mut s, 2).await, [5, 0xFF]);
    assert_closed(&mut s).await;
}

#[tokio::test]
async fn socks_error_replies() {
    let entry = start(config()).await;
    let ipv4 = [1, 10, 0, 0, 1];
    let mut ipv6 = vec![4];
    ipv6.extend_from_slice(&[0u8; 16]);
    let cases: [(Vec<u8>, u8, u8); 9] = [
        (ipv4.to_vec(), 1, 0x08),
        (ipv6, 1, 0x08),
        (domain("web.leaf.tether"), 2, 0x07),
        (domain("example.com"), 1, 0x04),
        (domain("forbidden.leaf.tether"), 1, 0x02),
        (domain("refused.leaf.tether"), 1, 0x05),
        (domain("slow.leaf.tether"), 1, 0x04),
        (domain("web.gone.tether"), 1, 0x03),
        (domain("other.leaf.tether"), 1, 0x01),
    ];
    for (address, command, code) in cases {
        let (mut s, reply) = socks_request(&entry, ALICE, &address, command).await;
        assert_eq!(reply[..2], [5, code], "{address:?}");
        assert_closed(&mut s).await;
    }
}

#[tokio::test]
async fn silent_and_slow_clients_are_dropped() {
    let mut config = config();
    config.handshake_timeout = Duration::from_millis(200);
    let entry = start(config).await;
    let mut silent = TcpStream::connect(entry.addr).await.unwrap();
    let mut partial = TcpStream::connect(entry.addr).await.unwrap();
    partial
        .write_all(b"CONNECT web.leaf.tether:80 HTTP/1.1\r\n")
        .await
        .unwrap();
    let mut socks = TcpStream::connect(entry.addr).await.unwrap();
    socks.write_all(&[5, 3, 0]).await.unwrap();
    assert_closed(&mut silent).await;
    assert_closed(&mut partial).await;
    assert_closed(&mut socks).await;
}

#[tokio::test]
async fn garbage_gets_400() {
    let entry = start(config()).await;
    let mut s = TcpStream::connect(entry.addr).await.unwrap();
    s.write_all(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03")
        .await
        .unwrap();
    let response = read_all(&mut s).await;
    assert!(response.starts_with("HTTP/1.1 400 "), "{response}");
}

#[tokio::test]
async fn connection_limit_refuses_excess_clients() {
    let mut config = config();
    config.max_connections = 1;
    let entry = start(config).await;
    // Accepted first, so it holds the only slot while it has not yet said anything.
    let mut first = TcpStream::connect(entry.addr).await.unwrap();
    let mut second = TcpStream::connect(entry.addr).await.unwrap();
    assert_closed(&mut second).await;
    let head = format!(
        "CONNECT web.leaf.tether:80 HTTP/1.1\r\nProxy-Authorization: Bearer {ALICE}\r\n\r\n"
    );
    first.write_all(head.as_bytes()).await.unwrap();
    assert_eq!(
        read_exact_n(&mut first, ESTABLISHED.len()).await,
        ESTABLISHED
    );
    assert_echoes(&mut first, b"still served").await;
}

#[tokio::test]
async fn shutdown_waits_for_open_tunnels() {
    let mut entry = start(config()).await;
    let auth = format!("Bearer {ALICE}");
    let mut s = connect_request(&entry, "web.leaf-1.tether:80", Some(&auth)).await;
    assert_eq!(read_exact_n(&mut s, ESTABLISHED.len()).await, ESTABLISHED);
    entry.stop.take().unwrap().send(()).unwrap();
    assert_echoes(&mut s, b"after shutdown").await;
    assert!(!entry.task.is_finished());
    drop(s);
    timeout(DEADLINE, entry.task)
        .await
        .expect("serve did not return")
        .unwrap();
}

/// Drives the real curl, through both protocols, if it is installed.
#[tokio::test]
async fn curl_through_http_and_socks() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("curl not found; skipping");
        return;
    }
    let entry = start(config()).await;
    let port = entry.addr.port();
    for proxy in [
        format!("http://alice:{ALICE}@127.0.0.1:{port}"),
        format!("socks5h://alice:{ALICE}@127.0.0.1:{port}"),
    ] {
        let output = timeout(
            DEADLINE,
            tokio::process::Command::new("curl")
                .args(["-q", "-sS", "--max-time", "5", "--proxytunnel", "--proxy"])
                .arg(&proxy)
                .arg("http://hello.leaf-1.tether/")
                .env_remove("NO_PROXY")
                .env_remove("no_proxy")
                .output(),
        )
        .await
        .expect("curl hung")
        .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            stdout,
            "hello",
            "{}: {stderr}",
            proxy.split(':').next().unwrap_or("")
        );
    }
}

mod naming;
