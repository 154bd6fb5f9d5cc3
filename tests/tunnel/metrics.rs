//! `/metrics` of real `tether proxy` and `tether agent` processes, parsed as Prometheus text,
//! moves as tunnels come and go and as bytes flow.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::procs::free_addr;
use crate::support::procs::{Files, admin_get, agent_flags_reaching, spawn_agent, spawn_proxy};
use crate::support::*;

/// The value of `name` with `labels` (each `(key, value)` must match) in the `/metrics` of
/// the admin endpoint at `admin`, if present.
fn sample(admin: std::net::SocketAddr, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    find_sample(&admin_get(admin, "/metrics")?, name, labels)
}

/// The value of `name` with `labels` in Prometheus text `body`, if present.
fn find_sample(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_tunnels_dials_and_bytes() {
    let pki = pki();
    let files = Files::write(&pki, &["p1"]);
    let (listen, proxy_admin, agent_admin) = (free_addr(), free_addr(), free_addr());
    let _proxy = spawn_proxy(&files, "p1", listen, proxy_admin, &[]);
    wait_for(
        "the proxy's admin endpoint",
        Duration::from_secs(20),
        || admin_get(proxy_admin, "/healthz").is_some(),
    )
    .await;
    let tunnels =
        || sample(proxy_admin, "tether_proxy_tunnels", &[("site", "leaf")]).unwrap_or(0.0);
    assert_eq!(tunnels(), 0.0);

    let echo = echo_server().await.expect("echo");
    let mut flags = agent_flags_reaching(echo);
    flags.extend(["--admin-listen".into(), agent_admin.to_string()]);
    let agent = spawn_agent(&files, listen, &flags);
    wait_for(
        "the proxy to count the tunnel",
        Duration::from_secs(20),
        || tunnels() == 1.0,
    )
    .await;
    wait_for(
        "the agent to count its tunnel",
        Duration::from_secs(20),
        || sample(agent_admin, "tether_agent_tunnels", &[]) == Some(1.0),
    )
    .await;
    assert!(
        sample(
            agent_admin,
            "tether_agent_dials_total",
            &[("result", "connected")]
        ) >= Some(1.0)
    );
    wait_for(
        "a heartbeat round trip to be timed",
        Duration::from_secs(20),
        || sample(agent_admin, "tether_agent_heartbeat_rtt_seconds_count", &[]) >= Some(1.0),
    )
    .await;

    // One dial through the tunnel with `tether dial`.
    let key = files.path("alice");
    tether::identity::Identity::generate_client(&pki.root, "alice", Duration::from_secs(600))
        .expect("client")
        .save(&key)
        .expect("save");
    let out = tokio::task::spawn_blocking({
        let root_ca = files.path("root-ca.pub");
        let target = format!("127.0.0.1:{}", echo.port());
        move || {
            use std::io::Write;
            let mut child = Command::new(env!("CARGO_BIN_EXE_tether"))
                .args(["dial", "leaf", &target, "--root-cluster", "root", "--proxy"])
                .arg(listen.to_string())
                .arg("--identity")
                .arg(&key)
                .arg("--root-ca")
                .arg(&root_ca)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("tether dial");
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(&[7u8; 1000])
                .expect("write");
            child.wait_with_output().expect("dial ends")
        }
    })
    .await
    .expect("join");
    assert_eq!(out.stdout.len(), 1000, "the echo came back");
    assert!(
        sample(
            proxy_admin,
            "tether_proxy_dials_total",
            &[("outcome", "ok")]
        ) >= Some(1.0)
    );
    wait_for(
        "the agent to count the bytes",
        Duration::from_secs(10),
        || {
            sample(
                agent_admin,
                "tether_stream_bytes_total",
                &[("direction", "in")],
            ) >= Some(1000.0)
                && sample(
                    agent_admin,
                    "tether_stream_bytes_total",
                    &[("direction", "out")],
                ) >= Some(1000.0)
        },
    )
    .await;

    drop(agent);
    wait_for(
        "the proxy to count the tunnel gone",
        Duration::from_secs(20),
        || tunnels() == 0.0,
    )
    .await;
}

/// The value of `name` with `labels` in Prometheus text `body` (0 when absent).
fn value_in(body: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    find_sample(body, name, labels).unwrap_or(0.0)
}

/// Metrics are handles, not one static per process: two proxies in one process count apart,
/// and a proxy's `/metrics` carries proxy and stream series only (it exported every agent
/// series as zeros).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_in_one_process_count_apart() {
    use tether::admin::Component;
    let echo = echo_server().await.expect("echo");
    let rig = Rig::start(&[format!("127.0.0.1/32:{}", echo.port())], |_| {}, |_| {}).await;
    rig.wait_online().await;
    let other = tether::proxy::ProxyServer::start(rig.pki.proxy_config("proxy-2").expect("config"))
        .await
        .expect("second proxy");
    for _ in 0..3 {
        let conn = rig.dial(echo).await.expect("dial");
        let (mut stream, splice) = attach(conn, 64 * 1024);
        assert_eq!(echo_round_trip(&mut stream, b"ping").await, b"ping");
        drop(stream);
        let _ = splice.await;
    }

    let carrying = rig.proxy.shared().metrics();
    let idle = other.shared().metrics();
    assert_eq!(
        value_in(&carrying, "tether_proxy_tunnels", &[("site", "leaf")]),
        1.0,
        "{carrying}"
    );
    assert_eq!(
        value_in(&carrying, "tether_proxy_dials_total", &[("outcome", "ok")]),
        3.0,
        "{carrying}"
    );
    assert!(
        value_in(
            &carrying,
            "tether_stream_bytes_total",
            &[("direction", "out")]
        ) >= 12.0
    );
    assert_eq!(
        value_in(&idle, "tether_proxy_tunnels", &[("site", "leaf")]),
        0.0
    );
    assert_eq!(
        value_in(&idle, "tether_proxy_dials_total", &[("outcome", "ok")]),
        0.0,
        "{idle}"
    );
    for body in [&carrying, &idle] {
        assert!(
            !body.contains("tether_agent_") && !body.contains("tether_operator_"),
            "a proxy exports another component's series:\n{body}"
        );
    }
    // The agent counts its own dials served, and exports nothing of the proxies'.
    let agent = rig.agent.metrics();
    assert_eq!(
        value_in(
            &agent,
            "tether_agent_served_dials_total",
            &[("outcome", "ok")]
        ),
        3.0,
        "{agent}"
    );
    assert!(!agent.contains("tether_proxy_"), "{agent}");
    other.shutdown(Duration::from_secs(1)).await;
}
