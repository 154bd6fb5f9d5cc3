use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const TIMEOUT: Duration = Duration::from_secs(5);

fn list(rules: &[String]) -> AllowList {
    match AllowList::parse(rules) {
        Ok(list) => list,
        Err(err) => panic!("{err}"),
    }
}

/// A loopback listener that echoes one line, and its port.
async fn echo_server() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    echo_on(listener)
}

/// Echo servers on 127.0.0.1 and 127.0.0.2 with the same port, and that port.
async fn echo_pair() -> (u16, [tokio::task::JoinHandle<()>; 2]) {
    for _ in 0..20 {
        let first = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = first.local_addr().expect("local addr").port();
        if let Ok(second) = TcpListener::bind(("127.0.0.2", port)).await {
            return (port, [echo_on(first).1, echo_on(second).1]);
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

/// Echoes one read on every connection `listener` accepts.
fn echo_on(listener: TcpListener) -> (u16, tokio::task::JoinHandle<()>) {
    let port = listener.local_addr().expect("local addr").port();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                if let Ok(n) = stream.read(&mut buf).await {
                    let _ = stream.write_all(&buf[..n]).await;
                }
            });
        }
    });
    (port, task)
}

/// A loopback port with nothing listening on it.
async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("local addr").port();
    drop(listener);
    port
}

/// A resolver answering `addrs` for each of `names` and "not found" for anything else.
fn fixed(names: &[&str], addrs: &[&str]) -> Resolver {
    let names: Vec<String> = names.iter().map(|n| n.to_ascii_lowercase()).collect();
    let ips: Vec<IpAddr> = addrs.iter().map(|a| a.parse().expect("address")).collect();
    Resolver::from_fn(move |host, port| {
        if names.contains(&host.to_ascii_lowercase()) {
            Ok(ips.iter().map(|&ip| SocketAddr::new(ip, port)).collect())
        } else {
            Err(io::Error::new(io::ErrorKind::NotFound, "no such name"))
        }
    })
}

async fn expect_err_via(
    resolver: &Resolver,
    allow: &AllowList,
    host: &str,
    port: u16,
) -> DialError {
    match connect_via(resolver, allow, host, port, TIMEOUT).await {
        Ok((_, addr)) => panic!("{host}:{port} connected to {addr}"),
        Err(err) => err,
    }
}

async fn expect_err(allow: &AllowList, host: &str, port: u16) -> DialError {
    match connect(allow, host, port, TIMEOUT).await {
        Ok((_, addr)) => panic!("{host}:{port} connected to {addr}"),
        Err(err) => err,
    }
}

async fn round_trip(mut stream: TcpStream) {
    stream.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"ping");
}

#[tokio::test]
async fn connects_to_permitted_ip() {
    let (port, server) = echo_server().await;
    let allow = list(&[format!("127.0.0.1:{port}")]);
    let (stream, addr) = connect(&allow, "127.0.0.1", port, TIMEOUT)
        .await
        .expect("connect");
    assert_eq!(addr, SocketAddr::from(([127, 0, 0, 1], port)));
    assert!(stream.nodelay().expect("nodelay"));
    round_trip(stream).await;
    server.abort();
}

#[tokio::test]
async fn default_list_denies() {
    let (port, server) = echo_server().await;
    let allow = AllowList::default();
    for host in ["127.0.0.1", "localhost"] {
        let err = expect_err(&allow, host, port).await;
        assert_eq!(err.kind, DialErrorKind::Forbidden, "{err}");
    }
    server.abort();
}

#[tokio::test]
async fn ip_not_in_list_is_forbidden() {
    let allow = list(&["127.0.0.1/32:80".to_owned()]);
    let err = expect_err(&allow, "127.0.0.2", 80).await;
    assert_eq!(err.kind, DialErrorKind::Forbidden);
    assert!(
        err.message
            .starts_with("127.0.0.2:80 is not in the agent's allow-list"),
        "{err}"
    );
    // A port outside the rule's ports.
    let err = expect_err(&allow, "127.0.0.1", 81).await;
    assert_eq!(err.kind, DialErrorKind::Forbidden);
    assert!(err.message.contains("127.0.0.1:81"), "{err}");
}

