//! The TLS port (#17): tunnels, joins and `tether dial` clients on one TLS port, by ALPN; behind
//! a real L7 load balancer that terminates TLS (haproxy in `mode http`, which strips ALPN),
//! agents fall back to a WebSocket upgrade on the same connection; and what a stranger on the
//! port costs is bounded like on the SSH port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tether::agent::{Agent, AgentEvent};
use tether::client::DialClient;
use tether::egress::allow_list::AllowList;
use tether::protocol::Target;
use tether::proxy::tls_port::TlsPort;
use tether::proxy::{Dialer, ProxyConfig, ProxyServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::support::haproxy::Haproxy;
use crate::support::{self, Rig, echo_once, echo_server, leaf, pki, within};

/// Serves a TLS port, with a self-issued certificate, on `proxy`; where it listens.
async fn serve_tls_port(proxy: &ProxyServer) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let port = TlsPort::self_issued(vec!["localhost".into()], None).expect("certificate");
    proxy.serve_tls_port(listener, port);
    addr
}

/// A proxy (tuned by `tune`) with its TLS port, and an agent dialling `address(tls_port)`,
/// allowed to reach `echo`; the agent's events, and a token that stops it.
pub(crate) struct TlsRig {
    pub(crate) proxy: ProxyServer,
    pub(crate) tls: SocketAddr,
    echo: SocketAddr,
    events: broadcast::Receiver<AgentEvent>,
    stop: CancellationToken,
}

impl TlsRig {
    pub(crate) async fn start(tune: impl FnOnce(&mut ProxyConfig)) -> (TlsRig, tether::demo::Pki) {
        let pki = pki();
        let mut config = pki.proxy_config("proxy-1").expect("proxy config");
        tune(&mut config);
        let proxy = ProxyServer::start(config).await.expect("proxy starts");
        let tls = serve_tls_port(&proxy).await;
        let echo = echo_server().await.expect("echo");
        let rig = TlsRig {
            proxy,
            tls,
            echo,
            events: broadcast::channel(1).1,
            stop: CancellationToken::new(),
        };
        (rig, pki)
    }

    /// Starts an agent dialling `address`; returns the carrier its first tunnel used.
    pub(crate) async fn agent(&mut self, pki: &tether::demo::Pki, address: &str) -> String {
        let allow = AllowList::parse(&[format!("{}/32:{}", self.echo.ip(), self.echo.port())])
            .expect("allow-list");
        let agent = Arc::new(Agent::new(
            pki.agent_config(address, allow).expect("config"),
        ));
        self.events = agent.events();
        let status = agent.status();
        let stop = self.stop.clone();
        tokio::spawn(async move { agent.run(stop).await });
        let events = &mut self.events;
        let carrier = within("the agent's tunnel", Duration::from_secs(20), async {
            loop {
                if let Ok(AgentEvent::Connected { carrier, .. }) = events.recv().await {
                    return carrier;
                }
            }
        })
        .await;
        // The agent's /status says it too.
        support::wait_for("the carrier in the status", Duration::from_secs(20), || {
            let shown = status.borrow().proxies.first().and_then(|p| p.carrier);
            shown.is_some_and(|used| used.to_string() == carrier)
        })
        .await;
        carrier
    }

    /// Dials the echo server through the proxy and checks the bytes come back.
    pub(crate) async fn echo_through(&self) {
        let target =
            Target::parse(&format!("127.0.0.1.leaf.tether:{}", self.echo.port())).expect("target");
        let conn = self
            .proxy
            .dialer()
            .dial(target, "127.0.0.1:1".parse().expect("addr"))
            .await
            .expect("dial through the tunnel");
        let (mut stream, _splice) = support::attach(conn, 64 * 1024);
        echo_once(&mut stream, b"through the TLS port").await;
    }
}

