use super::answer::{self, AnswerError, Head, parse_head};
use super::*;
use crate::transport::Route;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn url(s: &str) -> ProxyUrl {
    parse_url(s).expect("parses").0
}

#[test]
fn urls_parse_with_default_ports_and_scheme() {
    assert_eq!(
        url("http://proxy.corp:3128"),
        ProxyUrl {
            https: false,
            host: "proxy.corp".into(),
            port: 3128
        }
    );
    assert_eq!(url("proxy.corp").port, 80, "no scheme: http, as Go");
    assert_eq!(url("HTTPS://proxy.corp/").port, 443);
    assert!(url("https://proxy.corp/").https);
    let v6 = url("http://[fd00::1]:8080");
    assert_eq!((v6.host.as_str(), v6.port), ("fd00::1", 8080));
    assert_eq!(v6.to_string(), "http://[fd00::1]:8080");
}

#[test]
fn userinfo_is_percent_decoded_and_never_displayed() {
    let (parsed, info) = parse_url("http://al%40ice:p%3Ass%25w@proxy:3128").expect("parses");
    assert_eq!(info.as_deref(), Some("al@ice:p:ss%w"));
    assert_eq!(parsed.to_string(), "http://proxy:3128");
    let proxy = ForwardProxy::parse("http://alice:s3cret@proxy:3128", "HTTPS_PROXY").expect("ok");
    let shown = format!(
        "{proxy:?} {:?}",
        Route::via(Egress::via(proxy.clone(), NoProxy::default()))
    );
    assert!(
        shown.contains("alice") && !shown.contains("s3cret"),
        "{shown}"
    );
    assert_eq!(proxy.credentials().map(Credentials::user), Some("alice"));
}

#[test]
fn bad_urls_are_refused_naming_the_origin_not_the_secret() {
    for bad in [
        "socks5://proxy:1080",
        "http://proxy:0",
        "http://proxy:99999",
        "http://proxy:3128/path",
        "http://",
        "http://pro xy:1",
        "http://u:p%zz@proxy:1",
        "http://[::1:3128",
    ] {
        let err = ForwardProxy::parse(bad, "--egress-proxy")
            .expect_err(bad)
            .to_string();
        assert!(err.starts_with("--egress-proxy: "), "{err}");
        assert!(!err.contains("p%zz"), "{err}");
    }
}

#[test]
fn credentials_are_one_line_user_colon_password() {
    let c = Credentials::parse("bob:pa:ss\n", "file x").expect("ok");
    assert_eq!(c.user(), "bob");
    assert_eq!(c.header(), "Basic Ym9iOnBhOnNz");
    for bad in ["nocolon", ":pass", "a:b\nc:d", "a:b\x07"] {
        let err = Credentials::parse(bad, "file x")
            .expect_err(bad)
            .to_string();
        assert!(err.starts_with("file x: "), "{err}");
    }
}

#[test]
fn an_http_proxy_takes_no_ca_and_a_ca_must_be_pem() {
    let http = ForwardProxy::parse("http://proxy:3128", "--egress-proxy").expect("ok");
    let err = http
        .with_ca(b"", "--egress-proxy-ca")
        .expect_err("http")
        .to_string();
    assert!(err.contains("http:// proxy"), "{err}");
}

#[test]
fn env_reads_https_proxy_first_and_no_proxy() {
    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        }
    };
    let egress = Egress::from_vars(env(&[
        ("HTTPS_PROXY", "http://upper:1"),
        ("https_proxy", "http://lower:2"),
        ("NO_PROXY", "root.internal"),
    ]))
    .expect("ok");
    assert_eq!(
        egress.proxy.as_ref().map(|p| p.url().host.as_str()),
        Some("upper")
    );
    assert!(egress.proxy_for("root.internal:3024").is_none());
    assert!(egress.proxy_for("root.example:3024").is_some());
    let lower = Egress::from_vars(env(&[("HTTPS_PROXY", " "), ("https_proxy", "lower:2")]));
    assert_eq!(lower.expect("ok").proxy.map(|p| p.url().port), Some(2));
    let none = Egress::from_vars(env(&[
        ("ALL_PROXY", "http://x:1"),
        ("HTTP_PROXY", "http://y:1"),
    ]));
    assert!(
        none.expect("ok").proxy.is_none(),
        "only HTTPS_PROXY is read"
    );
    let bad = Egress::from_vars(env(&[("https_proxy", "socks5://x:1")])).expect_err("socks");
    assert!(bad.to_string().starts_with("https_proxy: "), "{bad}");
}

#[test]
fn a_head_is_partial_until_its_blank_line() {
    let full = b"HTTP/1.1 200 Connection established\r\nProxy-Agent: t\r\n\r\nSSH-2.0-x\r\n";
    for cut in 0..full.len() - 11 {
        assert_eq!(parse_head(&full[..cut]), Ok(None), "cut at {cut}");
    }
    let len = full.len() - 11;
    assert_eq!(parse_head(full), Ok(Some(Head::Established { len })));
    assert_eq!(&full[len..], b"SSH-2.0-x\r\n");
}

