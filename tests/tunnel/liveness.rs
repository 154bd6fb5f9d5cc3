//! Heartbeats and reconnection: a site goes offline when its agent freezes and comes back.

use std::process::Command;
use std::time::Duration;

use tether::agent::AgentEvent;
use tether::proxy::{ProxyServer, SiteStatus};

use crate::support::procs::{Files, agent_flags_reaching, spawn_agent};
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_agent_goes_offline_after_the_missed_heartbeats_and_comes_back() {
    let pki = pki();
    let mut config = pki.proxy_config("p1").expect("config");
    config.heartbeat.missed = 3;
    let proxy = ProxyServer::start(config).await.expect("proxy");

    let files = Files::write(&pki, &[]);
    let agent = spawn_agent(
        &files,
        proxy.local_addr(),
        &["--heartbeat-interval".into(), "200ms".into()],
    );
    let status = |proxy: &ProxyServer| proxy.site(&leaf()).map(|s| s.status);

    wait_for("online", Duration::from_secs(20), || {
        status(&proxy) == Some(SiteStatus::Online)
    })
    .await;
    agent.signal(libc::SIGSTOP).expect("SIGSTOP");
    let frozen_at = std::time::Instant::now();
    wait_for(
        "offline after missed heartbeats",
        Duration::from_secs(10),
        || status(&proxy) == Some(SiteStatus::Offline),
    )
    .await;
    // 3 missed intervals of 200 ms after the last heartbeat, which came at most one interval
    // before the freeze: not before 400 ms.
    assert!(
        frozen_at.elapsed() >= Duration::from_millis(400),
        "offline after only {:?}",
        frozen_at.elapsed()
    );
    let info = proxy.site(&leaf()).expect("site still known");
    assert!(info.last_connected.is_some());
    agent.signal(libc::SIGCONT).expect("SIGCONT");
    wait_for("online again", Duration::from_secs(20), || {
        status(&proxy) == Some(SiteStatus::Online)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reconnects_after_the_proxy_restarts() {
    let mut rig = Rig::start(&[], |_| {}, |_| {}).await;
    rig.proxy.close();
    rig.proxy.wait().await;
    within("the agent to notice", Duration::from_secs(10), async {
        loop {
            if let Ok(AgentEvent::Disconnected { .. }) = rig.events.recv().await {
                break;
            }
        }
    })
    .await;
    let config = rig.pki.proxy_config("p1-restarted").expect("config");
    // The same port, which the rig kept bound.
    let restarted =
        ProxyServer::start_on_std(config, rig.port.try_clone().expect("clone listener"))
            .await
            .expect("restart on the same port");
    within("the agent to reconnect", Duration::from_secs(30), async {
        loop {
            if let Ok(AgentEvent::Connected { proxy_id, .. }) = rig.events.recv().await {
                assert_eq!(proxy_id, "p1-restarted");
                break;
            }
        }
    })
    .await;
    wait_for("online on the new proxy", Duration::from_secs(10), || {
        restarted
            .site(&leaf())
            .is_some_and(|s| s.status == SiteStatus::Online)
    })
    .await;
    rig.stop.cancel();
}

#[tokio::test]
async fn a_proxy_awaiting_peer_discovery_is_not_ready_until_it_knows_its_peers() {
    use tether::admin::Component;
    let pki = pki();
    let proxy = ProxyServer::start(pki.proxy_config("p1").expect("config"))
        .await
        .expect("proxy");
    assert!(proxy.shared().ready(), "static peers: ready at once");
    proxy.expect_peer_discovery();
    assert!(
        !proxy.shared().ready(),
        "peers from EndpointSlices not listed yet"
    );
    proxy.set_peers(vec![tether::proxy::Peer {
        id: "p1".into(),
        addr: Some(proxy.local_addr()),
        generation: 0,
    }]);
    assert!(proxy.shared().ready());
    proxy.close();
    assert!(
        !proxy.shared().ready(),
        "a closed (draining) proxy is not ready"
    );
}

/// `tether dial` as an ssh `ProxyCommand`: when the agent carrying its stream dies (kill -9),
/// its standard output ends within one heartbeat timeout although its standard input stays
/// open, so the ssh reading it ends the session instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_s_output_ends_when_the_agent_carrying_it_dies() {
    use std::io::{Read, Write};
    use std::process::Stdio;

    let echo = echo_server().await.expect("echo");
    let pki = pki();
    let (proxy, files, agent) = proxy_and_agent_process(&pki, echo).await;
    tether::identity::Identity::generate_client(&pki.root, "alice", Duration::from_secs(600))
        .expect("client identity")
        .save(&files.path("alice"))
        .expect("save");
    // The path is up once a dial through it succeeds (a site is Online a moment earlier).
    let target = tether::protocol::Target::parse(&format!("127.0.0.1.leaf.tether:{}", echo.port()))
        .expect("target");
    within("a dial through the agent", Duration::from_secs(20), async {
        let dialer = proxy.dialer();
        let client = "127.0.0.1:1".parse().expect("addr");
        while tether::proxy::Dialer::dial(&dialer, target.clone(), client)
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let mut dial = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["dial", "leaf", &format!("127.0.0.1:{}", echo.port())])
        .arg("--proxy")
        .arg(proxy.local_addr().to_string())
        .args(["--root-cluster", "root", "--identity"])
        .arg(files.path("alice"))
        .arg("--root-ca")
        .arg(files.path("root-ca.pub"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("tether dial starts");
    let mut input = dial.stdin.take().expect("stdin");
    let mut output = dial.stdout.take().expect("stdout");
    input.write_all(b"ping").expect("write");
    // Reads on a blocking thread: the first 4 bytes (the echo), then until end-of-file. The
    // echo is announced, so the agent dies only once the stream has carried it (killing it
    // while the dial was still pending made the test race the echo).
    let (echo_seen, echo_arrived) = tokio::sync::oneshot::channel();
    let reader = tokio::task::spawn_blocking(move || {
        let mut echoed = [0u8; 4];
        output.read_exact(&mut echoed).map(|()| echoed)?;
        let _ = echo_seen.send(());
        let mut rest = Vec::new();
        output.read_to_end(&mut rest).map(|_| echoed)
    });
    within(
        "the echo through the dial",
        Duration::from_secs(20),
        echo_arrived,
    )
    .await
    .expect("the echo came back");
    agent.signal(libc::SIGKILL).expect("SIGKILL");
    // One heartbeat timeout (3 × 200 ms) and then some; the input stays open throughout.
    let echoed = within(
        "the dial's output to end after the agent died",
        Duration::from_secs(10),
        reader,
    )
    .await
    .expect("reader")
    .expect("read");
    assert_eq!(&echoed, b"ping");
    drop(input);
    let _ = dial.kill();
    let _ = dial.wait();
}

const TOKEN: &str = "liveness-token-0123456789abcdef";

/// A proxy in this process and a real `tether agent` process (200 ms heartbeats) that may
/// reach `echo`: the path the tests below kill.
async fn proxy_and_agent_process(
    pki: &tether::demo::Pki,
    echo: std::net::SocketAddr,
) -> (ProxyServer, Files, crate::support::procs::Proc) {
    let proxy = ProxyServer::start(pki.proxy_config("p1").expect("config"))
        .await
        .expect("proxy");
    let files = Files::write(pki, &[]);
    let agent = spawn_agent(&files, proxy.local_addr(), &agent_flags_reaching(echo));
    (proxy, files, agent)
}

/// Opens a SOCKS5 stream (username/password method, the target by name) through `entry`.
async fn socks5(entry: std::net::SocketAddr, host: &str, port: u16) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(entry).await.expect("entry");
    s.write_all(&[5, 1, 2]).await.expect("greeting");
    let mut reply = [0u8; 2];
    s.read_exact(&mut reply).await.expect("method");
    assert_eq!(reply, [5, 2], "the entry wants username/password");
    let mut auth = vec![1, 5];
    auth.extend_from_slice(b"alice");
    auth.push(TOKEN.len() as u8);
    auth.extend_from_slice(TOKEN.as_bytes());
    s.write_all(&auth).await.expect("auth");
    s.read_exact(&mut reply).await.expect("auth reply");
    assert_eq!(reply, [1, 0], "the token is accepted");
    let mut request = vec![5, 1, 0, 3, host.len() as u8];
    request.extend_from_slice(host.as_bytes());
    request.extend_from_slice(&port.to_be_bytes());
    s.write_all(&request).await.expect("connect");
    let mut head = [0u8; 10];
    s.read_exact(&mut head).await.expect("connect reply");
    assert_eq!(head[1], 0, "SOCKS5 CONNECT succeeded: {head:?}");
    s
}

/// Reads until the stream ends (end of file or a reset): what a client of a dead path must see.
async fn ended<S: tokio::io::AsyncRead + Unpin>(mut stream: S) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// The clients of the client entry (HTTP CONNECT, SOCKS5, and `tether forward` in front of it)
/// each hold a stream through an agent process; `kill -9` of the agent ends every one of them
/// within one heartbeat timeout, their own sides still open (issue #13).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_entry_s_streams_end_when_the_agent_carrying_them_dies() {
    use tether::forward::{ForwardConfig, connect};
    let echo = echo_server().await.expect("echo");
    let pki = pki();
    let (proxy, _files, agent) = proxy_and_agent_process(&pki, echo).await;
    let entry = start_client_entry(&proxy, &format!("alice:{TOKEN}\n"), |_| {}).await;
    let target = tether::protocol::Target::parse(&format!("127.0.0.1.leaf.tether:{}", echo.port()))
        .expect("target");
    let config = ForwardConfig {
        entry: entry.to_string(),
        user: "alice".into(),
        token: TOKEN.into(),
        target: target.clone(),
        connect_timeout: Duration::from_secs(10),
    };
    // The path is up once a CONNECT through it succeeds.
    let mut via_connect = within(
        "a CONNECT through the agent",
        Duration::from_secs(20),
        async {
            loop {
                match connect(&config).await {
                    Ok(s) => break s,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        },
    )
    .await;
    echo_once(&mut via_connect, b"connect").await;
    let mut via_socks = socks5(entry, "127.0.0.1.leaf.tether", echo.port()).await;
    echo_once(&mut via_socks, b"socks5").await;
    let forward_port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let forward_addr = forward_port.local_addr().expect("addr");
    drop(forward_port);
    let _forward = crate::support::procs::spawn({
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether"));
        cmd.args(["forward", "--listen", &forward_addr.to_string()])
            .args(["--entry", &entry.to_string(), "--user", "alice"])
            .args(["--to", &format!("127.0.0.1.leaf.tether:{}", echo.port())])
            .env("TETHER_TOKEN", TOKEN);
        cmd
    });
    let mut via_forward = within("tether forward to listen", Duration::from_secs(20), async {
        loop {
            match tokio::net::TcpStream::connect(forward_addr).await {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    echo_once(&mut via_forward, b"forward").await;

    agent.signal(libc::SIGKILL).expect("SIGKILL");
    // One heartbeat timeout is 3 × 200 ms; the deadline leaves room for a loaded machine.
    for (name, stream) in [
        ("HTTP CONNECT", via_connect),
        ("SOCKS5", via_socks),
        ("tether forward", via_forward),
    ] {
        within(
            &format!("the {name} stream to end after the agent died"),
            Duration::from_secs(10),
            ended(stream),
        )
        .await;
    }
}