#[tokio::test]
async fn never_allowed_and_mapped_addresses() {
    let tens = list(&["10.0.0.0/8:*".to_owned(), "0.0.0.0/0:*".to_owned()]);
    for host in ["0.0.0.0", "::", "[::]", "255.255.255.255", "224.0.0.1"] {
        let err = expect_err(&tens, host, 80).await;
        assert_eq!(err.kind, DialErrorKind::Forbidden, "{host}: {err}");
        assert!(err.message.contains("never dials"), "{err}");
    }
    let tens = list(&["10.0.0.0/8:*".to_owned()]);
    for host in ["::ffff:127.0.0.1", "[::ffff:127.0.0.1]"] {
        let err = expect_err(&tens, host, 80).await;
        assert_eq!(err.kind, DialErrorKind::Forbidden, "{err}");
        assert_eq!(
            err.message,
            "127.0.0.1:80 is not in the agent's allow-list \
             (loopback addresses need an address rule inside 127.0.0.0/8)"
        );
    }

    let (port, server) = echo_server().await;
    let loopback = list(&[format!("127.0.0.1/32:{port}")]);
    for host in ["::ffff:127.0.0.1", "[::ffff:127.0.0.1]"] {
        let (stream, addr) = connect(&loopback, host, port, TIMEOUT).await.expect(host);
        assert_eq!(addr, SocketAddr::from(([127, 0, 0, 1], port)));
        round_trip(stream).await;
    }
    server.abort();
}

#[tokio::test]
async fn numeric_forms_never_reach_the_resolver() {
    let allow = list(&["127.0.0.0/8:*".to_owned()]);
    for host in [
        "2130706433",
        "0177.0.0.1",
        "0x7f.0.0.1",
        "0x7f.1",
        "127.1",
        "017700000001",
        "0x7f.0.1",
        "127.000.0.1",
    ] {
        let err = expect_err(&allow, host, 80).await;
        assert_eq!(err.kind, DialErrorKind::Forbidden, "{host}: {err}");
        assert!(err.message.contains("ambiguous numeric"), "{err}");
    }
}

#[tokio::test]
async fn invalid_names_are_forbidden() {
    let allow = list(&["0.0.0.0/0:*".to_owned()]);
    for host in ["", "bad host", "127.0.0.1 x", "a..b", "fe80::1%lo"] {
        let err = expect_err(&allow, host, 80).await;
        assert_eq!(err.kind, DialErrorKind::Forbidden, "{host:?}: {err}");
    }
}

#[tokio::test]
async fn name_resolving_outside_the_list_is_forbidden() {
    let (port, server) = echo_server().await;
    let allow = list(&["10.0.0.0/8:*".to_owned()]);
    let err = expect_err(&allow, "localhost", port).await;
    assert_eq!(err.kind, DialErrorKind::Forbidden, "{err}");
    assert_eq!(
        err.message,
        format!("localhost:{port} resolves only to addresses outside the agent's allow-list")
    );
    server.abort();
}

#[tokio::test]
async fn name_whose_addresses_are_permitted_connects() {
    let (port, server) = echo_server().await;
    let allow = list(&[format!("127.0.0.1:{port}")]);
    let (stream, addr) = connect(&allow, "localhost", port, TIMEOUT)
        .await
        .expect("connect");
    assert_eq!(addr, SocketAddr::from(([127, 0, 0, 1], port)));
    round_trip(stream).await;
    server.abort();
}

#[tokio::test]
async fn host_rule_connects_to_what_the_name_resolves_to() {
    let (port, server) = echo_server().await;
    let echo = SocketAddr::from(([127, 0, 0, 1], port));
    // Loopback stands in for a pod address: an address rule for it is given too, since
    // a host rule alone never reaches loopback.
    let allow = list(&[format!("db.internal:{port}"), format!("127.0.0.1:{port}")]);
    let resolver = fixed(&["db.internal"], &["127.0.0.1"]);
    let (stream, addr) = connect_via(&resolver, &allow, "DB.Internal", port, TIMEOUT)
        .await
        .expect("connect");
    assert_eq!(addr, echo);
    assert!(stream.nodelay().expect("nodelay"));
    round_trip(stream).await;
    let other = port.wrapping_add(1).max(1);
    let err = expect_err_via(&resolver, &allow, "db.internal", other).await;
    assert_eq!(err.kind, DialErrorKind::Forbidden, "{err}");
    server.abort();
}