#[test]
fn refusals_keep_their_status_line() {
    let head = b"HTTP/1.0 407 Proxy Authentication Required\r\nContent-Length: 12\r\n\r\n";
    let Ok(Some(Head::Refused(r))) = parse_head(head) else {
        panic!("a refusal")
    };
    assert_eq!(r.code, 407);
    assert_eq!(r.status, "HTTP/1.0 407 Proxy Authentication Required");
    assert_eq!((r.len, r.body_len), (head.len(), Some(12)));
    let Ok(Some(Head::Refused(r))) = parse_head(b"HTTP/1.1 502 Bad\t\tGateway \r\n\r\n") else {
        panic!("a refusal")
    };
    assert_eq!(r.status, "HTTP/1.1 502 Bad Gateway");
}

#[test]
fn non_http_and_endless_heads_are_refused() {
    let ssh = parse_head(b"SSH-2.0-tether\r\n").expect_err("ssh");
    assert!(matches!(&ssh, AnswerError::NotHttp(s) if s.starts_with("SSH-2.0")));
    assert!(ssh.to_string().contains("names the root itself"), "{ssh}");
    assert!(matches!(parse_head(b"HTTQ"), Err(AnswerError::NotHttp(_))));
    let mut endless = b"HTTP/1.1 200 OK\r\nX-Pad: ".to_vec();
    endless.resize(answer::MAX_HEAD, b'a');
    assert_eq!(parse_head(&endless[..answer::MAX_HEAD - 1]), Ok(None));
    assert_eq!(parse_head(&endless), Err(AnswerError::TooLong));
    let many = format!("HTTP/1.1 200 OK\r\n{}\r\n", "X: y\r\n".repeat(40));
    assert!(matches!(
        parse_head(many.as_bytes()),
        Err(AnswerError::Malformed(_))
    ));
    assert!(matches!(
        parse_head(b"HTTP/1.1 abc\r\n\r\n"),
        Err(AnswerError::Malformed(_))
    ));
}

#[test]
fn excerpts_drop_tags_and_control_characters_and_stay_short() {
    let page = b"<html><head><title>Access denied</title></head>\n<body><h1>Denied</h1>\x1b[31m by policy</body>";
    assert_eq!(answer::excerpt(page), "Access denied Denied [31m by policy");
    let long = "word ".repeat(200);
    assert!(answer::excerpt(long.as_bytes()).chars().count() <= answer::EXCERPT + 1);
}

/// A one-shot "proxy" on loopback that reads the CONNECT request and writes `answer` (maybe in
/// pieces), then keeps the connection until the client is done. Returns its URL and the
/// request it read.
async fn scripted(pieces: Vec<Vec<u8>>) -> (String, tokio::task::JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("accept");
        let mut request = Vec::new();
        let mut chunk = [0u8; 1024];
        while !request.ends_with(b"\r\n\r\n") {
            let n = socket.read(&mut chunk).await.expect("read");
            assert!(n > 0, "the client closed before its request ended");
            request.extend_from_slice(&chunk[..n]);
        }
        for piece in pieces {
            socket.write_all(&piece).await.expect("write");
            socket.flush().await.expect("flush");
            tokio::task::yield_now().await;
        }
        // Keep the connection until the client closes it.
        let _ = socket.read(&mut chunk).await;
        request
    });
    (url, task)
}

#[tokio::test]
async fn bytes_after_the_200_reach_the_caller_and_credentials_are_sent() {
    let (url, server) = scripted(vec![
        b"HTTP/1.1 200 Conn".to_vec(),
        b"ection established\r\n\r\nSSH-2.0-root\r\n".to_vec(),
    ])
    .await;
    let url = url.replace("http://", "http://bob:pw@");
    let proxy = ForwardProxy::parse(&url, "test").expect("url");
    let mut opened = proxy.open("root.example:3024").await.expect("CONNECT");
    assert_eq!(
        opened.via.as_deref(),
        Some(proxy.url().to_string().as_str())
    );
    let mut got = [0u8; 14];
    opened.io.read_exact(&mut got).await.expect("leftover");
    assert_eq!(&got, b"SSH-2.0-root\r\n");
    drop(opened);
    let request = String::from_utf8(server.await.expect("server")).expect("utf8");
    assert!(
        request.starts_with("CONNECT root.example:3024 HTTP/1.1\r\n"),
        "{request}"
    );
    assert!(
        request.contains("\r\nHost: root.example:3024\r\n"),
        "{request}"
    );
    assert!(
        request.contains("\r\nProxy-Authorization: Basic Ym9iOnB3\r\n"),
        "{request}"
    );
}

#[tokio::test]
async fn read_ahead_keeps_the_bytes_for_the_next_reader() {
    let (url, _server) = scripted(vec![b"HTTP/1.1 200 OK\r\n\r\nBUSY 5\r\n".to_vec()]).await;
    let proxy = ForwardProxy::parse(&url, "test").expect("url");
    let opened = proxy.open("root:1").await.expect("CONNECT");
    let (mut opened, first) = opened.read_ahead(64).await.expect("read ahead");
    assert_eq!(first, b"BUSY 5\r\n");
    let mut again = [0u8; 8];
    opened.io.read_exact(&mut again).await.expect("again");
    assert_eq!(&again, b"BUSY 5\r\n");
}