impl Drop for TlsRig {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[tokio::test]
async fn an_agent_on_the_tls_port_speaks_ssh_by_alpn() {
    let (mut rig, pki) = TlsRig::start(|_| {}).await;
    let address = format!("tls://{}", rig.tls);
    assert_eq!(rig.agent(&pki, &address).await, "tls-alpn");
    rig.echo_through().await;
}

#[tokio::test]
async fn behind_an_l7_load_balancer_agents_fall_back_to_websocket() {
    let pem = tempfile::NamedTempFile::new().expect("pem");
    let issued = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    std::fs::write(
        pem.path(),
        format!(
            "{}{}",
            issued.cert.pem(),
            issued.signing_key.serialize_pem()
        ),
    )
    .expect("write pem");
    // haproxy forwarding plain HTTP, then haproxy re-encrypting: neither passes ALPN on.
    for reencrypt in [false, true] {
        let (mut rig, pki) = TlsRig::start(|_| {}).await;
        let haproxy = Haproxy::start_l7(&[rig.tls], pem.path(), reencrypt);
        let address = format!("tls://localhost:{}", haproxy.addr.port());
        let carrier = rig.agent(&pki, &address).await;
        assert_eq!(carrier, "tls-websocket", "re-encrypting: {reencrypt}");
        rig.echo_through().await;
    }
}

#[tokio::test]
async fn dial_clients_use_the_tls_port_by_alpn_and_by_websocket() {
    let echo = echo_server().await.expect("echo");
    let allow = [format!("{}/32:{}", echo.ip(), echo.port())];
    let rig = Rig::start(&allow, |_| {}, |_| {}).await;
    let tls = serve_tls_port(&rig.proxy).await;
    let mut config = support::client_config(&rig, &rig.pki.root, "alice");
    config.proxy_addr = format!("tls://{tls}");
    let client = DialClient::connect(&config).await.expect("client over TLS");
    let target = Target::parse(&format!("127.0.0.1.leaf.tether:{}", echo.port())).expect("target");
    let mut stream = client.open(&target, "127.0.0.1").await.expect("stream");
    echo_once(&mut stream, b"a client on the TLS port").await;

    config.proxy_addr = format!("ws://{tls}");
    let client = DialClient::connect(&config)
        .await
        .expect("client over WebSocket");
    let mut stream = client.open(&target, "127.0.0.1").await.expect("stream");
    echo_once(&mut stream, b"in plain WebSocket frames").await;
    assert!(rig.proxy.site(&leaf()).is_some());
}

/// Connects to `addr`, sends `bytes`, and reads until the proxy closes: what it answered.
async fn answer_to(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut socket = TcpStream::connect(addr).await.expect("connect");
    socket.write_all(bytes).await.expect("write");
    let mut answer = Vec::new();
    within(
        "the proxy to close the connection",
        Duration::from_secs(20),
        socket.read_to_end(&mut answer),
    )
    .await
    .ok();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_stranger_on_the_tls_port_is_answered_briefly_and_closed() {
    let (rig, _pki) =
        TlsRig::start(|c| c.limits.handshake_timeout = Duration::from_millis(500)).await;
    let answer = answer_to(rig.tls, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(answer.contains("ALPN tether-ssh"), "{answer}");

    let old = "GET /tether/v1/tunnel HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
               Connection: Upgrade\r\nSec-WebSocket-Version: 8\r\n\
               Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    assert!(
        answer_to(rig.tls, old.as_bytes())
            .await
            .starts_with("HTTP/1.1 400")
    );
    assert!(
        answer_to(rig.tls, b"\x00\x01garbage\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 400")
    );

    // One byte of a TLS handshake, or of an HTTP head, then silence: closed at the deadline.
    for first in [&b"\x16"[..], b"G"] {
        assert_eq!(answer_to(rig.tls, first).await, "", "{first:?}");
    }
    // A WebSocket that never speaks SSH is closed at the same deadline.
    let upgrade = old.replace("Version: 8", "Version: 13");
    let answer = answer_to(rig.tls, upgrade.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reaches_the_client_entry_on_the_tls_port() {
    use tether::proxy::client_entry::{self, ClientEntryConfig, ClientTokens};
    let web = crate::entry::http_server().await;
    let rig = Rig::start(&[format!("127.0.0.1/32:{}", web.port())], |_| {}, |_| {}).await;
    let token = "a-token-for-the-tls-port-test";
    let config = Arc::new(ClientEntryConfig::new(
        ClientTokens::parse(&format!("alice:{token}\n")).expect("tokens"),
    ));
    let (hand, handed) = client_entry::hand_off();
    let listener = config.bind().await.expect("bind entry");
    tokio::spawn(client_entry::serve_with(
        listener,
        Some(handed),
        config,
        Arc::new(rig.proxy.dialer()),
        std::future::pending::<()>(),
    ));
    // The port's certificate, which curl checks (`--proxy-cacert`, no `--proxy-insecure`).
    let dir = tempfile::tempdir().expect("tempdir");
    let issued = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("certificate");
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, issued.cert.pem()).expect("write");
    std::fs::write(&key, issued.signing_key.serialize_pem()).expect("write");
    let port = TlsPort::from_files(&cert, &key, None)
        .expect("port")
        .with_client_entry(hand);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let tls = listener.local_addr().expect("addr");
    rig.proxy.serve_tls_port(listener, port);

    let url = format!("http://127.0.0.1:{}/", web.port());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-sS", "--max-time", "20", "--proxytunnel"])
            .arg("--proxy")
            .arg(format!("https://127.0.0.1:{}", tls.port()))
            .arg("--proxy-cacert")
            .arg(&cert)
            .arg("--proxy-user")
            .arg(format!("alice@leaf:{token}"))
            .arg(&url)
            .output()
            .expect("curl runs")
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "curl through the TLS port: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from leaf");
}

#[tokio::test]
async fn a_leaf_joins_through_the_tls_port() {
    use tether::agent::join::join;
    use tether::protocol::join::JoinToken;
    let pki = pki();
    let token = JoinToken::generate();
    let authority = crate::join::authority_with(&token);
    let proxy = crate::join::root_proxy(&pki, Some(authority.clone())).await;
    let tls = serve_tls_port(&proxy).await;
    let mut request = crate::join::request(&proxy, &pki, &token);
    request.root_address = format!("tls://{tls}");
    let joined = join(&request).await.expect("join over the TLS port");
    assert_eq!(joined.root_cas, vec![pki.root.public_key().clone()]);
    assert!(authority.leaves.lock().expect("lock").contains_key("leaf"));
}

/// The certificate a TLS handshake with `addr` is shown, as DER.
async fn presented_certificate(addr: SocketAddr) -> Vec<u8> {
    let config = tether::transport::tls::client_config(None).expect("settings");
    let socket = TcpStream::connect(addr).await.expect("connect");
    let (tls, _) = tether::transport::tls::connect(socket, "localhost", config)
        .await
        .expect("handshake");
    let chain = tls.get_ref().1.peer_certificates().expect("a certificate");
    chain[0].to_vec()
}

/// Writes a fresh self-signed certificate for localhost and its key to `cert` and `key`; the
/// certificate's DER.
fn write_certificate(cert: &std::path::Path, key: &std::path::Path) -> Vec<u8> {
    let issued = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("issue");
    // Written beside and renamed over, as the kubelet swaps a Secret's files.
    for (path, text) in [
        (key, issued.signing_key.serialize_pem()),
        (cert, issued.cert.pem()),
    ] {
        let next = path.with_extension("next");
        std::fs::write(&next, text).expect("write");
        std::fs::rename(&next, path).expect("rename");
    }
    issued.cert.der().to_vec()
}

/// `tether proxy --tls-listen --tls-cert --tls-key`: the port presents the files' certificate,
/// and a renewed one (a cert-manager Secret updated in place) from the next connection on,
/// without a restart.
#[tokio::test]
async fn the_tls_port_follows_a_renewed_certificate() {
    use crate::support::procs::{Files, free_addr, proxy_command, spawn};
    let files = Files::write(&pki(), &["proxy-1"]);
    let dir = files.dir.path();
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let first = write_certificate(&cert, &key);
    let (listen, admin, tls) = (free_addr(), free_addr(), free_addr());
    let mut command = proxy_command(&files, "proxy-1", listen, admin, &[]);
    command
        .arg("--tls-listen")
        .arg(tls.to_string())
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key);
    let mut proxy = spawn(command);
    assert!(
        proxy.accepts(&[tls], Duration::from_secs(20)),
        "the TLS port listens"
    );
    assert_eq!(presented_certificate(tls).await, first);
    let renewed = write_certificate(&cert, &key);
    assert_ne!(renewed, first);
    within("the renewed certificate", Duration::from_secs(30), async {
        while presented_certificate(tls).await != renewed {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

/// With a CA to check the TLS port's certificate (`--root-tls-ca`), an agent connects to a
/// port whose certificate that CA signed, and refuses one it did not, before SSH starts.
#[tokio::test]
async fn a_root_tls_ca_refuses_a_port_it_did_not_sign() {
    let dir = tempfile::tempdir().expect("tempdir");
    let issued = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, issued.cert.pem()).expect("write");
    std::fs::write(&key, issued.signing_key.serialize_pem()).expect("write");
    let (rig, pki) = TlsRig::start(|_| {}).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let checked = listener.local_addr().expect("addr");
    let port = TlsPort::from_files(&cert, &key, None).expect("port");
    rig.proxy.serve_tls_port(listener, port);
    let tls = tether::transport::tls::client_config(Some(&cert)).expect("CA");
    let connect = |port: SocketAddr| {
        let mut config = pki
            .agent_config(
                &format!("tls://localhost:{}", port.port()),
                AllowList::default(),
            )
            .expect("config");
        config.route.tls = Some(tls.clone());
        tether::agent::Tunnel::connect(Arc::new(config))
    };
    let tunnel = connect(checked)
        .await
        .expect("the CA signed this port's certificate");
    assert_eq!(tunnel.carrier.to_string(), "tls-alpn");
    // The rig's own port presents a certificate it issued itself.
    let err = connect(rig.tls).await.expect_err("refused");
    let err = format!("{err:#}");
    assert!(err.contains("TLS handshake with localhost"), "{err}");
}