#[tokio::test]
async fn refused() {
    let port = closed_port().await;
    let allow = list(&[format!("127.0.0.1:{port}"), format!("localhost:{port}")]);
    for host in ["127.0.0.1", "localhost"] {
        let err = expect_err(&allow, host, port).await;
        assert_eq!(err.kind, DialErrorKind::Refused, "{err}");
        assert!(err.message.contains(&format!("{host}:{port}")), "{err}");
    }
}

#[tokio::test]
async fn unresolvable_name() {
    let allow = list(&["*.invalid:*".to_owned()]);
    let err = expect_err(&allow, "nonexistent.invalid", 80).await;
    assert_eq!(err.kind, DialErrorKind::NameNotResolved, "{err}");
    assert!(err.message.contains("nonexistent.invalid"), "{err}");
}

#[tokio::test]
async fn overall_timeout() {
    // A loopback listener that never accepts, with its accept queue filled: Linux then
    // drops further SYNs, so a connect hangs without any traffic leaving the machine.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind");
    let listener = socket.listen(0).expect("listen");
    let port = listener.local_addr().expect("local addr").port();
    let mut fillers = Vec::new();
    for _ in 0..16 {
        let attempt = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port)));
        match tokio::time::timeout(Duration::from_millis(200), attempt).await {
            Ok(Ok(stream)) => fillers.push(stream),
            Ok(Err(_)) | Err(_) => break,
        }
    }
    let allow = list(&[format!("localhost:{port}"), format!("127.0.0.1:{port}")]);
    let timeout = Duration::from_millis(300);
    let err = match connect(&allow, "localhost", port, timeout).await {
        Ok((_, addr)) => panic!("connected to {addr}"),
        Err(err) => err,
    };
    assert_eq!(err.kind, DialErrorKind::TimedOut, "{err}");
    assert!(err.message.contains(&format!("localhost:{port}")), "{err}");
    drop(listener);
}

/// The addresses a hostile DNS answer may point an allowed name at, each alone.
const RESTRICTED_ANSWERS: [&str; 8] = [
    "127.0.0.1",
    "127.8.9.10",
    "::1",
    "169.254.169.254",
    "fe80::1",
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
    "64:ff9b::7f00:1",
];

#[tokio::test]
async fn host_rule_never_reaches_restricted_answers() {
    let (port, server) = echo_server().await;
    let allow = list(&["*.svc.cluster.local:*".to_owned(), "[::/0]:*".to_owned()]);
    for answer in RESTRICTED_ANSWERS
        .into_iter()
        .chain(["0.0.0.0", "224.0.0.1"])
    {
        let resolver = fixed(&["evil.svc.cluster.local"], &[answer]);
        let err = expect_err_via(&resolver, &allow, "evil.svc.cluster.local", port).await;
        assert_eq!(err.kind, DialErrorKind::Forbidden, "{answer}: {err}");
        assert_eq!(
            err.message,
            format!(
                "evil.svc.cluster.local:{port} resolves only to addresses no host rule \
                 may reach (loopback, link-local, unspecified, broadcast or multicast); \
                 only an address rule naming them permits them"
            ),
            "{answer}"
        );
        assert!(!err.message.contains(answer), "{err}");
    }
    server.abort();
}