async fn refusal(answer: &[u8], url_user: &str) -> String {
    let (url, _server) = scripted(vec![answer.to_vec()]).await;
    let url = url.replace("http://", &format!("http://{url_user}"));
    let proxy = ForwardProxy::parse(&url, "HTTPS_PROXY").expect("url");
    proxy
        .open("root:3024")
        .await
        .expect_err("refused")
        .to_string()
}

#[tokio::test]
async fn a_407_names_the_refused_user_and_where_it_came_from_not_the_password() {
    let err = refusal(
        b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"x\"\r\nContent-Length: 0\r\n\r\n",
        "alice:hunter2@",
    )
    .await;
    assert!(
        err.contains("407") && err.contains("credentials of user \"alice\""),
        "{err}"
    );
    assert!(err.contains("the user:password in HTTPS_PROXY"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
    let none = refusal(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", "").await;
    assert!(none.contains("none were given"), "{none}");
}

#[tokio::test]
async fn a_403_and_a_502_say_what_the_proxy_said() {
    let body = b"<html><body>Not allowed: port 3024</body></html>";
    let mut answer = format!(
        "HTTP/1.1 403 Forbidden\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    answer.extend_from_slice(body);
    let err = refusal(&answer, "").await;
    assert!(
        err.contains("forbids CONNECT root:3024 (HTTP/1.1 403 Forbidden: Not allowed: port 3024)"),
        "{err}"
    );
    let err = refusal(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n", "").await;
    assert!(
        err.contains("refused CONNECT root:3024: HTTP/1.1 502 Bad Gateway"),
        "{err}"
    );
}

#[tokio::test]
async fn a_proxy_that_closes_or_speaks_ssh_is_named_as_such() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (socket, _) = listener.accept().await.expect("accept");
        drop(socket);
    });
    let proxy = ForwardProxy::parse(&format!("http://{addr}"), "test").expect("url");
    let closed = proxy.open("root:1").await.expect_err("closed");
    assert!(
        matches!(
            closed,
            TransportError::ProxyClosed { .. } | TransportError::ProxyIo { .. }
        ),
        "{closed}"
    );
    let ssh = refusal(b"SSH-2.0-tether\r\n", "").await;
    assert!(
        ssh.contains("as an HTTP proxy would") && ssh.contains("SSH-2.0-tether"),
        "{ssh}"
    );
}

#[tokio::test]
async fn a_target_with_spaces_or_newlines_is_never_sent() {
    let proxy = ForwardProxy::parse("http://127.0.0.1:9", "test").expect("url");
    for bad in ["root:1\r\nX: y", "", "ro ot:1"] {
        assert!(matches!(
            proxy.open(bad).await,
            Err(TransportError::BadTarget(_))
        ));
    }
}

/// An `https://` proxy on loopback: TLS with a certificate for `localhost` (from `rcgen`), then
/// the CONNECT answered with a 200 and the root's first bytes.
async fn tls_proxy() -> (u16, String) {
    let issued = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(issued.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(vec![issued.cert.der().clone()], key)
    .expect("server config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        // One task per connection: the first client keeps its stream while the next connects.
        while let Ok((socket, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(socket).await else {
                    return;
                };
                let mut head = [0u8; 512];
                let _ = tls.read(&mut head).await;
                let _ = tls
                    .write_all(b"HTTP/1.1 200 OK\r\n\r\nSSH-2.0-root\r\n")
                    .await;
                let _ = tls.flush().await;
                let _ = tls.read(&mut head).await;
            });
        }
    });
    (port, issued.cert.pem())
}

#[tokio::test]
async fn an_https_proxy_is_checked_against_its_ca_and_tunnels() {
    let (port, ca) = tls_proxy().await;
    let url = format!("https://localhost:{port}");
    let proxy = ForwardProxy::parse(&url, "test")
        .and_then(|p| p.with_ca(ca.as_bytes(), "--egress-proxy-ca"));
    let mut opened = proxy
        .expect("proxy")
        .open("root:3024")
        .await
        .expect("CONNECT over TLS");
    let mut got = [0u8; 14];
    opened
        .io
        .read_exact(&mut got)
        .await
        .expect("the root's bytes");
    assert_eq!(&got, b"SSH-2.0-root\r\n");
    // Another CA: the handshake fails, and says it was TLS with the proxy.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let proxy = ForwardProxy::parse(&url, "test")
        .and_then(|p| p.with_ca(other.cert.pem().as_bytes(), "--egress-proxy-ca"))
        .expect("proxy");
    let err = proxy.open("root:3024").await.expect_err("untrusted");
    assert!(matches!(err, TransportError::ProxyTls { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with("TLS with the forward proxy https://localhost:"),
        "{err}"
    );
}
