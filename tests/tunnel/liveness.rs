//! Heartbeats and reconnection: a site goes offline when its agent freezes and comes back.

use std::process::Command;
use std::time::Duration;

use tether::agent::AgentEvent;
use tether::proxy::{ProxyServer, SiteStatus};

use crate::support::procs::{Files, spawn_agent};
use crate::support::*;

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {sig} {pid} failed");
}

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
    signal(agent.0.id(), "-STOP");
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
    signal(agent.0.id(), "-CONT");
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
            if let Ok(AgentEvent::Connected { proxy_id }) = rig.events.recv().await {
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
    let proxy = ProxyServer::start(pki.proxy_config("p1").expect("config"))
        .await
        .expect("proxy");
    let files = Files::write(&pki, &[]);
    tether::identity::Identity::generate_client(&pki.root, "alice", Duration::from_secs(600))
        .expect("client identity")
        .save(&files.path("alice"))
        .expect("save");
    let agent = spawn_agent(
        &files,
        proxy.local_addr(),
        &[
            "--heartbeat-interval".into(),
            "200ms".into(),
            "--allow".into(),
            format!("127.0.0.1/32:{}", echo.port()),
        ],
    );
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
    signal(agent.0.id(), "-KILL");
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