#[tokio::test]
async fn mixed_answers_dial_only_the_permitted_ones() {
    // Echo servers on 127.0.0.1:P and 127.0.0.2:P; 127.0.0.2 stands in for a pod address
    // an address rule permits. The name resolves to 127.0.0.1 first: a connector that
    // trusted the host rule for it would reach 127.0.0.1:P.
    let (port, servers) = echo_pair().await;
    let allow = list(&[
        format!("*.svc.cluster.local:{port}"),
        format!("127.0.0.2:{port}"),
    ]);
    let resolver = fixed(
        &["mix.svc.cluster.local"],
        &["127.0.0.1", "::1", "169.254.169.254", "127.0.0.2"],
    );
    let (stream, addr) = connect_via(&resolver, &allow, "mix.svc.cluster.local", port, TIMEOUT)
        .await
        .expect("connect");
    assert_eq!(addr, SocketAddr::from(([127, 0, 0, 2], port)));
    round_trip(stream).await;
    servers.iter().for_each(|s| s.abort());
}

#[tokio::test]
async fn address_rule_inside_the_range_permits_restricted_answers() {
    let (port, server) = echo_server().await;
    let echo = SocketAddr::from(([127, 0, 0, 1], port));
    let resolver = fixed(&["evil.svc.cluster.local"], &["127.0.0.1"]);
    for rule in [format!("127.0.0.1:{port}"), "127.0.0.0/8:*".to_owned()] {
        let allow = list(&["*.svc.cluster.local:*".to_owned(), rule.clone()]);
        let (stream, addr) =
            connect_via(&resolver, &allow, "evil.svc.cluster.local", port, TIMEOUT)
                .await
                .expect(&rule);
        assert_eq!(addr, echo, "{rule}");
        round_trip(stream).await;
    }
    // A broad network is not an address rule naming loopback.
    let broad = list(&["0.0.0.0/0:*".to_owned(), "*.svc.cluster.local:*".to_owned()]);
    let err = expect_err_via(&resolver, &broad, "evil.svc.cluster.local", port).await;
    assert_eq!(err.kind, DialErrorKind::Forbidden, "{err}");
    let err = expect_err(&broad, "127.0.0.1", port).await;
    assert_eq!(err.kind, DialErrorKind::Forbidden, "{err}");
    assert!(err.message.contains("inside 127.0.0.0/8"), "{err}");
    server.abort();
}

#[tokio::test]
async fn system_resolver_localhost_under_a_host_rule_is_refused() {
    let (port, server) = echo_server().await;
    let allow = list(&[format!("localhost:{port}"), "*.localhost:*".to_owned()]);
    let err = expect_err(&allow, "localhost", port).await;
    assert_eq!(err.kind, DialErrorKind::Forbidden, "{err}");
    assert!(err.message.contains("no host rule may reach"), "{err}");
    assert!(!err.message.contains("127.0.0.1"), "{err}");
    assert!(!err.message.contains("::1"), "{err}");
    server.abort();
}

#[test]
fn io_errors_map_to_kinds() {
    let target = Target {
        host: "db",
        port: 5432,
    };
    let addr = SocketAddr::from(([10, 0, 0, 1], 5432));
    let cases = [
        (io::ErrorKind::ConnectionRefused, DialErrorKind::Refused),
        (io::ErrorKind::TimedOut, DialErrorKind::TimedOut),
        (io::ErrorKind::HostUnreachable, DialErrorKind::Unreachable),
        (
            io::ErrorKind::NetworkUnreachable,
            DialErrorKind::Unreachable,
        ),
        (io::ErrorKind::PermissionDenied, DialErrorKind::Other),
    ];
    for (io_kind, kind) in cases {
        let err = io_error(target, addr, &io::Error::from(io_kind));
        assert_eq!(err.kind, kind);
        assert!(err.message.starts_with("db:5432: "), "{err}");
        assert!(!err.message.contains("10.0.0.1"), "{err}");
    }
    let err = io_error(
        Target {
            host: "10.0.0.1",
            port: 5432,
        },
        addr,
        &io::Error::from_raw_os_error(113),
    );
    assert_eq!(err.kind, DialErrorKind::Unreachable);
    assert!(err.message.starts_with("10.0.0.1:5432: "), "{err}");
    assert_eq!(
        Target {
            host: "::1",
            port: 22
        }
        .to_string(),
        "[::1]:22"
    );
}
